"""``best_on_validation`` in a models folder: the manifest records, per category, the served model with
the best validation AUROC, and ``score`` / ``serve`` (``plan_models``) resolve the alias to it, so
each image is scored by its own category's choice under that detector's real name. No Ray (the
fixture models of ``tests/data/models_before_move`` stand in for a fit's output)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mvtec_ray.config import load_config
from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
from mvtec_ray.deploy.model_files import MANIFEST, served_models, update_manifest
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION
from mvtec_ray.storage import Storage

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "models_before_move" / "models"
FINGERPRINT = json.loads((FIXTURE / "washer" / "knn" / "model.json").read_text())["fingerprint"]
POOLED = ("knn", "lof")  # planning loads and probes each model: two keep the tests short
#: (category, detector) -> validation AUROC; the choice differs between the categories
VAL_AUROC = {("washer", "knn"): 0.70, ("washer", "lof"): 0.90, ("bottle", "knn"): 0.95, ("bottle", "lof"): 0.80}


def cell(category: str, detector: str, val_auroc: float | None = None, status: str = "ok") -> dict:
    auroc = VAL_AUROC[(category, detector)] if val_auroc is None else val_auroc
    return {"category": category, "detector": detector, "status": status, "error": "",
            "val_auroc": auroc, "val_ap": auroc}


@pytest.fixture
def models(tmp_path) -> str:
    """Two categories of two pooled models each (bottle's are washer's, relabelled), fitted."""
    target = tmp_path / "models"
    for detector in POOLED:
        shutil.copytree(FIXTURE / "washer" / detector, target / "washer" / detector)
        copy = target / "bottle" / detector
        shutil.copytree(FIXTURE / "washer" / detector, copy)
        info = json.loads((copy / "model.json").read_text())
        (copy / "model.json").write_text(json.dumps({**info, "category": "bottle"}))  # hashes cover the files only
    update_manifest(Storage(), str(target), [cell(c, d) for c, d in VAL_AUROC], FINGERPRINT)
    return str(target)


def _manifest(models: str) -> dict:
    return json.loads((Path(models) / MANIFEST).read_text())


def test_the_manifest_records_each_categorys_choice(models):
    document = _manifest(models)
    assert {c: choice["detector"] for c, choice in document[BEST_ON_VALIDATION].items()} == \
        {"washer": "lof", "bottle": "knn"}
    assert document[BEST_ON_VALIDATION]["washer"]["val_auroc"] == VAL_AUROC[("washer", "lof")]
    assert {(e["category"], e["detector"]): e["val_auroc"] for e in document["models"]} == VAL_AUROC
    assert served_models(Storage(), models).best == {"washer": "lof", "bottle": "knn"}


def test_score_and_serve_resolve_the_alias_per_category(models):
    storage, config = Storage(), load_config(None, {})
    plan = plan_models(config, storage, models, [BEST_ON_VALIDATION])
    assert plan.pairs == [("bottle", "knn"), ("washer", "lof")]
    # the scores name the real detector of each image's category
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    scored = ModelSet.from_plan(plan, storage).score(images, ["washer", "bottle"])
    assert [[s.model.detector.name for s in image] for image in scored] == [["lof"], ["knn"]]
    assert all(np.isfinite(s.score) for image in scored for s in image)


def test_the_choice_follows_refits(models):
    storage = Storage()
    # a narrower refit: washer's knn alone, now better on validation than the kept lof
    update_manifest(storage, models, [cell("washer", "knn", 0.99)], FINGERPRINT)
    assert served_models(storage, models).best == {"washer": "knn", "bottle": "knn"}
    # a failed refit of a chosen cell: it is no longer served, so no longer chosen
    update_manifest(storage, models, [cell("bottle", "knn", status="error")], FINGERPRINT)
    assert served_models(storage, models).best == {"washer": "knn", "bottle": "lof"}
    # a cell without validation metrics (a fit without synthetic anomalies) is no candidate
    update_manifest(storage, models, [cell("bottle", "lof", float("nan"))], FINGERPRINT)
    served = served_models(storage, models)
    assert served.best == {"washer": "knn"} and ("bottle", "lof") in served.pairs
    with pytest.raises(UserError, match=rf"no {BEST_ON_VALIDATION} choice recorded for categories \['bottle'\]"):
        plan_models(load_config(None, {}), storage, models, [BEST_ON_VALIDATION], ["bottle"])


def test_a_folder_without_a_recorded_choice_is_one_line(models):
    storage = Storage()
    update_manifest(storage, models, [{**cell(c, d), "val_auroc": None} for c, d in VAL_AUROC], FINGERPRINT)
    with pytest.raises(UserError, match=f"records no {BEST_ON_VALIDATION} choice") as info:
        plan_models(load_config(None, {}), storage, models, [BEST_ON_VALIDATION])
    assert "\n" not in str(info.value)
    assert served_models(storage, models).pairs == sorted(VAL_AUROC)  # named detectors are still served


def test_a_choice_of_a_model_not_served_is_refused(models):
    path = Path(models) / MANIFEST
    document = _manifest(models)
    document[BEST_ON_VALIDATION]["washer"]["detector"] = "patchcore"  # edited by hand
    path.write_text(json.dumps(document))
    with pytest.raises(ModelMismatch, match="choice of 'washer' .* is not a model the manifest serves") as info:
        served_models(Storage(), models)
    assert "\n" not in str(info.value)

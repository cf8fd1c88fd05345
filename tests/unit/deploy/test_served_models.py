"""What ``score``, ``serve`` and ``export`` load: exactly the cells the latest fit's manifest lists
with status ok, each as the version listed. A failed re-fit leaves its old model on disk but not
served; a narrower re-fit keeps the other cells; a folder without a manifest serves every model
folder with a warning; a model.json without file_sha256 is refused. No Ray (the fixture models
of ``tests/data/models_before_move`` stand in for a fit's output)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from mvtec_ray.config import load_config
from mvtec_ray.deploy.loaded_models import plan_models
from mvtec_ray.deploy.model_files import MANIFEST, load_model, served_models, update_manifest
from mvtec_ray.errors import ModelMismatch, UserError
from mvtec_ray.storage import Storage

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "models_before_move" / "models"
DETECTORS = sorted(p.name for p in (FIXTURE / "washer").iterdir())
FINGERPRINT = json.loads((FIXTURE / "washer" / "knn" / "model.json").read_text())["fingerprint"]
POOLED = ["knn", "lof"]  # planning loads and probes each model: two keep the tests short


def ok(detector: str, category: str = "washer") -> dict:
    return {"category": category, "detector": detector, "status": "ok", "error": ""}


@pytest.fixture
def models(tmp_path) -> str:
    target = tmp_path / "models"
    shutil.copytree(FIXTURE, target)
    return str(target)


@pytest.fixture
def fitted(models) -> str:
    """The folder after a full fit: its manifest lists every model as ok."""
    update_manifest(Storage(), models, [ok(d) for d in DETECTORS], FINGERPRINT)
    return models


def test_a_failed_refit_does_not_serve_the_old_model(fitted, caplog):
    storage = Storage()
    update_manifest(storage, fitted, [{**ok("knn"), "status": "error", "error": "ValueError: boom"}], FINGERPRINT)
    assert (Path(fitted) / "washer" / "knn" / "model.json").exists()  # the old model is still on disk
    served = served_models(storage, fitted)
    assert ("washer", "knn") not in served.pairs and sorted(d for _, d in served.pairs) == \
        sorted(set(DETECTORS) - {"knn"})
    assert "boom" in served.refused[("washer", "knn")]
    for detectors in (POOLED, None):  # asked for, or every detector: a detector with no served model too
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            plan = plan_models(load_config(None, {}), storage, fitted, detectors)
        assert ("washer", "knn") not in plan.pairs and ("washer", "lof") in plan.pairs
        assert any("not served" in r.getMessage() and "washer/knn" in r.getMessage() for r in caplog.records)
    with pytest.raises(ModelMismatch, match=r"washer/knn: its latest fit ended with status 'error' \(ValueError: boom\)") \
            as info:
        plan_models(load_config(None, {}), storage, fitted, ["knn"], ["washer"])  # what export asks for
    assert "\n" not in str(info.value)


def test_a_narrower_refit_keeps_the_other_cells(fitted):
    storage = Storage()
    listed = update_manifest(storage, fitted, [ok("knn")], FINGERPRINT)  # run --detectors knn
    assert sorted(e["detector"] for e in listed if e["status"] == "ok") == DETECTORS
    assert sorted(d for _, d in served_models(storage, fitted).pairs) == DETECTORS
    # a re-fit on other features: the earlier models cannot be served beside it, so they leave the manifest
    listed = update_manifest(storage, fitted, [ok("knn")], "another-fingerprint")
    assert [(e["detector"], e["status"]) for e in listed] == [("knn", "ok")]


def test_a_fit_into_a_folder_without_manifest_keeps_its_models(models):
    listed = update_manifest(Storage(), models, [ok("knn")], FINGERPRINT)
    assert sorted(e["detector"] for e in listed) == DETECTORS and {e["status"] for e in listed} == {"ok"}


def test_a_listed_model_whose_folder_is_gone_is_one_line(fitted):
    shutil.rmtree(Path(fitted) / "washer" / "lof")
    with pytest.raises(ModelMismatch, match=f"{MANIFEST} under .* lists model washer/lof, but its folder") as info:
        plan_models(load_config(None, {}), Storage(), fitted, POOLED)
    assert "\n" not in str(info.value)


def test_a_model_replaced_after_the_fit_is_refused(fitted):
    path = Path(fitted) / "washer" / "lof" / "model.json"
    info = json.loads(path.read_text())
    path.write_text(json.dumps({**info, "version": info["version"] + "-copied"}))
    with pytest.raises(ModelMismatch, match=r"model washer/lof on disk is version .*-copied, but manifest\.json lists"):
        plan_models(load_config(None, {}), Storage(), fitted, POOLED)


def test_without_a_manifest_every_folder_is_served_with_a_warning(models, caplog):
    with caplog.at_level(logging.WARNING):
        served = served_models(Storage(), models)
    assert sorted(d for _, d in served.pairs) == DETECTORS and not served.manifest
    assert [r.getMessage() for r in caplog.records if MANIFEST in r.getMessage()], caplog.text


def test_only_failed_cells_say_so(fitted):
    update_manifest(Storage(), fitted, [{**ok(d), "status": "error", "error": "MemoryError"} for d in DETECTORS],
                    FINGERPRINT)
    with pytest.raises(ModelMismatch, match="no model under .* is served: washer/autoencoder: .*MemoryError"):
        plan_models(load_config(None, {}), Storage(), fitted)


def test_a_broken_manifest_is_one_line(fitted):
    (Path(fitted) / MANIFEST).write_text("{not json")
    with pytest.raises(ModelMismatch, match="manifest.json is not valid JSON") as info:
        served_models(Storage(), fitted)
    assert "\n" not in str(info.value)


def test_a_model_json_without_file_hashes_is_refused(models):
    path = Path(models) / "washer" / "knn" / "model.json"
    info = json.loads(path.read_text())
    del info["file_sha256"]
    path.write_text(json.dumps(info))
    with pytest.raises(ModelMismatch, match=r"model washer/knn: model\.json has no file_sha256 for .*refit") as exc:
        load_model(Storage(), models, "washer", "knn")
    assert "\n" not in str(exc.value)
    assert isinstance(exc.value, UserError)

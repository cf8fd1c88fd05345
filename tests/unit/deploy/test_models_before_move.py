"""Model folders saved before the house-plan move (flat module layout) still load and score the
same: saved models persist detector names and file formats, not class paths.

``tests/data/models_before_move/`` was written by that layout's code (its ``make.py`` says how);
the images are regenerated here from the same seed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mvtec_ray.config import load_config
from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
from mvtec_ray.deploy.loaded_models import plan_models
from mvtec_ray.deploy.scorer import Scorer
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.storage import Storage

FIXTURE = Path(__file__).resolve().parents[2] / "data" / "models_before_move"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    data = tmp_path_factory.mktemp("before-move") / "data"
    generate_sample_dataset(data, categories=["washer"], seed=5,
                            spec=SampleSpec(n_train=16, n_test_good=3, n_test_defect_per_type=1, size=64))
    storage = Storage()
    plan = plan_models(load_config(None, {}), storage, str(FIXTURE / "models"))
    names = sorted(next(iter(EXPECTED.values())))
    n = len(names)
    batch = {"image_id": np.asarray(names, dtype=object),
             "uri": np.asarray([str(data / name) for name in names], dtype=object),
             "version": np.full(n, "1", dtype=object), "category": np.full(n, "washer", dtype=object),
             "split": np.full(n, "test", dtype=object), "label": np.zeros(n, np.int8),
             "defect_type": np.full(n, "", dtype=object), "mask_uri": np.full(n, "", dtype=object),
             "variants": np.full(n, "orig", dtype=object)}
    prepared = prepare_batch(batch, plan.extract, storage)
    assert (prepared["status"] == "ok").all(), prepared["error"]
    rows = Scorer(plan.selection, storage, plan.weights.state_dict, map_size=32)(
        {key: prepared[key] for key in ("image", "status", "error", "source_uri", "source_version", "category")})
    return plan, names, rows


def test_every_detector_saved_before_the_move_loads(scored):
    plan, _, _ = scored
    assert sorted(d for _, d in plan.pairs) == sorted(EXPECTED)


@pytest.mark.parametrize("detector", sorted(EXPECTED))
def test_scores_equal_the_fit_time_scores(scored, detector):
    _, names, rows = scored
    mine = np.asarray(rows["detector"]) == detector
    by_image = {Path(uri).relative_to(Path(uri).parents[3]).as_posix(): score
                for uri, score in zip(np.asarray(rows["input_uri"])[mine], np.asarray(rows["score"])[mine])}
    assert sorted(by_image) == names
    for name in names:
        assert by_image[name] == pytest.approx(EXPECTED[detector][name], rel=1e-4, abs=1e-6), name

"""Hyper-parameter search: the validation-best setting wins, and test labels are never read.

The run-level test (search.parquet, params column, report, false-alarm budget) is in
tests/unit/data/test_manifest.py, on the features of its folder run.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mvtec_ray.config import SearchConfig
from mvtec_ray.distributed.search import run_search
from mvtec_ray.fit.search import (
    choose,
    search_settings,
    validation_auroc,
    validation_view,
)

GRIDS = {"knn": {"k": [1, 4, 12]}, "lof": {"n_neighbors": [2, 6, 15]}}


def pooled_features(seed: int = 0) -> dict:
    """Normals on a curved 8-d manifold, anomalies off it: the settings rank differently."""
    rng = np.random.default_rng(seed)

    def normal(n):
        t = rng.uniform(0, 3, size=(n, 1))
        return np.hstack([np.sin(t * 2), np.cos(t * 3), t, rng.normal(0, 0.05, (n, 5))]).astype(np.float32)

    def part(X, label):
        n = len(X)
        ids = np.array([f"id{rng.integers(1e9)}" for _ in range(n)], dtype=object)
        return {"X": X, "label": np.full(n, label, np.int8), "row_id": ids, "image_id": ids,
                "defect_type": np.full(n, "good" if label == 0 else "d", dtype=object),
                "source_uri": ids, "mask_uri": np.full(n, "", dtype=object)}

    def anomalies(n):
        return normal(n) + rng.normal(0, 0.25, (n, 8)).astype(np.float32)

    return {"train": part(normal(40), 0), "val_good": part(normal(12), 0), "val_synthetic": part(anomalies(12), 1),
            "test": {**part(np.vstack([normal(10), anomalies(10)]), 0),
                     "label": np.r_[np.zeros(10), np.ones(10)].astype(np.int8)}}


class Untouchable(dict):
    def __getitem__(self, key):
        raise AssertionError("the search read the test split")

    get = __getitem__


def test_settings_start_with_the_default_and_respect_the_budget():
    search = SearchConfig(grids={"ocsvm": {"nu": [0.05, 0.1, 0.2], "gamma": ["scale", 0.01]}}, max_trials=4)
    settings = search_settings(search, "ocsvm", {"nu": 0.1})
    assert settings[0] == {"nu": 0.1} and len(settings) == 4
    assert len({json.dumps(s, sort_keys=True) for s in settings}) == 4
    assert search_settings(search, "patchcore", {}) == [{}]  # patch detectors keep their setting


def test_trials_see_no_test_split():
    pooled = pooled_features()
    pooled["test"] = Untouchable(pooled["test"])
    view = validation_view(pooled)
    assert set(view) == {"train", "val_good", "val_synthetic"}
    result = validation_auroc(view, "knn", {"k": 3})
    assert result["status"] == "ok" and 0.5 < result["val_auroc"] <= 1.0


def test_choose_takes_the_best_and_prefers_the_earlier_on_ties():
    table = pd.DataFrame({"category": "c", "detector": ["knn"] * 4, "trial": [0, 1, 2, 3],
                          "val_auroc": [0.8, 0.9, 0.9, np.nan], "status": ["ok", "ok", "ok", "error"]})
    assert list(choose(table)["chosen"]) == [False, True, False, False]
    failed = table.assign(status="error")
    assert list(choose(failed)["chosen"]) == [True, False, False, False]


@pytest.mark.parametrize("backend", ["tasks", "tune"])
def test_search_picks_the_validation_best_and_ignores_test_labels(ray_session, backend):
    ray = ray_session
    search = SearchConfig(enabled=True, grids=GRIDS, backend=backend)
    pooled = pooled_features()
    table, chosen = run_search(search, ["c"], ["knn", "lof", "padim"], {}, {"c": ray.put(pooled)})
    assert len(table) == 8 and set(table["detector"]) == {"knn", "lof"}  # default + 3 each; padim not searched
    assert (table["status"] == "ok").all() and (table["backend"] == backend).all()
    assert table["fit_seconds"].gt(0).all()
    for detector, group in table.groupby("detector"):
        expected = [validation_auroc(validation_view(pooled), detector, json.loads(p))["val_auroc"]
                    for p in group["params"]]
        np.testing.assert_allclose(group["val_auroc"], expected)
        best = group.sort_values(["val_auroc", "trial"], ascending=[False, True]).iloc[0]
        assert group["chosen"].sum() == 1 and bool(best["chosen"])
        assert chosen[("c", detector)] == json.loads(best["params"])
    assert table.groupby("detector")["val_auroc"].nunique().max() > 1  # the settings really differ somewhere

    # poisoned test split (labels flipped, features garbage): nothing about the search changes
    poisoned = dict(pooled)
    poisoned["test"] = {**pooled["test"], "label": 1 - pooled["test"]["label"],
                        "X": np.full_like(pooled["test"]["X"], np.nan)}
    again, chosen_again = run_search(search, ["c"], ["knn", "lof"], {}, {"c": ray.put(poisoned)})
    pd.testing.assert_frame_equal(table.drop(columns="fit_seconds"), again.drop(columns="fit_seconds"))
    assert chosen_again == chosen

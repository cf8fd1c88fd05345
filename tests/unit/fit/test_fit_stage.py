"""The fit stage on a small hand-built feature store (no image extraction): error cells, the full
table, thread pinning per task, and a threshold that never looks at test labels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mvtec_ray.config import EvaluationConfig, load_config
from mvtec_ray.distributed.pipeline import run_fit
from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION, validation_metrics
from mvtec_ray.fit.cell import fit_category_detector
from mvtec_ray.storage import Storage
from tests.helpers.feature_store import CATEGORIES, SIZES, write_store

ALL = ["ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder", "mahalanobis", "padim", "patchcore"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("features"))


@pytest.fixture(scope="module")
def table_with_failure(ray_session, store, tmp_path_factory):
    out = tmp_path_factory.mktemp("fit")
    # nu=5 passes our constructor but scikit-learn rejects it inside fit()
    config = load_config(None, {"out": str(out), "detectors.names": ["ocsvm", "knn", "mahalanobis"],
                                "detectors.params": {"ocsvm": {"nu": 5.0}}})
    results, scores = run_fit(store, str(out), config, Storage())
    return results, scores, out


def test_failing_fit_is_an_error_cell_and_the_run_goes_on(table_with_failure):
    results, scores, out = table_with_failure
    cells = results[results["category"] != "mean"].set_index(["detector", "category"])
    for category in CATEGORIES:
        assert cells.loc[("ocsvm", category), "status"] == "error"
        assert "nu" in cells.loc[("ocsvm", category), "error"]
        for name in ("knn", "mahalanobis"):
            assert cells.loc[(name, category), "status"] == "ok", cells.loc[(name, category), "error"]
            assert cells.loc[(name, category), "image_auroc"] > 0.8
            assert (out / "models" / category / name / "model.json").is_file()
    assert not (out / "models" / "alpha" / "ocsvm").exists()
    assert set(scores["detector"]) == {"knn", "mahalanobis"}
    mean = results[results["category"] == "mean"].set_index("detector")
    assert mean.loc["ocsvm", "status"] == "no_ok_rows" and mean.loc["knn", "status"] == "ok"


def test_table_has_every_detector_category_and_mean_rows(table_with_failure):
    results, _, _ = table_with_failure
    cells = results[results["category"] != "mean"]
    best = cells[cells["detector"] == BEST_ON_VALIDATION]
    cells = cells[cells["detector"] != BEST_ON_VALIDATION]
    # one deployable choice per category, among the cells that fitted
    assert sorted(best["category"]) == sorted(CATEGORIES)
    assert set(best["chosen_detector"]) <= {"knn", "mahalanobis"} and (best["status"] == "ok").all()
    assert len(cells) == 6
    assert set(zip(cells["detector"], cells["category"])) == {
        (d, c) for d in ("ocsvm", "knn", "mahalanobis") for c in CATEGORIES}
    mean = results[results["category"] == "mean"].set_index("detector")
    assert sorted(mean.index) == [BEST_ON_VALIDATION, "knn", "mahalanobis", "ocsvm"]
    for name in ("knn", "mahalanobis"):
        expected = cells.loc[cells["detector"] == name, "image_auroc"].mean()
        assert mean.loc[name, "image_auroc"] == pytest.approx(expected)
        assert mean.loc[name, "n_train"] == SIZES["train"] * len(CATEGORIES)


def test_each_fit_task_runs_with_cpus_per_task_threads(ray_session, store, tmp_path):
    # the same Ray workers serve both runs: a worker keeps whatever its first task left behind
    # unless the fit sets its threads itself
    seen = {}
    for cpus in (1, 2, 1):
        config = load_config(None, {"out": str(tmp_path / f"c{cpus}"), "categories": ["alpha"],
                                    "detectors.names": ["knn", "autoencoder"], "detectors.cpus_per_task": cpus,
                                    "detectors.params": {"autoencoder": {"max_epochs": 2}}})
        results, _ = run_fit(store, str(tmp_path / f"c{cpus}"), config, Storage())
        cells = results[(results["category"] != "mean") & (results["detector"] != BEST_ON_VALIDATION)]
        assert (cells["status"] == "ok").all(), cells["error"].tolist()
        seen.setdefault(cpus, []).extend(cells["threads"].tolist())
    assert seen == {1: [1] * 4, 2: [2] * 2}


@pytest.fixture(scope="module")
def patch_stores(tmp_path_factory):
    """The same store with patch maps, as written and with its test labels permuted."""
    root = tmp_path_factory.mktemp("patch-stores")
    return write_store(root / "true", patches=True), write_store(root / "shuffled", patches=True,
                                                                 shuffle_test_labels=True)


@pytest.mark.parametrize("name", ALL)
def test_threshold_and_fit_ignore_test_labels(patch_stores, name):
    """Every detector: permuting the test labels (features unchanged) changes the metrics, never the fit
    or the threshold, and the validation scores the threshold comes from are the same."""
    params = {"autoencoder": {"max_epochs": 30}}.get(name, {})
    outcomes = [fit_category_detector(fs, "alpha", name, params, EvaluationConfig(), None, Storage())
                for fs in patch_stores]
    rows = [o.row for o in outcomes]
    assert rows[0]["status"] == rows[1]["status"] == "ok", (rows[0]["error"], rows[1]["error"])
    assert rows[0]["threshold_rule"] == "val_f1_max"
    assert rows[1]["threshold"] == rows[0]["threshold"]
    scores = [o.scores.sort_values("row_id").reset_index(drop=True) for o in outcomes]
    np.testing.assert_array_equal(scores[0]["score"], scores[1]["score"])  # same fit: same scores everywhere
    # the shuffle did reach the metrics: the store really changed
    assert rows[0]["image_auroc"] > 0.8, rows[0]["image_auroc"]
    assert rows[1]["image_auroc"] < rows[0]["image_auroc"] - 0.2
    # each cell carries its validation metrics, the ones the driver would take from its scores
    own = validation_metrics(outcomes[0].scores).iloc[0]
    assert rows[0]["val_auroc"] == own["val_auroc"] and rows[0]["val_ap"] == own["val_ap"]
    assert rows[1]["val_auroc"] == rows[0]["val_auroc"]  # validation only: the test shuffle cannot move it


def test_autoencoder_never_early_stops_on_the_threshold_images(store, monkeypatch):
    """The validation images choose the threshold; the autoencoder's early stopping must use other
    images (a seeded part of the train split), or the threshold would sit on images the fit tuned on."""
    import torch

    from mvtec_ray.detectors.autoencoder import AutoencoderDetector
    seen = {}
    original_fit, original_loss = AutoencoderDetector._fit, AutoencoderDetector._loss

    def fit_spy(self, Z, Z_val):
        seen["detector"] = self
        return original_fit(self, Z, Z_val)

    def loss_spy(model, data):
        seen.setdefault("monitored", []).append(data.clone())
        return original_loss(model, data)

    monkeypatch.setattr(AutoencoderDetector, "_fit", fit_spy)
    monkeypatch.setattr(AutoencoderDetector, "_loss", staticmethod(loss_spy))
    outcome = fit_category_detector(store, "alpha", "autoencoder", {"max_epochs": 5}, EvaluationConfig(), None,
                                    Storage())
    assert outcome.row["status"] == "ok", outcome.row["error"]
    data = store.load_pooled("alpha")
    detector = seen["detector"]
    scale = lambda X: torch.from_numpy(detector._scaler.transform(detector._pre.transform(X)))  # noqa: E731
    monitored = seen["monitored"][0]
    assert all(torch.equal(m, monitored) for m in seen["monitored"])  # one fixed early-stopping set
    threshold_images = scale(np.concatenate([data["val_good"]["X"], data["val_synthetic"]["X"]]))
    train = scale(data["train"]["X"])

    def rows_in(rows, pool):
        return [bool(torch.isclose(pool, r, atol=1e-5).all(1).any()) for r in rows]
    assert not any(rows_in(monitored, threshold_images)), "early stopping saw validation images"
    assert all(rows_in(monitored, train)) and 1 <= len(monitored) < len(train)
    assert detector.fit_info_["monitor"] == f"train_holdout_{len(monitored)}"
    # the threshold was chosen on exactly the validation images' scores
    val = outcome.scores[outcome.scores["split"].isin(["val_good", "val_synthetic"])]
    assert len(val) == len(threshold_images)


def test_a_category_whose_features_cannot_be_loaded_gets_error_cells_naming_why(ray_session, tmp_path):
    store = write_store(tmp_path / "features")
    for shard in store.shard_uris("beta", "train"):  # broken after the store was opened
        Path(shard).write_bytes(b"not parquet")
    config = load_config(None, {"out": str(tmp_path / "out"), "detectors.names": ["knn", "lof", "mahalanobis"]})
    results, _ = run_fit(store, str(tmp_path / "out"), config, Storage())
    cells = results[(results["category"] != "mean") & (results["detector"] != BEST_ON_VALIDATION)]
    cells = cells.set_index(["category", "detector"])
    for name in ("knn", "lof", "mahalanobis"):
        assert cells.loc[("alpha", name), "status"] == "ok"
        beta = cells.loc[("beta", name)]
        # the loading task's own error, not Ray's wrapper around it
        assert beta["status"] == "error" and beta["error"].startswith("UserError: corrupt feature shard"), beta["error"]
        assert "/beta/train/" in beta["error"]

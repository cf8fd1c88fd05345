"""The fit stage on a small hand-built feature store (no image extraction): error cells, the full
table, thread pinning per task, and a threshold that never looks at test labels."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mvtec_ray.config import EvaluationConfig, load_config
from mvtec_ray.features import EXTRACT_META, META_COLUMNS, SUCCESS, FeatureSet, write_shards
from mvtec_ray.fitting import fit_category_detector
from mvtec_ray.pipeline import run_fit
from mvtec_ray.storage import Storage, join

CATEGORIES = ["alpha", "beta"]
DIM = 24
GRID = (4, 4, 8)  # patch maps of the store: 4x4 positions, 8 channels
ALL = ["ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder", "mahalanobis", "padim", "patchcore"]
SIZES = {"train": 40, "val_good": 8, "val_synthetic": 16, "test": 24}


def _split_rows(rng, category: str, split: str, n: int, center: np.ndarray) -> dict:
    label = np.zeros(n, np.int8)
    if split == "val_synthetic":
        label[:] = 1
    elif split == "test":
        label[n // 3:] = 1  # a third good, the rest defective
    X = center + rng.normal(0, 1, (n, DIM))
    X[label == 1, :4] += rng.uniform(2.0, 4.0, (int(label.sum()), 1))  # defects: a shift in a few channels
    P = rng.normal(0, 1, (n, *GRID))
    for i in np.flatnonzero(label):  # defects: one patch position shifted
        P[i, rng.integers(GRID[0]), rng.integers(GRID[1]), :3] += rng.uniform(4.0, 6.0)
    folder = "test" if split == "test" else "train"
    image_ids = [f"{category}/{folder}/{'defect' if y else 'good'}/{split}_{i:03d}.png" for i, y in enumerate(label)]
    return {"row_id": [f"{i}#orig" for i in image_ids], "image_id": image_ids, "split": [split] * n,
            "label": label, "defect_type": ["defect" if y else "good" for y in label], "pooled": X.astype(np.float32),
            "patches": P.astype(np.float16)}


def write_store(root, seed: int = 0, shuffle_test_labels: bool = False, patches: bool = False) -> FeatureSet:
    """A complete store as extraction leaves it; optionally the test labels permuted, features unchanged,
    and with patch maps (for the patch detectors)."""
    storage = Storage()
    out = join(str(root), "fp0")
    metadata = {"backbone": "handmade", "weights": "none", "weights_sha256": "", "pretrained": False,
                "fingerprint": "fp0", "image_size": 32, "pooled_dim": DIM,
                "patch_shape": list(GRID) if patches else None, "padim_shape": list(GRID) if patches else None,
                "patch_dim": None}
    for c, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, c])
        center = rng.uniform(0, 3, DIM)
        for split, n in SIZES.items():
            part = _split_rows(rng, category, split, n, center)
            if shuffle_test_labels and split == "test":
                order = np.random.default_rng(99).permutation(n)
                part["label"], part["defect_type"] = part["label"][order], list(np.asarray(part["defect_type"])[order])
            batch = {k: np.asarray(v, dtype=object) for k, v in part.items() if k not in ("label", "pooled", "patches")}
            if patches:  # PaDiM reads its own column: the same maps here
                batch.update(patches=part["patches"], padim=part["patches"], with_patches=np.ones(n, bool),
                             source_height=np.full(n, 32, np.int32), source_width=np.full(n, 32, np.int32))
            batch.update(label=part["label"], pooled=part["pooled"], category=np.full(n, category, dtype=object),
                         status=np.full(n, "ok", dtype=object), mask_png=np.full(n, b"", dtype=object))
            batch["source_uri"] = batch["image_id"]
            for column in META_COLUMNS:
                batch.setdefault(column, np.full(n, "", dtype=object))
            write_shards(batch, out, storage, metadata)
    storage.write_bytes(join(out, EXTRACT_META), json.dumps(metadata).encode())
    storage.write_bytes(join(out, SUCCESS), json.dumps({"rows": 0, "errors": 0}).encode())
    return FeatureSet.open(out, storage)


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
    assert len(cells) == 6
    assert set(zip(cells["detector"], cells["category"])) == {
        (d, c) for d in ("ocsvm", "knn", "mahalanobis") for c in CATEGORIES}
    mean = results[results["category"] == "mean"].set_index("detector")
    assert sorted(mean.index) == ["knn", "mahalanobis", "ocsvm"]
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
        cells = results[results["category"] != "mean"]
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


def test_autoencoder_never_early_stops_on_the_threshold_images(store, monkeypatch):
    """The validation images choose the threshold; the autoencoder's early stopping must use other
    images (a seeded part of the train split), or the threshold would sit on images the fit tuned on."""
    import torch

    from mvtec_ray.detectors.pooled import AutoencoderDetector
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

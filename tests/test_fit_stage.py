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
SIZES = {"train": 40, "val_good": 8, "val_synthetic": 16, "test": 24}


def _split_rows(rng, category: str, split: str, n: int, center: np.ndarray) -> dict:
    label = np.zeros(n, np.int8)
    if split == "val_synthetic":
        label[:] = 1
    elif split == "test":
        label[n // 3:] = 1  # a third good, the rest defective
    X = center + rng.normal(0, 1, (n, DIM))
    X[label == 1, :4] += rng.uniform(2.0, 4.0, (int(label.sum()), 1))  # defects: a shift in a few channels
    folder = "test" if split == "test" else "train"
    image_ids = [f"{category}/{folder}/{'defect' if y else 'good'}/{split}_{i:03d}.png" for i, y in enumerate(label)]
    return {"row_id": [f"{i}#orig" for i in image_ids], "image_id": image_ids, "split": [split] * n,
            "label": label, "defect_type": ["defect" if y else "good" for y in label], "pooled": X.astype(np.float32)}


def write_store(root, seed: int = 0, shuffle_test_labels: bool = False) -> FeatureSet:
    """A complete store as extraction leaves it; optionally the test labels permuted, features unchanged."""
    storage = Storage()
    out = join(str(root), "fp0")
    metadata = {"backbone": "handmade", "weights": "none", "weights_sha256": "", "pretrained": False,
                "fingerprint": "fp0", "image_size": 32, "pooled_dim": DIM, "patch_shape": None, "patch_dim": None}
    for c, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, c])
        center = rng.uniform(0, 3, DIM)
        for split, n in SIZES.items():
            part = _split_rows(rng, category, split, n, center)
            if shuffle_test_labels and split == "test":
                order = np.random.default_rng(99).permutation(n)
                part["label"], part["defect_type"] = part["label"][order], list(np.asarray(part["defect_type"])[order])
            batch = {k: np.asarray(v, dtype=object) for k, v in part.items() if k not in ("label", "pooled")}
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


def test_threshold_ignores_test_labels(store, tmp_path):
    shuffled = write_store(tmp_path / "shuffled", shuffle_test_labels=True)
    evaluation = EvaluationConfig()
    for name in ("knn", "mahalanobis", "iforest"):
        rows = [fit_category_detector(fs, "alpha", name, {}, evaluation, None, Storage()).row
                for fs in (store, shuffled)]
        assert rows[0]["status"] == rows[1]["status"] == "ok", (rows[0]["error"], rows[1]["error"])
        assert rows[0]["threshold_rule"] == "val_f1_max"
        assert rows[1]["threshold"] == rows[0]["threshold"]
        # the shuffle did reach the metrics: the store really changed
        assert rows[1]["image_auroc"] < rows[0]["image_auroc"] - 0.2

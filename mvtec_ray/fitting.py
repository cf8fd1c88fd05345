"""Fit one detector on one category, score validation and test, evaluate (pure; no Ray).

The threshold is chosen on the validation split only (held-out normals + synthetic
anomalies); test labels are used for metrics and nothing else. Detectors are fitted on the
train split alone: the validation images the threshold is chosen on are never seen by a fit
(the autoencoder early-stops on its own seeded part of the train split).
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .config import EvaluationConfig
from .detectors import build_detector, detector_class
from .evaluation import image_metrics, pixel_auroc, pro_score, threshold_for_rule
from .features import FeatureSet, PatchChunks
from .model_store import save_model
from .storage import Storage, join

log = logging.getLogger(__name__)
SCORE_COLUMNS = ["category", "detector", "split", "image_id", "row_id", "input_uri", "label", "defect_type",
                 "score", "threshold", "map_file", "mask_file"]


@dataclass
class FitOutcome:
    row: dict
    scores: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCORE_COLUMNS))


@contextmanager
def limited_threads(n: int):
    """Pin torch, BLAS/OpenMP and faiss to ``n`` threads (Ray workers keep their first setting)."""
    import torch
    from threadpoolctl import threadpool_limits
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        import faiss
        previous_faiss = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(n)
    except ImportError:
        faiss = None
    with threadpool_limits(limits=n):
        try:
            yield
        finally:
            torch.set_num_threads(previous)
            if faiss is not None:
                faiss.omp_set_num_threads(previous_faiss)


def fit_category_detector(features: FeatureSet, category: str, detector_name: str, params: dict,
                          evaluation: EvaluationConfig, out_uri: str | None, storage: Storage,
                          threads: int = 1, pooled: dict | None = None, metadata: dict | None = None) -> FitOutcome:
    """Never raises for a failing fit: the outcome row then carries status "error"."""
    metadata = metadata or features.metadata()
    row = {"category": category, "detector": detector_name, "backbone": metadata["backbone"],
           "weights": metadata["weights"], "status": "ok", "error": "",
           "params": json.dumps(params, sort_keys=True, default=str)}
    cpu_started = time.process_time()
    try:
        with limited_threads(max(1, int(threads))):
            import torch
            row["threads"] = torch.get_num_threads()  # what the fit really ran with (observable in tests)
            if detector_class(detector_name).input_kind == "patches":
                return _fit_patches(features, category, detector_name, params, evaluation, out_uri, storage,
                                    row, metadata)
            pooled = pooled if pooled is not None else features.load_pooled(category)
            return _fit_pooled(pooled, category, detector_name, params, evaluation, out_uri, storage, row, metadata)
    except Exception as exc:  # noqa: BLE001 - a failing fit is a cell in the table, not a crash
        log.warning("fit %s/%s failed: %s", category, detector_name, traceback.format_exc())
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        return FitOutcome(row)
    finally:
        # CPU time of the whole process: with 1 thread, above fit+score seconds means overhead
        row["cpu_seconds"] = time.process_time() - cpu_started


def fit_task(*args, **kwargs) -> FitOutcome:
    """:func:`fit_category_detector` as a Ray task; the row records the node it ran on.

    Defined here, not in :mod:`pipeline`: a Ray worker imports the task's module, and that one
    pulls in extraction (torchvision, Ray Data), about 2 CPU-seconds more per worker.
    """
    import ray
    outcome = fit_category_detector(*args, **kwargs)
    outcome.row["node"] = ray.get_runtime_context().get_node_id()
    return outcome


def _counts(split_sizes: dict) -> dict:
    return {"n_train": split_sizes.get("train", 0), "n_val_good": split_sizes.get("val_good", 0),
            "n_val_synthetic": split_sizes.get("val_synthetic", 0), "n_test_good": split_sizes.get("test_good", 0),
            "n_test_defect": split_sizes.get("test_defect", 0)}


def _finish(row: dict, detector, category: str, val_scores, val_labels, test: dict, test_scores,
            evaluation: EvaluationConfig, out_uri, storage, metadata, extra_rows: list[dict]) -> FitOutcome:
    threshold = threshold_for_rule(val_scores, val_labels, evaluation.threshold_rule, evaluation.normal_quantile)
    metrics = image_metrics(test["label"], test_scores, threshold)
    row.update(metrics, threshold=threshold.value, threshold_rule=threshold.rule)
    if out_uri:
        save_model(storage, join(out_uri, "models"), category, detector, threshold.value, threshold.rule, metadata)
    scores = pd.DataFrame(extra_rows, columns=SCORE_COLUMNS)
    scores["threshold"] = threshold.value
    return FitOutcome(row, scores)


def _score_rows(category, detector_name, split, part: dict, scores, map_files=None) -> list[dict]:
    return [{"category": category, "detector": detector_name, "split": split, "image_id": part["image_id"][i],
             "row_id": part["row_id"][i], "input_uri": part["source_uri"][i], "label": int(part["label"][i]),
             "defect_type": part["defect_type"][i], "score": float(scores[i]),
             "map_file": map_files[i] if map_files else "", "mask_file": part["mask_uri"][i]}
            for i in range(len(scores))]


def _fit_pooled(data: dict, category, detector_name, params, evaluation, out_uri, storage, row, metadata) -> FitOutcome:
    if "train" not in data or "test" not in data:
        raise ValueError(f"category {category} has no usable train or test features")
    detector = build_detector(detector_name, **params)
    started = time.perf_counter()
    detector.fit(data["train"]["X"])
    row["fit_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    val_parts = [data[s] for s in ("val_good", "val_synthetic") if s in data]
    val_scores = [detector.score(p["X"]) for p in val_parts]
    test_scores = detector.score(data["test"]["X"])
    row["score_seconds"] = time.perf_counter() - started
    test = data["test"]
    row.update(_counts({"train": len(data["train"]["X"]), "val_good": len(data.get("val_good", {}).get("X", [])),
                        "val_synthetic": len(data.get("val_synthetic", {}).get("X", [])),
                        "test_good": int((test["label"] == 0).sum()), "test_defect": int((test["label"] == 1).sum())}))
    rows = []
    for part, scores in zip(val_parts, val_scores):
        split = "val_good" if part is data.get("val_good") else "val_synthetic"
        rows += _score_rows(category, detector_name, split, part, scores)
    rows += _score_rows(category, detector_name, "test", test, test_scores)
    vs = np.concatenate(val_scores) if val_scores else np.zeros(0)
    vl = np.concatenate([p["label"] for p in val_parts]) if val_parts else np.zeros(0)
    return _finish(row, detector, category, vs, vl, test, test_scores, evaluation, out_uri, storage, metadata, rows)


def _fit_patches(features: FeatureSet, category, detector_name, params, evaluation, out_uri, storage, row,
                 metadata) -> FitOutcome:
    detector = build_detector(detector_name, **params)
    train = PatchChunks(features, category, "train")
    started = time.perf_counter()
    detector.fit(train)
    row["fit_seconds"] = time.perf_counter() - started
    val_good_parts = list(features.iter_patches(category, "val_good"))
    size = evaluation.pixel_eval_size
    rows, val_scores, val_labels = [], [], []
    started = time.perf_counter()
    for split, parts in (("val_good", val_good_parts), ("val_synthetic", features.iter_patches(category, "val_synthetic"))):
        for part in parts:
            scores = detector.score(part["X"])
            val_scores.append(scores)
            val_labels.append(part["label"])
            rows += _score_rows(category, detector_name, split, part, scores)
    from .images import decode_mask_png  # here, not at the top: it imports torchvision (~1 s per Ray worker)
    test_scores, test_labels, maps, masks, map_files = [], [], [], [], []
    n_train = sum(len(c) for c in train)
    for part in features.iter_patches(category, "test", with_masks=True):
        scores, part_maps = _scores_and_maps(detector, part["X"], (size, size))
        test_scores.append(scores)
        test_labels.append(part["label"])
        files = []
        for i, image_id in enumerate(part["image_id"]):
            maps.append(part_maps[i].astype(np.float32))
            png = part["mask_png"][i]
            masks.append(_resize_mask(decode_mask_png(png), size) if png else np.zeros((size, size), bool))
            files.append(_save_map(storage, out_uri, detector_name, image_id, part_maps[i]) if out_uri and evaluation.save_maps else "")
        rows += _score_rows(category, detector_name, "test", part, scores, files)
    row["score_seconds"] = time.perf_counter() - started
    if not test_scores:
        raise ValueError(f"category {category} has no usable test patch features")
    test = {"label": np.concatenate(test_labels)}
    scores_all = np.concatenate(test_scores)
    n_val_good = sum(len(p["X"]) for p in val_good_parts)
    row.update(_counts({"train": n_train, "val_good": n_val_good,
                        "val_synthetic": int(sum(len(s) for s in val_scores) - n_val_good),
                        "test_good": int((test["label"] == 0).sum()), "test_defect": int((test["label"] == 1).sum())}))
    maps_arr, masks_arr = np.stack(maps), np.stack(masks)
    if masks_arr.any():
        row["pixel_auroc"] = pixel_auroc(maps_arr, masks_arr)
        row["pixel_pro"] = pro_score(maps_arr, masks_arr)
    stats = getattr(detector, "fit_stats_", None)
    if stats:
        row["fit_peak_mb"] = float(stats.get("peak_rss_mb", stats.get("peak_mb", float("nan"))) or float("nan"))
    vs = np.concatenate(val_scores) if val_scores else np.zeros(0)
    vl = np.concatenate(val_labels) if val_labels else np.zeros(0)
    return _finish(row, detector, category, vs, vl, test, scores_all, evaluation, out_uri, storage, metadata, rows)


def _scores_and_maps(detector, X, size):
    if hasattr(detector, "score_with_maps"):
        return detector.score_with_maps(X, size)
    return detector.score(X), detector.anomaly_maps(X, size)


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127


def _save_map(storage: Storage, out_uri: str, detector_name: str, image_id: str, anomaly_map: np.ndarray) -> str:
    import io
    relative = f"maps/{detector_name}/{image_id.replace('/', '__')}.npy"
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map.astype(np.float16), allow_pickle=False)
    storage.write_bytes(join(out_uri, relative), buffer.getvalue())
    return relative

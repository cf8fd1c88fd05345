"""Fit one detector on one category, score validation and test, evaluate (pure; no Ray).

The threshold is chosen on the validation split only (held-out normals + synthetic
anomalies); test labels are used for metrics and nothing else. Detectors are fitted on the
train split alone: the validation images the threshold is chosen on are never seen by a fit
(the autoencoder early-stops on its own seeded part of the train split).
"""
from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mvtec_ray.config import EvaluationConfig, params_json
from mvtec_ray.deploy.model_files import save_model
from mvtec_ray.detectors.base import Detector
from mvtec_ray.detectors.registry import build_detector, input_kind
from mvtec_ray.errors import StorageError, StorageUnavailable
from mvtec_ray.evaluation.metrics import image_metrics
from mvtec_ray.evaluation.pixel_metrics import evaluate_pixels
from mvtec_ray.evaluation.selection import validation_metrics
from mvtec_ray.evaluation.thresholds import choose_pixel_threshold, threshold_for_rule
from mvtec_ray.features.store import FeatureSet, PatchChunks
from mvtec_ray.storage import Storage, join
from mvtec_ray.threads import limited_threads

log = logging.getLogger(__name__)
SCORE_COLUMNS = ["category", "detector", "split", "image_id", "row_id", "input_uri", "label", "defect_type",
                 "score", "threshold", "map_file", "mask_file", "pred_mask_file", "overlay_file"]
#: images scored per call at least (feature shards joined): PatchCore's list-by-list search is a
#: matrix product per list, efficient from a few thousand patch queries on (measured, 784 patches
#: per image, 37k-row bank: 6.7 / 4.1 / 3.8 ms per image at 3 / 16 / 32 images, faiss's scan 10)
SCORE_BATCH_IMAGES = 32


@dataclass
class FitOutcome:
    row: dict
    scores: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCORE_COLUMNS))


def fit_category_detector(features: FeatureSet, category: str, detector_name: str, params: dict,
                          evaluation: EvaluationConfig, out_uri: str | None, storage: Storage,
                          threads: int = 1, pooled: dict | None = None, metadata: dict | None = None,
                          configure: Callable[[Detector], None] | None = None) -> FitOutcome:
    """Never raises for a failing fit: the outcome row then carries status "error".

    ``configure`` is called on the new detector before its fit: the Ray layer injects what runs
    where (e.g. PatchCore's coreset shards as Ray tasks) without the core knowing of Ray.
    """
    metadata = metadata or features.metadata()
    row = {"category": category, "detector": detector_name, "backbone": metadata["backbone"],
           "weights": metadata["weights"], "status": "ok", "error": "",
           "params": params_json(params)}
    cpu_started = time.process_time()
    try:
        with limited_threads(max(1, int(threads))):
            import torch
            row["threads"] = torch.get_num_threads()  # what the fit really ran with (observable in tests)
            if input_kind(detector_name) == "patches":
                return _fit_patches(features, category, detector_name, params, evaluation, out_uri, storage,
                                    row, metadata, configure)
            pooled = pooled if pooled is not None else features.load_pooled(category)
            return _fit_pooled(pooled, category, detector_name, params, evaluation, out_uri, storage, row, metadata,
                               configure)
    except Exception as exc:  # noqa: BLE001 - a failing fit is a cell in the table, not a crash
        log.warning("fit %s/%s failed: %s", category, detector_name, traceback.format_exc())
        row.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        return FitOutcome(row)
    finally:
        # CPU time of the whole process: with 1 thread, above fit+score seconds means overhead
        row["cpu_seconds"] = time.process_time() - cpu_started


def return_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed arenas): once, after a stage that
    left much garbage. Not after every fit task: the next task faults the pages back in (measured:
    the 105 pooled fits of ``benchmarks/fit.py`` took 40% more CPU with a trim after each)."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


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
    # here, in parallel with the other cells, not in the driver after the last one
    validation = validation_metrics(scores)
    if len(validation) == 1:
        row.update(val_auroc=float(validation["val_auroc"].iloc[0]), val_ap=float(validation["val_ap"].iloc[0]))
    return FitOutcome(row, scores)


def _score_rows(category, detector_name, split, part: dict, scores, files: dict | None = None) -> list[dict]:
    files = files or {}
    return [{"category": category, "detector": detector_name, "split": split, "image_id": part["image_id"][i],
             "row_id": part["row_id"][i], "input_uri": part["source_uri"][i], "label": int(part["label"][i]),
             "defect_type": part["defect_type"][i], "score": float(scores[i]), "mask_file": part["mask_uri"][i],
             **{key: files[key][i] if key in files else "" for key in ("map_file", "pred_mask_file", "overlay_file")}}
            for i in range(len(scores))]


def _fit_pooled(data: dict, category, detector_name, params, evaluation, out_uri, storage, row, metadata,
                configure=None) -> FitOutcome:
    if "train" not in data or "test" not in data:
        raise ValueError(f"category {category} has no usable train or test features")
    detector = build_detector(detector_name, **params)
    if configure is not None:
        configure(detector)
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
                 metadata, configure=None) -> FitOutcome:
    from mvtec_ray.data.images import (
        decode_mask_png,  # here, not at the top: it imports torchvision (~1 s per Ray worker)
    )
    from mvtec_ray.evaluation.pixel_protocol import MaskUnreadable, PixelProtocol
    detector = build_detector(detector_name, **params)
    if configure is not None:
        configure(detector)
    column = detector.feature_column
    train = PatchChunks(features, category, "train", column)
    val_good_parts = list(features.iter_patches(category, "val_good", with_masks=True, column=column,
                                                min_images=SCORE_BATCH_IMAGES))
    started = time.perf_counter()
    detector.fit(train)
    row["fit_seconds"] = time.perf_counter() - started
    input_size = int(metadata["image_size"])
    protocol = PixelProtocol(evaluation.pixel_eval, evaluation.pixel_eval_size, input_size, metadata.get("resize_to"),
                             metadata.get("resize") or "stretch")
    square = (input_size, input_size)
    rows, val_scores, val_labels, val_maps, val_masks = [], [], [], [], []
    started = time.perf_counter()
    val_parts = (("val_good", val_good_parts),
                 ("val_synthetic", features.iter_patches(category, "val_synthetic", with_masks=True, column=column,
                                                         min_images=SCORE_BATCH_IMAGES)))
    for split, parts in val_parts:
        for part in parts:
            patch, scores = detector.patch_and_image_scores(part["X"])
            val_scores.append(scores)
            val_labels.append(part["label"])
            part_maps, part_masks = protocol.input_frame(
                detector.maps_from_patch_scores(patch, square, input_size),
                [decode_mask_png(png) if png else np.zeros(square, bool) for png in part["mask_png"]], part["source_hw"])
            val_maps += part_maps
            val_masks += part_masks
            rows += _score_rows(category, detector_name, split, part, scores)
    # the pixel threshold: from validation maps (synthetic defects' masks) alone, before any test mask is read
    pixel_threshold = (choose_pixel_threshold(val_maps, val_masks, evaluation.normal_quantile,
                                              evaluation.pixel_threshold_rule) if val_maps else None)
    normal_range = _normal_range(val_maps, val_masks)
    del val_maps, val_masks
    test_scores, test_labels, maps, truths, overlay_jobs = [], [], [], [], []
    # one unreadable mask or image is a problem of that image (named in the row), not a failed cell
    problems: list[str] = []
    left_out: set[int] = set()
    n_train = sum(len(c) for c in train)
    write = bool(out_uri and evaluation.save_maps)
    for part in features.iter_patches(category, "test", with_masks=True, column=column, min_images=SCORE_BATCH_IMAGES):
        patch, scores = detector.patch_and_image_scores(part["X"])
        test_scores.append(scores)
        test_labels.append(part["label"])
        part_truths = []
        for i in range(len(scores)):
            try:
                truth = protocol.ground_truth(storage, part["mask_uri"][i], part["mask_png"][i], part["source_hw"][i])
            except MaskUnreadable as exc:
                problems.append(f"{part['image_id'][i]} left out of the pixel metrics: {exc}")
                left_out.add(len(maps) + i)
                truth = protocol.ground_truth(storage, "", b"", part["source_hw"][i])  # the map's shape only
            part_truths.append(truth)
        square_maps = protocol.input_maps(detector, patch)  # smoothed once; only resized below
        part_maps = protocol.at_truth(square_maps, [t.shape for t in part_truths], part["source_hw"])
        files = {"map_file": [""] * len(scores), "pred_mask_file": [""] * len(scores),
                 "overlay_file": [""] * len(scores)}
        if write:
            small = protocol.at_size(square_maps, protocol.reduced_size)
            for i, image_id in enumerate(part["image_id"]):
                files["map_file"][i] = _save_map(storage, out_uri, detector_name, image_id, small[i])
                if pixel_threshold is not None:
                    files["pred_mask_file"][i] = _save_predicted_mask(storage, out_uri, detector_name, image_id,
                                                                      part_maps[i] >= pixel_threshold.value)
        if out_uri and evaluation.overlays and pixel_threshold is not None:
            from mvtec_ray.report.overlays import SUFFIXES, overlay_name
            for i, image_id in enumerate(part["image_id"]):
                if len(maps) + i in left_out:
                    continue
                files["overlay_file"][i] = overlay_name(detector_name, image_id, SUFFIXES[evaluation.overlay_format])
                overlay_jobs.append((len(maps) + i, part["source_uri"][i], files["overlay_file"][i],
                                     f"{image_id}  score {scores[i]:.4g}  (pixel threshold {pixel_threshold.value:.4g})"))
        maps += part_maps
        truths += part_truths
        rows += _score_rows(category, detector_name, "test", part, scores, files)
    if not test_scores:
        raise ValueError(f"category {category} has no usable test patch features")
    test = {"label": np.concatenate(test_labels)}
    scores_all = np.concatenate(test_scores)
    n_val_good = sum(len(p["X"]) for p in val_good_parts)
    row.update(_counts({"train": n_train, "val_good": n_val_good,
                        "val_synthetic": int(sum(len(s) for s in val_scores) - n_val_good),
                        "test_good": int((test["label"] == 0).sum()), "test_defect": int((test["label"] == 1).sum())}))
    row["pixel_eval"] = protocol.label
    if left_out:
        maps = [m for j, m in enumerate(maps) if j not in left_out]
        truths = [t for j, t in enumerate(truths) if j not in left_out]
        overlay_jobs = [(maps_index - sum(1 for j in left_out if j < maps_index), *rest)
                        for maps_index, *rest in overlay_jobs]
    if any(t.any() for t in truths):
        # pixel AUROC, PRO, F1-max (oracle: uses the test masks) and F1: one flattening, one sort
        row.update(evaluate_pixels(maps, truths, pixel_threshold.value if pixel_threshold is not None else None))
    if pixel_threshold is not None:
        row.update(pixel_threshold=pixel_threshold.value, pixel_threshold_rule=pixel_threshold.rule)
        if overlay_jobs:
            overlays_started = time.perf_counter()
            problems += _write_overlays(storage, out_uri, overlay_jobs, maps, truths, pixel_threshold.value,
                                        normal_range, input_size, metadata.get("resize_to"), evaluation.overlay_format)
            row["overlay_seconds"] = time.perf_counter() - overlays_started  # a part of score_seconds
    if problems:
        row["problems"] = "; ".join(problems[:5]) + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
    row["score_seconds"] = time.perf_counter() - started
    stats = getattr(detector, "fit_stats_", None)
    if stats:
        row["fit_peak_mb"] = float(stats.get("peak_rss_mb", stats.get("peak_mb", float("nan"))) or float("nan"))
    vs = np.concatenate(val_scores) if val_scores else np.zeros(0)
    vl = np.concatenate(val_labels) if val_labels else np.zeros(0)
    return _finish(row, detector, category, vs, vl, test, scores_all, evaluation, out_uri, storage, metadata, rows)


def _normal_range(val_maps: list[np.ndarray], val_masks: list[np.ndarray]) -> tuple[float, float]:
    """The overlays' colour range: from the median normal validation pixel to the highest pixel."""
    if not val_maps:
        return 0.0, 1.0
    values = np.concatenate([m.ravel() for m in val_maps])
    normal = values[~np.concatenate([m.ravel() for m in val_masks])]
    low = float(np.median(normal)) if normal.size else float(values.min())
    return low, float(values.max())


def _write_overlays(storage: Storage, out_uri: str, jobs: list, maps: list, truths: list, threshold: float,
                    colour_range: tuple[float, float], input_size: int, resize_to: int | None,
                    image_format: str) -> list[str]:
    """Write each overlay; return a problem per image that could not be read (its overlay is skipped)."""
    from mvtec_ray.data.images import DecodeError, decode_image
    from mvtec_ray.report.overlays import render_overlay
    problems = []
    low = colour_range[0]
    high = max(colour_range[1], max(float(maps[index].max()) for index, *_ in jobs))
    for index, source_uri, relative, caption in jobs:
        try:
            image = decode_image(storage.read_bytes(source_uri), input_size, resize_to=resize_to)
        except StorageUnavailable:
            raise
        except (DecodeError, FileNotFoundError, StorageError) as exc:  # e.g. its permissions changed since extraction
            log.warning("overlay of %s skipped: %s", source_uri, exc)
            problems.append(f"overlay of {source_uri} skipped: {exc}")
            continue
        encoded = render_overlay(image, truths[index], maps[index], threshold, low, high, caption, image_format)
        storage.write_bytes(join(out_uri, relative), encoded)
    return problems


def _save_predicted_mask(storage: Storage, out_uri: str, detector_name: str, image_id: str, mask: np.ndarray) -> str:
    from mvtec_ray.data.images import encode_mask_png
    from mvtec_ray.report.overlays import overlay_name
    relative = overlay_name(detector_name, image_id).replace("overlays/", "pred_masks/", 1)
    storage.write_bytes(join(out_uri, relative), encode_mask_png(mask))
    return relative


def _save_map(storage: Storage, out_uri: str, detector_name: str, image_id: str, anomaly_map: np.ndarray) -> str:
    import io
    relative = f"maps/{detector_name}/{image_id.replace('/', '__')}.npy"
    buffer = io.BytesIO()
    np.save(buffer, anomaly_map.astype(np.float16), allow_pickle=False)
    storage.write_bytes(join(out_uri, relative), buffer.getvalue())
    return relative

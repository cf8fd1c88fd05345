"""Batch scoring of decoded images with the loaded models, and the score / error shards it writes (pure; runs inside Ray Data actors)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mvtec_ray.config import ExtractConfig
from mvtec_ray.deploy.loaded_models import ModelSelection, ModelSet
from mvtec_ray.deploy.score_index import error_keys, input_key
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.features.store import shard_name, tensor_array
from mvtec_ray.storage import Storage, join
from mvtec_ray.threads import pin_threads

SCORE_FIELDS = ["input_uri", "input_version", "category", "detector", "score", "threshold", "is_anomaly",
                "model_version", "backbone", "weights", "scored_at"]


ERROR_FIELDS = ["input_uri", "input_version", "category", "error", "scored_at"]


class Scorer:
    """Callable class for ``map_batches``: backbone and models loaded once per actor.

    ``weights`` is the backbone's state dict (the Ray layer resolves an object reference first)."""

    def __init__(self, selection: ModelSelection, storage: Storage, weights: dict | None, map_size: int,
                 threads: int | None = None, device: str = "cpu", scored_at: float = 0.0):
        if threads:
            self._threads = pin_threads(threads)
        self.model_set = ModelSet(selection, storage, weights, device)
        self.map_size = map_size
        self.scored_at = scored_at

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score each ok image with the detectors of its ``detectors`` column (comma-separated; all
        of its category's when the column is absent or empty): only the models it lacks a score of."""
        images = batch.pop("image")
        ok = np.asarray(batch["status"]) == "ok"
        categories = np.asarray(batch["category"]).astype(str)
        wanted = None
        if "detectors" in batch:
            wanted = [str(d).split(",") if d else None for d in np.asarray(batch["detectors"])[ok]]
        scored = self.model_set.score(images[ok], categories[ok], self.map_size, wanted) if ok.any() else []
        position = np.cumsum(ok) - 1
        out = {k: [] for k in SCORE_FIELDS + ["status", "error", "map", "first"]}
        for i in range(len(ok)):
            base = {"input_uri": batch["source_uri"][i], "input_version": batch["source_version"][i],
                    "category": categories[i]}
            if not ok[i]:
                self._append(out, base, status="error", error=batch["error"][i])
                continue
            for k, (model, score, anomaly_map) in enumerate(scored[position[i]]):
                self._append(out, base, detector=model.detector.name, score=score, threshold=model.threshold,
                             is_anomaly=score >= model.threshold, model_version=model.version,
                             backbone=model.info["schema"]["backbone"], weights=model.info["weights"],
                             map=anomaly_map, first=k == 0)
        result = {k: np.asarray(v, dtype=object) for k, v in out.items() if k != "map"}
        for name, dtype in (("score", np.float64), ("threshold", np.float64), ("scored_at", np.float64),
                            ("is_anomaly", bool), ("first", bool)):
            result[name] = np.asarray(out[name], dtype=dtype)
        result["has_map"] = np.asarray([m is not None for m in out["map"]], dtype=bool)
        blank = np.zeros((self.map_size, self.map_size), np.float16)
        result["map"] = np.stack([m if m is not None else blank for m in out["map"]]) if out["map"] else \
            np.zeros((0, self.map_size, self.map_size), np.float16)
        return result

    def _append(self, out: dict, base: dict, **values) -> None:
        defaults = {"detector": "", "score": np.nan, "threshold": np.nan, "is_anomaly": False, "model_version": "",
                    "backbone": "", "weights": "", "status": "ok", "error": "", "map": None, "first": False,
                    "scored_at": self.scored_at}
        for key, value in {**defaults, **base, **values}.items():
            out[key].append(value)


def write_score_shards(batch: dict[str, np.ndarray], out_uri: str, storage: Storage,
                       recorded_errors: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Write the batch's shards; return only counts per category (nothing per image reaches the driver).

    An error whose (uri, version, error) key is in ``recorded_errors`` (the index's errors that are
    still their file's latest outcome) is counted but not written again.
    """
    status = np.asarray(batch["status"])
    ok, failed = status == "ok", status != "ok"
    bad = failed.copy()
    if recorded_errors is not None and len(recorded_errors) and failed.any():
        keys = error_keys(np.asarray(batch["input_uri"])[failed], np.asarray(batch["input_version"])[failed],
                          np.asarray(batch["error"])[failed])
        bad[np.flatnonzero(failed)[np.isin(keys, recorded_errors)]] = False
    keys = [input_key(u, v) for u, v in zip(batch["input_uri"], batch["input_version"])]
    name = shard_name([f"{k}|{d}" for k, d in zip(keys, batch["detector"])])
    if ok.any():
        columns = {f: pa.array(list(np.asarray(batch[f])[ok])) for f in SCORE_FIELDS}
        columns["anomaly_map"] = tensor_array(np.asarray(batch["map"])[ok], np.asarray(batch["has_map"])[ok])
        _write_table(storage, join(out_uri, "scores", name), pa.table(columns))
    if bad.any():
        columns = {f: pa.array([str(x) for x in np.asarray(batch[f])[bad]]) for f in ERROR_FIELDS if f != "scored_at"}
        columns["scored_at"] = pa.array(np.asarray(batch["scored_at"], dtype=np.float64)[bad])
        _write_table(storage, join(out_uri, "errors", name), pa.table(columns))
    categories = np.asarray(batch["category"]).astype(str)
    first = np.asarray(batch["first"], dtype=bool)
    names = np.unique(categories)
    return {"category": names.astype(object),
            "images": np.asarray([int((ok & first & (categories == c)).sum()) for c in names], np.int64),
            "rows": np.asarray([int((ok & (categories == c)).sum()) for c in names], np.int64),
            "errors": np.asarray([int((failed & (categories == c)).sum()) for c in names], np.int64),
            "known_errors": np.asarray([int((failed & ~bad & (categories == c)).sum()) for c in names], np.int64)}


def _write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def prepare_or_reject(batch: dict[str, np.ndarray], config: ExtractConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Decode like extraction does (same pixels, same features); listing problems become error rows.

    Only the columns the scorer reads go on, so every block has the same schema whatever
    :func:`prepare_batch` adds.
    """
    n = len(batch["uri"])
    if "detectors" not in batch:  # every model of the image's category
        batch = {**batch, "detectors": np.full(n, "", dtype=object)}
    batch = {**batch, "image_id": batch["uri"], "split": np.full(n, "score", dtype=object),
             "label": np.zeros(n, np.int8), "defect_type": np.full(n, "", dtype=object),
             "mask_uri": np.full(n, "", dtype=object), "variants": np.full(n, "orig", dtype=object)}
    rejected = np.asarray([bool(p) for p in batch["problem"]], dtype=bool)
    parts = []
    if (~rejected).any():
        good = prepare_batch({k: np.asarray(v)[~rejected] for k, v in batch.items()}, config, storage)
        parts.append({**{k: good[k] for k in _SCORER_INPUT},
                      "detectors": np.asarray(batch["detectors"], dtype=object)[~rejected]})
    if rejected.any():
        bad = np.flatnonzero(rejected)
        size = config.image_size
        parts.append({"source_uri": batch["uri"][bad], "source_version": batch["version"][bad],
                      "category": batch["category"][bad], "status": np.full(len(bad), "error", dtype=object),
                      "error": np.asarray(batch["problem"][bad], dtype=object),
                      "image": np.zeros((len(bad), size, size, 3), np.uint8),
                      "detectors": np.full(len(bad), "", dtype=object)})
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([parts[0][k], parts[1][k]]) for k in (*_SCORER_INPUT, "detectors")}


_SCORER_INPUT = ("source_uri", "source_version", "category", "status", "error", "image")

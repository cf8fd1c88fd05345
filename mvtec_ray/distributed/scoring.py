"""Score new images with fitted models: a streaming Ray Data job, incremental by content version.

images -> decode tasks -> scoring actors (backbone + every model loaded once per actor)
-> Parquet shards ``OUT/scores/part-*.parquet`` (one row per image and detector) and
``OUT/errors/part-*.parquet`` (unreadable inputs, images of categories without a model).

Driver memory does not grow with the number of images, except for two compact parts, both
O(N) by nature of an incremental job and small per image:

* the index of what is already scored: one 8-byte hash per (uri, version) read from earlier
  shards with column-only reads (10 million images = 80 MB);
* one object reference per block of :data:`BLOCK_ROWS` listed files (the listing itself goes to
  Ray's object store in chunks, a few hundred bytes per file, spillable).

Listing walks the input folder by folder, so its peak is the largest single folder. Results
never come back to the driver: the writers return per-batch counts only.
"""
from __future__ import annotations

import hashlib
import logging
import posixpath
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .catalog import IMAGE_EXTENSIONS
from .config import ExtractConfig, RunConfig
from .errors import UserError
from .extract import WRITER_CPUS, prepare_batch
from .features import shard_name, tensor_array
from .model_set import ModelSet, check_models, plan_models  # noqa: F401 - check_models: one import path
from .model_store import list_models
from .storage import Storage, join

log = logging.getLogger(__name__)
SCORE_FIELDS = ["input_uri", "input_version", "category", "detector", "score", "threshold", "is_anomaly",
                "model_version", "backbone", "weights", "scored_at"]
ERROR_FIELDS = ["input_uri", "input_version", "category", "error", "scored_at"]
LISTING_COLUMNS = ["uri", "version", "category", "problem"]
#: listed files per Ray Data input block (a decode task's share)
BLOCK_ROWS = 64
#: listed files filtered against the index at a time on the driver
LISTING_CHUNK = 4096


@dataclass
class ScoringSummary:
    out: str
    listed: int = 0
    already_scored: int = 0
    scored_images: int = 0
    score_rows: int = 0
    errors: int = 0
    #: listed files of model categories left out by ``categories`` (neither scored nor errors)
    not_selected: int = 0
    seconds: float = 0.0
    #: new images scored per category
    by_category: dict = field(default_factory=dict)

    def describe(self) -> str:
        cats = ", ".join(f"{c}: {n}" for c, n in sorted(self.by_category.items()))
        return (f"scored {self.scored_images} new images ({self.score_rows} rows) into {self.out}/scores; "
                f"{self.errors} errors into {self.out}/errors; {self.already_scored} of {self.listed} listed "
                f"were already scored; " + (f"{self.not_selected} of other categories left out; "
                                             if self.not_selected else "") +
                f"{self.seconds:.1f}s" + (f" [{cats}]" if cats else ""))


def input_key(uri: str, version: str) -> str:
    return f"{uri}@{version}"


def key_hashes(uris, versions) -> np.ndarray:
    """64-bit hashes of (uri, version) keys: 8 bytes per image instead of a Python string.

    A collision (about 3e-6 for 10 million keys) would skip one new image as already scored.
    """
    return np.fromiter((int.from_bytes(hashlib.blake2b(input_key(str(u), str(v)).encode(), digest_size=8).digest(),
                                       "little") for u, v in zip(uris, versions)), dtype=np.uint64)


# -- listing (driver, streamed in chunks) --------------------------------------
def _walk(storage: Storage, images_uri: str) -> Iterator[pafs.FileInfo]:
    """Files under ``images_uri`` one folder at a time (memory: the largest folder, not the tree)."""
    storage.check_reachable(images_uri)
    if not storage.is_dir(images_uri):
        fs, path = storage.resolve(images_uri)
        yield fs.get_file_info(path)
        return
    stack = [images_uri]
    while stack:
        folder = stack.pop()
        infos = sorted(storage.list(folder), key=lambda i: i.path)
        subfolders = []
        for info in infos:
            if info.type == pafs.FileType.Directory:
                subfolders.append(storage.uri_of(images_uri, info.path))
            elif info.type == pafs.FileType.File:
                yield info
        stack.extend(reversed(subfolders))


def iter_listing(storage: Storage, images_uri: str, categories: list[str], category: str | None,
                 chunk: int = LISTING_CHUNK) -> Iterator[pd.DataFrame]:
    """Every file under ``images_uri`` with its version, category and, when it cannot be scored, why.

    The category is ``category`` (``--category``) for every file when given; otherwise the nearest
    folder in the path that names a model's category; otherwise the first folder under
    ``images_uri``, reported as a category without a model.
    """
    _, root = storage.resolve(images_uri)
    root = root.replace("\\", "/").rstrip("/")
    known = set(categories)
    rows: list[dict] = []
    for info in _walk(storage, images_uri):
        path = info.path.replace("\\", "/")
        parts = path.split("/")
        name = parts[-1]
        folders = parts[:-1]
        relative = path[len(root) + 1:].split("/")[:-1] if path.startswith(root + "/") else []
        found = category or next((p for p in reversed(folders) if p in known), "")
        problem = ""
        if name.startswith("."):
            problem = "hidden file"
        elif posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            problem = f"not an image file (extension {posixpath.splitext(name)[1] or 'none'})"
        elif "ground_truth" in (relative or folders[-2:]):
            problem = "defect mask (ground_truth folder), not an image to score"
        elif not found and relative:
            found = relative[0]
            problem = f"no model for category {found!r} (models exist for {', '.join(categories)})"
        elif not found:
            problem = f"no category in the path and no --category (models exist for {', '.join(categories)})"
        rows.append({"uri": storage.uri_of(images_uri, info.path), "version": f"{info.size}-{info.mtime_ns or 0}",
                     "category": found, "problem": problem})
        if len(rows) >= chunk:
            yield pd.DataFrame(rows, columns=LISTING_COLUMNS)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=LISTING_COLUMNS)


def list_images(storage: Storage, images_uri: str, categories: list[str], category: str | None) -> pd.DataFrame:
    """The whole listing at once (small inputs, tests); the job itself streams :func:`iter_listing`."""
    chunks = list(iter_listing(storage, images_uri, categories, category))
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=LISTING_COLUMNS)


def scored_index(storage: Storage, out_uri: str, threads: int = 8) -> np.ndarray:
    """Sorted hashes of every (uri, version) in earlier score and error shards.

    Reads only the two key columns of each shard (ranged reads, in parallel threads); keeps 8 bytes
    per key. Error rows count as done too: a file is tried again when it changes (new version) or
    with ``rescore``.
    """
    uris = []
    for folder in ("scores", "errors"):
        base = join(out_uri, folder)
        if storage.exists(base):
            uris += [storage.uri_of(out_uri, i.path) for i in storage.iter_files(base)
                     if i.base_name.endswith(".parquet")]

    def read(uri: str) -> np.ndarray:
        fs, path = storage.resolve(uri)

        def columns() -> pa.Table:
            with fs.open_input_file(path) as handle:
                return pq.ParquetFile(handle).read(columns=["input_uri", "input_version"])
        table = storage.retry(f"cannot read {uri}", columns)
        return key_hashes(table.column("input_uri").to_pylist(), table.column("input_version").to_pylist())

    if not uris:
        return np.zeros(0, np.uint64)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(read, uris))
    return np.unique(np.concatenate(parts))


# -- the actors ------------------------------------------------------------------
class Scorer:
    """Callable class for ``map_batches``: backbone and models loaded once per actor."""

    def __init__(self, models_uri: str, pairs: list[tuple[str, str]], storage: Storage, backbone: str, weights,
                 patch_dim: int | None, map_size: int, threads: int | None = None, device: str = "cpu",
                 expect: dict | None = None, versions: dict | None = None, scored_at: float = 0.0,
                 padim_channels: int | None = None, input_size: int | None = None):
        import torch
        if threads:
            # Ray pins OMP to 1 thread in num_cpus=1 workers; set torch, faiss and BLAS explicitly
            torch.set_num_threads(threads)
            try:
                import faiss
                faiss.omp_set_num_threads(threads)
            except ImportError:
                pass
            from threadpoolctl import threadpool_limits
            self._limits = threadpool_limits(limits=threads)
        if hasattr(weights, "hex") and not isinstance(weights, (str, bytes)):
            import ray
            weights = ray.get(weights)
        self.model_set = ModelSet(models_uri, pairs, storage, backbone, weights, patch_dim, device=device,
                                  expect=expect, versions=versions, padim_channels=padim_channels,
                                  input_size=input_size)
        self.map_size = map_size
        self.input_size = input_size
        self.scored_at = scored_at

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray(batch["status"]) == "ok"
        categories = np.asarray(batch["category"]).astype(str)
        scored = self.model_set.score(images[ok], categories[ok], self.map_size) if ok.any() else []
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


class ScoringWorker:
    """Decode, score and write in one long-lived actor: the CPU path (see extract.ExtractionWorker)."""

    def __init__(self, config: ExtractConfig, storage: Storage, out_uri: str, **scorer_kwargs):
        self.config, self.storage, self.out_uri = config, storage, out_uri
        self.scorer = Scorer(storage=storage, **scorer_kwargs)

    def __call__(self, listing: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = _prepare_or_reject(listing, self.config, self.storage)
        return write_score_shards(self.scorer(prepared), self.out_uri, self.storage)


def write_score_shards(batch: dict[str, np.ndarray], out_uri: str, storage: Storage) -> dict[str, np.ndarray]:
    """Write the batch's shards; return only counts per category (nothing per image reaches the driver)."""
    status = np.asarray(batch["status"])
    ok, bad = status == "ok", status != "ok"
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
            "errors": np.asarray([int((bad & (categories == c)).sum()) for c in names], np.int64)}


def _write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


# -- the job -------------------------------------------------------------------------
def run_scoring(config: RunConfig, models_uri: str, images_uri: str, category: str | None = None,
                rescore: bool = False, detectors: list[str] | None = None) -> ScoringSummary:
    """Score every image under ``images_uri`` not scored before (by uri and size-mtime version).

    ``category`` applies to every image; without it the category comes from each path.
    ``config.categories`` (``--categories``) keeps only those categories' models, and leaves the
    files of other model categories out of the job (counted in the summary, not recorded as errors,
    so a later job for those categories still scores them). ``rescore``
    scores everything again; an image then has rows from several runs: the latest ``scored_at`` wins.
    Models are checked before any work (:func:`~mvtec_ray.model_set.plan_models`) and refused with
    :class:`ModelMismatch`.
    """
    import ray

    from .extract import cluster_plan
    from .pipeline import connect
    started = time.perf_counter()
    scored_at = time.time()
    storage = Storage(config.s3)
    out_uri = config.out
    # every category with a model names files in the listing; only the selected ones are scored
    categories = sorted({c for c, _ in list_models(storage, models_uri)})
    if category and categories and category not in categories:
        raise UserError(f"no model for category {category!r}; models exist for {', '.join(categories)}")
    if category and config.categories and category not in config.categories:
        raise UserError(f"--category {category!r} is not among --categories {', '.join(config.categories)}")
    plan = plan_models(config, storage, models_uri, detectors, categories=config.categories)
    pairs, schema, weights, extract_cfg = plan.pairs, plan.schema, plan.weights, plan.extract
    selected, expect, versions = plan.categories, plan.expect, plan.versions

    summary = ScoringSummary(out_uri)
    done = np.zeros(0, np.uint64) if rescore else scored_index(storage, out_uri)
    connect(config.ray)
    blocks = []
    others = set(categories) - set(selected)
    for chunk in iter_listing(storage, images_uri, categories, category):
        summary.listed += len(chunk)
        if others:
            left_out = chunk["category"].isin(others).to_numpy()
            summary.not_selected += int(left_out.sum())
            chunk = chunk[~left_out].reset_index(drop=True)
        if len(done):
            fresh = ~np.isin(key_hashes(chunk["uri"], chunk["version"]), done)
            summary.already_scored += int((~fresh).sum())
            chunk = chunk[fresh].reset_index(drop=True)
        for i in range(0, len(chunk), BLOCK_ROWS):
            blocks.append(ray.put(chunk.iloc[i:i + BLOCK_ROWS].reset_index(drop=True)))
    del done
    if not blocks:
        summary.seconds = time.perf_counter() - started
        return summary

    resources = cluster_plan(extract_cfg)
    # an actor per block at most: one that could get no input only costs its start (and Ray Data warns)
    actors = max(1, min(resources["actors"], len(blocks)))
    scorer_kwargs = {"models_uri": models_uri, "pairs": pairs, "backbone": schema["backbone"],
                     "weights": ray.put(weights.state_dict), "patch_dim": schema.get("patch_dim"),
                     "padim_channels": extract_cfg.padim_channels, "input_size": extract_cfg.image_size,
                     "map_size": config.evaluation.pixel_eval_size, "threads": resources["threads"],
                     "device": resources["device"], "expect": expect, "versions": versions, "scored_at": scored_at}
    from .pipeline import use_ray_data
    use_ray_data()
    ds = ray.data.from_pandas_refs(blocks)
    if resources["fused"]:
        ds = ds.map_batches(ScoringWorker, batch_size=extract_cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"config": extract_cfg, "storage": storage, "out_uri": out_uri,
                                                   **scorer_kwargs},
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=resources["num_cpus"], resources=resources.get("resources") or None)
    else:
        ds = ds.map_batches(_prepare_or_reject, fn_kwargs={"config": extract_cfg, "storage": storage},
                            batch_size=8, batch_format="numpy", num_cpus=extract_cfg.cpus_per_reader)
        ds = ds.map_batches(Scorer, batch_size=extract_cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"storage": storage, **scorer_kwargs},
                            compute=ray.data.ActorPoolStrategy(size=actors),
                            num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
                            resources=resources.get("resources") or None)
        ds = ds.map_batches(write_score_shards, fn_kwargs={"out_uri": out_uri, "storage": storage},
                            batch_size=None, batch_format="numpy", num_cpus=WRITER_CPUS)
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for c, images, rows, errors in zip(part["category"], part["images"], part["rows"], part["errors"]):
            summary.scored_images += int(images)
            summary.score_rows += int(rows)
            summary.errors += int(errors)
            if images:
                summary.by_category[str(c)] = summary.by_category.get(str(c), 0) + int(images)
    summary.seconds = time.perf_counter() - started
    return summary


def _prepare_or_reject(batch: dict[str, np.ndarray], config: ExtractConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Decode like extraction does (same pixels, same features); listing problems become error rows.

    Only the columns the scorer reads go on, so every block has the same schema whatever
    :func:`prepare_batch` adds.
    """
    n = len(batch["uri"])
    batch = {**batch, "image_id": batch["uri"], "split": np.full(n, "score", dtype=object),
             "label": np.zeros(n, np.int8), "defect_type": np.full(n, "", dtype=object),
             "mask_uri": np.full(n, "", dtype=object), "variants": np.full(n, "orig", dtype=object)}
    rejected = np.asarray([bool(p) for p in batch["problem"]], dtype=bool)
    parts = []
    if (~rejected).any():
        good = prepare_batch({k: np.asarray(v)[~rejected] for k, v in batch.items()}, config, storage)
        parts.append({k: good[k] for k in _SCORER_INPUT})
    if rejected.any():
        bad = np.flatnonzero(rejected)
        size = config.image_size
        parts.append({"source_uri": batch["uri"][bad], "source_version": batch["version"][bad],
                      "category": batch["category"][bad], "status": np.full(len(bad), "error", dtype=object),
                      "error": np.asarray(batch["problem"][bad], dtype=object),
                      "image": np.zeros((len(bad), size, size, 3), np.uint8)})
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([parts[0][k], parts[1][k]]) for k in _SCORER_INPUT}


_SCORER_INPUT = ("source_uri", "source_version", "category", "status", "error", "image")

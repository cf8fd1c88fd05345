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

from .backbones import BACKBONES, RANDOM_WEIGHTS_ID, FeatureExtractor, embed_images, prepare_for_device, resolve_weights
from .catalog import IMAGE_EXTENSIONS
from .config import ExtractConfig, RunConfig
from .errors import ModelMismatch, UserError
from .extract import WRITER_CPUS, prepare_batch
from .features import shard_name, tensor_array
from .model_store import SCHEMA_KEYS, check_schema, list_models, load_model, read_model_info
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
        self.extractor = prepare_for_device(FeatureExtractor(BACKBONES[backbone], weights, patch_dim, padim_channels),
                                            device)
        self.models: dict[str, list] = {}
        for category, name in pairs:
            model = load_model(storage, models_uri, category, name, expect=expect)
            if versions and versions.get(f"{category}/{name}") not in (None, model.version):
                raise ModelMismatch(f"model {category}/{name} was replaced while the scoring job started; run again")
            self.models.setdefault(category, []).append(model)
        columns = {m.detector.feature_column for ms in self.models.values() for m in ms}
        self.need_patches, self.need_padim = "patches" in columns, "padim" in columns
        self.map_size = map_size
        self.input_size = input_size
        self.scored_at = scored_at

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray(batch["status"]) == "ok"
        categories = np.asarray(batch["category"]).astype(str)
        features = {}
        if ok.any():
            features["pooled"], features["patches"], features["padim"] = embed_images(
                self.extractor, images[ok], self.need_patches, self.need_padim)
        # one detector call per (category, model) for the whole batch, not per image
        position = np.cumsum(ok) - 1
        per_row: dict[int, list] = {}
        for category in np.unique(categories[ok]):
            rows = np.flatnonzero(ok & (categories == category))
            for model in self.models[category]:
                scores, maps = self._score(model, features, position[rows])
                for j, r in enumerate(rows):
                    per_row.setdefault(int(r), []).append((model, float(scores[j]),
                                                           None if maps is None else maps[j]))
        out = {k: [] for k in SCORE_FIELDS + ["status", "error", "map", "first"]}
        for i in range(len(ok)):
            base = {"input_uri": batch["source_uri"][i], "input_version": batch["source_version"][i],
                    "category": categories[i]}
            if not ok[i]:
                self._append(out, base, status="error", error=batch["error"][i])
                continue
            for k, (model, score, anomaly_map) in enumerate(per_row[i]):
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

    def _score(self, model, features: dict, index):
        detector = model.detector
        X = features[detector.feature_column][index]
        if detector.input_kind != "patches":
            return detector.score(X), None
        size = (self.map_size, self.map_size)
        if hasattr(detector, "score_with_maps"):
            scores, maps = detector.score_with_maps(X, size, self.input_size)
        else:
            scores, maps = detector.score(X), detector.anomaly_maps(X, size)
        return scores, maps.astype(np.float16)

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
def check_models(storage: Storage, models_uri: str, pairs: list[tuple[str, str]], config: RunConfig) -> dict:
    """Refuse models that do not fit each other or what the caller asked for; return the shared schema.

    Every model must share one feature schema. Settings given explicitly in ``config.extract``
    (backbone, image_size, patch_dim) must equal the models'.
    """
    infos = {(c, d): read_model_info(storage, models_uri, c, d) for c, d in pairs}
    (c0, d0), reference = next(iter(infos.items()))
    schema = reference["schema"]
    for (c, d), info in infos.items():
        for key in SCHEMA_KEYS:
            if info["schema"].get(key) != schema.get(key):
                raise ModelMismatch(f"models under {models_uri} were fitted on different features ({c}/{d}: "
                                    f"{key}={info['schema'].get(key)!r}, {c0}/{d0}: {key}={schema.get(key)!r}); "
                                    f"score them separately")
    requested = {k: getattr(config.extract, k) for k in ("backbone", "image_size", "patch_dim")
                 if k in config.extract.model_fields_set}
    if requested:
        check_schema(reference, requested, f"{c0}/{d0}")
    return {"schema": schema, "weights": reference["weights"]}


def run_scoring(config: RunConfig, models_uri: str, images_uri: str, category: str | None = None,
                rescore: bool = False, detectors: list[str] | None = None) -> ScoringSummary:
    """Score every image under ``images_uri`` not scored before (by uri and size-mtime version).

    ``category`` applies to every image; without it the category comes from each path.
    ``config.categories`` (``--categories``) keeps only those categories' models, and leaves the
    files of other model categories out of the job (counted in the summary, not recorded as errors,
    so a later job for those categories still scores them). ``rescore``
    scores everything again; an image then has rows from several runs: the latest ``scored_at`` wins.
    Models are checked before any work (:func:`check_models`, then :func:`load_model` with the
    features' actual shapes and a probe) and refused with :class:`ModelMismatch`.
    """
    import ray

    from .extract import cluster_plan, probe_feature_shapes
    from .pipeline import connect
    started = time.perf_counter()
    scored_at = time.time()
    storage = Storage(config.s3)
    out_uri = config.out
    pairs = list_models(storage, models_uri)
    if not pairs:
        raise UserError(f"no fitted models under {models_uri} (run 'mvtec-ray fit' or 'run' first)")
    wanted = detectors or sorted({d for _, d in pairs})
    pairs = [(c, d) for c, d in pairs if d in wanted]
    if not pairs:
        raise UserError(f"none of the detectors {wanted} has a fitted model under {models_uri}")
    categories = sorted({c for c, _ in pairs})
    if category and category not in categories:
        raise UserError(f"no model for category {category!r}; models exist for {', '.join(categories)}")
    selected = categories
    if config.categories:
        unknown = sorted(set(config.categories) - set(categories))
        if unknown:
            raise UserError(f"no model for categories {unknown}; models exist for {', '.join(categories)}")
        if category and category not in config.categories:
            raise UserError(f"--category {category!r} is not among --categories {', '.join(config.categories)}")
        selected = sorted(config.categories)
        pairs = [(c, d) for c, d in pairs if c in selected]
    shared = check_models(storage, models_uri, pairs, config)
    schema = shared["schema"]
    if "weights" in config.extract.model_fields_set:
        weights_arg = config.extract.weights  # e.g. the same file at another path on this machine
    elif shared["weights"] == RANDOM_WEIGHTS_ID:
        weights_arg = "random"
    else:
        kind, _, rest = str(shared["weights"]).partition(":")
        weights_arg = "imagenet" if kind == "imagenet" else rest
    weights = resolve_weights(schema["backbone"], weights_arg, storage)
    if weights.sha256 != schema["weights_sha256"]:
        raise ModelMismatch(f"backbone weights differ from the ones the models were fitted with "
                            f"(sha256 {weights.sha256[:12]} != {str(schema['weights_sha256'])[:12]})")
    padim_shape = schema.get("padim_shape")
    extract_cfg = config.extract.model_copy(update={
        "backbone": schema["backbone"], "image_size": schema["image_size"], "patch_dim": schema.get("patch_dim"),
        "resize_to": schema.get("resize_to"), "padim_channels": int(padim_shape[-1]) if padim_shape else 0,
        "holdout_fraction": 0.0, "synthetic_per_image": 0, "augment_copies": 0})
    # the features this job will compute, measured: a model.json edited to claim otherwise is refused
    expect = {"backbone": weights.backbone, "weights_sha256": weights.sha256, "image_size": extract_cfg.image_size,
              "patch_dim": extract_cfg.patch_dim, "resize_to": extract_cfg.resize_to,
              **probe_feature_shapes(extract_cfg, weights)}
    versions = {}
    for c, d in pairs:  # one at a time: the driver never holds every model
        versions[f"{c}/{d}"] = load_model(storage, models_uri, c, d, expect=expect, probe=True).version

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
    scorer_kwargs = {"models_uri": models_uri, "pairs": pairs, "backbone": schema["backbone"],
                     "weights": ray.put(weights.state_dict), "patch_dim": schema.get("patch_dim"),
                     "padim_channels": extract_cfg.padim_channels, "input_size": extract_cfg.image_size,
                     "map_size": config.evaluation.pixel_eval_size, "threads": resources["threads"],
                     "device": resources["device"], "expect": expect, "versions": versions, "scored_at": scored_at}
    ds = ray.data.from_pandas_refs(blocks)
    if resources["fused"]:
        ds = ds.map_batches(ScoringWorker, batch_size=extract_cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"config": extract_cfg, "storage": storage, "out_uri": out_uri,
                                                   **scorer_kwargs},
                            compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
                            num_cpus=resources["num_cpus"], resources=resources.get("resources") or None)
    else:
        ds = ds.map_batches(_prepare_or_reject, fn_kwargs={"config": extract_cfg, "storage": storage},
                            batch_size=8, batch_format="numpy", num_cpus=extract_cfg.cpus_per_reader)
        ds = ds.map_batches(Scorer, batch_size=extract_cfg.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"storage": storage, **scorer_kwargs},
                            compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
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

"""Extraction: catalog -> work plan -> Ray Data (decode tasks -> extractor actors -> shard writers).

The pure parts (:func:`plan_work`, :func:`prepare_batch`, :class:`Extractor`) need no Ray; the
Ray Data wiring is :func:`run_extraction` alone.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from mvtec_ray.config import ExtractConfig
from mvtec_ray.data.catalog import Catalog
from mvtec_ray.distributed.cluster import (
    WRITER_CPUS,
    cluster_plan,
    resolved,
    use_ray_data,
)
from mvtec_ray.distributed.progress import Progress
from mvtec_ray.distributed.stream import Stage, apply_stages, model_stage
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.backbones import (
    FeatureExtractor,
    ResolvedWeights,
    embed_images,
    prepare_for_device,
    probe_feature_shapes,
    resolve_weights,
)
from mvtec_ray.features.plan import (
    Reuse,
    expected_row_ids,
    expected_rows,
    known_splits_of,
    plan_work,
    reuse_stored_rows,
)
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.features.row_index import (
    ROW_INDEX,
    build_row_index,
    catalog_identity,
    check_error_budget,
    read_row_index,
    write_row_index,
)
from mvtec_ray.features.store import (
    EXTRACT_META,
    SUCCESS,
    FeatureSet,
    extraction_metadata,
    write_shards,
)
from mvtec_ray.storage import Storage, join
from mvtec_ray.threads import pin_threads

log = logging.getLogger(__name__)
NODE_COLUMN = "extract_node"  # per-row Ray node id of the extractor actor (driver-side summary only)
SUMMARY_COLUMNS = ["row_id", "image_id", "source_uri", "category", "split", "status", "error", "file", NODE_COLUMN]


# -- planning (pure) ----------------------------------------------------------


# -- decoding and variants (pure; runs in Ray Data tasks) ---------------------


# -- feature computation (pure torch; one instance per Ray actor) -------------
class Extractor:
    """Callable class for ``map_batches``: the model is built once per actor."""

    def __init__(self, backbone: str, weights, patch_dim: int | None, with_patches: bool,
                 device: str = "cpu", threads: int | None = None, padim_channels: int | None = None,
                 tile_size: int | None = None):
        if threads:
            self._threads = pin_threads(threads)
        weights = resolved(weights)
        self.model = prepare_for_device(
            FeatureExtractor(BACKBONES[backbone], weights, patch_dim, padim_channels, tile_size), device)
        self.with_patches = with_patches
        self.with_padim = with_patches and self.model.padim_channels > 0
        self.node = _current_node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")
        ok = np.asarray(batch["status"]) == "ok"
        batch["pooled"], patches, padim = embed_images(self.model, images, self.with_patches, self.with_padim)
        if patches is not None:
            batch["patches"] = patches
        if padim is not None:
            batch["padim"] = padim
        batch["pooled"][~ok] = 0.0
        batch[NODE_COLUMN] = np.full(len(ok), self.node, dtype=object)
        return batch


def _current_node() -> str:
    """Ray node id of this process ("" outside Ray): records where rows were extracted."""
    try:
        import ray
        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - bookkeeping only
        return ""


def _write_shards_keep_node(batch: dict[str, np.ndarray], root: str, storage: Storage,
                            metadata: dict) -> dict[str, np.ndarray]:
    """:func:`write_shards`, passing the extractor's node on to the driver (not into the shards)."""
    node = batch.pop(NODE_COLUMN, None)
    out = write_shards(batch, root, storage, metadata)
    out[NODE_COLUMN] = node if node is not None else np.full(len(out["row_id"]), "", dtype=object)
    return out


class Preparer:
    """:func:`prepare_batch` in a long-lived actor. As tasks, Ray kills idle workers after about a
    second and starts new ones, each importing torch again: on 2 cores, 15 new processes during
    a 300-image run and 0.36 CPU-s per image in all, against 0.11 with long-lived actors."""

    def __init__(self, config: ExtractConfig, storage: Storage):
        self.config, self.storage = config, storage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return prepare_batch(batch, self.config, self.storage)


class ShardWriter:
    """The shard writer in a long-lived actor, for the same reason as :class:`Preparer`."""

    def __init__(self, root: str, storage: Storage, metadata: dict):
        self.root, self.storage, self.metadata = root, storage, metadata

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _write_shards_keep_node(batch, self.root, self.storage, self.metadata)


class ExtractionWorker:
    """Decode, embed and write in one long-lived actor: the CPU path.

    On CPU nodes the three stages compete for the same cores anyway; fusing them saves a process
    per stage (each with its own imports and memory), and the pixels and patch maps never cross
    the object store. GPU nodes keep separate CPU decoders feeding the GPU actors instead.
    """

    def __init__(self, config: ExtractConfig, storage: Storage, root: str, metadata: dict, weights,
                 threads: int | None = None):
        self.config, self.storage, self.root, self.metadata = config, storage, root, metadata
        self.extractor = Extractor(config.backbone, weights, config.patch_dim, config.patch_maps != "none",
                                   "cpu", threads, config.padim_channels, config.tile_size)

    def __call__(self, plan_rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prepared = prepare_batch(plan_rows, self.config, self.storage)
        size, parts = self.config.batch_size, []
        for start in range(0, len(prepared["row_id"]), size):
            batch = {key: value[start:start + size] for key, value in prepared.items()}
            parts.append(_write_shards_keep_node(self.extractor(batch), self.root, self.storage, self.metadata))
        if not parts:
            return {key: np.zeros(0, dtype=object) for key in SUMMARY_COLUMNS}
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


# -- Ray Data wiring ------------------------------------------------------------
@dataclass
class ExtractionResult:
    features_dir: str
    counts: pd.DataFrame  # category, split, status -> rows
    errors: pd.DataFrame  # row_id, image_id, source_uri, category, split, error
    seconds: float
    skipped_existing: int  # rows reused from an earlier run (same source version, status ok)
    nodes: dict = field(default_factory=dict)  # Ray node id -> rows its extractor actors produced
    retried_errors: int = 0  # error rows of an earlier run tried again
    changed: int = 0  # rows extracted again because their source file changed
    dropped: int = 0  # stored rows the catalog no longer has (never read again)
    catalog: dict = field(default_factory=dict)  # the catalog the features now belong to


def run_extraction(catalog: Catalog, features_root: str, config: ExtractConfig, storage: Storage,
                   weights: ResolvedWeights | None = None, progress: list | None = None) -> ExtractionResult:
    """Extract every catalog image into ``features_root/<fingerprint>``; resumable.

    A stored row is reused only when it was read from the catalog's current version of its source
    and is ok (:func:`~mvtec_ray.features.plan.reuse_stored_rows`); error rows are tried again; the
    row index written at the end lists exactly the rows of this catalog (``features/row_index.py``).
    More errors than ``config.max_error_fraction`` in a (category, split) stop the run (UserError)
    before anything is marked complete. ``progress``, when given, receives ``(seconds since start,
    rows)`` per finished batch.
    """
    import ray

    started = time.perf_counter()
    weights = weights or resolve_weights(config.backbone, config.weights, storage)
    out_dir = join(features_root, config.fingerprint())
    stored = FeatureSet(out_dir, storage).stored_rows() if storage.exists(out_dir) else None
    known_splits = known_splits_of(stored, catalog.entries) if stored is not None else {}
    expected = expected_rows(plan_work(catalog.entries, config, None, known_splits))
    reuse = reuse_stored_rows(expected, stored) if stored is not None else Reuse()
    done = set(reuse.shards)
    plan = plan_work(catalog.entries, config, done, known_splits)
    metadata = extraction_metadata(config, weights, probe_feature_shapes(config, weights))
    if len(plan) and storage.exists(join(out_dir, SUCCESS)):
        storage.delete_file(join(out_dir, SUCCESS))  # rows to extract: not complete until this run ends
    storage.write_bytes(join(out_dir, EXTRACT_META), json.dumps(metadata, indent=2).encode())
    resources = cluster_plan(config)
    todo = len(expected_row_ids(plan))
    log.info("extracting %d rows (%d reused, %d errors retried, %d of changed files, %d no longer in the data) "
             "with %s", todo, len(done), reuse.retried, reuse.changed, reuse.dropped, resources)

    summaries = []
    if len(plan):
        weights_ref = ray.put(weights.state_dict)
        batch_size = config.batch_size
        # a small increment (a grown dataset) does not start actors that would get no batch
        actors = max(1, min(resources["actors"], -(-todo // batch_size)))
        # small blocks so decode work spreads over the workers from the start
        blocks = [plan.iloc[i:i + 4] for i in range(0, len(plan), 4)]
        use_ray_data()
        if resources["fused"]:
            worker = {"config": config, "storage": storage, "root": out_dir, "metadata": metadata,
                      "weights": weights_ref, "threads": resources["threads"]}
            stages = [model_stage(ExtractionWorker, 4, worker, resources, actors)]
        else:
            stages = _staged(config, storage, out_dir, metadata, weights_ref, resources, actors)
        ds = apply_stages(ray.data.from_pandas(blocks), stages)
        shown = Progress("extract", todo, "rows")
        for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
            summaries.append(part)
            shown.update(len(part))
            if progress is not None:
                progress.append((time.perf_counter() - started, len(part)))
        shown.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data stats:\n%s", ds.stats())  # per-operator time, backpressure
    produced = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(columns=SUMMARY_COLUMNS)
    nodes = {str(k): int(v) for k, v in produced[NODE_COLUMN].value_counts().items() if k} \
        if NODE_COLUMN in produced else {}
    index = build_row_index(expected, reuse.shards, produced)  # raises when a planned row was lost
    # every error row is this run's (errors are never reused): the reasons come from its summaries
    errors = produced[produced["status"] == "error"].drop_duplicates("row_id", keep="last")
    errors = errors[errors["row_id"].isin(set(index["row_id"]))][
        ["row_id", "image_id", "source_uri", "category", "split", "status", "error"]].reset_index(drop=True)
    check_error_budget(index, errors, config.max_error_fraction)
    counts = index.groupby(["category", "split", "status"]).size().rename("rows").reset_index()
    identity = catalog_identity(catalog.root, catalog.entries)
    previous = read_row_index(storage, out_dir)
    if previous is None or previous[1] != identity or not previous[0].equals(index):
        if storage.exists(join(out_dir, SUCCESS)):
            storage.delete_file(join(out_dir, SUCCESS))  # never a _SUCCESS.json beside another run's index
        write_row_index(storage, out_dir, index, identity)
    success = {"rows": int(len(index)), "errors": int(len(errors)), "fingerprint": config.fingerprint(),
               "counts": counts.to_dict(orient="records"), "catalog": identity, "row_index": ROW_INDEX,
               "reused": len(done), "extracted": int(len(produced)), "retried_errors": reuse.retried,
               "changed": reuse.changed, "dropped": reuse.dropped, "finished_at": time.time()}
    storage.write_bytes(join(out_dir, SUCCESS), json.dumps(success, indent=2).encode())
    return ExtractionResult(out_dir, counts, errors, time.perf_counter() - started, len(done), nodes,
                            reuse.retried, reuse.changed, reuse.dropped, identity)


def _staged(config: ExtractConfig, storage: Storage, out_dir: str, metadata: dict, weights_ref,
            resources: dict, actors: int) -> list[Stage]:
    """GPU path: CPU decoder actors -> GPU extractor actors -> shard writer actors."""
    extractor = {"backbone": config.backbone, "weights": weights_ref, "patch_dim": config.patch_dim,
                 "with_patches": config.patch_maps != "none", "padim_channels": config.padim_channels,
                 "tile_size": config.tile_size,
                 "device": resources["device"], "threads": resources["threads"]}
    return [Stage(Preparer, 4, config.cpus_per_reader, {"config": config, "storage": storage},
                  (1, resources["readers"])),
            model_stage(Extractor, config.batch_size, extractor, resources, actors),
            Stage(ShardWriter, None, WRITER_CPUS, {"root": out_dir, "storage": storage, "metadata": metadata},
                  (1, resources["writers"]))]

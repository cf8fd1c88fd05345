"""Extraction: catalog -> work plan -> Ray Data (decode tasks -> extractor actors -> shard writers).

The pure parts (:func:`plan_work`, :func:`prepare_batch`, :class:`Extractor`) need no Ray; the
Ray Data wiring is :func:`run_extraction` alone.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import __version__
from .backbones import BACKBONES, FeatureExtractor, ResolvedWeights, embed_images, prepare_for_device, resolve_weights
from .catalog import Catalog
from .config import ExtractConfig
from .features import EXTRACT_META, SUCCESS, FeatureSet, write_shards
from .images import (DecodeError, DecodeLimits, apply_augmentation, content_box, decode_image, decode_mask,
                     encode_mask_png, image_dimensions, make_synthetic_anomaly, params_json, row_rng, sample_augmentation)
from .errors import StorageUnavailable
from .progress import Progress
from .storage import Storage, join

log = logging.getLogger(__name__)
WRITER_CPUS = 0.25  # per shard-writer actor; cluster_plan keeps one such slot free beside the extractors
NODE_COLUMN = "extract_node"  # per-row Ray node id of the extractor actor (driver-side summary only)
SUMMARY_COLUMNS = ["row_id", "image_id", "source_uri", "category", "split", "status", "error", "file", NODE_COLUMN]
PLAN_COLUMNS = ["image_id", "uri", "version", "category", "split", "label", "defect_type", "mask_uri",
                "variants"]


# -- planning (pure) ----------------------------------------------------------
def plan_work(entries: pd.DataFrame, config: ExtractConfig, done_row_ids: set[str] | None = None,
              known_splits: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per source image with the variants still to produce (comma-separated).

    Held-out train images (val_good) also give the synthetic anomalies (val_synthetic), so
    validation never shares a source image with training. ``known_splits`` (image_id -> split of
    an earlier run) keeps earlier images where they were: a grown dataset only adds images.
    """
    done = done_row_ids or set()
    known = known_splits or {}
    rows = []
    for category, group in entries.groupby("category", sort=True):
        train = group[group["split"] == "train"].sort_values("image_id")
        n_hold = 0
        if config.holdout_fraction > 0 and len(train) > 1:
            n_hold = max(config.min_holdout, int(round(config.holdout_fraction * len(train))))
            n_hold = min(n_hold, len(train) - 1)
        ids = list(train["image_id"])
        # an empty file can only become an error row: never spend a validation slot on it
        empty = set(train.loc[train["size_bytes"] == 0, "image_id"]) if "size_bytes" in train else set()
        held = {i for i in ids if known.get(i) == "val_good"}
        # the fresh run's draw order, skipping images already placed: a run resumed after a crash
        # holds out exactly what an uninterrupted run would; a grown dataset only adds images
        for k in row_rng(config.seed, category, "holdout").permutation(len(ids)):
            if len(held) >= n_hold:
                break
            if known.get(ids[k]) not in ("train", "val_good") and ids[k] not in empty:
                held.add(ids[k])
        for row in group.itertuples(index=False):
            if row.split == "test":
                split, variants = "test", ["orig"]
            elif row.image_id in held:
                split, variants = "val_good", ["orig"] + [f"syn{k}" for k in range(1, config.synthetic_per_image + 1)]
            else:
                split, variants = "train", ["orig"] + [f"aug{k}" for k in range(1, config.augment_copies + 1)]
            todo = [v for v in variants if f"{row.image_id}#{v}" not in done]
            if todo:
                rows.append({"image_id": row.image_id, "uri": row.uri, "version": row.version,
                             "category": category, "split": split, "label": int(row.label),
                             "defect_type": row.defect_type, "mask_uri": row.mask_uri,
                             "variants": ",".join(todo)})
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def expected_row_ids(plan: pd.DataFrame) -> list[str]:
    return [f"{image_id}#{v}" for image_id, variants in zip(plan["image_id"], plan["variants"])
            for v in variants.split(",")]


# -- decoding and variants (pure; runs in Ray Data tasks) ---------------------
def _synthetic_on_content(image: np.ndarray, kind: str, rng: np.random.Generator, config: ExtractConfig,
                          source_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, dict]:
    """A synthetic defect drawn on the image itself, never on the padding of ``resize: pad``."""
    top, left, h, w = content_box(*source_hw, config.image_size) if config.resize == "pad" else (0, 0, 0, 0)
    if min(h, w) < 16:  # not padded, or a sliver too thin to draw on
        return make_synthetic_anomaly(image, kind, rng)
    inner, inner_mask, params = make_synthetic_anomaly(image[top:top + h, left:left + w], kind, rng)
    pixels, mask = image.copy(), np.zeros(image.shape[:2], bool)
    pixels[top:top + h, left:left + w], mask[top:top + h, left:left + w] = inner, inner_mask
    return pixels, mask, {**params, "content_box": [top, left, h, w]}


def prepare_batch(batch: dict[str, np.ndarray], config: ExtractConfig, storage: Storage) -> dict[str, np.ndarray]:
    """Source rows -> variant rows: decode once, then augment / draw synthetic defects.

    A source that cannot be read or decoded yields one error row per variant, never nothing.
    """
    size = config.image_size
    limits = DecodeLimits(config.max_image_pixels, config.min_image_side)
    out: dict[str, list] = {k: [] for k in ("row_id", "image_id", "source_uri", "source_version", "category",
                                            "split", "label", "defect_type", "mask_uri", "variant", "aug_params", "status",
                                            "error", "mask_png", "with_patches", "image", "source_height",
                                            "source_width")}
    blank = np.zeros((size, size, 3), np.uint8)
    for i in range(len(batch["image_id"])):
        image_id, uri = str(batch["image_id"][i]), str(batch["uri"][i])
        variants = str(batch["variants"][i]).split(",")
        base_split, label = str(batch["split"][i]), int(batch["label"][i])
        image, mask, error, source_hw = None, None, "", (0, 0)
        try:
            data = storage.read_bytes(uri)
            image = decode_image(data, size, limits, config.resize_to, config.resize)
            source_hw = image_dimensions(data, limits)
            if label == 1 and batch["mask_uri"][i]:
                mask = decode_mask(storage.read_bytes(str(batch["mask_uri"][i])), size, resize_to=config.resize_to,
                                   resize=config.resize)
        except DecodeError as exc:
            error = str(exc)
        except FileNotFoundError:
            error = "file disappeared before it could be read"
        except StorageUnavailable:
            raise  # storage down, not a bad image: fail the run (resumable) rather than record an error row
        except Exception as exc:  # noqa: BLE001 - recorded per row, the run goes on
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        for variant in variants:
            split, row_label, defect_type, params, pixels, row_mask = base_split, label, str(batch["defect_type"][i]), {}, image, mask
            if error == "" and variant.startswith("aug"):
                params = sample_augmentation(row_rng(config.seed, image_id, variant), config.augmentations)
                pixels = apply_augmentation(image, params)
            elif error == "" and variant.startswith("syn"):
                rng = row_rng(config.seed, image_id, variant)
                kind = config.synthetic_kinds[int(rng.integers(len(config.synthetic_kinds)))]
                pixels, row_mask, params = _synthetic_on_content(image, kind, rng, config, source_hw)
                split, row_label, defect_type = "val_synthetic", 1, f"synthetic_{kind}"
            elif variant.startswith("syn"):
                split, row_label = "val_synthetic", 1
            out["row_id"].append(f"{image_id}#{variant}")
            out["image_id"].append(image_id)
            out["source_uri"].append(uri)
            out["source_version"].append(str(batch["version"][i]))
            out["category"].append(str(batch["category"][i]))
            out["split"].append(split)
            out["label"].append(row_label)
            out["defect_type"].append(defect_type)
            out["mask_uri"].append(str(batch["mask_uri"][i]) if split == "test" else "")
            out["variant"].append(variant)
            out["aug_params"].append(params_json(params) if params else "")
            out["status"].append("error" if error else "ok")
            out["error"].append(error)
            out["mask_png"].append(encode_mask_png(row_mask) if row_mask is not None else b"")
            out["with_patches"].append(config.patch_maps == "all" or
                                       (config.patch_maps == "originals" and not variant.startswith("aug")))
            out["image"].append(pixels if pixels is not None else blank)
            out["source_height"].append(source_hw[0])
            out["source_width"].append(source_hw[1])
    result = {key: np.asarray(values, dtype=object) for key, values in out.items()
              if key not in ("image", "label", "with_patches", "source_height", "source_width")}
    result["image"] = np.stack(out["image"]) if out["image"] else np.zeros((0, size, size, 3), np.uint8)
    result["label"] = np.asarray(out["label"], dtype=np.int8)
    result["with_patches"] = np.asarray(out["with_patches"], dtype=bool)
    for key in ("source_height", "source_width"):
        result[key] = np.asarray(out[key], dtype=np.int32)
    return result


# -- feature computation (pure torch; one instance per Ray actor) -------------
class Extractor:
    """Callable class for ``map_batches``: the model is built once per actor."""

    def __init__(self, backbone: str, weights, patch_dim: int | None, with_patches: bool,
                 device: str = "cpu", threads: int | None = None, padim_channels: int | None = None):
        import torch
        if threads:
            torch.set_num_threads(threads)
        if hasattr(weights, "hex") and not isinstance(weights, (str, bytes)):  # a Ray ObjectRef
            import ray
            weights = ray.get(weights)
        self.model = prepare_for_device(FeatureExtractor(BACKBONES[backbone], weights, patch_dim, padim_channels),
                                        device)
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
                                   "cpu", threads, config.padim_channels)

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
    skipped_existing: int
    nodes: dict = field(default_factory=dict)  # Ray node id -> rows its extractor actors produced


def extraction_metadata(config: ExtractConfig, weights: ResolvedWeights, probe_shapes: dict) -> dict:
    from importlib.metadata import version

    import pyarrow
    import ray
    import torch
    import torchvision
    spec = BACKBONES[config.backbone]
    return {
        **weights.identity(), "pretrained": weights.pretrained, "fingerprint": config.fingerprint(),
        "image_size": config.image_size, "resize_to": config.resize_to, "resize": config.resize, "normalisation": {"mean": spec.mean, "std": spec.std},
        "patch_layers": list(spec.patch_layers), "padim_layers": list(spec.padim_layers), "patch_dim": config.patch_dim, **probe_shapes,
        "config": config.model_dump(mode="json"),
        # plain str: torch's version is a str subclass whose unpickling imports torch (in every process
        # this metadata reaches, Ray Data's stats actor included); scikit-learn's is read, not imported
        "versions": {k: str(v) for k, v in {
            "mvtec_ray": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "ray": ray.__version__, "pyarrow": pyarrow.__version__, "scikit-learn": version("scikit-learn"),
            "numpy": np.__version__, "python": platform.python_version()}.items()},
    }


def probe_feature_shapes(config: ExtractConfig, weights: ResolvedWeights) -> dict:
    """Shapes of the feature columns, from one blank image (cheap; also validates the weights)."""
    import torch
    model = FeatureExtractor(BACKBONES[config.backbone], weights.state_dict, config.patch_dim, config.padim_channels)
    pooled, patches, padim = model(torch.zeros((1, config.image_size, config.image_size, 3), dtype=torch.uint8),
                                   with_padim=True)
    return {"pooled_dim": int(pooled.shape[1]), "patch_shape": list(patches.shape[1:]),
            "padim_shape": list(padim.shape[1:]) if padim is not None else None}


def _eligible_nodes(required: dict[str, float]) -> list[dict]:
    """Resources of the alive nodes that offer every resource in ``required``."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")
            and all(n["Resources"].get(k, 0) >= v for k, v in required.items())]


def cluster_plan(config: ExtractConfig) -> dict:
    """Actor pool size, devices and threads from the cluster's resources.

    With ``actor_resources`` only the nodes offering them count, and the pool never asks for
    more actors than they can hold (a fixed-size pool waiting for an unplaceable actor hangs).
    """
    import ray
    resources = ray.cluster_resources()
    gpus = float(resources.get("GPU", 0))
    cpus = float(resources.get("CPU", 1))
    nodes = _eligible_nodes(config.actor_resources)
    cap = None
    if config.actor_resources:
        if nodes:
            cap = sum(min(int(n.get(k, 0) // v) for k, v in config.actor_resources.items()) for n in nodes)
            cpus = sum(float(n.get("CPU", 0)) for n in nodes) or cpus
        else:  # an autoscaler may still add such a node: start small and let it
            log.warning("no node offers actor_resources %s yet; the extractor actors wait for one",
                        config.actor_resources)
    node_cpus = max([float(n.get("CPU", 0)) for n in nodes] or [cpus]) or cpus
    use_gpu = config.device == "cuda" or (config.device == "auto" and gpus > 0)
    if use_gpu:
        actors = config.actors or max(1, int(gpus / config.gpus_per_actor))
        plan = {"device": "cuda", "actors": actors, "num_gpus": config.gpus_per_actor,
                "num_cpus": config.cpus_per_actor, "threads": config.torch_threads or 2}
    else:
        if config.actors:
            actors = config.actors
        elif node_cpus <= 4 and len(nodes) <= 1:
            # a small single node: one single-threaded actor per core. Decode and write tasks share
            # these cores, and a 2-thread forward pass stalls whenever one of its threads is preempted
            # (ResNet50 on 2 shared cores: ~0.065 CPU-s/img with 1 thread, ~0.14 with 2)
            actors = max(1, int(cpus))
        else:
            actors = max(1, int((cpus - config.cpus_per_reader) // max(config.cpus_per_actor, 2.0)))
        # threads per actor: its share of the CPUs, never more than one node has
        threads = config.torch_threads or max(1, int(min(cpus / actors, node_cpus)))
        plan = {"device": "cpu", "actors": actors, "num_gpus": 0, "num_cpus": config.cpus_per_actor,
                "threads": threads}
    if cap is not None and plan["actors"] > max(cap, 1):
        if config.actors:
            log.warning("actors=%d but the nodes with %s hold only %d; using %d", config.actors,
                        config.actor_resources, cap, max(cap, 1))
        plan["actors"] = max(cap, 1)
        if not config.torch_threads and plan["device"] == "cpu":
            plan["threads"] = max(1, int(min(cpus / plan["actors"], node_cpus)))
    plan["fused"] = plan["device"] == "cpu" if config.stages == "auto" else config.stages == "fused"
    plan["resources"] = dict(config.actor_resources)
    if plan["fused"]:
        # decode, embed and write in the same actors. Their CPU requests leave one CPU (half of a
        # small node) unreserved: Ray Data's own small tasks (block metadata) and the actors of a
        # next run in the same driver, while a failed run's are still being torn down, must fit
        # beside them, or they wait forever. Torch threads are set explicitly, not from num_cpus.
        share = (cpus - min(1.0, cpus / 2)) / plan["actors"]
        if plan["num_cpus"] > share:  # Ray takes whole numbers above 1 and at most 4 decimals below
            plan["num_cpus"] = float(int(share)) if share >= 1 else max(0.0001, int(share * 1e4) / 1e4)
        plan["readers"] = plan["writers"] = 0
        return plan
    # actors hold their CPUs for the whole run: together they must leave a reader and a writer slot
    # free, or the decode tasks feeding them are never scheduled (a silent hang, e.g. 2 GPU actors
    # on 2 CPUs), or the writer waits until every image is decoded (all patches pile up in memory)
    share = (cpus - config.cpus_per_reader - WRITER_CPUS) / plan["actors"]
    if plan["num_cpus"] > share:
        # Ray takes whole numbers above 1 and at most 4 decimals below
        plan["num_cpus"] = float(int(share)) if share >= 1 else max(0.0001, int(share * 1e4) / 1e4)
    # reader / writer actor pools grow up to what the CPUs left beside the extractors hold (a GPU
    # needs many decoders); writing costs about half of decoding per image
    free = cpus - plan["actors"] * plan["num_cpus"]
    plan["readers"] = max(1, int((free - WRITER_CPUS) / config.cpus_per_reader))
    plan["writers"] = max(1, plan["readers"] // 2)
    return plan


def _existing_rows(existing: FeatureSet) -> tuple[set[str], dict[str, str]]:
    """Row ids already written, and each source image's split (synthetic rows count as val_good)."""
    if not existing.shard_uris():
        return set(), {}
    table = existing.read(columns=["row_id", "image_id", "split"])
    splits = {image_id: "val_good" if split == "val_synthetic" else split
              for image_id, split in zip(table.column("image_id").to_pylist(), table.column("split").to_pylist())}
    return set(table.column("row_id").to_pylist()), splits


def run_extraction(catalog: Catalog, features_root: str, config: ExtractConfig, storage: Storage,
                   weights: ResolvedWeights | None = None, progress: list | None = None) -> ExtractionResult:
    """Extract every catalog image into ``features_root/<fingerprint>``; resumable.

    ``progress``, when given, receives ``(seconds since start, rows)`` per finished batch.
    """
    import ray

    started = time.perf_counter()
    weights = weights or resolve_weights(config.backbone, config.weights, storage)
    out_dir = join(features_root, config.fingerprint())
    done, known_splits = _existing_rows(FeatureSet(out_dir, storage)) if storage.exists(out_dir) else (set(), {})
    plan = plan_work(catalog.entries, config, done, known_splits)
    metadata = extraction_metadata(config, weights, probe_feature_shapes(config, weights))
    if len(plan) and storage.exists(join(out_dir, SUCCESS)):
        storage.delete_file(join(out_dir, SUCCESS))  # the input grew: not complete until this run ends
    storage.write_bytes(join(out_dir, EXTRACT_META), json.dumps(metadata, indent=2).encode())
    resources = cluster_plan(config)
    log.info("extracting %d rows (%d already done) with %s", len(expected_row_ids(plan)), len(done), resources)

    summaries = []
    if len(plan):
        weights_ref = ray.put(weights.state_dict)
        batch_size = config.batch_size
        # a small increment (a grown dataset) does not start actors that would get no batch
        actors = max(1, min(resources["actors"], -(-len(expected_row_ids(plan)) // batch_size)))
        # small blocks so decode work spreads over the workers from the start
        blocks = [plan.iloc[i:i + 4] for i in range(0, len(plan), 4)]
        from .pipeline import use_ray_data
        use_ray_data()
        ds = ray.data.from_pandas(blocks)
        if resources["fused"]:
            ds = ds.map_batches(ExtractionWorker, batch_size=4, batch_format="numpy",
                                fn_constructor_kwargs={"config": config, "storage": storage, "root": out_dir,
                                                       "metadata": metadata, "weights": weights_ref,
                                                       "threads": resources["threads"]},
                                compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=resources["num_cpus"],
                                resources=resources["resources"] or None)
        else:
            ds = _staged_pipeline(ds, config, storage, out_dir, metadata, weights_ref, resources, actors)
        shown = Progress("extract", len(expected_row_ids(plan)), "rows")
        for part in ds.iter_batches(batch_size=None, batch_format="pandas"):
            summaries.append(part.drop(columns=["file"]))
            shown.update(len(part))
            if progress is not None:
                progress.append((time.perf_counter() - started, len(part)))
        shown.close()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("Ray Data stats:\n%s", ds.stats())  # per-operator time, backpressure
    produced = pd.concat(summaries, ignore_index=True) if summaries else pd.DataFrame(
        columns=["row_id", "image_id", "source_uri", "category", "split", "status", "error", NODE_COLUMN])
    nodes = {str(k): int(v) for k, v in produced[NODE_COLUMN].value_counts().items() if k} \
        if NODE_COLUMN in produced else {}
    missing = set(expected_row_ids(plan)) - set(produced["row_id"])
    if missing:
        raise RuntimeError(f"extraction lost {len(missing)} rows (e.g. {sorted(missing)[:3]}); nothing marked complete")
    full = FeatureSet(out_dir, storage).read(columns=["row_id", "image_id", "source_uri", "category", "split",
                                                      "status", "error"]).to_pandas()
    counts = full.groupby(["category", "split", "status"]).size().rename("rows").reset_index()
    errors = full[full["status"] == "error"].reset_index(drop=True)
    success = {"rows": int(len(full)), "errors": int(len(errors)), "fingerprint": config.fingerprint(),
               "counts": counts.to_dict(orient="records"), "finished_at": time.time()}
    storage.write_bytes(join(out_dir, SUCCESS), json.dumps(success, indent=2).encode())
    return ExtractionResult(out_dir, counts, errors, time.perf_counter() - started, len(done), nodes)


def _staged_pipeline(ds, config: ExtractConfig, storage: Storage, out_dir: str, metadata: dict, weights_ref,
                     resources: dict, actors: int):
    """GPU path: CPU decoder actors -> GPU extractor actors -> shard writer actors."""
    import ray
    ds = ds.map_batches(Preparer, fn_constructor_kwargs={"config": config, "storage": storage},
                        batch_size=4, batch_format="numpy", num_cpus=config.cpus_per_reader,
                        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources["readers"]))
    ds = ds.map_batches(
        Extractor, batch_size=config.batch_size, batch_format="numpy",
        fn_constructor_kwargs={"backbone": config.backbone, "weights": weights_ref,
                               "patch_dim": config.patch_dim, "with_patches": config.patch_maps != "none",
                               "padim_channels": config.padim_channels,
                               "device": resources["device"], "threads": resources["threads"]},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
        resources=resources["resources"] or None)
    return ds.map_batches(ShardWriter, fn_constructor_kwargs={"root": out_dir, "storage": storage,
                                                              "metadata": metadata},
                          batch_size=None, batch_format="numpy", num_cpus=WRITER_CPUS,
                          compute=ray.data.ActorPoolStrategy(min_size=1, max_size=resources["writers"]))

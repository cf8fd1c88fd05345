"""Score new images with fitted models: a streaming Ray Data job, incremental by content version.

images -> decode tasks -> scoring actors (backbone + every model loaded once per actor)
-> Parquet shards ``OUT/scores/part-*.parquet`` (one row per image and detector) and
``OUT/errors/part-*.parquet`` (unreadable inputs, images of categories without a model).
Nothing but per-batch counts reaches the driver, so memory does not grow with the input.
"""
from __future__ import annotations

import io
import logging
import posixpath
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .backbones import BACKBONES, RANDOM_WEIGHTS_ID, FeatureExtractor, resolve_weights
from .catalog import IMAGE_EXTENSIONS
from .config import ExtractConfig, RunConfig
from .errors import ModelMismatch, UserError
from .extract import prepare_batch
from .features import shard_name, tensor_array
from .model_store import list_models, load_model
from .storage import Storage, is_s3, join

log = logging.getLogger(__name__)
SCORE_FIELDS = ["input_uri", "input_version", "category", "detector", "score", "threshold", "is_anomaly",
                "model_version", "backbone", "weights"]
ERROR_FIELDS = ["input_uri", "input_version", "category", "error"]


@dataclass
class ScoringSummary:
    out: str
    listed: int
    already_scored: int
    scored_images: int = 0
    score_rows: int = 0
    errors: int = 0
    seconds: float = 0.0
    by_category: dict = field(default_factory=dict)

    def describe(self) -> str:
        cats = ", ".join(f"{c}: {n}" for c, n in sorted(self.by_category.items()))
        return (f"scored {self.scored_images} new images ({self.score_rows} rows) into {self.out}/scores; "
                f"{self.errors} errors into {self.out}/errors; {self.already_scored} of {self.listed} listed "
                f"were already scored; {self.seconds:.1f}s" + (f" [{cats}]" if cats else ""))


def input_key(uri: str, version: str) -> str:
    return f"{uri}@{version}"


def list_images(storage: Storage, images_uri: str, categories: list[str], category: str | None) -> pd.DataFrame:
    """Every file under ``images_uri`` with its version and category (from ``--category`` or the path)."""
    storage.check_reachable(images_uri)
    if storage.is_dir(images_uri):
        infos = list(storage.iter_files(images_uri))
    else:
        fs, path = storage.resolve(images_uri)
        infos = [fs.get_file_info(path)]
    rows = []
    for info in infos:
        uri = storage.uri_of(images_uri, info.path)
        name = posixpath.basename(info.path.replace("\\", "/"))
        parts = info.path.replace("\\", "/").split("/")
        found = category or next((p for p in reversed(parts[:-1]) if p in categories), "")
        problem = ""
        if name.startswith("."):
            problem = "hidden file"
        elif posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            problem = f"not an image file (extension {posixpath.splitext(name)[1] or 'none'})"
        elif not found:
            problem = f"no category in the path and no --category (models exist for {', '.join(categories)})"
        elif found not in categories:
            problem = f"no model for category {found!r}"
        rows.append({"uri": uri, "version": f"{info.size}-{info.mtime_ns or 0}", "category": found,
                     "problem": problem})
    return pd.DataFrame(rows, columns=["uri", "version", "category", "problem"])


def scored_keys(storage: Storage, out_uri: str) -> set[str]:
    keys = set()
    for folder in ("scores", "errors"):
        base = join(out_uri, folder)
        if not storage.exists(base):
            continue
        for info in storage.iter_files(base):
            if info.base_name.endswith(".parquet"):
                table = pq.read_table(io.BytesIO(storage.read_bytes(storage.uri_of(out_uri, info.path))),
                                      columns=["input_uri", "input_version"])
                keys.update(input_key(u, v) for u, v in zip(table.column("input_uri").to_pylist(),
                                                             table.column("input_version").to_pylist()))
    return keys


class Scorer:
    """Callable class for ``map_batches``: backbone and models loaded once per actor."""

    def __init__(self, models_uri: str, pairs: list[tuple[str, str]], storage: Storage, backbone: str, weights,
                 patch_dim: int | None, map_size: int, threads: int | None = None, device: str = "cpu"):
        import torch
        if threads:
            torch.set_num_threads(threads)
        if hasattr(weights, "hex") and not isinstance(weights, (str, bytes)):
            import ray
            weights = ray.get(weights)
        self.device = torch.device(device)
        self.extractor = FeatureExtractor(BACKBONES[backbone], weights, patch_dim).to(self.device)
        self.models: dict[str, list] = {}
        for category, name in pairs:
            self.models.setdefault(category, []).append(load_model(storage, models_uri, category, name))
        self.need_patches = any(m.detector.input_kind == "patches" for ms in self.models.values() for m in ms)
        self.map_size = map_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        images = np.require(batch.pop("image"), np.uint8, ["C", "W"])
        ok = np.asarray(batch["status"]) == "ok"
        pooled = patches = None
        if ok.any():
            with torch.inference_mode():
                p, q = self.extractor(torch.from_numpy(images[ok]).to(self.device), with_patches=self.need_patches)
            pooled = p.float().cpu().numpy()
            patches = q.to(torch.float16).cpu().numpy() if q is not None else None
        out = {k: [] for k in SCORE_FIELDS + ["status", "error", "map"]}
        position = np.cumsum(ok) - 1
        for i in range(len(ok)):
            base = {"input_uri": batch["source_uri"][i], "input_version": batch["source_version"][i],
                    "category": batch["category"][i]}
            if not ok[i]:
                self._append(out, base, status="error", error=batch["error"][i])
                continue
            for model in self.models[str(batch["category"][i])]:
                detector = model.detector
                anomaly_map = None
                if detector.input_kind == "patches":
                    X = patches[position[i]:position[i] + 1]
                    if hasattr(detector, "score_with_maps"):
                        scores, maps = detector.score_with_maps(X, (self.map_size, self.map_size))
                    else:
                        scores, maps = detector.score(X), detector.anomaly_maps(X, (self.map_size, self.map_size))
                    anomaly_map = maps[0].astype(np.float16)
                else:
                    scores = detector.score(pooled[position[i]:position[i] + 1])
                score = float(scores[0])
                self._append(out, base, detector=detector.name, score=score, threshold=model.threshold,
                             is_anomaly=score >= model.threshold, model_version=model.version,
                             backbone=model.info["schema"]["backbone"], weights=model.info["weights"],
                             status="ok", error="", map=anomaly_map)
        result = {k: np.asarray(v, dtype=object) for k, v in out.items() if k != "map"}
        result["score"] = np.asarray(out["score"], dtype=np.float64)
        result["threshold"] = np.asarray(out["threshold"], dtype=np.float64)
        result["is_anomaly"] = np.asarray(out["is_anomaly"], dtype=bool)
        has_map = np.asarray([m is not None for m in out["map"]], dtype=bool)
        blank = np.zeros((self.map_size, self.map_size), np.float16)
        result["map"] = np.stack([m if m is not None else blank for m in out["map"]]) if out["map"] else \
            np.zeros((0, self.map_size, self.map_size), np.float16)
        result["has_map"] = has_map
        return result

    @staticmethod
    def _append(out: dict, base: dict, **values) -> None:
        defaults = {"detector": "", "score": np.nan, "threshold": np.nan, "is_anomaly": False, "model_version": "",
                    "backbone": "", "weights": "", "status": "ok", "error": "", "map": None}
        for key, value in {**defaults, **base, **values}.items():
            out[key].append(value)


def write_score_shards(batch: dict[str, np.ndarray], out_uri: str, storage: Storage) -> dict[str, np.ndarray]:
    status = np.asarray(batch["status"])
    ok, bad = status == "ok", status != "ok"
    keys = [input_key(u, v) for u, v in zip(batch["input_uri"], batch["input_version"])]
    name = shard_name([f"{k}|{d}" for k, d in zip(keys, batch["detector"])])
    if ok.any():
        columns = {f: pa.array(list(np.asarray(batch[f])[ok])) for f in SCORE_FIELDS}
        columns["anomaly_map"] = tensor_array(np.asarray(batch["map"])[ok], np.asarray(batch["has_map"])[ok])
        _write_table(storage, join(out_uri, "scores", name), pa.table(columns))
    if bad.any():
        columns = {f: pa.array([str(x) for x in np.asarray(batch[f])[bad]]) for f in ERROR_FIELDS}
        _write_table(storage, join(out_uri, "errors", name), pa.table(columns))
    return {"category": np.asarray(batch["category"]), "status": status, "detector": np.asarray(batch["detector"]),
            "input_uri": np.asarray(batch["input_uri"])}


def _write_table(storage: Storage, uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    storage.write_bytes(uri, sink.getvalue())


def run_scoring(config: RunConfig, models_uri: str, images_uri: str, category: str | None = None,
                rescore: bool = False, detectors: list[str] | None = None) -> ScoringSummary:
    import ray

    from .pipeline import connect
    started = time.perf_counter()
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
    reference = load_model(storage, models_uri, *pairs[0]).info
    schema = reference["schema"]
    for c, d in pairs[1:]:
        other = load_model(storage, models_uri, c, d).info["schema"]
        if (other["backbone"], other["weights_sha256"], other["image_size"]) != \
                (schema["backbone"], schema["weights_sha256"], schema["image_size"]):
            raise ModelMismatch(f"models under {models_uri} were fitted on different features ({c}/{d}: "
                                f"{other['backbone']}); score them separately")
    weights_arg = {RANDOM_WEIGHTS_ID: "random"}.get(reference["weights"], None)
    if weights_arg is None:
        kind, _, rest = reference["weights"].partition(":")
        weights_arg = "imagenet" if kind == "imagenet" else rest
    weights = resolve_weights(schema["backbone"], weights_arg, storage)
    if weights.sha256 != schema["weights_sha256"]:
        raise ModelMismatch(f"backbone weights differ from the ones the models were fitted with "
                            f"(sha256 {weights.sha256[:12]} != {str(schema['weights_sha256'])[:12]})")
    listing = list_images(storage, images_uri, categories, category)
    keys = set() if rescore else scored_keys(storage, out_uri)
    fresh = listing[[input_key(u, v) not in keys for u, v in zip(listing["uri"], listing["version"])]]
    summary = ScoringSummary(out_uri, listed=len(listing), already_scored=len(listing) - len(fresh))
    if fresh.empty:
        summary.seconds = time.perf_counter() - started
        return summary
    extract_cfg = ExtractConfig(backbone=schema["backbone"], image_size=schema["image_size"],
                                patch_dim=schema.get("patch_dim"), holdout_fraction=0.0, synthetic_per_image=0,
                                batch_size=config.extract.batch_size, device=config.extract.device)
    plan = pd.DataFrame({"image_id": fresh["uri"], "uri": fresh["uri"], "version": fresh["version"],
                         "category": fresh["category"], "split": "score", "label": 0, "defect_type": "",
                         "mask_uri": "", "variants": "orig"})
    connect(config.ray)
    from .extract import cluster_plan
    resources = cluster_plan(extract_cfg)
    problems = fresh["problem"].to_numpy()
    ds = ray.data.from_pandas([plan.iloc[i:i + 8] for i in range(0, len(plan), 8)])
    ds = ds.map_batches(_prepare_or_reject, fn_kwargs={"config": extract_cfg, "storage": storage,
                                                       "problems": dict(zip(fresh["uri"], problems))},
                        batch_size=8, batch_format="numpy", num_cpus=extract_cfg.cpus_per_reader)
    ds = ds.map_batches(Scorer, batch_size=extract_cfg.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"models_uri": models_uri, "pairs": pairs, "storage": storage,
                                               "backbone": schema["backbone"], "weights": ray.put(weights.state_dict),
                                               "patch_dim": schema.get("patch_dim"),
                                               "map_size": config.evaluation.pixel_eval_size,
                                               "threads": resources["threads"], "device": resources["device"]},
                        compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
                        num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"])
    ds = ds.map_batches(write_score_shards, fn_kwargs={"out_uri": out_uri, "storage": storage},
                        batch_size=None, batch_format="numpy", num_cpus=0.25)
    images_seen = set()
    for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
        ok = part["status"] == "ok"
        summary.score_rows += int(ok.sum())
        summary.errors += int((~ok).sum())
        images_seen.update(part["input_uri"][ok].tolist())
        for c in part["category"][ok]:
            summary.by_category[c] = summary.by_category.get(c, 0) + 1
    summary.scored_images = len(images_seen)
    summary.seconds = time.perf_counter() - started
    return summary


def _prepare_or_reject(batch: dict[str, np.ndarray], config: ExtractConfig, storage: Storage,
                       problems: dict[str, str]) -> dict[str, np.ndarray]:
    """Decode like extraction does (same pixels, same features); listing problems become error rows."""
    rejected = np.asarray([bool(problems.get(u)) for u in batch["uri"]])
    if not rejected.any():
        return prepare_batch(batch, config, storage)
    good = {k: np.asarray(v)[~rejected] for k, v in batch.items()}
    out = prepare_batch(good, config, storage) if (~rejected).any() else None
    bad = np.flatnonzero(rejected)
    size = config.image_size
    rows = {"row_id": batch["uri"][bad], "image_id": batch["uri"][bad], "source_uri": batch["uri"][bad],
            "source_version": batch["version"][bad], "category": batch["category"][bad],
            "split": np.full(len(bad), "score", dtype=object), "defect_type": np.full(len(bad), "", dtype=object),
            "variant": np.full(len(bad), "orig", dtype=object), "aug_params": np.full(len(bad), "", dtype=object),
            "status": np.full(len(bad), "error", dtype=object),
            "error": np.asarray([problems[u] for u in batch["uri"][bad]], dtype=object),
            "mask_png": np.full(len(bad), b"", dtype=object), "image": np.zeros((len(bad), size, size, 3), np.uint8),
            "label": np.zeros(len(bad), np.int8), "with_patches": np.zeros(len(bad), bool)}
    if out is None:
        return rows
    return {k: np.concatenate([out[k], rows[k]]) for k in rows}

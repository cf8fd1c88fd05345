"""Detector zoo: every detector shares :class:`Detector`'s interface and is found by name."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvtec_ray.detectors.base import PARAMS_FILE, Detector

REGISTRY: dict[str, type[Detector]] = {}


@dataclass(frozen=True)
class DetectorInfo:
    """What the pipeline knows of a built-in detector without importing its code (torch, faiss,
    scikit-learn): a driver that only plans and schedules fits stays light."""

    name: str
    input_kind: str  # "pooled" (one vector per image) or "patches" (a feature map per image)
    fit_cost: float  # relative fit + score time at MVTec size (benchmarks/fit.py); only the order matters
    module: str  # the module of mvtec_ray.detectors that defines and registers it


#: the one table of built-in detectors, in the order of the default run: config defaults, the fit
#: order (longest first) and the benchmarks read it
BUILTIN: tuple[DetectorInfo, ...] = (
    DetectorInfo("ocsvm", "pooled", 1.0, "sklearn_detectors"),
    DetectorInfo("iforest", "pooled", 1.5, "sklearn_detectors"),
    DetectorInfo("lof", "pooled", 0.5, "sklearn_detectors"),
    DetectorInfo("elliptic", "pooled", 1.0, "sklearn_detectors"),
    DetectorInfo("knn", "pooled", 0.2, "knn"),
    DetectorInfo("autoencoder", "pooled", 20.0, "autoencoder"),
    DetectorInfo("mahalanobis", "pooled", 3.0, "mahalanobis"),
    DetectorInfo("padim", "patches", 100.0, "padim"),
    DetectorInfo("patchcore", "patches", 200.0, "patch"),
)
BUILTIN_INPUT_KINDS: dict[str, str] = {d.name: d.input_kind for d in BUILTIN}


def builtin_names(kind: str | None = None) -> list[str]:
    """The built-in detectors' names (of one input kind if given), in the table's order."""
    return [d.name for d in BUILTIN if kind is None or d.input_kind == kind]


def fit_cost(name: str) -> float:
    """Relative fit cost of ``name`` (1 for a detector outside the table)."""
    return next((d.fit_cost for d in BUILTIN if d.name == name), 1.0)


def register(cls: type[Detector]) -> type[Detector]:
    """Class decorator adding a detector to :data:`REGISTRY` under ``cls.name``."""
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"detector name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def detector_class(name: str) -> type[Detector]:
    _load_builtin()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def input_kind(name: str) -> str:
    """``"pooled"`` or ``"patches"``: which kind of feature column the detector ``name`` reads."""
    if name in BUILTIN_INPUT_KINDS:
        return BUILTIN_INPUT_KINDS[name]
    return detector_class(name).input_kind


def build_detector(name: str, **params: Any) -> Detector:
    return detector_class(name)(**params)


def load_detector(directory: str | Path) -> Detector:
    name = json.loads((Path(directory) / PARAMS_FILE).read_text())["name"]
    return detector_class(name).load(directory)


def available_detectors() -> list[str]:
    return sorted(set(BUILTIN_INPUT_KINDS) | set(REGISTRY))


def _load_builtin() -> None:
    # Imported lazily so that importing the registry stays cheap (torch, faiss).
    import importlib
    for module in sorted({d.module for d in BUILTIN}):
        importlib.import_module(f"mvtec_ray.detectors.{module}")



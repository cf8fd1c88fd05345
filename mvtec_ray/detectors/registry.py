"""Detector zoo: every detector shares :class:`Detector`'s interface and is found by name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import PARAMS_FILE, Detector

REGISTRY: dict[str, type[Detector]] = {}
#: the built-in detectors and the feature column kind each reads, known without importing their code
#: (torch, faiss, scikit-learn): a driver that only plans and schedules fits stays light
BUILTIN_INPUT_KINDS: dict[str, str] = {
    "ocsvm": "pooled", "iforest": "pooled", "lof": "pooled", "elliptic": "pooled", "knn": "pooled",
    "autoencoder": "pooled", "mahalanobis": "pooled", "patchcore": "patches", "padim": "patches"}


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
    from . import padim, patch, pooled  # noqa: F401


__all__ = ["Detector", "REGISTRY", "BUILTIN_INPUT_KINDS", "register", "detector_class", "input_kind", "build_detector",
           "load_detector", "available_detectors"]

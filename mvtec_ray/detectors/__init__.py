"""Detector zoo: every detector shares :class:`Detector`'s interface and is found by name."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .base import PARAMS_FILE, Detector

REGISTRY: dict[str, type[Detector]] = {}


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


def build_detector(name: str, **params: Any) -> Detector:
    return detector_class(name)(**params)


def load_detector(directory: str | Path) -> Detector:
    name = json.loads((Path(directory) / PARAMS_FILE).read_text())["name"]
    return detector_class(name).load(directory)


def available_detectors() -> list[str]:
    _load_builtin()
    return sorted(REGISTRY)


def _load_builtin() -> None:
    # Imported lazily so that importing the registry stays cheap (torch, faiss).
    from . import padim, patch, pooled  # noqa: F401


__all__ = ["Detector", "REGISTRY", "register", "detector_class", "build_detector",
           "load_detector", "available_detectors"]

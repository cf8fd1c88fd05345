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
    #: the keys of its ``default_params()`` (checked against the class by a test): the config
    #: refuses an unknown parameter at load time without importing the detector's code
    params: tuple[str, ...] = ()


#: parameters every pooled detector takes (``PooledDetector.default_params``)
_POOLED = ("preprocess", "pca_variance", "n_threads")
#: the one table of built-in detectors, in the order of the default run: config defaults, the fit
#: order (longest first) and the benchmarks read it
BUILTIN: tuple[DetectorInfo, ...] = (
    DetectorInfo("ocsvm", "pooled", 1.0, "sklearn_detectors", _POOLED + ("nu", "gamma")),
    DetectorInfo("iforest", "pooled", 1.5, "sklearn_detectors",
                 _POOLED + ("n_estimators", "max_samples", "random_state")),
    DetectorInfo("lof", "pooled", 0.5, "sklearn_detectors", _POOLED + ("n_neighbors",)),
    DetectorInfo("elliptic", "pooled", 1.0, "sklearn_detectors",
                 _POOLED + ("support_fraction", "contamination", "random_state", "max_dim")),
    DetectorInfo("knn", "pooled", 0.2, "knn", _POOLED + ("k",)),
    DetectorInfo("autoencoder", "pooled", 20.0, "autoencoder",
                 _POOLED + ("hidden", "bottleneck", "lr", "batch_size", "max_epochs", "patience", "val_fraction",
                            "seed")),
    DetectorInfo("mahalanobis", "pooled", 3.0, "mahalanobis", _POOLED),
    DetectorInfo("padim", "patches", 100.0, "padim",
                 ("n_features", "seed", "eps", "shrinkage", "memory_budget_mb", "accumulator_budget_mb",
                  "smoothing_sigma", "use_gpu")),
    DetectorInfo("patchcore", "patches", 200.0, "patch",
                 ("coreset_ratio", "projection_dim", "seed", "k", "reweight", "reweight_neighbors", "index",
                  "ivf_min_bank", "nlist", "nprobe", "nprobe_target", "nprobe_max", "memory_budget_mb",
                  "smoothing_sigma", "use_gpu", "coreset_threads", "coreset_shard_patches", "coreset_oversample", "coreset_ray_tasks",
                  "coreset_task_gpus")),
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


def check_params(params: dict[str, dict[str, Any]]) -> None:
    """Refuse, with one ``ValueError`` line, a detector name or a parameter name no detector knows.

    Built-in detectors are checked against :data:`BUILTIN` (their code is not imported: torch,
    faiss, scikit-learn); a detector registered by other code against its class's ``default_params``.
    Values are checked when the detector is built.
    """
    known = available_detectors()
    for name, given in params.items():
        if name not in known:
            raise ValueError(f"unknown detector {name!r}; known: {', '.join(known)}")
        info = next((d for d in BUILTIN if d.name == name), None)
        accepted = info.params if info is not None else tuple(REGISTRY[name].default_params())
        unknown = sorted(set(given or {}) - set(accepted))
        if unknown:
            raise ValueError(f"{name}: unknown parameter(s) {unknown}; known: {', '.join(sorted(accepted))}")


def _load_builtin() -> None:
    # Imported lazily so that importing the registry stays cheap (torch, faiss).
    import importlib
    for module in sorted({d.module for d in BUILTIN}):
        importlib.import_module(f"mvtec_ray.detectors.{module}")



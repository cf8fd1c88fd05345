"""The one interface every detector implements.

A detector is fitted on features of normal (defect-free) images only and returns
anomaly scores with a single convention everywhere: **higher = more anomalous**.

Two kinds of input exist:

* ``pooled``: one vector per image, ``X`` of shape ``(n_images, dim)`` float32.
* ``patches``: one patch map per image, ``P`` of shape ``(n_images, H, W, C)``
  (float16 or float32). Patch detectors also produce anomaly maps.

Persistence never unpickles anything from storage: detectors write JSON for
parameters, ``.npz`` (``allow_pickle=False``) for arrays, faiss index files,
torch ``state_dict`` files loaded with ``weights_only=True`` or skops files
loaded with an explicit list of trusted types.
"""
from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

PARAMS_FILE = "params.json"


class Detector(ABC):
    """Fit on normal features; ``score`` returns higher = more anomalous."""

    #: registry name, e.g. ``"knn"``
    name: ClassVar[str]
    #: which feature column the detector consumes: ``"pooled"`` or ``"patches"``
    input_kind: ClassVar[str] = "pooled"
    #: the stored feature column it reads: ``"pooled"``, ``"patches"`` or ``"padim"`` (PaDiM's layer1-3 maps)
    feature_column: ClassVar[str] = "pooled"
    #: whether :meth:`anomaly_maps` is implemented
    produces_maps: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = {**self.default_params(), **params}
        unknown = set(params) - set(self.default_params())
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {sorted(unknown)}; "
                             f"known: {sorted(self.default_params())}")

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {}

    @abstractmethod
    def fit(self, X: np.ndarray, X_val: np.ndarray | None = None) -> Detector:
        """Fit on normal features. ``X_val`` (held-out normals) may be used for early stopping; the fit
        stage passes none, since its validation images choose the threshold."""

    @abstractmethod
    def score(self, X: np.ndarray) -> np.ndarray:
        """Anomaly score per row, float64, higher = more anomalous."""

    def anomaly_maps(self, X: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
        """Per-pixel anomaly maps ``(n, h, w)`` float32 at ``output_size`` (patch detectors only)."""
        raise NotImplementedError(f"{self.name} produces no anomaly maps")

    # -- export --------------------------------------------------------------
    def torch_head(self) -> Any:
        """A ``torch.nn.Module`` scoring as :meth:`score` does, for the edge export
        (:mod:`mvtec_ray.deploy.export`): ``head(pooled, maps)`` takes the pooled vectors ``(n, dim)``
        float32 and the detector's feature maps ``(n, H, W, C)`` float16 (the pooled vectors again for a
        pooled detector) and returns the scores ``(n,)`` float64. Detectors whose scoring is not plain
        tensor algebra (the scikit-learn ones) have none."""
        raise NotImplementedError(f"detector {self.name!r} has no torch head")

    @classmethod
    def has_torch_head(cls) -> bool:
        return cls.torch_head is not Detector.torch_head

    # -- persistence -------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / PARAMS_FILE).write_text(json.dumps(
            {"name": self.name, "params": self.params}, indent=2, sort_keys=True))
        self._save_state(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Detector:
        directory = Path(directory)
        meta = json.loads((directory / PARAMS_FILE).read_text())
        if meta["name"] != cls.name:
            raise ValueError(f"{directory} holds a {meta['name']!r} detector, not {cls.name!r}")
        detector = cls(**meta["params"])
        detector._load_state(directory)
        return detector

    @abstractmethod
    def _save_state(self, directory: Path) -> None: ...

    @abstractmethod
    def _load_state(self, directory: Path) -> None: ...


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    np.savez(path, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def as_float32(X: np.ndarray | Iterable) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(X), dtype=np.float32)

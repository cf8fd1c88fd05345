"""The shared base of the detectors on pooled feature vectors ``X`` of shape ``(n_images, dim)``:
input checks, preprocessing, thread limits, persistence. The detectors: :mod:`.sklearn_detectors`
(ocsvm, iforest, lof, elliptic), :mod:`.knn`, :mod:`.mahalanobis`, :mod:`.autoencoder`.

Every ``score`` is float64 of shape ``(n,)`` with higher = more anomalous;
sklearn's ``score_samples`` (higher = more normal) is negated for that.

All detectors take the common parameters ``preprocess`` (see
:mod:`.preprocess`), ``pca_variance`` (used by ``preprocess="pca"``) and
``n_threads`` (``None`` leaves the caller's thread settings alone).

Default ``preprocess`` per detector is chosen on VALIDATION AUROC (held-out normals vs synthetic
defects, the images the threshold is chosen on; test AUROC only reported beside it) by
``benchmarks/study_preprocess.py``: efficientnet_lite0 pooled features (1280-d) of the built-in
dataset, 3 categories x 3 seeds (40 train images each); a mode other than ``none`` is chosen when
its mean validation AUROC is more than 0.01 higher. Measured (validation / test):
``standard`` for ``elliptic`` (0.810 / 0.876 -> 0.910 / 0.968) and ``lof`` (0.903 / 0.963 ->
0.920 / 0.974); ``none`` for the rest (``standard`` is equal or lower on validation for ocsvm,
iforest, knn, autoencoder, mahalanobis); ``pca95`` was never higher on validation
(0.06 to 0.12 lower; equal for elliptic, which reduces dimension itself). Re-measure on real MVTec features before trusting these.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from mvtec_ray.detectors.base import Detector, as_float32
from mvtec_ray.detectors.preprocess import PREPROCESS_MODES, Preprocessor
from mvtec_ray.threads import limited_threads

PREPROCESS_FILE = "preprocess.npz"
#: rows scored per step
SCORE_CHUNK = 4096


class PooledDetector(Detector):
    """Shared plumbing: input checks, preprocessing, thread limits, persistence."""

    input_kind: ClassVar[str] = "pooled"
    #: per-detector default for ``preprocess``
    default_preprocess: ClassVar[str] = "none"
    #: whether ``n_threads`` also limits faiss's OpenMP threads
    uses_faiss: ClassVar[bool] = False

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if self.params["preprocess"] not in PREPROCESS_MODES:
            raise ValueError(f"{self.name}: preprocess must be one of {PREPROCESS_MODES}, "
                             f"got {self.params['preprocess']!r}")
        if not 0.0 < float(self.params["pca_variance"]) <= 1.0:
            raise ValueError(f"{self.name}: pca_variance must be in (0, 1]")
        n_threads = self.params["n_threads"]
        if n_threads is not None and int(n_threads) < 1:
            raise ValueError(f"{self.name}: n_threads must be None or >= 1")
        self._pre: Preprocessor | None = None

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {"preprocess": cls.default_preprocess, "pca_variance": 0.95,
                "n_threads": None, **cls._own_params()}

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {}

    # -- the public interface ----------------------------------------------
    def fit(self, X: np.ndarray, X_val: np.ndarray | None = None) -> PooledDetector:
        X = self._check_input(X, min_rows=2)
        with self._thread_limits():
            self._pre = Preprocessor(self.params["preprocess"],
                                     self.params["pca_variance"]).fit(X)
            Z = self._pre.transform(X)
            Z_val = None
            if X_val is not None and len(X_val):
                Z_val = self._pre.transform(self._check_input(X_val, X.shape[1]))
            self._fit(Z, Z_val)
        return self

    def score(self, X: np.ndarray) -> np.ndarray:
        if self._pre is None:
            raise RuntimeError(f"{self.name}: fit or load before score")
        X = self._check_input(X, self._pre.n_features_in, min_rows=0)
        if len(X) == 0:
            return np.zeros(0, dtype=np.float64)
        with self._thread_limits():
            scores = self._score(self._pre.transform(X))
        return np.asarray(scores, dtype=np.float64).reshape(len(X))

    @property
    def preprocessor(self) -> Preprocessor | None:
        return self._pre

    # -- what subclasses implement -------------------------------------------
    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        raise NotImplementedError

    def _score(self, Z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _save_model(self, directory: Path) -> None:
        raise NotImplementedError

    def _load_model(self, directory: Path) -> None:
        raise NotImplementedError

    # -- persistence -------------------------------------------------------
    def _save_state(self, directory: Path) -> None:
        if self._pre is None:
            raise RuntimeError(f"{self.name}: fit before save")
        self._pre.save(directory / PREPROCESS_FILE)
        self._save_model(directory)

    def _load_state(self, directory: Path) -> None:
        self._pre = Preprocessor.load(directory / PREPROCESS_FILE)
        self._load_model(directory)

    # -- helpers -------------------------------------------------------------
    def _check_input(self, X: np.ndarray, dim: int | None = None, min_rows: int = 1) -> np.ndarray:
        X = as_float32(X)
        if X.ndim != 2:
            raise ValueError(f"{self.name}: expected (n, dim) pooled features, got shape {X.shape}")
        if dim is not None and X.shape[1] != dim:
            raise ValueError(f"{self.name}: expected dim {dim}, got {X.shape[1]}")
        if len(X) < min_rows:
            raise ValueError(f"{self.name}: needs at least {min_rows} rows, got {len(X)}")
        if not np.isfinite(X).all():
            raise ValueError(f"{self.name}: features contain NaN or inf")
        return X

    def _thread_limits(self) -> contextlib.AbstractContextManager:
        """BLAS/OpenMP (and faiss, for a detector that searches with it) at ``n_threads``; torch untouched."""
        n_threads = self.params["n_threads"]
        if n_threads is None:
            return contextlib.nullcontext()
        return limited_threads(int(n_threads), torch=False, faiss=self.uses_faiss)

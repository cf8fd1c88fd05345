"""Feature preprocessing shared by the pooled detectors.

``transform(X) = ((X - mean) / scale) @ components.T`` covers every mode:

* ``none``: identity (nothing stored but the input width),
* ``standard``: per-feature z-score,
* ``pca95`` / ``pca``: centred PCA keeping the fewest leading components whose
  explained variance reaches ``variance`` (0.95 for ``pca95``), no whitening.
  Note that PCA drops the low-variance directions, which for pretrained
  features are often the ones that carry the anomaly signal (Rippel et al.,
  2020), so it is an option to be measured, not a default.

State is saved as plain ``.npz`` arrays, never pickled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mvtec_ray.detectors.base import as_float32, load_arrays, save_arrays

PREPROCESS_MODES = ("none", "standard", "pca95", "pca")

# Features with (near) zero spread are left unscaled rather than blown up.
_MIN_SCALE = 1e-12


class Preprocessor:
    def __init__(self, mode: str = "none", variance: float = 0.95,
                 max_components: int | None = None) -> None:
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess {mode!r}; known: {PREPROCESS_MODES}")
        variance = 0.95 if mode == "pca95" else float(variance)
        if not 0.0 < variance <= 1.0:
            raise ValueError(f"PCA variance fraction must be in (0, 1], got {variance}")
        if max_components is not None and int(max_components) < 1:
            raise ValueError(f"max_components must be >= 1, got {max_components}")
        self.mode = mode
        self.variance = variance
        self.max_components = None if max_components is None else int(max_components)
        self.mean: np.ndarray | None = None
        self.scale: np.ndarray | None = None
        self.components: np.ndarray | None = None
        #: fraction of the training variance each kept component explains (PCA only)
        self.explained_variance_ratio: np.ndarray = np.zeros(0)
        self.n_features_in: int | None = None

    @property
    def is_pca(self) -> bool:
        return self.mode in ("pca", "pca95")

    @property
    def n_features_out(self) -> int:
        if self.n_features_in is None:
            raise RuntimeError("preprocessor is not fitted")
        return len(self.components) if self.is_pca else self.n_features_in

    def fit(self, X: np.ndarray) -> Preprocessor:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or len(X) < 1:
            raise ValueError(f"expected a non-empty 2-D array, got shape {X.shape}")
        n, d = X.shape
        self.n_features_in = d
        if self.mode == "none":
            return self
        self.mean = X.mean(axis=0)
        if self.mode == "standard":
            std = X.std(axis=0)
            self.scale = np.where(std > _MIN_SCALE, std, 1.0)
            return self
        self.scale = np.ones(d)
        Xc = X - self.mean
        # Eigen-decompose whichever Gram matrix is smaller: n x n when n < d.
        if n < d:
            _, s, vt = np.linalg.svd(Xc, full_matrices=False)
            eig, vecs = s ** 2, vt
        else:
            eig, v = np.linalg.eigh(Xc.T @ Xc)
            order = np.argsort(eig)[::-1]
            eig, vecs = np.clip(eig[order], 0.0, None), v[:, order].T
        total = eig.sum()
        rank = max(1, int(np.sum(eig > total * 1e-12))) if total > 0 else 1
        if total > 0:
            ratio = eig / total
            # fewest components reaching the target (tolerance for round-off at 1.0)
            k = int(np.searchsorted(np.cumsum(ratio), self.variance - 1e-9) + 1)
        else:
            ratio, k = np.zeros_like(eig), 1
        k = min(k, rank, len(eig))
        if self.max_components is not None:
            k = min(k, self.max_components)
        self.components = vecs[:k]
        self.explained_variance_ratio = ratio[:k]
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        if self.n_features_in is None:
            raise RuntimeError("preprocessor is not fitted")
        X = as_float32(X)
        if X.ndim != 2 or X.shape[1] != self.n_features_in:
            raise ValueError(f"expected shape (n, {self.n_features_in}), got {X.shape}")
        if self.mode == "none":
            return X
        Z = (X.astype(np.float64) - self.mean) / self.scale
        if self.is_pca:
            Z = Z @ self.components.T
        return as_float32(Z)

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)

    # -- persistence -------------------------------------------------------
    def save(self, path: str | Path) -> None:
        if self.n_features_in is None:
            raise RuntimeError("preprocessor is not fitted")
        d = self.n_features_in
        empty = np.zeros(0)
        save_arrays(
            Path(path),
            mode=np.array(self.mode),
            variance=np.array(self.variance),
            max_components=np.array(-1 if self.max_components is None else self.max_components),
            n_features_in=np.array(d),
            mean=empty if self.mean is None else self.mean,
            scale=empty if self.scale is None else self.scale,
            components=np.zeros((0, d)) if self.components is None else self.components,
            explained_variance_ratio=self.explained_variance_ratio,
        )

    @classmethod
    def load(cls, path: str | Path) -> Preprocessor:
        a = load_arrays(Path(path))
        max_components = int(a["max_components"])
        pre = cls(str(a["mode"]), float(a["variance"]),
                  None if max_components < 0 else max_components)
        pre.n_features_in = int(a["n_features_in"])
        if pre.mode != "none":
            pre.mean, pre.scale = a["mean"], a["scale"]
        if pre.is_pca:
            pre.components = a["components"]
        pre.explained_variance_ratio = a["explained_variance_ratio"]
        return pre

"""Gaussian with shrinkage covariance on pooled vectors (Rippel et al., 2020)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mvtec_ray.detectors.base import load_arrays, save_arrays
from mvtec_ray.detectors.chunks import iter_chunks
from mvtec_ray.detectors.pooled_base import SCORE_CHUNK, PooledDetector
from mvtec_ray.detectors.registry import register
from mvtec_ray.detectors.torch_heads import PreprocessorModule


@register
class MahalanobisDetector(PooledDetector):
    """Mahalanobis distance under a Ledoit-Wolf shrunk covariance."""

    name = "mahalanobis"
    # affine-invariant up to the shrinkage, and Rippel et al. fit raw features
    default_preprocess = "none"
    STATE_FILE: ClassVar[str] = "gaussian.npz"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.mean_: np.ndarray | None = None
        self.precision_: np.ndarray | None = None

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        from scipy import linalg
        from sklearn.covariance import LedoitWolf
        lw = LedoitWolf(store_precision=False).fit(Z.astype(np.float64))
        cov = lw.covariance_
        # The shrunk covariance is positive definite unless the data are
        # constant: Cholesky inverts it ~10x faster than sklearn's pinvh.
        try:
            precision = linalg.cho_solve(linalg.cho_factor(cov), np.eye(len(cov)))
            precision = (precision + precision.T) / 2
        except linalg.LinAlgError:
            precision = linalg.pinvh(cov)
        self.mean_ = lw.location_
        self.precision_ = precision

    def _score(self, Z: np.ndarray) -> np.ndarray:
        out = np.empty(len(Z), dtype=np.float64)
        for sl in iter_chunks(len(Z), SCORE_CHUNK):
            diff = Z[sl].astype(np.float64) - self.mean_
            out[sl] = np.einsum("ij,ij->i", diff @ self.precision_, diff)
        return np.sqrt(np.maximum(out, 0.0))

    def _save_model(self, directory: Path) -> None:
        save_arrays(directory / self.STATE_FILE, mean=self.mean_, precision=self.precision_)

    def _load_model(self, directory: Path) -> None:
        a = load_arrays(directory / self.STATE_FILE)
        self.mean_, self.precision_ = a["mean"], a["precision"]

    def torch_head(self) -> nn.Module:
        return MahalanobisHead(self)


class MahalanobisHead(nn.Module):
    """:class:`MahalanobisDetector`'s scoring in torch (float64)."""

    def __init__(self, detector: MahalanobisDetector):
        super().__init__()
        self.pre = PreprocessorModule(detector.preprocessor)
        self.register_buffer("mean", torch.as_tensor(np.asarray(detector.mean_, np.float64)))
        self.register_buffer("precision", torch.as_tensor(np.asarray(detector.precision_, np.float64)))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        diff = self.pre(pooled).double() - self.mean
        return ((diff @ self.precision) * diff).sum(1).clamp_min(0).sqrt()

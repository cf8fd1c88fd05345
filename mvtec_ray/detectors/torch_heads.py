"""Torch building blocks of the detectors' export heads (:meth:`Detector.torch_head`), shared by
several detectors: a fitted :class:`~mvtec_ray.detectors.preprocess.Preprocessor` as a module, and
exact k-nearest-neighbour distances to a memory bank."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mvtec_ray.detectors.preprocess import Preprocessor


class PreprocessorModule(nn.Module):
    """A fitted :class:`Preprocessor`: ``((x - mean) / scale) @ components.T`` in float64, out float32."""

    def __init__(self, pre: Preprocessor | None):
        super().__init__()
        self.active = pre is not None and pre.mode != "none"
        d = pre.n_features_in if pre is not None else 0
        mean = pre.mean if self.active else np.zeros(d)
        scale = pre.scale if self.active else np.ones(d)
        comps = pre.components if self.active and pre.is_pca else np.eye(d)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, np.float64)))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale, np.float64)))
        self.register_buffer("components_t", torch.as_tensor(np.asarray(comps, np.float64).T.copy()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return (((x.double() - self.mean) / self.scale) @ self.components_t).float()


def bank_tensor(index) -> torch.Tensor:
    """Every vector of a faiss index, float64 (the memory bank a head searches)."""
    return torch.as_tensor(index.reconstruct_n(0, index.ntotal).astype(np.float64))


def mean_nearest_distance(queries: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Mean L2 distance to the k nearest rows of ``bank`` (float64, like faiss's flat index but exact)."""
    q = queries.double()
    d2 = (q * q).sum(1, keepdim=True) + (bank * bank).sum(1)[None, :] - 2.0 * (q @ bank.t())
    smallest = torch.topk(d2, k, dim=1, largest=False).values
    return smallest.clamp_min(0).sqrt().mean(1)

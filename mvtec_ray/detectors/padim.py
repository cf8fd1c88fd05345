"""PaDiM (Defard et al., 2020): a Gaussian per patch position of layer1-3 features.

Input: the ``padim`` feature column (``feature_column``): the backbone's stride-4, -8 and -16
maps (ResNet layer1-3), the coarser ones upsampled to the stride-4 grid with nearest neighbour,
of which extraction keeps a fixed random subset of channels (per backbone, as anomalib's
defaults: resnet18 100, wide_resnet50_2 550; see :mod:`mvtec_ray.features.backbone_specs`). Fit: mean and
covariance per position, regularised by ``eps * I`` (0.01 in the paper), optionally shrunk
towards ``trace/d * I``. Anomaly map: Mahalanobis distance per position; image score: its max.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mvtec_ray.detectors.base import load_arrays, save_arrays
from mvtec_ray.detectors.chunks import budget_bytes, iter_budget_chunks
from mvtec_ray.detectors.coreset import resolve_torch_device
from mvtec_ray.detectors.patch import _PatchDetector, _peak_rss_mb
from mvtec_ray.detectors.registry import register


@register
class PaDiM(_PatchDetector):
    """Per-position Gaussian over PaDiM's layer1-3 maps; Mahalanobis distance maps.

    ``n_features``: None uses every stored channel (the extraction's random subset); a number
    draws a further random subset of that size (``seed``). The covariance accumulators of all
    positions (float64, ``d x d`` each) are kept within ``accumulator_budget_mb`` by fitting
    blocks of positions in separate passes over the training maps.
    """

    name = "padim"
    feature_column = "padim"

    @classmethod
    def default_params(cls) -> dict[str, Any]:
        return {
            "n_features": None,
            "seed": 0,
            "eps": 0.01,
            "shrinkage": 0.0,
            "memory_budget_mb": 1024,
            "accumulator_budget_mb": 2048,
            "smoothing_sigma": 4.0,      # in input-image pixels (anomalib: 4 at 224 px)
            "use_gpu": "auto",
        }

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not 0.0 <= float(self.params["shrinkage"]) <= 1.0:
            raise ValueError("padim: shrinkage must be in [0, 1]")
        if self.params["n_features"] is not None and int(self.params["n_features"]) < 1:
            raise ValueError("padim: n_features must be >= 1 (or None for every stored channel)")
        self._device = resolve_torch_device(self.params["use_gpu"])
        self.grid_: tuple[int, int, int] | None = None
        self.channels_: np.ndarray | None = None
        self.mean_: np.ndarray | None = None      # (H*W, d) float32
        self.inv_cov_: np.ndarray | None = None   # (H*W, d, d) float32
        self.fit_stats_: dict[str, Any] = {}
        self._on_device: tuple[torch.Tensor, torch.Tensor] | None = None

    def _pick_channels(self, C: int) -> np.ndarray:
        self._input_channels = C
        wanted = self.params["n_features"]
        if wanted is None or int(wanted) >= C:
            self.channels_ = np.arange(C, dtype=np.int64)
        else:
            rng = np.random.default_rng(int(self.params["seed"]))
            self.channels_ = np.sort(rng.choice(C, size=int(wanted), replace=False)).astype(np.int64)
        return self.channels_

    def fit(self, X: Any, X_val: Any = None) -> PaDiM:
        t0 = time.perf_counter()
        dev = self._device
        budget = budget_bytes(self.params["memory_budget_mb"])
        H = W = d = block = None
        means, invs = [], []
        n = max_chunk = passes = start = 0
        while H is None or start < H * W:  # one pass over the maps per block of positions
            passes += 1
            s1 = s2 = None
            n = 0
            # float32 copy + float64 copy + permuted float64 copy per value
            for chunk in iter_budget_chunks(X, budget, bytes_per_value=24, channels=self._pick_channels):
                m = chunk.shape[0]
                if H is None:
                    H, W, d = chunk.shape[1], chunk.shape[2], len(self.channels_)
                    per_position = d * d * 8 * 2  # float64 sums of outer products + the covariance from them
                    block = max(1, budget_bytes(self.params["accumulator_budget_mb"]) // per_position)
                if chunk.shape[1:3] != (H, W):
                    raise ValueError(f"padim: inconsistent grid {chunk.shape[1:3]} after {(H, W)}")
                positions = slice(start, min(start + block, H * W))
                if s1 is None:
                    s1 = torch.zeros(positions.stop - start, d, dtype=torch.float64, device=dev)
                    s2 = torch.zeros(positions.stop - start, d, d, dtype=torch.float64, device=dev)
                max_chunk = max(max_chunk, chunk.nbytes)
                x = torch.from_numpy(chunk).reshape(m, H * W, d)[:, positions]
                x = x.to(dev, torch.float64).transpose(0, 1)  # (P, m, d)
                s1 += x.sum(1)
                s2.baddbmm_(x.transpose(1, 2), x)  # sum of outer products per position
                n += m
                del x
            if s1 is None:
                raise ValueError("padim: no patch maps to fit on (empty input)")
            mean, inv = self._gaussian(s1, s2, n)
            means.append(mean)
            invs.append(inv)
            start += len(mean)
            del s1, s2
        self.grid_ = (H, W, self._input_channels)  # the input's shape; channels_ selects d of them
        self.mean_ = np.concatenate(means)
        self.inv_cov_ = np.concatenate(invs)
        self._on_device = None
        self.fit_stats_ = {
            "n_images": int(n), "n_features": int(d), "grid": [H, W], "passes": passes,
            "fit_seconds": time.perf_counter() - t0, "max_chunk_bytes": int(max_chunk),
            "state_bytes": int(self.mean_.nbytes + self.inv_cov_.nbytes),
            "peak_rss_mb": _peak_rss_mb(), "device": dev.type,
        }
        return self

    def _gaussian(self, s1: torch.Tensor, s2: torch.Tensor, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean and regularised inverse covariance per position (float32) from the sums."""
        d = s1.shape[1]
        mean = s1 / n
        cov = (s2 - n * mean[:, :, None] * mean[:, None, :]) / max(n - 1, 1)
        eye = torch.eye(d, dtype=torch.float64, device=s1.device)
        a = float(self.params["shrinkage"])
        if a > 0:
            scale = torch.diagonal(cov, dim1=1, dim2=2).mean(1)[:, None, None]
            cov = (1 - a) * cov + a * scale * eye
        cov = cov + float(self.params["eps"]) * eye
        inv = torch.linalg.inv(cov)
        inv = 0.5 * (inv + inv.transpose(1, 2))  # exact symmetry keeps distances >= 0
        return mean.float().cpu().numpy(), inv.float().cpu().numpy()

    def _params_on_device(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._on_device is None:
            self._on_device = (torch.from_numpy(self.mean_).to(self._device),
                               torch.from_numpy(self.inv_cov_).to(self._device))
        return self._on_device

    def _patch_scores(self, X: Any) -> tuple[np.ndarray, np.ndarray]:
        self._check_fitted()
        mean, inv = self._params_on_device()
        H0, W0, C0 = self.grid_
        d = len(self.channels_)

        def channels(C: int) -> np.ndarray:
            if C != C0:
                raise ValueError(f"padim fitted on {C0} channels, got {C}")
            return self.channels_
        parts: list[np.ndarray] = []
        for chunk in iter_budget_chunks(X, budget_bytes(self.params["memory_budget_mb"]),
                                        bytes_per_value=16, channels=channels):
            m, H, W, _ = chunk.shape
            if (H, W) != (H0, W0):
                raise ValueError(f"padim fitted on a {H0}x{W0} grid, got {H}x{W}")
            x = torch.from_numpy(chunk).to(self._device).reshape(m, H * W, d).transpose(0, 1)
            delta = x - mean[:, None, :]                 # (HW, m, d)
            md2 = (torch.bmm(delta, inv) * delta).sum(-1)  # (HW, m)
            parts.append(md2.clamp_min_(0).sqrt_().t().reshape(m, H, W).cpu().numpy())
        if not parts:
            raise ValueError("padim: nothing to score (empty input)")
        patch = np.concatenate(parts).astype(np.float32, copy=False)
        return patch, patch.reshape(len(patch), -1).max(1).astype(np.float64)

    def _save_state(self, directory: Path) -> None:
        self._check_fitted()
        save_arrays(directory / "state.npz", grid=np.asarray(self.grid_, dtype=np.int64),
                    channels=self.channels_, mean=self.mean_, inv_cov=self.inv_cov_)
        self._save_stats(directory)

    def _load_state(self, directory: Path) -> None:
        arrays = load_arrays(directory / "state.npz")
        self.grid_ = tuple(int(v) for v in arrays["grid"])  # type: ignore[assignment]
        self.channels_ = arrays["channels"]
        self.mean_ = arrays["mean"].astype(np.float32, copy=False)
        self.inv_cov_ = arrays["inv_cov"].astype(np.float32, copy=False)
        self._on_device = None
        self._load_stats(directory)

    # -- export ----------------------------------------------------------------
    def torch_head(self) -> nn.Module:
        return PaDiMHead(self)


class PaDiMHead(nn.Module):
    """:class:`PaDiM`'s image score in torch: Mahalanobis distance per position, max over positions."""

    def __init__(self, detector: PaDiM):
        super().__init__()
        self.register_buffer("channels", torch.as_tensor(np.asarray(detector.channels_, np.int64)))
        self.register_buffer("mean", torch.as_tensor(np.asarray(detector.mean_, np.float32)))
        self.register_buffer("inv_cov", torch.as_tensor(np.asarray(detector.inv_cov_, np.float32)))

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        n = patches.shape[0]
        x = patches.index_select(3, self.channels).float().reshape(n, -1, self.mean.shape[1]).transpose(0, 1)
        delta = x - self.mean[:, None, :]
        md2 = (torch.bmm(delta, self.inv_cov) * delta).sum(-1)
        return md2.clamp_min(0).sqrt().t().reshape(n, -1).max(1).values.double()

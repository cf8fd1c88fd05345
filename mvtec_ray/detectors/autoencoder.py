"""MLP autoencoder on pooled vectors; score = mean squared reconstruction error."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from mvtec_ray.detectors.chunks import iter_chunks
from mvtec_ray.detectors.pooled_base import SCORE_CHUNK, PooledDetector
from mvtec_ray.detectors.preprocess import Preprocessor
from mvtec_ray.detectors.registry import register
from mvtec_ray.detectors.torch_heads import PreprocessorModule


def _build_autoencoder(dim: int, hidden: int, bottleneck: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(),
        nn.Linear(hidden, bottleneck),  # linear code: a ReLU here can kill units
        nn.Linear(bottleneck, hidden), nn.ReLU(),
        nn.Linear(hidden, dim),
    )


@register
class AutoencoderDetector(PooledDetector):
    """MLP autoencoder; score = mean squared reconstruction error.

    Always standardises its (preprocessed) input internally, so
    ``preprocess="none"`` is the default. Uses whatever torch thread count the
    caller set.
    """

    name = "autoencoder"
    default_preprocess = "none"
    MODEL_FILE: ClassVar[str] = "autoencoder.pt"
    SCALER_FILE: ClassVar[str] = "autoencoder_scaler.npz"

    @classmethod
    def _own_params(cls) -> dict[str, Any]:
        return {"hidden": 256, "bottleneck": 32, "lr": 1e-3, "batch_size": 64,
                "max_epochs": 200, "patience": 10, "val_fraction": 0.1, "seed": 0}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        for key in ("hidden", "bottleneck", "batch_size", "max_epochs"):
            if int(self.params[key]) < 1:
                raise ValueError(f"{self.name}: {key} must be >= 1")
        self._scaler: Preprocessor | None = None
        self.model_: Any = None
        #: training summary: epochs run, best monitored loss, what was monitored
        self.fit_info_: dict[str, Any] = {}

    def _fit(self, Z: np.ndarray, Z_val: np.ndarray | None) -> None:
        p = self.params
        seed = int(p["seed"])
        monitor = "val"
        if Z_val is None:
            # seeded hold-out of the training normals for early stopping (the fit stage passes no
            # X_val: its validation images choose the threshold and must stay unseen)
            monitor = "train"
            n_val = int(round(float(p["val_fraction"]) * len(Z)))
            if n_val >= 1 and len(Z) - n_val >= 1:
                perm = np.random.default_rng(seed).permutation(len(Z))
                Z_val, Z = Z[perm[:n_val]], Z[perm[n_val:]]
                monitor = f"train_holdout_{n_val}"
        self._scaler = Preprocessor("standard").fit(Z)
        train = torch.from_numpy(self._scaler.transform(Z))
        val = None if Z_val is None else torch.from_numpy(self._scaler.transform(Z_val))

        # fork_rng: seed init and shuffling without touching the caller's RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build_autoencoder(train.shape[1], int(p["hidden"]), int(p["bottleneck"]))
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(model.parameters(), lr=float(p["lr"]))
            bs = int(p["batch_size"])
            best, best_state, bad, epoch = float("inf"), None, 0, 0
            for epoch in range(1, int(p["max_epochs"]) + 1):  # noqa: B007 - read after the loop
                model.train()
                total = 0.0
                for idx in torch.randperm(len(train), generator=gen).split(bs):
                    batch = train[idx]
                    loss = torch.mean((model(batch) - batch) ** 2)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(idx)
                monitored = total / len(train) if val is None else self._loss(model, val)
                if monitored < best:
                    best, best_state, bad = monitored, copy.deepcopy(model.state_dict()), 0
                else:
                    bad += 1
                    if bad >= int(p["patience"]):
                        break
        if best_state is not None:  # None only if every loss was NaN
            model.load_state_dict(best_state)
        model.eval()
        self.model_ = model
        self.fit_info_ = {"epochs": epoch, "best_loss": best, "monitor": monitor}

    @staticmethod
    def _loss(model, data) -> float:
        model.eval()
        with torch.no_grad():
            return float(torch.mean((model(data) - data) ** 2))

    def _score(self, Z: np.ndarray) -> np.ndarray:
        S = self._scaler.transform(Z)
        out = np.empty(len(S), dtype=np.float64)
        self.model_.eval()
        with torch.no_grad():
            for sl in iter_chunks(len(S), SCORE_CHUNK):
                x = torch.from_numpy(S[sl])
                out[sl] = torch.mean((self.model_(x) - x) ** 2, dim=1).double().numpy()
        return out

    def _save_model(self, directory: Path) -> None:
        self._scaler.save(directory / self.SCALER_FILE)
        torch.save(self.model_.state_dict(), directory / self.MODEL_FILE)

    def _load_model(self, directory: Path) -> None:
        self._scaler = Preprocessor.load(directory / self.SCALER_FILE)
        state = torch.load(directory / self.MODEL_FILE, map_location="cpu", weights_only=True)
        model = _build_autoencoder(self._scaler.n_features_in, int(self.params["hidden"]),
                                   int(self.params["bottleneck"]))
        model.load_state_dict(state)
        model.eval()
        self.model_ = model

    def torch_head(self) -> nn.Module:
        return AutoencoderHead(self)


class AutoencoderHead(nn.Module):
    """:class:`AutoencoderDetector`'s scoring in torch: preprocessing, its scaler, the network."""

    def __init__(self, detector: AutoencoderDetector):
        super().__init__()
        self.pre = PreprocessorModule(detector.preprocessor)
        self.scaler = PreprocessorModule(detector._scaler)
        self.net = detector.model_.eval()

    def forward(self, pooled: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        x = self.scaler(self.pre(pooled)).float()
        return ((self.net(x) - x) ** 2).mean(1).double()

"""Tiny synthetic patch maps (8x8 grids, C=24) for PatchCore / PaDiM / coreset tests, and the
module-scoped ``data`` fixture built from them (import it into a test module to use it)."""
from __future__ import annotations

import numpy as np
import pytest

H = W = 8
C = 24
SCALE = 4  # output pixels per patch
OUT = (H * SCALE, W * SCALE)


def _pattern(rng: np.random.Generator) -> np.ndarray:
    fy, fx, ph = rng.uniform(0.3, 1.0, C), rng.uniform(0.3, 1.0, C), rng.uniform(0, 6.3, C)
    return np.sin(np.arange(H)[:, None, None] * fy + np.arange(W)[None, :, None] * fx + ph)


def make_maps(n: int, anomalous: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise around one smooth pattern; anomalies shift a 2x2 patch square."""
    pattern = _pattern(np.random.default_rng(123))
    rng = np.random.default_rng(seed)
    X = pattern[None] + 0.1 * rng.normal(size=(n, H, W, C))
    mask = np.zeros((n, H, W), dtype=bool)
    if anomalous:
        for i in range(n):
            y, x = rng.integers(0, H - 1, size=2)
            X[i, y:y + 2, x:x + 2] += rng.choice([-0.5, 0.5], size=C)
            mask[i, y:y + 2, x:x + 2] = True
    return X.astype(np.float16), mask


@pytest.fixture(scope="module")
def data():
    train, _ = make_maps(30, False, seed=1)
    normal, m0 = make_maps(10, False, seed=2)
    anomal, m1 = make_maps(10, True, seed=3)
    test = np.concatenate([normal, anomal])
    labels = np.r_[np.zeros(10), np.ones(10)]
    pixel_mask = np.kron(np.concatenate([m0, m1]), np.ones((SCALE, SCALE), dtype=bool))
    return train, test, labels, pixel_mask

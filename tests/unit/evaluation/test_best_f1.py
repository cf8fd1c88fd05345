"""best_f1 (the F1-max threshold of images and of validation pixels) against a brute force over
every distinct score, on random inputs with and without ties."""
from __future__ import annotations

import numpy as np
import pytest

from mvtec_ray.evaluation.thresholds import best_f1


def brute_force_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    values = np.unique(scores)[::-1]  # every distinct score, descending: ties go to the higher one
    n_pos = int(labels.sum())
    f1 = [2 * int((labels[scores >= v]).sum()) / (int((scores >= v).sum()) + n_pos) for v in values]
    best = int(np.argmax(f1))
    thr = values[best] if best + 1 == len(values) else 0.5 * (values[best] + values[best + 1])
    return f1[best], float(thr)


@pytest.mark.parametrize("kind", ["integers", "normal", "rounded"])
def test_best_f1_equals_the_brute_force(kind):
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 50))
        scores = {"integers": lambda: rng.integers(0, 5, n).astype(np.float64),
                  "normal": lambda: rng.normal(size=n),
                  "rounded": lambda: np.round(rng.normal(size=n), 1)}[kind]()
        labels = (rng.random(n) < rng.uniform(0.05, 0.9)).astype(np.int8)
        labels[int(rng.integers(n))] = 1
        f1, thr = best_f1(scores, labels)
        want_f1, want_thr = brute_force_f1(scores, labels)
        assert f1 == pytest.approx(want_f1, abs=1e-12) and thr == pytest.approx(want_thr, abs=1e-12)
        # the threshold makes the chosen decisions on these scores
        flagged = scores >= thr
        assert 2 * int(labels[flagged].sum()) / (int(flagged.sum()) + int(labels.sum())) == pytest.approx(f1)


def test_a_perfect_split_and_all_positive():
    assert best_f1(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == (1.0, 0.5)
    assert best_f1(np.array([0.3, 0.3]), np.array([1, 1])) == (1.0, 0.3)

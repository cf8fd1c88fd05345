"""The pixel metrics without redundant work: the PRO curve from a partition of the normal pixels
(only the share above the FPR limit sorted) and one histogram of the defect pixels, and
``evaluate_pixels`` (every metric from one flattening and one sort), against the implementation
they replaced (kept below as the reference) on random maps with several regions per image, ragged
sizes and ties."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from mvtec_ray.evaluation.pixel_metrics import (
    evaluate_pixels,
    maps_and_masks,
    pixel_auroc,
    pixel_f1,
    pixel_f1_max,
    pro_curve,
    pro_score,
)

# |new - reference| allowed: the threshold grid's resolution (measured: 0.0, the grids are the same)
TOLERANCE = 1e-3


# -- the reference: pro_curve / pro_score as they were before (one full sort of the normal pixels) --
def _reference_regions(maps, masks):
    ragged = isinstance(maps, (list, tuple)) and len({np.shape(x) for x in maps}) > 1
    structure_2d = np.ones((3, 3), dtype=int)
    if ragged:
        values, defect, labels, total = [], [], [], 0
        for a, m in zip(maps, masks):
            m = np.asarray(m, dtype=bool)
            lab, k = ndimage.label(m, structure=structure_2d)
            values.append(np.asarray(a, dtype=np.float32).ravel())
            defect.append(m.ravel())
            labels.append(np.where(lab > 0, lab + total, 0).ravel())
            total += k
        return np.concatenate(values), np.concatenate(defect), np.concatenate(labels), total
    a, m = maps_and_masks(maps, masks)
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = structure_2d
    regions, n_regions = ndimage.label(m, structure=structure)
    return a.ravel(), m.ravel(), regions.ravel(), n_regions


def reference_pro_curve(maps, masks, fpr_limit=0.3, num_thresholds=200):
    a, m, regions, n_regions = _reference_regions(maps, masks)
    normal = np.sort(a[~m], axis=None)
    if n_regions == 0 or normal.size == 0:
        return np.empty(0), np.empty(0)
    n_norm = normal.size
    targets = np.linspace(0.0, fpr_limit, num_thresholds)
    k = np.clip(np.ceil(targets * n_norm).astype(np.int64), 1, n_norm)
    picked = normal[n_norm - k]
    cand = np.concatenate([picked, np.nextafter(picked, np.inf),
                           [a.max(), a.min(), np.nextafter(normal[-1], np.inf)]])
    thr = np.unique(cand)
    fpr = (n_norm - np.searchsorted(normal, thr, side="left")) / n_norm
    lab = regions[m]
    vals = a[m]
    sizes = np.bincount(lab)
    weights = 1.0 / sizes[lab]
    bins = np.searchsorted(thr, vals, side="right")
    hist = np.bincount(bins, weights=weights, minlength=thr.size + 1)
    pro = np.minimum(np.cumsum(hist[::-1])[::-1][1:] / n_regions, 1.0)
    return np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]]


def reference_pro_score(maps, masks, fpr_limit=0.3, num_thresholds=200):
    fpr, pro = reference_pro_curve(maps, masks, fpr_limit, num_thresholds)
    if fpr.size == 0:
        return float("nan")
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    above = np.flatnonzero(~inside)
    if above.size and x[-1] < fpr_limit:
        i = above[0]
        x0, y0, x1, y1 = fpr[i - 1], pro[i - 1], fpr[i], pro[i]
        x, y = np.r_[x, fpr_limit], np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    return float(np.trapezoid(y, x) / fpr_limit)


# -- random maps ------------------------------------------------------------------------------------
def random_maps(seed, n=10, ragged=True, decimals=None, regions=(1, 4), dtype=np.float32):
    """Smooth random maps (an upsampled coarse grid, as patch maps are) with a few elliptic
    regions per image, some touching diagonally, lifted by a random amount; ``decimals`` rounds
    the scores (many ties); half the images are good (empty masks)."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i in range(n):
        h, w = (int(rng.integers(30, 90)), int(rng.integers(30, 90))) if ragged else (64, 48)
        coarse = rng.normal(size=(h // 6 + 1, w // 6 + 1))
        a = ndimage.zoom(coarse, 6, order=1)[:h, :w] + 0.3 * rng.normal(size=(h, w))
        m = np.zeros((h, w), bool)
        if i % 2:
            yy, xx = np.ogrid[:h, :w]
            for _ in range(int(rng.integers(*regions))):
                cy, cx = rng.integers(0, h), rng.integers(0, w)
                ry, rx = rng.integers(1, 10), rng.integers(1, 10)
                m |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            m[0, 0] = m[1, 1] = True  # a diagonal touch: one region with 8-connectivity
            a = a + rng.uniform(0.0, 2.0) * m
        if decimals is not None:
            a = np.round(a, decimals)
        maps.append(a.astype(dtype))
        masks.append(m)
    if not ragged:
        return np.stack(maps), np.stack(masks)
    return maps, masks


CASES = [dict(seed=s, ragged=r, decimals=d) for s in range(4) for r in (True, False) for d in (None, 1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("fpr_limit,num_thresholds", [(0.3, 200), (0.3, 7), (0.05, 200), (1.0, 50)])
def test_pro_matches_the_reference(case, fpr_limit, num_thresholds):
    maps, masks = random_maps(**case)
    new = pro_score(maps, masks, fpr_limit, num_thresholds)
    old = reference_pro_score(maps, masks, fpr_limit, num_thresholds)
    assert abs(new - old) <= TOLERANCE, (new, old)
    assert new == pytest.approx(old, abs=1e-12)  # measured: the same grid, the same counts
    fpr, pro = pro_curve(maps, masks, fpr_limit, num_thresholds)
    ref_fpr, ref_pro = reference_pro_curve(maps, masks, fpr_limit, num_thresholds)
    np.testing.assert_array_equal(fpr, ref_fpr)
    np.testing.assert_allclose(pro, ref_pro, rtol=0, atol=1e-12)


def test_pro_with_ties_across_the_fpr_limit():
    """Scores of 5 levels only: the partition's pivot, the thresholds and the pixels below them tie."""
    rng = np.random.default_rng(11)
    maps, masks = random_maps(12, n=8, ragged=True)
    maps = [np.floor(rng.uniform(0, 5, size=a.shape) + m).astype(np.float32) for a, m in zip(maps, masks)]
    for fpr_limit in (0.3, 0.2, 0.4, 0.6):
        assert pro_score(maps, masks, fpr_limit) == pytest.approx(reference_pro_score(maps, masks, fpr_limit),
                                                                   abs=1e-12)
    constant = [np.full(a.shape, 0.5, np.float32) for a in maps]
    assert pro_score(constant, masks) == pytest.approx(0.15, abs=1e-9)


def test_pro_single_map_and_edge_cases():
    maps, masks = random_maps(3, n=2, ragged=False)
    assert pro_score(maps[1], masks[1]) == pytest.approx(reference_pro_score(maps[1], masks[1]), abs=1e-12)
    assert np.isnan(pro_score(maps, np.zeros_like(masks)))
    assert np.isnan(pro_score(maps, np.ones_like(masks)))  # no normal pixel
    with pytest.raises(ValueError, match="num_thresholds"):
        pro_curve(maps, masks, num_thresholds=1)


@pytest.mark.parametrize("case", CASES[:6], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_evaluate_pixels_equals_each_metric(case):
    maps, masks = random_maps(**case)
    threshold = float(np.quantile(np.concatenate([np.ravel(a) for a in maps]), 0.9))
    row = evaluate_pixels(maps, masks, threshold)
    assert row["pixel_auroc"] == pixel_auroc(maps, masks)
    assert row["pixel_pro"] == pro_score(maps, masks)
    assert row["pixel_f1_max"] == pixel_f1_max(maps, masks)
    expected = pixel_f1(maps, masks, threshold)
    assert row.keys() >= expected.keys()
    for key, value in expected.items():
        assert row[key] == value, key
    flat_maps = np.concatenate([np.ravel(a) for a in maps])
    flat_masks = np.concatenate([np.ravel(m) for m in masks])
    assert row["pixel_auroc"] == pytest.approx(roc_auc_score(flat_masks, flat_maps), abs=1e-12)
    assert set(evaluate_pixels(maps, masks)) == {"pixel_auroc", "pixel_pro", "pixel_f1_max"}


def test_evaluate_pixels_one_class_only_and_a_threshold_between_float32_values():
    maps, masks = random_maps(5, n=4, ragged=True)
    empty = [np.zeros_like(m) for m in masks]
    row = evaluate_pixels(maps, empty, 0.0)
    assert np.isnan(row["pixel_auroc"]) and np.isnan(row["pixel_pro"]) and np.isnan(row["pixel_f1_max"])
    assert row["pixel_recall"] != row["pixel_recall"]  # 0/0
    value = float(maps[1][masks[1]][0])
    just_above = np.nextafter(value, np.inf)  # a float64 threshold that rounds to the float32 value
    for threshold in (value, just_above):
        got = evaluate_pixels(maps, masks, threshold)
        for key, expected in pixel_f1(maps, masks, threshold).items():
            assert got[key] == expected

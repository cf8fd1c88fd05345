"""Pixel-level metrics: pixel AUROC, PRO (per-region overlap), pixel F1 (pure numpy / scipy / scikit-learn)."""
from __future__ import annotations

import numpy as np

# 8-connectivity, as in the official MVTec AD evaluation code (pro_curve_util.py
# labels ground-truth regions with ``structure = np.ones((3, 3))``).
PRO_STRUCTURE_2D = np.ones((3, 3), dtype=int)


def maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Maps and masks as ``(n, h, w)`` arrays; a list of 2-D maps of different sizes (each with
    its mask of the same size: full-resolution evaluation) comes back as one ``(1, 1, total)``
    row of pixels, for the metrics that need no regions."""
    if _is_ragged(maps):
        flat_maps, flat_masks = _ragged(maps, masks)
        return maps_and_masks(flat_maps.reshape(1, 1, -1), flat_masks.reshape(1, 1, -1))
    a = np.asarray(maps)
    m = np.asarray(masks)
    if a.ndim == 2 and m.ndim == 2:  # a single map
        a, m = a[None], m[None]
    if a.ndim != 3 or a.shape != m.shape:
        raise ValueError(f"maps {a.shape} and masks {m.shape} must both be (n, h, w) "
                         "with the same shape")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    n_nan = int(np.isnan(a).sum())
    if n_nan:
        raise ValueError(f"maps contain {n_nan} NaN value(s)")
    return a, m.astype(bool)


def _is_ragged(maps) -> bool:
    return isinstance(maps, (list, tuple)) and len(maps) > 0 and len({np.shape(x) for x in maps}) > 1


def _ragged(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    if len(maps) != len(masks) or any(np.shape(a) != np.shape(m) or np.ndim(a) != 2 for a, m in zip(maps, masks)):
        raise ValueError("each map must be 2-D with a mask of the same shape")
    return (np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in maps]),
            np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks]))


def _regions(maps, masks) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Flat (scores, is_defect, region label) of every pixel and the number of regions: the
    8-connected components of each mask (labels unique over all images, none across images)."""
    from scipy import ndimage
    if _is_ragged(maps):
        _ragged(maps, masks)  # shape checks
        values, defect, labels, total = [], [], [], 0
        for a, m in zip(maps, masks):
            m = np.asarray(m, dtype=bool)
            lab, k = ndimage.label(m, structure=PRO_STRUCTURE_2D)
            values.append(np.asarray(a, dtype=np.float32).ravel())
            defect.append(m.ravel())
            labels.append(np.where(lab > 0, lab + total, 0).ravel())
            total += k
        a = np.concatenate(values)
        if np.isnan(a).any():
            raise ValueError(f"maps contain {int(np.isnan(a).sum())} NaN value(s)")
        return a, np.concatenate(defect), np.concatenate(labels), total
    a, m = maps_and_masks(maps, masks)
    # 3-D structure without links across images = per-image 8-connectivity,
    # with labels unique over the whole stack
    structure = np.zeros((3, 3, 3), dtype=int)
    structure[1] = PRO_STRUCTURE_2D
    regions, n_regions = ndimage.label(m, structure=structure)
    return a.ravel(), m.ravel(), regions.ravel(), n_regions


def pixel_auroc(maps, masks) -> float:
    """Pixel-level AUROC over all pixels of all maps (NaN if one class only).

    Computed as the Mann-Whitney statistic (ties count 1/2), which equals
    ``sklearn.metrics.roc_auc_score``; two sorts and a binary search instead
    of sklearn's full ROC curve keep a few million pixels well under a second.
    Downsampling, if wanted, is the caller's choice. ``maps`` / ``masks`` may also be lists of
    2-D arrays of different sizes (each map at its own mask's resolution).
    """
    a, m = maps_and_masks(maps, masks)
    neg = np.sort(a[~m], axis=None)
    pos = np.sort(a[m], axis=None)  # sorted queries make searchsorted cache-friendly
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    below = np.searchsorted(neg, pos, side="left").sum(dtype=np.int64)
    ties = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64) - below
    return float((below + 0.5 * ties) / (pos.size * neg.size))


def pro_curve(maps, masks, fpr_limit: float = 0.3,
              num_thresholds: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """Sampled PRO curve ``(fprs, pros)``, sorted by increasing FPR.

    Ground-truth regions are the 8-connected components of each mask (as in
    the official MVTec AD evaluation). For threshold ``t``: PRO is the mean over
    all regions (of all images) of the fraction of the region's pixels with
    ``map >= t``; FPR is the fraction of normal pixels (outside every mask, all
    images) with ``map >= t``.

    Thresholds are normal-pixel scores at ``num_thresholds`` FPR targets evenly
    spaced in ``[0, fpr_limit]`` (plus the first one at or beyond ``fpr_limit``,
    the maximum and minimum score). Each score ``v`` is used both as ``v`` and
    just above it, so the sampled points are exact vertices of the full curve:
    the best PRO at each FPR level and the jump across a tie. Points are
    joined linearly, which is also how ties are resolved (random tie-breaking
    in expectation). The curve starts at ``(0, 0)``. Returns empty arrays when
    there are no regions or no normal pixels. Maps and masks: ``(n, h, w)``, or lists of 2-D
    arrays of different sizes.
    """
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2")
    a, m, regions, n_regions = _regions(maps, masks)
    normal = np.sort(a[~m], axis=None)
    if n_regions == 0 or normal.size == 0:
        return np.empty(0), np.empty(0)

    n_norm = normal.size
    targets = np.linspace(0.0, fpr_limit, num_thresholds)
    k = np.clip(np.ceil(targets * n_norm).astype(np.int64), 1, n_norm)
    picked = normal[n_norm - k]  # k-th largest normal score: FPR >= target
    cand = np.concatenate([picked, np.nextafter(picked, np.inf),
                           [a.max(), a.min(), np.nextafter(normal[-1], np.inf)]])
    thr = np.unique(cand)  # ascending

    # FPR(t) = #normal >= t / n_norm
    fpr = (n_norm - np.searchsorted(normal, thr, side="left")) / n_norm

    # PRO(t) = (1/R) * sum over region pixels >= t of 1/|region|, via a
    # weighted histogram over threshold bins (no region x threshold matrix)
    lab = regions[m]
    vals = a[m]
    sizes = np.bincount(lab)
    weights = 1.0 / sizes[lab]
    bins = np.searchsorted(thr, vals, side="right")  # = #thresholds <= value
    hist = np.bincount(bins, weights=weights, minlength=thr.size + 1)
    # pixel counts for threshold j iff bins > j
    pro = np.cumsum(hist[::-1])[::-1][1:] / n_regions
    pro = np.minimum(pro, 1.0)  # float summation noise

    # thresholds descending -> FPR and PRO ascending
    fpr = np.r_[0.0, fpr[::-1]]
    pro = np.r_[0.0, pro[::-1]]
    return fpr, pro


def pro_score(maps, masks, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AU-PRO).

    See :func:`pro_curve` for the curve. The curve is cut at exactly
    ``fpr_limit`` (linear interpolation), integrated with the trapezoid rule
    and divided by ``fpr_limit``: a perfect map scores 1.0, a random map about
    ``fpr_limit / 2`` and a constant map exactly ``fpr_limit / 2``. NaN when the
    masks hold no anomalous region or no normal pixel. Memory is a few copies
    of the pixel scores (fine for ~100 maps of 256x256).
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fpr, pro = pro_curve(maps, masks, fpr_limit, num_thresholds)
    if fpr.size == 0:
        return float("nan")
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    above = np.flatnonzero(~inside)
    if above.size and x[-1] < fpr_limit:
        i = above[0]  # first point past the limit; i - 1 is the last inside
        x0, y0, x1, y1 = fpr[i - 1], pro[i - 1], fpr[i], pro[i]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_lim]
    return float(np.trapezoid(y, x) / fpr_limit)


def pixel_f1(maps, masks, threshold: float) -> dict[str, float]:
    """Pixel precision, recall and F1 over all pixels of all maps at ``threshold``
    (a pixel is flagged iff ``map >= threshold``); a 0/0 ratio is NaN."""
    a, m = maps_and_masks(maps, masks)
    pred = a >= float(threshold)
    tp = int(np.count_nonzero(pred & m))
    fp = int(np.count_nonzero(pred & ~m))
    fn = int(np.count_nonzero(m)) - tp
    return {"pixel_precision": tp / (tp + fp) if tp + fp else float("nan"),
            "pixel_recall": tp / (tp + fn) if tp + fn else float("nan"),
            "pixel_f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")}


def pixel_f1_max(maps, masks) -> float:
    """The best pixel F1 over all thresholds: an **oracle** (it looks at these masks), as
    anomalib's F1-max tuned on the test set; NaN without defect pixels. Exact: candidate
    thresholds are the defect pixels' scores, counted against two sorted arrays (no sort of
    every pixel with its label)."""
    a, m = maps_and_masks(maps, masks)
    pos = np.sort(a[m], axis=None)
    if pos.size == 0:
        return float("nan")
    neg = np.sort(a[~m], axis=None)
    candidates = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    return float(np.max(2 * tp / (tp + fp + pos.size)))

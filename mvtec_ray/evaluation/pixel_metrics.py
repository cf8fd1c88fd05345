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


def _flat(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's score and defect flag, flattened once (checked as in :func:`maps_and_masks`)."""
    a, m = maps_and_masks(maps, masks)
    return a.ravel(), m.ravel()


def _defect_labels(masks) -> tuple[np.ndarray, int]:
    """The region label of every defect pixel (in the order of ``a[m]`` of :func:`_flat`) and the
    number of regions: the 8-connected components of each mask, labels unique over all images (no
    region spans two images). ``masks``: the 2-D masks, a list or a stack, already checked."""
    from scipy import ndimage
    m = masks if _is_ragged(masks) else np.asarray(masks, dtype=bool)
    if isinstance(m, np.ndarray) and m.ndim == 2:  # a single mask
        m = m[None]
    labels, total = [], 0
    for mask in m:
        mask = np.asarray(mask, dtype=bool)
        lab, k = ndimage.label(mask, structure=PRO_STRUCTURE_2D)
        labels.append(lab[mask] + total)
        total += k
    return (np.concatenate(labels) if labels else np.zeros(0, np.int64)), total


def _auroc_sorted(neg: np.ndarray, pos: np.ndarray) -> tuple[float, np.ndarray]:
    """The Mann-Whitney AUROC of sorted normal and defect scores, and for every defect score the
    number of normal scores below it (what :func:`_f1_max_sorted` reuses)."""
    below = np.searchsorted(neg, pos, side="left")  # sorted queries make searchsorted cache-friendly
    if pos.size == 0 or neg.size == 0:
        return float("nan"), below
    n_below = below.sum(dtype=np.int64)
    ties = np.searchsorted(neg, pos, side="right").sum(dtype=np.int64) - n_below
    return float((n_below + 0.5 * ties) / (pos.size * neg.size)), below


def _f1_max_sorted(neg: np.ndarray, pos: np.ndarray, below: np.ndarray) -> float:
    """The best F1 over the candidate thresholds (each distinct defect score), from sorted scores
    and :func:`_auroc_sorted`'s ``below``."""
    if pos.size == 0:
        return float("nan")
    first = np.r_[True, pos[1:] != pos[:-1]]  # the first of each run of equal defect scores
    tp = pos.size - np.flatnonzero(first)
    fp = neg.size - below[first]
    return float(np.max(2 * tp / (tp + fp + pos.size)))


def _f1_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    return {"pixel_precision": tp / (tp + fp) if tp + fp else float("nan"),
            "pixel_recall": tp / (tp + fn) if tp + fn else float("nan"),
            "pixel_f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else float("nan")}


def pixel_auroc(maps, masks) -> float:
    """Pixel-level AUROC over all pixels of all maps (NaN if one class only).

    Computed as the Mann-Whitney statistic (ties count 1/2), which equals
    ``sklearn.metrics.roc_auc_score``; two sorts and a binary search instead
    of sklearn's full ROC curve keep a few million pixels well under a second.
    Downsampling, if wanted, is the caller's choice. ``maps`` / ``masks`` may also be lists of
    2-D arrays of different sizes (each map at its own mask's resolution).
    """
    a, m = _flat(maps, masks)
    neg, pos = np.sort(a[~m]), np.sort(a[m])
    return _auroc_sorted(neg, pos)[0]


def _thresholds_k(n_norm: int, fpr_limit: float, num_thresholds: int) -> np.ndarray:
    """Which normal scores are thresholds: the k-th largest for each k (ascending)."""
    targets = np.linspace(0.0, fpr_limit, num_thresholds)
    return np.clip(np.ceil(targets * n_norm).astype(np.int64), 1, n_norm)  # k-th largest: FPR >= target


def _normal_tail(normal: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(top, rest)``: the ``k`` highest normal scores sorted ascending, and the others (each at
    most ``top[0]``) unsorted: a partition, not a sort, of the pixels below the FPR limit."""
    n = normal.size
    if k >= n:
        return np.sort(normal), normal[:0]
    part = np.partition(normal, n - k)
    top = part[n - k:]
    top.sort()
    return top, part[:n - k]


def _pro_curve_sorted(defect_values: np.ndarray, defect_labels: np.ndarray, n_regions: int,
                      top: np.ndarray, rest: np.ndarray, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The PRO curve from the normal scores' sorted top (see :func:`_normal_tail`; a fully sorted
    array with ``rest`` empty will do) and the defect pixels' scores and region labels.

    One pass bins every defect pixel into the threshold grid; the regions' weighted histogram,
    summed from the top, gives the mean overlap at every threshold, and the sorted normal scores
    give the FPR at every threshold (no labelling or thresholding pass per threshold)."""
    n_norm = top.size + rest.size
    picked = top[top.size - k]  # k-th largest normal score
    lowest = min(rest.min() if rest.size else top[0], defect_values.min())
    cand = np.concatenate([picked, np.nextafter(picked, np.inf),
                           [max(top[-1], defect_values.max()), lowest, np.nextafter(top[-1], np.inf)]])
    thr = np.unique(cand)  # ascending

    # FPR(t) = #normal >= t / n_norm; ``rest`` (all <= top[0]) counts only for t <= top[0]
    count = top.size - np.searchsorted(top, thr, side="left")
    if rest.size:
        for j in np.flatnonzero(thr <= top[0]):
            count[j] += np.count_nonzero(rest >= thr[j])
    fpr = count / n_norm

    # PRO(t) = (1/R) * sum over region pixels >= t of 1/|region|, via a
    # weighted histogram over threshold bins (no region x threshold matrix)
    sizes = np.bincount(defect_labels)
    weights = 1.0 / sizes[defect_labels]
    bins = np.searchsorted(thr, defect_values, side="right")  # = #thresholds <= value
    hist = np.bincount(bins, weights=weights, minlength=thr.size + 1)
    # pixel counts for threshold j iff bins > j
    pro = np.cumsum(hist[::-1])[::-1][1:] / n_regions
    pro = np.minimum(pro, 1.0)  # float summation noise

    # thresholds descending -> FPR and PRO ascending
    return np.r_[0.0, fpr[::-1]], np.r_[0.0, pro[::-1]]


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

    Cost: one labelling of the masks, one histogram of the defect pixels over the threshold
    grid, and a partition (not a sort) of the normal pixels: only the ``fpr_limit`` share with
    the highest scores is sorted.
    """
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2")
    a, m = _flat(maps, masks)
    labels, n_regions = _defect_labels(masks)
    n_norm = a.size - labels.size
    if n_regions == 0 or n_norm == 0:
        return np.empty(0), np.empty(0)
    k = _thresholds_k(n_norm, fpr_limit, num_thresholds)
    top, rest = _normal_tail(a[~m], int(k[-1]))
    return _pro_curve_sorted(a[m], labels, n_regions, top, rest, k)


def _pro_area(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> float:
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


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


def pro_score(maps, masks, fpr_limit: float = 0.3, num_thresholds: int = 200) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD AU-PRO).

    See :func:`pro_curve` for the curve. The curve is cut at exactly
    ``fpr_limit`` (linear interpolation), integrated with the trapezoid rule
    and divided by ``fpr_limit``: a perfect map scores 1.0, a random map about
    ``fpr_limit / 2`` and a constant map exactly ``fpr_limit / 2``. NaN when the
    masks hold no anomalous region or no normal pixel. Memory is a few copies
    of the pixel scores.
    """
    _check_fpr_limit(fpr_limit)
    return _pro_area(*pro_curve(maps, masks, fpr_limit, num_thresholds), fpr_limit)


def evaluate_pixels(maps, masks, threshold: float | None = None, fpr_limit: float = 0.3,
                    num_thresholds: int = 200) -> dict[str, float]:
    """``pixel_auroc``, ``pixel_pro`` and ``pixel_f1_max`` (and, with ``threshold``,
    ``pixel_precision`` / ``pixel_recall`` / ``pixel_f1``) of one set of maps, each equal to its own
    function's value, from one flattening and one sort of the normal and of the defect scores:
    the AUROC's sorted scores give the F1-max's counts, the PRO curve's thresholds and FPRs, and
    the F1 at ``threshold`` (calling the four functions flattens four times and sorts the normal
    pixels three times)."""
    _check_fpr_limit(fpr_limit)
    if num_thresholds < 2:
        raise ValueError("num_thresholds must be >= 2")
    a, m = _flat(maps, masks)
    neg = a[~m]
    neg.sort()
    pos = a[m]
    pos.sort()
    auroc, below = _auroc_sorted(neg, pos)
    row = {"pixel_auroc": auroc, "pixel_pro": float("nan"), "pixel_f1_max": _f1_max_sorted(neg, pos, below)}
    labels, n_regions = _defect_labels(masks)
    if n_regions and neg.size:
        k = _thresholds_k(neg.size, fpr_limit, num_thresholds)
        curve = _pro_curve_sorted(a[m], labels, n_regions, neg, neg[:0], k)
        row["pixel_pro"] = _pro_area(*curve, fpr_limit)
    if threshold is not None:
        t = neg.dtype.type(threshold)  # as ``map >= threshold`` compares
        tp = pos.size - int(np.searchsorted(pos, t, side="left"))
        fp = neg.size - int(np.searchsorted(neg, t, side="left"))
        row.update(_f1_counts(tp, fp, pos.size - tp))
    return row


def pixel_f1(maps, masks, threshold: float) -> dict[str, float]:
    """Pixel precision, recall and F1 over all pixels of all maps at ``threshold``
    (a pixel is flagged iff ``map >= threshold``); a 0/0 ratio is NaN."""
    a, m = _flat(maps, masks)
    pred = a >= float(threshold)
    tp = int(np.count_nonzero(pred & m))
    fp = int(np.count_nonzero(pred & ~m))
    return _f1_counts(tp, fp, int(np.count_nonzero(m)) - tp)


def pixel_f1_max(maps, masks) -> float:
    """The best pixel F1 over all thresholds: an **oracle** (it looks at these masks), as
    anomalib's F1-max tuned on the test set; NaN without defect pixels. Exact: candidate
    thresholds are the defect pixels' scores, counted against two sorted arrays (no sort of
    every pixel with its label)."""
    a, m = _flat(maps, masks)
    pos = np.sort(a[m])
    if pos.size == 0:
        return float("nan")
    neg = np.sort(a[~m])
    return _f1_max_sorted(neg, pos, np.searchsorted(neg, pos, side="left"))

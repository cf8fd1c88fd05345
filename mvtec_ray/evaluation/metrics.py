"""Image- and pixel-level evaluation metrics (pure numpy / scipy / scikit-learn).

Conventions used everywhere in this module:

* score: **higher = more anomalous**;
* label: ``1`` = anomaly (defect), ``0`` = good;
* decision rule: an image (or pixel) is flagged anomalous **iff score >= threshold**.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "Threshold",
    "choose_pixel_threshold",
    "choose_threshold",
    "choose_fpr_threshold",
    "parse_threshold_rule",
    "threshold_for_rule",
    "image_metrics",
    "pixel_auroc",
    "pixel_f1",
    "pixel_f1_max",
    "pro_curve",
    "pro_score",
    "summarise",
]

# 8-connectivity, as in the official MVTec AD evaluation code (pro_curve_util.py
# labels ground-truth regions with ``structure = np.ones((3, 3))``).
PRO_STRUCTURE_2D = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class Threshold:
    """A decision threshold: flag anomalous iff ``score >= value``."""

    value: float
    rule: str  # how it was chosen, e.g. "val_f1_max" or "normal_quantile_0.99"


# -- input checks --------------------------------------------------------------
def _as_scores(scores, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(f"{name} contain {n_nan} NaN value(s) out of {arr.size}")
    return arr


def _as_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} entries but there are {n} scores")
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must be 0 (good) or 1 (anomaly); found e.g. {bad.tolist()}")
    return arr.astype(np.int8)


def _threshold_value(threshold: Threshold | float | None) -> float:
    if threshold is None:
        return float("nan")
    if isinstance(threshold, Threshold):
        return float(threshold.value)
    return float(threshold)


# -- F1 over all thresholds ----------------------------------------------------
def _f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it.

    Candidates are the distinct scores (flag iff score >= candidate). Ties in F1
    go to the higher candidate. The returned threshold sits at the midpoint
    between the chosen score and the next lower distinct score, so it makes the
    same decisions on these scores while tolerating tiny numeric differences
    elsewhere; if the chosen score is the lowest one, it is returned as is.
    Requires at least one positive label.
    """
    n_pos = int(labels.sum())
    order = np.argsort(-scores, kind="stable")
    s = scores[order]
    y = labels[order]
    tp = np.cumsum(y, dtype=np.int64)
    fp = np.arange(1, s.size + 1, dtype=np.int64) - tp
    # last index of each run of equal scores: counts of "score >= value"
    last = np.r_[s[1:] != s[:-1], True]
    values, tp, fp = s[last], tp[last], fp[last]
    # integer numerator/denominator -> equal rationals give bit-identical floats
    f1 = (2 * tp) / (tp + fp + n_pos)
    best = int(np.argmax(f1))  # first maximum = highest threshold (values descend)
    if best + 1 < values.size:
        thr = 0.5 * (values[best] + values[best + 1])
        # midpoint can round onto the lower score when they are adjacent floats
        if not thr > values[best + 1]:
            thr = values[best]
    else:
        thr = values[best]
    return float(f1[best]), float(thr)


def choose_threshold(val_scores, val_labels, normal_quantile: float = 0.99) -> Threshold:
    """Choose a decision threshold from a validation set, never from test labels.

    The validation set holds held-out normal images (label 0) and, optionally,
    synthetic anomalies made from other held-out normals (label 1). Rule:

    * both classes present: the threshold maximising F1 on the validation set
      (ties go to the higher threshold), placed at the midpoint between the
      chosen score and the next lower distinct validation score, so tiny numeric
      differences do not flip decisions. ``rule = "val_f1_max"``.
    * only normals: the ``normal_quantile`` quantile of the normal scores
      (about ``1 - normal_quantile`` of normals flagged, instead of flagging
      everything as a plain F1 search would). ``rule = "normal_quantile_<q>"``.
    * empty: ``ValueError``; only anomalies (no normals): ``ValueError``, as no
      meaningful threshold exists without normals.

    Decision rule: an image is anomalous iff ``score >= threshold.value``.
    """
    scores = _as_scores(val_scores, "val_scores")
    labels = _as_labels(val_labels, scores.size, "val_labels")
    if scores.size == 0:
        raise ValueError("cannot choose a threshold from an empty validation set")
    if not 0.0 < normal_quantile <= 1.0:
        raise ValueError(f"normal_quantile must be in (0, 1], got {normal_quantile}")
    n_pos = int(labels.sum())
    if n_pos == scores.size:
        raise ValueError("validation set holds only anomalies (label 1); "
                         "held-out normal images are needed to choose a threshold")
    if n_pos == 0:
        value = float(np.quantile(scores, normal_quantile))
        return Threshold(value=value, rule=f"normal_quantile_{normal_quantile:g}")
    _, value = _f1_max(scores, labels)
    return Threshold(value=value, rule="val_f1_max")


def choose_fpr_threshold(val_scores, val_labels, max_fpr: float) -> Threshold:
    """The lowest threshold that flags at most ``max_fpr`` of the held-out normal images.

    Only the normals of the validation set (label 0) are used: a false-alarm budget, for lines
    where rejecting good parts costs money. With ``n`` normals at most ``floor(max_fpr * n)`` of
    them score ``>= value``; the value sits halfway between the highest normal score left
    unflagged and the next higher one (just above the highest normal when none may be
    flagged). ``rule = "val_fpr_<max_fpr>"``.
    """
    scores = _as_scores(val_scores, "val_scores")
    labels = _as_labels(val_labels, scores.size, "val_labels")
    if not 0.0 < max_fpr < 1.0:
        raise ValueError(f"the false-alarm budget must be in (0, 1), got {max_fpr}")
    normal = np.sort(scores[labels == 0])[::-1]  # descending
    if normal.size == 0:
        raise ValueError("the false-alarm rule needs held-out normal images (label 0) in the validation set")
    allowed = int(np.floor(max_fpr * normal.size + 1e-9))
    highest_unflagged = normal[allowed] if allowed < normal.size else None
    rule = f"val_fpr_{max_fpr:g}"
    if highest_unflagged is None:  # unreachable for max_fpr < 1, kept for clarity
        return Threshold(value=float(normal[-1]), rule=rule)
    above = normal[normal > highest_unflagged]
    if above.size == 0:
        value = float(np.nextafter(highest_unflagged, np.inf))
    else:
        value = 0.5 * (highest_unflagged + above.min())
        if not value > highest_unflagged:  # adjacent floats
            value = float(above.min())
    return Threshold(value=float(value), rule=rule)


def parse_threshold_rule(rule: str) -> tuple[str, float | None]:
    """``"f1"`` -> ("f1", None); ``"fpr:0.01"`` -> ("fpr", 0.01); anything else: ``ValueError``."""
    text = str(rule).strip().lower()
    if text == "f1":
        return "f1", None
    if text.startswith("fpr:"):
        try:
            rate = float(text[4:])
        except ValueError:
            rate = float("nan")
        if 0.0 < rate < 1.0:
            return "fpr", rate
        raise ValueError(f"threshold rule {rule!r}: the false-alarm rate must be a number in (0, 1), e.g. fpr:0.01")
    raise ValueError(f"unknown threshold rule {rule!r}; use 'f1' or 'fpr:<rate>' (e.g. fpr:0.01)")


def threshold_for_rule(val_scores, val_labels, rule: str = "f1", normal_quantile: float = 0.99) -> Threshold:
    """The threshold of a named rule: ``f1`` (:func:`choose_threshold`) or ``fpr:<rate>``
    (:func:`choose_fpr_threshold`); both use validation data only."""
    kind, rate = parse_threshold_rule(rule)
    if kind == "fpr":
        return choose_fpr_threshold(val_scores, val_labels, rate)
    return choose_threshold(val_scores, val_labels, normal_quantile=normal_quantile)


def choose_pixel_threshold(val_maps, val_masks, normal_quantile: float = 0.99) -> Threshold:
    """The pixel threshold, from validation maps and masks only (held-out normals: empty masks;
    synthetic defects: their masks), never from test masks: :func:`choose_threshold` over every
    validation pixel (F1-max with defect pixels, else the ``normal_quantile`` of normal pixels).
    A pixel is flagged iff ``map >= threshold``. Rules: ``pixel_val_f1_max`` / ``pixel_normal_quantile_<q>``.
    """
    a, m = _maps_and_masks(val_maps, val_masks)
    chosen = choose_threshold(a.ravel(), m.ravel().astype(np.int8), normal_quantile)
    return Threshold(chosen.value, f"pixel_{chosen.rule}")


# -- image-level metrics -------------------------------------------------------
def image_metrics(labels, scores, threshold: Threshold | float | None) -> dict[str, float]:
    """Image-level metrics for one test set.

    Returns ``image_auroc``, ``image_ap`` (NaN when only one class is present),
    ``image_f1``, ``image_precision``, ``image_recall`` at ``threshold`` (flag iff
    ``score >= threshold``; all NaN when ``threshold`` is None; a 0/0 ratio is
    NaN), ``threshold`` (the value used, NaN when None), and the **oracle**
    ``image_f1_max`` / ``threshold_f1_max``: the best F1 over all thresholds on
    these very test labels and its threshold. The oracle uses the test labels,
    so it is an upper bound for reference only, never a deployable operating
    point (NaN when there are no anomalies).
    """
    s = _as_scores(scores)
    y = _as_labels(labels, s.size)
    if s.size == 0:
        raise ValueError("image_metrics needs at least one image")
    n_pos = int(y.sum())
    both = 0 < n_pos < y.size
    from sklearn.metrics import average_precision_score, roc_auc_score  # here: a driver importing this stays light
    out: dict[str, float] = {
        "image_auroc": float(roc_auc_score(y, s)) if both else float("nan"),
        "image_ap": float(average_precision_score(y, s)) if both else float("nan"),
    }

    thr = _threshold_value(threshold)
    if np.isnan(thr):
        f1 = precision = recall = float("nan")
    else:
        pred = s >= thr
        tp = int(np.sum(pred & (y == 1)))
        fp = int(np.sum(pred & (y == 0)))
        fn = n_pos - tp
        precision = tp / (tp + fp) if tp + fp else float("nan")
        recall = tp / n_pos if n_pos else float("nan")
        f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else float("nan")
    out.update(image_f1=float(f1), image_precision=float(precision),
               image_recall=float(recall), threshold=thr)

    if n_pos:
        f1_max, thr_max = _f1_max(s, y)
    else:
        f1_max = thr_max = float("nan")
    out.update(image_f1_max=f1_max, threshold_f1_max=thr_max)
    return out


# -- pixel-level metrics -------------------------------------------------------
def _maps_and_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Maps and masks as ``(n, h, w)`` arrays; a list of 2-D maps of different sizes (each with
    its mask of the same size: full-resolution evaluation) comes back as one ``(1, 1, total)``
    row of pixels, for the metrics that need no regions."""
    if _is_ragged(maps):
        flat_maps, flat_masks = _ragged(maps, masks)
        return _maps_and_masks(flat_maps.reshape(1, 1, -1), flat_masks.reshape(1, 1, -1))
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
    a, m = _maps_and_masks(maps, masks)
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
    a, m = _maps_and_masks(maps, masks)
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
    a, m = _maps_and_masks(maps, masks)
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
    a, m = _maps_and_masks(maps, masks)
    pos = np.sort(a[m], axis=None)
    if pos.size == 0:
        return float("nan")
    neg = np.sort(a[~m], axis=None)
    candidates = np.unique(pos)
    tp = pos.size - np.searchsorted(pos, candidates, side="left")
    fp = neg.size - np.searchsorted(neg, candidates, side="left")
    return float(np.max(2 * tp / (tp + fp + pos.size)))


# -- summaries -----------------------------------------------------------------
def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Append one ``category == "mean"`` row per detector.

    Numeric metric columns: mean over the detector's categories with
    ``status == "ok"`` (all rows if there is no ``status`` column), NaNs
    skipped. Count columns (``n_*``): summed over the same rows. Other columns
    are copied when they hold a single value (e.g. ``backbone``), else left
    empty; ``status`` of a mean row is ``"ok"`` when every category was ok,
    ``"partial (k/n ok)"`` otherwise, and ``"no_ok_rows"`` when none was.
    Existing mean rows are recomputed. Sorted by detector, then category, with
    the mean row last for each detector.
    """
    for col in ("category", "detector"):
        if col not in rows.columns:
            raise ValueError(f"summarise needs a {col!r} column; got {list(rows.columns)}")
    base = rows[rows["category"] != "mean"].reset_index(drop=True)
    if base.empty:
        return base.copy()
    numeric = [c for c in base.columns
               if c not in ("category", "detector")
               and pd.api.types.is_numeric_dtype(base[c])
               and not pd.api.types.is_bool_dtype(base[c])]
    counts = [c for c in numeric if c.startswith("n_")]
    has_status = "status" in base.columns

    mean_rows = []
    for detector, grp in base.groupby("detector", sort=False, dropna=False):
        ok = grp[grp["status"] == "ok"] if has_status else grp
        pool = ok if len(ok) else grp
        row: dict = {}
        for c in base.columns:
            if c in numeric:
                row[c] = ok[c].sum() if c in counts else ok[c].mean()
            else:
                uniq = pool[c].dropna().unique()
                row[c] = uniq[0] if len(uniq) == 1 else None
        row["category"], row["detector"] = "mean", detector
        if has_status:
            row["status"] = ("ok" if len(ok) == len(grp) else
                             "no_ok_rows" if len(ok) == 0 else
                             f"partial ({len(ok)}/{len(grp)} ok)")
        mean_rows.append(row)

    out = pd.concat([base, pd.DataFrame(mean_rows, columns=base.columns)],
                    ignore_index=True)
    is_mean = out["category"] == "mean"
    order = (out.assign(_mean=is_mean.astype(int), _cat=out["category"].astype(str),
                        _det=out["detector"].astype(str))
             .sort_values(["_det", "_mean", "_cat"], kind="stable").index)
    return out.loc[order].reset_index(drop=True)

"""Decision thresholds chosen without test labels: F1 on validation, a false-alarm budget, a normal quantile.

Score convention: **higher = more anomalous**; flagged iff score >= threshold."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mvtec_ray.evaluation.pixel_metrics import maps_and_masks


@dataclass(frozen=True)
class Threshold:
    """A decision threshold: flag anomalous iff ``score >= value``."""

    value: float
    rule: str  # how it was chosen, e.g. "val_f1_max" or "normal_quantile_0.99"


def as_scores(scores, name: str = "scores") -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_nan = int(np.isnan(arr).sum())
    if n_nan:
        raise ValueError(f"{name} contain {n_nan} NaN value(s) out of {arr.size}")
    return arr


def as_labels(labels, n: int, name: str = "labels") -> np.ndarray:
    arr = np.asarray(labels).reshape(-1)
    if arr.size != n:
        raise ValueError(f"{name} has {arr.size} entries but there are {n} scores")
    # integers and booleans: the range says it (isin over millions of pixel labels costs ~0.5 s)
    exact = arr.dtype.kind in "biu" and (not arr.size or (arr.min() >= 0 and arr.max() <= 1))
    if arr.size and not exact and not np.isin(arr, (0, 1)).all():
        bad = np.unique(arr[~np.isin(arr, (0, 1))])[:5]
        raise ValueError(f"{name} must be 0 (good) or 1 (anomaly); found e.g. {bad.tolist()}")
    return arr.astype(np.int8)


def threshold_value(threshold: Threshold | float | None) -> float:
    if threshold is None:
        return float("nan")
    if isinstance(threshold, Threshold):
        return float(threshold.value)
    return float(threshold)


def best_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold achieving it.

    Candidates are the distinct scores (flag iff score >= candidate). Ties in F1
    go to the higher candidate. The returned threshold sits at the midpoint
    between the chosen score and the next lower distinct score, so it makes the
    same decisions on these scores while tolerating tiny numeric differences
    elsewhere; if the chosen score is the lowest one, it is returned as is.
    Requires at least one positive label.

    Only positive scores are evaluated as candidates: a candidate between two
    positive scores has the true positives of the next higher one and at least
    its false positives, so it never wins (and loses ties, which go higher).
    The positives and the negatives are sorted apart and counted by binary
    search, which for millions of pixels is several times cheaper than one
    stable argsort of everything.
    """
    labels = np.asarray(labels).astype(bool, copy=False)
    positive = np.sort(scores[labels])
    negative = np.sort(scores[~labels])
    n_pos = positive.size
    distinct = np.ones(n_pos, bool)
    distinct[1:] = positive[1:] != positive[:-1]
    values = positive[distinct][::-1]                      # distinct positive scores, descending (no re-sort)
    tp = n_pos - np.searchsorted(positive, values, side="left")
    fp = negative.size - np.searchsorted(negative, values, side="left")
    # integer numerator/denominator -> equal rationals give bit-identical floats
    f1 = (2 * tp) / (tp + fp + n_pos)
    best = int(np.argmax(f1))  # first maximum = highest threshold (values descend)
    value = values[best]
    below = [part[i - 1] for part in (positive, negative)
             if (i := int(np.searchsorted(part, value, side="left"))) > 0]
    thr = value
    if below:
        lower = max(below)
        thr = 0.5 * (value + lower)
        # midpoint can round onto the lower score when they are adjacent floats
        if not thr > lower:
            thr = value
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
    scores = as_scores(val_scores, "val_scores")
    labels = as_labels(val_labels, scores.size, "val_labels")
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
    _, value = best_f1(scores, labels)
    return Threshold(value=value, rule="val_f1_max")


def choose_fpr_threshold(val_scores, val_labels, max_fpr: float) -> Threshold:
    """The lowest threshold that flags at most ``max_fpr`` of the held-out normal images.

    Only the normals of the validation set (label 0) are used: a false-alarm budget, for lines
    where rejecting good parts costs money. With ``n`` normals at most ``floor(max_fpr * n)`` of
    them score ``>= value``; the value sits halfway between the highest normal score left
    unflagged and the next higher one (just above the highest normal when none may be
    flagged). ``rule = "val_fpr_<max_fpr>"``.
    """
    scores = as_scores(val_scores, "val_scores")
    labels = as_labels(val_labels, scores.size, "val_labels")
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


PIXEL_RULES = ("f1", "normal:<q>", "between:<q>")


def parse_pixel_threshold_rule(rule: str) -> tuple[str, float | None]:
    """``"f1"`` -> ("f1", None); ``"normal:0.999"`` -> ("normal", 0.999); ``"between:0.999"`` ->
    ("between", 0.999); anything else: ``ValueError``."""
    text = str(rule).strip().lower()
    if text == "f1":
        return "f1", None
    kind, _, value = text.partition(":")
    if kind in ("normal", "between") and value:
        try:
            q = float(value)
        except ValueError:
            q = float("nan")
        if 0.5 < q < 1.0:
            return kind, q
        raise ValueError(f"pixel threshold rule {rule!r}: the quantile must be a number in (0.5, 1), "
                         f"e.g. {kind}:0.999")
    raise ValueError(f"unknown pixel threshold rule {rule!r}; use one of {', '.join(PIXEL_RULES)} "
                     "(e.g. between:0.999)")


def choose_pixel_threshold(val_maps, val_masks, normal_quantile: float = 0.99, rule: str = "between:0.999"
                           ) -> Threshold:
    """The pixel threshold, from validation maps and masks only (held-out normals: empty masks;
    synthetic defects: their masks), never from test masks. A pixel is flagged iff ``map >= threshold``.

    * ``f1``: :func:`choose_threshold` over every validation pixel (F1-max with the synthetic
      defects' pixels, else the ``normal_quantile`` of normal pixels); ``pixel_val_f1_max``.
    * ``normal:<q>``: the ``q`` quantile of the held-out normal images' pixels (``val_good``: the
      maps whose masks are empty) alone, so about ``1 - q`` of good pixels are flagged whatever the
      synthetic defects look like; ``pixel_normal_<q>``.
    * ``between:<q>`` (the default): the geometric mean of the two above. The normal quantile is
      where normal texture ends, a lower bound; synthetic defects are stronger than most real ones,
      so their F1 threshold is an upper bound, and a real defect's best threshold lies between.
      Chosen on real MVTec AD bottle by the gap to the oracle F1-max (``benchmarks/pixel_rules.py``):
      PatchCore 0.685 vs 0.692, PaDiM 0.658 vs 0.673, where ``f1`` gave 0.454 and 0.174.
      Arithmetic mean when a bound is not positive; ``pixel_between_<q>``.
    """
    kind, q = parse_pixel_threshold_rule(rule)
    if kind in ("normal", "between"):
        normal = [np.asarray(a, np.float32).ravel() for a, m in zip(val_maps, val_masks) if not np.asarray(m).any()]
        if not normal:
            raise ValueError(f"the {kind} pixel rule needs held-out normal images (val_good) in the validation set")
        low = float(np.quantile(np.concatenate(normal), q))
        if kind == "normal":
            return Threshold(low, f"pixel_normal_{q:g}")
    a, m = maps_and_masks(val_maps, val_masks)
    chosen = choose_threshold(a.ravel(), m.ravel().astype(np.int8), normal_quantile)
    if kind == "f1" or chosen.rule != "val_f1_max":  # no synthetic defects: the normal quantile alone
        return Threshold(chosen.value, f"pixel_{chosen.rule}")
    high = max(chosen.value, low)
    value = float(np.sqrt(low * high)) if low > 0 else 0.5 * (low + high)
    return Threshold(value, f"pixel_between_{q:g}")

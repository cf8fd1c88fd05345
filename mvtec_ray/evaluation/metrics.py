"""Image-level evaluation metrics: AUROC, AP, F1 at a threshold, the oracle F1-max (pure numpy / scipy / scikit-learn).

Conventions used everywhere in this module:

* score: **higher = more anomalous**;
* label: ``1`` = anomaly (defect), ``0`` = good;
* decision rule: an image (or pixel) is flagged anomalous **iff score >= threshold**.
"""
from __future__ import annotations

import numpy as np

from mvtec_ray.evaluation.thresholds import (
    Threshold,
    as_labels,
    as_scores,
    best_f1,
    threshold_value,
)

# -- input checks --------------------------------------------------------------


# -- F1 over all thresholds ----------------------------------------------------


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
    s = as_scores(scores)
    y = as_labels(labels, s.size)
    if s.size == 0:
        raise ValueError("image_metrics needs at least one image")
    n_pos = int(y.sum())
    both = 0 < n_pos < y.size
    from sklearn.metrics import (  # here: a driver importing this stays light
        average_precision_score,
        roc_auc_score,
    )
    out: dict[str, float] = {
        "image_auroc": float(roc_auc_score(y, s)) if both else float("nan"),
        "image_ap": float(average_precision_score(y, s)) if both else float("nan"),
    }

    thr = threshold_value(threshold)
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
        f1_max, thr_max = best_f1(s, y)
    else:
        f1_max = thr_max = float("nan")
    out.update(image_f1_max=f1_max, threshold_f1_max=thr_max)
    return out


# -- pixel-level metrics -------------------------------------------------------


# -- summaries -----------------------------------------------------------------

"""The deployable row: per category, the detector chosen on the validation split (``best_on_validation``).

A user who cannot tell which detector suits their data deploys this row. Per category it is the
cell (status ``ok``, validation scores of both ``val_good`` and ``val_synthetic``) with the highest
validation image AUROC (``val_good`` = 0 against ``val_synthetic`` = 1); ties go to the higher
validation average precision, then to the cheaper detector (:func:`~mvtec_ray.detectors.registry.fit_cost`),
then to the earlier one in the registry's table, then to the name. Only validation rows of the
scores table are read, and their label is the split itself: no test label, no test score and no
test metric takes part in the choice. The row then carries the chosen cell's test metrics (its
threshold was chosen on validation too), ``chosen_detector`` and ``val_auroc``.

Pure pandas; scikit-learn is imported only when AUROCs are computed, so a driver importing this
stays light (``tests/unit/fit/test_light_driver.py``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from mvtec_ray.detectors.registry import builtin_names, fit_cost

#: the ``detector`` of the chosen rows, and the alias ``score`` / ``serve`` resolve per category
BEST_ON_VALIDATION = "best_on_validation"
VALIDATION_SPLITS = {"val_good": 0, "val_synthetic": 1}
VALIDATION_COLUMNS = ["category", "detector", "val_auroc", "val_ap", "n_val_good", "n_val_synthetic"]
#: the decimals validation metrics are compared at: equal rankings tie even through float noise
_DECIMALS = 12


def validation_metrics(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (category, detector) of ``scores``: AUROC and AP of ``val_good`` (0) vs ``val_synthetic`` (1).

    NaN where either class is missing or a validation score is not finite. Rows of other splits
    (the test split) are dropped before anything else is read, and the label is the split's, not
    the ``label`` column.
    """
    if scores.empty or "split" not in scores:
        return pd.DataFrame(columns=VALIDATION_COLUMNS)
    validation = scores.loc[scores["split"].isin(list(VALIDATION_SPLITS)), ["category", "detector", "split", "score"]]
    out = []
    for (category, detector), group in validation.groupby(["category", "detector"], sort=True):
        labels = group["split"].map(VALIDATION_SPLITS).to_numpy(dtype=int)
        values = pd.to_numeric(group["score"], errors="coerce").to_numpy(dtype=float)
        n_synthetic = int(labels.sum())
        auroc = ap = math.nan
        if 0 < n_synthetic < len(labels) and np.isfinite(values).all():
            from sklearn.metrics import average_precision_score, roc_auc_score  # here: the driver stays light
            auroc = float(roc_auc_score(labels, values))
            ap = float(average_precision_score(labels, values))
        out.append({"category": category, "detector": detector, "val_auroc": auroc, "val_ap": ap,
                    "n_val_good": len(labels) - n_synthetic, "n_val_synthetic": n_synthetic})
    return pd.DataFrame(out, columns=VALIDATION_COLUMNS)


def choice_key(detector: str, val_auroc: float, val_ap: float) -> tuple:
    """Sorts the best candidate first (module docstring): the one rule the results row and the
    models folder's manifest (:func:`mvtec_ray.deploy.model_files.update_manifest`) both use."""
    order = builtin_names()
    ap = round(float(val_ap), _DECIMALS) if _finite(val_ap) else -math.inf
    return (-round(float(val_auroc), _DECIMALS), -ap, fit_cost(detector),
            order.index(detector) if detector in order else len(order), detector)


def best_candidate(candidates: Iterable[dict]) -> dict | None:
    """The best of ``candidates`` (dicts with ``detector``, ``val_auroc``, ``val_ap``) that has a
    finite validation AUROC, or None."""
    usable = [c for c in candidates if _finite(c.get("val_auroc"))]
    if not usable:
        return None
    return min(usable, key=lambda c: choice_key(str(c["detector"]), c["val_auroc"], c.get("val_ap")))


def with_validation(rows: pd.DataFrame, scores: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (one per fitted cell) with ``val_auroc`` and ``val_ap`` from ``scores`` (NaN where a cell
    has none, e.g. a failed fit). A row that carries a ``val_auroc`` already (the fit cell computes its
    own with :func:`validation_metrics`, where it ran) keeps it: the driver then reads no scores."""
    if not {"category", "detector"} <= set(rows.columns):
        return rows
    keys = ["category", "detector"]
    known = rows["val_auroc"].notna().to_numpy() if "val_auroc" in rows else np.zeros(len(rows), bool)
    out = rows.copy()
    for column in ("val_auroc", "val_ap"):
        if column not in out:
            out[column] = math.nan
    if known.all():
        return out
    wanted = pd.MultiIndex.from_frame(rows.loc[~known, keys])
    if len(scores) and set(keys) <= set(scores.columns):
        scores = scores[pd.MultiIndex.from_frame(scores[keys]).isin(wanted)]
    metrics = validation_metrics(scores).set_index(keys)
    for column in ("val_auroc", "val_ap"):
        out.loc[~known, column] = metrics[column].reindex(wanted).to_numpy(dtype=float)
    return out


def best_on_validation_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """One ``best_on_validation`` row per category of ``rows`` (cells with ``val_auroc``, see
    :func:`with_validation`): the chosen cell's row under the alias, with ``chosen_detector``.

    A category without a candidate (no ok cell with both validation classes) gets a row with status
    ``error`` saying so, so the table shows why it has nothing to deploy.
    """
    if not {"category", "detector"} <= set(rows.columns):
        return pd.DataFrame()
    rows = rows[rows["detector"] != BEST_ON_VALIDATION]
    out = []
    for category, group in rows.groupby("category", sort=True):
        ok = group[group["status"] == "ok"] if "status" in group else group
        best = best_candidate(ok.to_dict("records"))
        if best is None:
            out.append({"category": category, "detector": BEST_ON_VALIDATION, "status": "error",
                        "error": "no detector to choose: none ended ok with validation scores of both "
                                 "val_good and val_synthetic", "chosen_detector": None, "val_auroc": math.nan})
            continue
        out.append({**best, "detector": BEST_ON_VALIDATION, "chosen_detector": best["detector"]})
    return pd.DataFrame(out)


def with_best_on_validation(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` (with validation metrics, :func:`with_validation`) plus their ``best_on_validation`` rows
    (earlier ones replaced)."""
    best = best_on_validation_rows(rows)
    if best.empty:
        return rows
    cells = rows[rows["detector"] != BEST_ON_VALIDATION]
    return pd.concat([cells, best.reindex(columns=list(cells.columns) + [c for c in best if c not in cells])],
                     ignore_index=True)


def as_finite(value) -> float | None:
    """``value`` as a float when it is a finite number, else None (e.g. for JSON, which has no NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _finite(value) -> bool:
    return as_finite(value) is not None

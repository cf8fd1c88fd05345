"""Hyper-parameter search per (category, detector), chosen on the validation split only.

Each trial fits one setting on ``train`` and scores ``val_good`` (label 0) and ``val_synthetic``
(label 1); the setting with the highest validation AUROC wins (ties: the earlier trial, and the
detector's default setting is always trial 0). Trials only ever receive :func:`validation_view`
of a category's features, which has no test split: the test set is touched once, by the fit of
the chosen setting. Pooled detectors only; patch detectors keep their one setting.

Trials run as plain Ray tasks (``backend: tasks``) or as Ray Tune trials (``backend: tune``);
either way a category's features are loaded once and reach every trial through the object
store. ``benchmarks/search.py`` measures the two on the same trials.
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from mvtec_ray.config import DEFAULT_SEARCH_GRIDS, SearchConfig, params_json
from mvtec_ray.detectors.registry import build_detector, input_kind

log = logging.getLogger(__name__)
VALIDATION_SPLITS = ("train", "val_good", "val_synthetic")
SEARCH_COLUMNS = ["category", "detector", "trial", "params", "val_auroc", "chosen", "fit_seconds", "status",
                  "error", "backend"]


@dataclass(frozen=True)
class Trial:
    category: str
    detector: str
    index: int  # within its (category, detector); 0 = the default setting
    params: dict



def searchable(detector: str) -> bool:
    return input_kind(detector) == "pooled"


def search_settings(search: SearchConfig, detector: str, base: dict) -> list[dict]:
    """The default setting (``base``) first, then the grid's settings over it, without repeats,
    at most ``search.max_trials`` (a larger grid is sampled with ``search.seed``)."""
    grid = search.grids.get(detector, DEFAULT_SEARCH_GRIDS.get(detector, {})) if searchable(detector) else {}
    keys = sorted(grid)
    settings, seen = [], set()
    for values in itertools.product(*(grid[k] for k in keys)):
        setting = {**base, **dict(zip(keys, values))}
        if params_json(setting) not in seen and params_json(setting) != params_json(base):
            seen.add(params_json(setting))
            settings.append(setting)
    if len(settings) > search.max_trials - 1:
        rng = np.random.default_rng(search.seed)
        keep = sorted(rng.choice(len(settings), size=search.max_trials - 1, replace=False))
        settings = [settings[i] for i in keep]
    return [dict(base)] + settings


def plan_trials(search: SearchConfig, categories: list[str], detectors: list[str],
                base_params: dict[str, dict]) -> list[Trial]:
    return [Trial(category, detector, i, params)
            for category in categories for detector in detectors if searchable(detector)
            for i, params in enumerate(search_settings(search, detector, base_params.get(detector, {})))]


def validation_view(pooled: dict) -> dict:
    """A category's pooled features without the test split: all a trial may see."""
    return {split: pooled[split] for split in VALIDATION_SPLITS if split in pooled}


def validation_auroc(view: dict, detector: str, params: dict, threads: int = 1) -> dict:
    """Fit ``params`` on train, AUROC on val_good (0) + val_synthetic (1). Never raises."""
    from sklearn.metrics import roc_auc_score

    from mvtec_ray.threads import limited_threads
    result = {"val_auroc": math.nan, "fit_seconds": math.nan, "status": "ok", "error": ""}
    try:
        if "train" not in view or "val_good" not in view or "val_synthetic" not in view:
            raise ValueError("validation needs train, val_good and val_synthetic features")
        with limited_threads(max(1, int(threads))):
            model = build_detector(detector, **params)
            started = time.perf_counter()
            model.fit(view["train"]["X"], view["val_good"]["X"])
            result["fit_seconds"] = time.perf_counter() - started
            scores = np.concatenate([model.score(view["val_good"]["X"]), model.score(view["val_synthetic"]["X"])])
        labels = np.r_[np.zeros(len(view["val_good"]["X"])), np.ones(len(view["val_synthetic"]["X"]))]
        if not np.isfinite(scores).all():
            raise ValueError("non-finite validation scores")
        result["val_auroc"] = float(roc_auc_score(labels, scores))
    except Exception as exc:  # noqa: BLE001 - a failing setting is a row, not a failed search
        result.update(status="error", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return result


def choose(table: pd.DataFrame) -> pd.DataFrame:
    """Mark, per (category, detector), the trial with the best validation AUROC (ties: lowest
    trial number, so the default wins a tie; none valid: the default)."""
    table = table.copy()
    table["chosen"] = False
    for _, group in table.groupby(["category", "detector"], sort=False):
        valid = group[group["status"].eq("ok") & group["val_auroc"].notna()]
        pick = group.index[group["trial"] == 0][0] if valid.empty else \
            valid.sort_values(["val_auroc", "trial"], ascending=[False, True]).index[0]
        table.loc[pick, "chosen"] = True
    return table


def default_beside_tuned(rows: pd.DataFrame, default_rows: dict) -> pd.DataFrame:
    """Add the default setting's test metrics (``default_image_auroc``, ``default_image_f1``) to the
    rows of the tuned fits (cells that kept their default setting show their own) and
    ``setting_changed`` (the search chose another setting than the default)."""
    rows = rows.copy()
    rows["setting_changed"] = [(c, d) in default_rows for c, d in zip(rows["category"], rows["detector"])]
    for column in ("image_auroc", "image_f1"):
        values = []
        for row in rows.to_dict("records"):
            source = default_rows.get((row["category"], row["detector"]), row)
            ok = source.get("status") == "ok"
            values.append(float(source.get(column, math.nan)) if ok else math.nan)
        rows[f"default_{column}"] = values
    return rows

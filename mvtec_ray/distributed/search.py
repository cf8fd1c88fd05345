"""Ray glue for the hyper-parameter search: trials as Ray tasks or through Ray Tune."""
from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
import time

import pandas as pd

from mvtec_ray.config import SearchConfig, params_json
from mvtec_ray.fit.search import (
    SEARCH_COLUMNS,
    Trial,
    choose,
    plan_trials,
    validation_auroc,
    validation_view,
)

log = logging.getLogger(__name__)


def trial_task(view: dict, detector: str, params: dict, threads: int) -> dict:
    """:func:`validation_auroc` as a Ray task (``view`` arrives from the object store)."""
    return validation_auroc(view, detector, params, threads)


def _tune_trainable(config: dict, trials: list[Trial], views: dict, threads: int) -> None:
    import ray
    from ray import tune
    trial = trials[config["index"]]
    tune.report(validation_auroc(ray.get(views[trial.category]), trial.detector, trial.params, threads))


def run_trials(trials: list[Trial], views: dict, backend: str, cpus: float = 1.0, threads: int = 1) -> list[dict]:
    """Validation results of ``trials`` in their order; ``views``: category -> ObjectRef of its view."""
    if not trials:
        return []
    if backend == "tune":
        return _run_tune(trials, views, cpus, threads)
    import ray
    remote = ray.remote(num_cpus=cpus, max_retries=2)(trial_task)
    return ray.get([remote.remote(views[t.category], t.detector, t.params, threads) for t in trials])


def _run_tune(trials: list[Trial], views: dict, cpus: float, threads: int) -> list[dict]:
    from ray import tune
    storage = tempfile.mkdtemp(prefix="mvtec-ray-tune-")
    try:
        trainable = tune.with_resources(tune.with_parameters(_tune_trainable, trials=trials, views=views,
                                                             threads=threads), {"cpu": cpus})
        tuner = tune.Tuner(trainable, param_space={"index": tune.grid_search(list(range(len(trials))))},
                           tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
                           run_config=tune.RunConfig(name="search", storage_path=storage, verbose=0,
                                                     log_to_file=False))
        previous = os.environ.get("RAY_AIR_NEW_OUTPUT")
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer console output ignores verbose=0
        try:
            grid = tuner.fit()
        finally:
            if previous is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = previous
        out: list[dict] = [{"val_auroc": math.nan, "fit_seconds": math.nan, "status": "error",
                            "error": "no result from Tune"} for _ in trials]
        for result in grid:
            index = result.config["index"]
            if result.error is not None:
                out[index]["error"] = f"{type(result.error).__name__}: {str(result.error).splitlines()[0][:200]}"
                continue
            metrics = result.metrics or {}
            out[index] = {k: metrics.get(k, out[index][k]) for k in ("val_auroc", "fit_seconds", "status", "error")}
        return out
    finally:
        shutil.rmtree(storage, ignore_errors=True)


def run_search(search: SearchConfig, categories: list[str], detectors: list[str], base_params: dict[str, dict],
               pooled_refs: dict, cpus: float = 1.0, threads: int = 1) -> tuple[pd.DataFrame, dict]:
    """All trials of every (category, pooled detector); returns (one row per trial, the chosen
    params per (category, detector))."""
    import ray
    trials = plan_trials(search, categories, detectors, base_params)
    if not trials:
        return pd.DataFrame(columns=SEARCH_COLUMNS), {}
    make_view = ray.remote(num_cpus=0)(validation_view)
    views = {category: make_view.remote(pooled_refs[category]) for category in {t.category for t in trials}}
    started = time.perf_counter()
    results = run_trials(trials, views, search.backend, cpus, threads)
    log.info("search: %d trials with %s in %.1fs", len(trials), search.backend, time.perf_counter() - started)
    table = pd.DataFrame([{"category": t.category, "detector": t.detector, "trial": t.index,
                           "params": params_json(t.params), **r, "backend": search.backend}
                          for t, r in zip(trials, results)])
    table = choose(table)[SEARCH_COLUMNS]
    chosen = {(t.category, t.detector): t.params for t, pick in zip(trials, table["chosen"]) if pick}
    return table, chosen

"""Ray glue for the stages: connect, extract, fit every (category, detector) as a task, write outputs.

The numerical work lives in :mod:`extract`, :mod:`fitting` and :mod:`evaluation`; this module
only decides where it runs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from mvtec_ray.config import RunConfig
from mvtec_ray.data.catalog import Catalog
from mvtec_ray.data.manifest import dataset_catalog
from mvtec_ray.deploy.model_files import update_manifest
from mvtec_ray.detectors.registry import builtin_names, fit_cost, input_kind
from mvtec_ray.distributed.cluster import connect
from mvtec_ray.distributed.fit import fit_cells_task, fit_task
from mvtec_ray.distributed.progress import Progress
from mvtec_ray.evaluation.selection import with_best_on_validation, with_validation
from mvtec_ray.evaluation.summary import summarise
from mvtec_ray.features.store import FeatureSet
from mvtec_ray.fit.cell import SCORE_COLUMNS, FitOutcome, return_freed_memory
from mvtec_ray.report.outputs import parquet_bytes, write_outputs
from mvtec_ray.storage import Storage, join

if TYPE_CHECKING:  # torch and torchvision: imported only when a run extracts
    from mvtec_ray.distributed.extraction import ExtractionResult
    from mvtec_ray.features.backbones import ResolvedWeights

log = logging.getLogger(__name__)


def _fit_task_options(config: RunConfig, detector: str) -> dict:
    options = {"num_cpus": config.detectors.cpus_per_task, "max_retries": 2, "retry_exceptions": False}
    if input_kind(detector) == "patches" and config.detectors.patch_task_memory_mb:
        options["memory"] = config.detectors.patch_task_memory_mb * 1024 * 1024
    return options


#: built-in pooled detectors this cheap (``fit_cost``: ocsvm, iforest, lof, elliptic, knn; tens of
#: milliseconds a cell at MVTec size) share one task per category
GROUPED_FIT_COST = 1.5


def _task_plan(categories: list[str], names: list[str]) -> list[tuple[str, list[str]]]:
    """(category, detectors) per fit task, longest first (the run then ends on short tasks instead
    of one CPU waiting on a long one): one task per cell, except the cheap built-in pooled
    detectors of a category, which share one."""
    cheap = [n for n in names if n in builtin_names("pooled") and fit_cost(n) <= GROUPED_FIT_COST]
    tasks = []
    for category in categories:
        if len(cheap) > 1:
            tasks.append((category, cheap))
        tasks += [(category, [n]) for n in names if len(cheap) < 2 or n not in cheap]
    return sorted(tasks, key=lambda task: -sum(fit_cost(n) for n in task[1]))


def run_fit(features: FeatureSet, out_uri: str, config: RunConfig, storage: Storage) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every (category, detector) cell as a Ray task (the cheap pooled ones of a category share one,
    :func:`_task_plan`); returns (results with mean rows, scores)."""
    import ray

    metadata = features.metadata()
    categories = config.categories or features.categories()
    # Same CPU request as a fit (at most 1): a fractional one let Ray run many loads at once, each in a
    # new worker process that then paid the torch/sklearn imports again for the fits it picked up.
    load_pooled = ray.remote(num_cpus=min(1.0, config.detectors.cpus_per_task))(FeatureSet.load_pooled)
    fit_cells_remote = ray.remote(fit_cells_task)
    threads = max(1, int(config.detectors.cpus_per_task))
    pooled_refs = {}
    if any(input_kind(name) == "pooled" for name in config.detectors.names):
        pooled_refs = {category: load_pooled.remote(features, category) for category in categories}
    chosen, defaults = {}, {}
    if config.search.enabled:
        chosen, defaults = _search(config, categories, pooled_refs, threads, out_uri, storage, features, metadata)
    pending = {}
    for category, names in _task_plan(categories, config.detectors.names):
        cells = [(name, chosen.get((category, name), config.detectors.params.get(name, {}))) for name in names]
        pooled = pooled_refs[category] if input_kind(names[0]) == "pooled" else None
        common = (config.evaluation, out_uri, storage, threads, pooled, metadata)
        # one remote function for all: Ray queues a caller's tasks per (function, resources,
        # dependencies), so one function keeps each category's cells longest first
        ref = fit_cells_remote.options(**_fit_task_options(config, names[0])).remote(features, category, cells,
                                                                                    *common)
        pending[ref] = (category, names)
    n_cells = sum(len(names) for names in pending.values())
    log.info("fitting %d (category, detector) cells in %d tasks", n_cells, len(pending))
    outcomes: list[FitOutcome] = []
    remaining = list(pending)
    shown = Progress("fit", n_cells, "cells")
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        category, names = pending[done[0]]
        shown.update(len(names))
        try:
            finished = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - a lost worker, an OOM or an unreadable store: error cells
            cause = getattr(exc, "cause", None) or exc  # a task's own exception, not Ray's wrapper
            text = str(cause).splitlines()[0][:300] if str(cause) else ""
            finished = [FitOutcome({"category": category, "detector": name, "backbone": metadata["backbone"],
                                    "weights": metadata["weights"], "status": "error",
                                    "error": f"{type(cause).__name__}: {text}"})
                        for name in names]
        for outcome in finished:
            log.debug("fitted %s/%s: %s", category, outcome.row.get("detector"), outcome.row.get("status"))
        outcomes += finished
    shown.close()
    scored = [o.scores for o in outcomes if len(o.scores)]
    scores = pd.concat(scored, ignore_index=True) if scored else pd.DataFrame(columns=SCORE_COLUMNS)
    # every cell's validation AUROC/AP (validation rows of the scores only): the manifest records them
    # and chooses each category's best_on_validation model from them
    rows = with_validation(pd.DataFrame([o.row for o in outcomes]), scores)
    # what score/serve/export load: this fit's cells as they ended, plus still-valid earlier ones;
    # written first, so nothing after it can leave the earlier manifest serving a failed cell's old model
    update_manifest(storage, join(out_uri, "models"), rows.to_dict("records"), metadata.get("fingerprint"))
    if config.search.enabled:
        from mvtec_ray.fit.search import default_beside_tuned
        rows = default_beside_tuned(rows, {cell: _row_or_error(ref) for cell, ref in defaults.items()})
    results = summarise(with_best_on_validation(rows))
    return results, scores


def _search(config: RunConfig, categories, pooled_refs, threads: int, out_uri: str, storage: Storage,
            features: FeatureSet, metadata: dict):
    """Choose each pooled detector's setting on validation (writes OUT/search.parquet); where the
    choice is not the default, also fit the default (no models saved) for the report's comparison."""
    import ray

    from mvtec_ray.distributed.search import run_search
    table, chosen = run_search(config.search, categories, config.detectors.names, config.detectors.params,
                               pooled_refs, config.detectors.cpus_per_task, threads)
    storage.write_bytes(join(out_uri, "search.parquet"), parquet_bytes(table))
    fit_remote = ray.remote(fit_task)
    defaults = {}
    for (category, name), params in chosen.items():
        base = config.detectors.params.get(name, {})
        if params != base:
            defaults[(category, name)] = fit_remote.options(**_fit_task_options(config, name)).remote(
                features, category, name, base, config.evaluation, None, storage, threads, pooled_refs[category],
                metadata)
    return chosen, defaults


def _row_or_error(ref) -> dict:
    import ray
    try:
        return ray.get(ref).row
    except Exception as exc:  # noqa: BLE001 - a lost worker leaves the comparison empty, not the run failed
        return {"status": "error", "error": f"{type(exc).__name__}"}


@dataclass
class RunOutputs:
    results: pd.DataFrame
    scores: pd.DataFrame
    extraction: ExtractionResult | None
    seconds: dict


def run_pipeline(config: RunConfig, features_uri: str | None = None, catalog: Catalog | None = None,
                 weights: ResolvedWeights | None = None) -> RunOutputs:
    """catalog -> extract -> fit/evaluate -> results + report, all under ``config.out``.

    ``catalog`` and ``weights`` may come from a caller that validated them already (the CLI).
    """
    storage = Storage(config.s3)
    timings = {}
    started = time.perf_counter()
    catalog = catalog or dataset_catalog(config.data, config.manifest, storage, config.categories)
    for warning in catalog.warnings[:20]:
        log.warning(warning)
    # fail before any work
    from mvtec_ray.distributed.extraction import run_extraction
    from mvtec_ray.features.backbones import RANDOM_WEIGHTS_ID, resolve_weights
    weights = weights or resolve_weights(config.extract.backbone, config.extract.weights, storage)
    if weights.weights_id == RANDOM_WEIGHTS_ID:
        log.warning("backbone %s uses RANDOM weights: results are NOT from a pretrained model", config.extract.backbone)
    connect(config.ray)
    timings["catalog_and_start"] = time.perf_counter() - started
    features_uri = features_uri or join(config.out, "features")
    extraction = run_extraction(catalog, features_uri, config.extract, storage, weights)
    del weights
    return_freed_memory()  # the driver's share of extraction (weights, probe model) while the fits run
    timings["extract"] = extraction.seconds
    started = time.perf_counter()
    features = FeatureSet.open(extraction.features_dir, storage)
    results, scores = run_fit(features, config.out, config, storage)
    timings["fit"] = time.perf_counter() - started
    write_outputs(config.out, storage, config, results, scores, extraction.errors, catalog.skipped)
    return RunOutputs(results, scores, extraction, timings)

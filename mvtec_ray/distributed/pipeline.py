"""Ray glue for the stages: connect, extract, fit every (category, detector) as a task, write outputs.

The numerical work lives in :mod:`extract`, :mod:`fitting` and :mod:`evaluation`; this module
only decides where it runs.
"""
from __future__ import annotations

import io
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pandas as pd

from .catalog import Catalog
from .config import RayConfig, RunConfig
from .detectors import input_kind
from .evaluation import summarise
from .features import FeatureSet
from .fitting import SCORE_COLUMNS, FitOutcome, fit_category_detector, fit_task, return_freed_memory
from .manifest import dataset_catalog
from .model_store import write_manifest
from .progress import Progress
from .storage import Storage, join

if TYPE_CHECKING:  # torch and torchvision: imported only when a run extracts
    from .backbones import ResolvedWeights
    from .extract import ExtractionResult

log = logging.getLogger(__name__)


def connect(config: RayConfig) -> None:
    """The cluster at ``config.address``, else the one ``RAY_ADDRESS`` names, else a new embedded Ray."""
    import ray
    if ray.is_initialized():
        return
    # RAY_ADDRESS (set for `ray job submit` drivers, or exported) means "join that cluster"; an
    # http:// one is the job server's, for the `ray job` CLI only
    env_address = os.environ.get("RAY_ADDRESS", "")
    address = config.address or (env_address if env_address and "://" not in env_address else None)
    if address:
        if config.num_cpus and not config.address:
            log.warning("num_cpus=%d ignored: joining the cluster at RAY_ADDRESS=%s", config.num_cpus, address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        resources = ray.cluster_resources()
        log.info("joined the Ray cluster at %s: %d node(s), %g CPU(s), %g GPU(s)",
                 ray.get_runtime_context().gcs_address, len(nodes), resources.get("CPU", 0), resources.get("GPU", 0))
    else:
        # "local": always a new embedded Ray; plain ray.init() would join whatever cluster a
        # `ray start` recorded in /tmp/ray/ray_current_cluster (and reject num_cpus)
        ray.init(address="local", num_cpus=config.num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING, configure_logging=True)
    from . import native_stderr
    native_stderr.start_if_requested()  # after ray.init: Ray's daemons keep the real stderr


def use_ray_data():
    """Ray Data's settings for this driver, set by the stages that stream with it (extraction,
    scoring) right before they build a dataset: a driver that only fits never imports it."""
    from ray.data import DataContext  # its import configures Ray Data's loggers: quiet them after it
    if not log.isEnabledFor(logging.DEBUG):
        # Ray Data's per-dataset INFO lines and its "progress bars disabled" notice: the project
        # shows its own progress line instead
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = os.environ.get("MVTEC_RAY_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False
    return ctx


def _fit_task_options(config: RunConfig, detector: str) -> dict:
    options = {"num_cpus": config.detectors.cpus_per_task, "max_retries": 2, "retry_exceptions": False}
    if input_kind(detector) == "patches" and config.detectors.patch_task_memory_mb:
        options["memory"] = config.detectors.patch_task_memory_mb * 1024 * 1024
    return options


#: rough relative fit+score time per detector at MVTec size (pipelines/benchmark_fit.py); only the order
#: matters (longest first), unknown detectors count 1
_FIT_COST = {"patchcore": 200, "padim": 100, "autoencoder": 20, "mahalanobis": 3, "iforest": 1.5, "elliptic": 1,
             "ocsvm": 1, "lof": 0.5, "knn": 0.2}


def run_fit(features: FeatureSet, out_uri: str, config: RunConfig, storage: Storage) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One Ray task per (category, detector); returns (results with mean rows, scores)."""
    import ray

    metadata = features.metadata()
    categories = config.categories or features.categories()
    # Same CPU request as a fit (at most 1): a fractional one let Ray run many loads at once, each in a
    # new worker process that then paid the torch/sklearn imports again for the fits it picked up.
    load_pooled = ray.remote(num_cpus=min(1.0, config.detectors.cpus_per_task))(FeatureSet.load_pooled)
    fit_remote = ray.remote(fit_task)
    threads = max(1, int(config.detectors.cpus_per_task))
    pooled_refs = {}
    if any(input_kind(name) == "pooled" for name in config.detectors.names):
        pooled_refs = {category: load_pooled.remote(features, category) for category in categories}
    chosen, defaults = {}, {}
    if config.search.enabled:
        chosen, defaults = _search(config, categories, pooled_refs, threads, out_uri, storage, features, metadata)
    # Longest fits first: the run then ends on short tasks instead of one CPU waiting on a long one.
    order = sorted(((c, n) for c in categories for n in config.detectors.names),
                   key=lambda cell: -_FIT_COST.get(cell[1], 1))
    pending = {}
    for category, name in order:
        pooled = input_kind(name) == "pooled"
        params = chosen.get((category, name), config.detectors.params.get(name, {}))
        ref = fit_remote.options(**_fit_task_options(config, name)).remote(
            features, category, name, params, config.evaluation, out_uri, storage,
            threads, pooled_refs[category] if pooled else None, metadata)
        pending[ref] = (category, name)
    log.info("fitting %d (category, detector) tasks", len(pending))
    outcomes: list[FitOutcome] = []
    remaining = list(pending)
    shown = Progress("fit", len(pending), "tasks")
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=1)
        shown.update(1)
        category, name = pending[done[0]]
        try:
            outcome = ray.get(done[0])
        except Exception as exc:  # noqa: BLE001 - a lost worker or OOM becomes an error cell
            outcome = FitOutcome({"category": category, "detector": name, "backbone": metadata["backbone"],
                                  "weights": metadata["weights"], "status": "error",
                                  "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"})
        log.debug("fitted %s/%s: %s", category, name, outcome.row.get("status"))
        outcomes.append(outcome)
    shown.close()
    rows = pd.DataFrame([o.row for o in outcomes])
    if config.search.enabled:
        from .search import default_beside_tuned
        rows = default_beside_tuned(rows, {cell: _row_or_error(ref) for cell, ref in defaults.items()})
    results = summarise(rows)
    scores = pd.concat([o.scores for o in outcomes if len(o.scores)], ignore_index=True) if outcomes else \
        pd.DataFrame(columns=SCORE_COLUMNS)
    write_manifest(storage, join(out_uri, "models"), [
        {"category": o.row["category"], "detector": o.row["detector"], "status": o.row["status"]} for o in outcomes])
    return results, scores


def _search(config: RunConfig, categories, pooled_refs, threads: int, out_uri: str, storage: Storage,
            features: FeatureSet, metadata: dict):
    """Choose each pooled detector's setting on validation (writes OUT/search.parquet); where the
    choice is not the default, also fit the default (no models saved) for the report's comparison."""
    import ray
    from .search import run_search
    table, chosen = run_search(config.search, categories, config.detectors.names, config.detectors.params,
                               pooled_refs, config.detectors.cpus_per_task, threads)
    storage.write_bytes(join(out_uri, "search.parquet"), _parquet_bytes(table))
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


def write_outputs(out_uri: str, storage: Storage, config: RunConfig, results: pd.DataFrame, scores: pd.DataFrame,
                  errors: pd.DataFrame | None = None, skipped: pd.DataFrame | None = None) -> None:
    from .report import results_markdown
    storage.write_bytes(join(out_uri, "config.yaml"), config.dump_yaml().encode())
    storage.write_bytes(join(out_uri, "results.parquet"), _parquet_bytes(results))
    storage.write_bytes(join(out_uri, "results.csv"), results.to_csv(index=False).encode())
    storage.write_bytes(join(out_uri, "results.md"), results_markdown(results).encode())
    storage.write_bytes(join(out_uri, "scores.parquet"), _parquet_bytes(scores))
    if errors is not None:
        storage.write_bytes(join(out_uri, "errors.parquet"), _parquet_bytes(errors))
        storage.write_bytes(join(out_uri, "errors.csv"), errors.to_csv(index=False).encode())
    if skipped is not None:
        storage.write_bytes(join(out_uri, "skipped.csv"), skipped.to_csv(index=False).encode())


def _parquet_bytes(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.reset_index(drop=True).to_parquet(buffer, index=False)
    return buffer.getvalue()


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
    from .backbones import RANDOM_WEIGHTS_ID, resolve_weights
    from .extract import run_extraction
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

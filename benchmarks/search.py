"""Search overhead: the same validation trials as Ray Tune trials vs plain Ray tasks.

    python benchmarks/search.py [--features FEATURES_DIR] [--categories 3] [--num-cpus 2] [--repeats 1]

Trials: every pooled detector's grid (``config.DEFAULT_SEARCH_GRIDS``, up to ``--max-trials`` per
(category, detector)) on every category. Features: an extracted features folder
(``OUT/features/<fingerprint>``), or by default synthetic pooled features shaped like
EfficientNet-Lite0's (1280-d; 32 train, 8 val_good, 16 val_synthetic per category). Either way a
category's features go into the object store once, before the clock starts. One embedded Ray for
both; a warm-up round of tasks first, so both start with imported workers. Timed: from submitting
the trials to having every result (Tune: ``Tuner.fit()``, its trial actors included).

Prints ``trials=``, ``fit_seconds_mean=`` (work per trial), ``trials_per_s_tasks=``,
``trials_per_s_tune=`` and ``tune/tasks=`` (Tune's wall time over the tasks' for the same trials;
above 2 means Tune costs more than twice as much).
"""
from __future__ import annotations

import logging
import time

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import numpy as np
from measure import emit


def synthetic_pooled(seed: int, dim: int = 1280) -> dict:
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, dim)).astype(np.float32)

    def part(n, label, noise):
        X = (rng.normal(size=(n, 16)).astype(np.float32) @ basis + rng.normal(0, noise, (n, dim))).astype(np.float32)
        X = np.maximum(X, 0)  # post-ReLU-like
        ids = np.array([f"{seed}-{label}-{i}" for i in range(n)], dtype=object)
        return {"X": X, "label": np.full(n, label, np.int8), "row_id": ids, "image_id": ids,
                "defect_type": ids, "source_uri": ids, "mask_uri": ids}

    return {"train": part(32, 0, 0.5), "val_good": part(8, 0, 0.5), "val_synthetic": part(16, 1, 1.5)}


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--features", help="an extracted features folder (default: synthetic features)")
    parser.add_argument("--categories", type=int, default=3, help="synthetic categories (default 3)")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--max-trials", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds per backend (best is kept)")
    args = parser.parse_args()

    import ray

    from mvtec_ray.config import DEFAULT_SEARCH_GRIDS, RayConfig, SearchConfig
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.search import run_trials
    from mvtec_ray.fit.search import plan_trials, validation_view

    logging.basicConfig(level=logging.WARNING)
    connect(RayConfig(num_cpus=args.num_cpus))
    if args.features:
        from mvtec_ray.features.store import FeatureSet
        features = FeatureSet.open(args.features)
        views = {c: ray.put(validation_view(features.load_pooled(c))) for c in features.categories()}
    else:
        views = {f"cat{i}": ray.put(synthetic_pooled(i)) for i in range(args.categories)}
    search = SearchConfig(enabled=True, max_trials=args.max_trials)
    trials = plan_trials(search, sorted(views), sorted(DEFAULT_SEARCH_GRIDS), {})
    print(f"trials={len(trials)} categories={len(views)} num_cpus={args.num_cpus} "
          f"load_average={common.load_1min():.1f}", flush=True)

    run_trials(trials[: args.num_cpus * 2], views, "tasks")  # warm-up: workers import torch/sklearn/faiss
    seconds = {}
    results = None
    for backend in ("tasks", "tune"):
        best = float("inf")
        for _ in range(args.repeats):
            started = time.perf_counter()
            results = run_trials(trials, views, backend)
            best = min(best, time.perf_counter() - started)
            failed = [r for r in results if r["status"] != "ok"]
            if failed:
                print(f"warning: {len(failed)} {backend} trials failed, e.g. {failed[0]['error']}")
        seconds[backend] = best
        emit(**{f"seconds_{backend}": best}, digits=2)
    emit(fit_seconds_mean=float(np.nanmean([r["fit_seconds"] for r in results])), digits=3)
    emit(trials_per_s_tasks=len(trials) / seconds["tasks"], trials_per_s_tune=len(trials) / seconds["tune"],
         **{"tune/tasks": seconds["tune"] / seconds["tasks"]}, digits=2)
    ray.shutdown()


if __name__ == "__main__":
    main()

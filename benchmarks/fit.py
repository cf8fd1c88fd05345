"""Fit-stage scaling: every pooled detector x every category, sequential vs Ray tasks, in one run.

    .venv/bin/python benchmarks/fit.py [--categories 15] [--train 250] [--test 110] [--dim 2048]
                                               [--cpus 2] [--knn-bank 50000] [--knn-queries 2000]

Generates MVTec-size pooled features (2048-d like ResNet50's: non-negative, low-rank plus noise;
anomalies shifted along low-variance directions) and writes them as a real feature store
(``write_shards`` + ``_extract.json`` + ``_SUCCESS.json``). Then, on the same store:

* sequential: ``fit.cell.fit_category_detector`` in a loop in a cold process, 1 thread, features
  loaded once per category (what one Ray task does, minus Ray);
* Ray: ``distributed.pipeline.run_fit`` on a fresh embedded Ray with ``--cpus`` CPUs, 1 CPU per task, in a
  cold process (Ray start and worker start-up inside, as users pay them).

Also times faiss vs scikit-learn brute-force kNN scoring on a large bank (``--knn-bank 0`` skips).
Prints both wall times, a breakdown of the Ray run (Ray's task events, CPU-seconds of the worker
processes), ``cpu_efficiency`` (sequential CPU-s / Ray workers' CPU-s: the Ray-side overhead, little
affected by other load), ``steady_parallel_efficiency`` (the fit phase alone, Ray start excluded) and
``parallel_efficiency=<sequential wall / (ray wall x cpus)>`` of the two cold processes. Other load
on the machine lowers the wall-clock ratio a lot (a 2-process job loses more to it than a
1-process one): the load average is printed before and after.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import numpy as np
from measure import (
    TIMING_PSS_EVERY_S,
    TreeMonitor,
    emit,
    load_average,
    python,
    require_ok,
    run_cold,
)

from mvtec_ray.detectors.registry import builtin_names

POOLED = builtin_names("pooled")


# -- synthetic features ----------------------------------------------------------
def category_features(rng: np.random.Generator, n_train: int, n_test: int, dim: int, rank: int = 16) -> dict:
    """{split: (X, defect_types)}; val_good = train / 5, two synthetic anomalies per val_good image.

    Normals: ReLU(base + low-rank variation + noise), channel scales log-normal like pooled CNN
    features. Defects: shifts along directions orthogonal to the low-rank span (tuned so kNN
    reaches about 0.8 image AUROC and a Gaussian about 0.99).
    """
    base = rng.lognormal(-1.2, 0.8, dim).astype(np.float32)  # per-channel activation level
    loadings = (rng.normal(0, 1, (rank, dim)) * base * 0.15).astype(np.float32)
    strengths = np.linspace(1.5, 0.3, rank).astype(np.float32)
    noise = (0.1 * base).astype(np.float32)
    span, _ = np.linalg.qr(loadings.T.astype(np.float64))

    def normal(n):
        z = rng.normal(0, 1, (n, rank)).astype(np.float32) * strengths
        return np.maximum(base + z @ loadings + rng.normal(0, 1, (n, dim)).astype(np.float32) * noise, 0)

    def shifted(n, n_dirs, scale):
        d = rng.normal(0, 1, (n_dirs, dim))
        d -= (d @ span) @ span.T
        d = (d / np.linalg.norm(d, axis=1, keepdims=True) * base).astype(np.float32)
        d *= scale * np.linalg.norm(noise) / np.linalg.norm(d, axis=1, keepdims=True)
        pick = rng.integers(0, n_dirs, n)
        amount = rng.uniform(0.3, 1.5, (n, 1)).astype(np.float32)
        return np.maximum(normal(n) + amount * d[pick], 0), [f"defect{k}" for k in pick]

    n_val = max(2, n_train // 5)
    n_good = max(1, int(round(0.3 * n_test)))
    defect, kinds = shifted(n_test - n_good, 5, 3.0)
    synthetic, syn_kinds = shifted(2 * n_val, 3, 3.0)
    return {"train": (normal(n_train), ["good"] * n_train), "val_good": (normal(n_val), ["good"] * n_val),
            "val_synthetic": (synthetic, [f"synthetic_{k}" for k in syn_kinds]),
            "test": (np.vstack([normal(n_good), defect]), ["good"] * n_good + kinds)}


def write_feature_store(root: str, n_categories: int, n_train: int, n_test: int, dim: int, seed: int,
                        shard_rows: int = 16) -> str:
    """A complete feature store as extraction writes it (small shards, metadata, success marker)."""
    from mvtec_ray.features.store import (
        EXTRACT_META,
        META_COLUMNS,
        SUCCESS,
        write_shards,
    )
    from mvtec_ray.storage import Storage, join
    storage = Storage()
    fingerprint = f"synthetic{seed:04d}"
    out = join(root, fingerprint)
    metadata = {"backbone": "synthetic_resnet50_pooled", "weights": "synthetic", "weights_sha256": "",
                "pretrained": False, "fingerprint": fingerprint, "image_size": 224, "pooled_dim": dim,
                "patch_shape": None, "patch_dim": None}
    rows = 0
    for c in range(n_categories):
        category = f"cat{c:02d}"
        data = category_features(np.random.default_rng([seed, c]), n_train, n_test, dim)
        batch = {k: [] for k in ("row_id", "image_id", "split", "label", "defect_type", "variant")}
        pooled = []
        for split, (X, kinds) in data.items():
            for i, kind in enumerate(kinds):
                folder = "test/" + kind if split == "test" else "train/good"
                # synthetic rows are variants of the held-out (val_good) images
                index = i + n_train if split == "val_good" else n_train + i // 2 if split == "val_synthetic" else i
                variant = f"syn{i % 2 + 1}" if split == "val_synthetic" else "orig"
                image_id = f"{category}/{folder}/{index:04d}.png"
                batch["row_id"].append(f"{image_id}#{variant}")
                batch["image_id"].append(image_id)
                batch["split"].append(split)
                batch["label"].append(0 if kind == "good" else 1)
                batch["defect_type"].append(kind)
                batch["variant"].append(variant)
            pooled.append(X)
        n = len(batch["row_id"])
        full = {k: np.asarray(v, dtype=object) for k, v in batch.items()}
        full.update(label=np.asarray(batch["label"], np.int8), pooled=np.vstack(pooled).astype(np.float32),
                    category=np.full(n, category, dtype=object), source_uri=full["image_id"],
                    source_version=np.full(n, "0", dtype=object), aug_params=np.full(n, "", dtype=object),
                    status=np.full(n, "ok", dtype=object), error=np.full(n, "", dtype=object),
                    mask_png=np.full(n, b"", dtype=object))
        for column in META_COLUMNS:  # columns added to the schema later default to empty
            full.setdefault(column, np.full(n, "", dtype=object))
        order = np.random.default_rng([seed, c, 1]).permutation(n)  # extraction batches mix splits
        for start in range(0, n, shard_rows):
            index = order[start:start + shard_rows]
            write_shards({k: v[index] for k, v in full.items()}, out, storage, metadata)
        rows += n
    storage.write_bytes(join(out, EXTRACT_META), json.dumps(metadata).encode())
    storage.write_bytes(join(out, SUCCESS), json.dumps({"rows": rows, "errors": 0, "fingerprint": fingerprint}).encode())
    return out


# -- the two ways of fitting -------------------------------------------------------
def run_sequential(features_dir: str, out_uri: str, detectors: list[str]):
    import pandas as pd

    from mvtec_ray.config import EvaluationConfig
    from mvtec_ray.evaluation.summary import summarise
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.fit.cell import fit_category_detector
    from mvtec_ray.storage import Storage
    storage = Storage()
    started, cpu_started = time.perf_counter(), time.process_time()
    features = FeatureSet.open(features_dir, storage)
    metadata = features.metadata()
    rows = []
    for category in features.categories():
        pooled = features.load_pooled(category)
        for name in detectors:
            rows.append(fit_category_detector(features, category, name, {}, EvaluationConfig(), out_uri, storage,
                                              threads=1, pooled=pooled, metadata=metadata).row)
    return summarise(pd.DataFrame(rows)), time.perf_counter() - started, time.process_time() - cpu_started


def run_ray(features_dir: str, out_uri: str, detectors: list[str], cpus: int):
    import ray

    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage
    storage = Storage()
    config = load_config(None, {"out": out_uri, "detectors.names": detectors, "detectors.cpus_per_task": 1,
                                "ray.num_cpus": cpus})
    started = time.perf_counter()
    connect(config.ray)
    init_s = time.perf_counter() - started
    workers = TreeMonitor(include_root=False, pss_every_s=None)  # this driver's Ray processes
    workers.sample()
    worker_cpu_before = workers.worker_cpu()  # the prestarted idle workers
    started, started_at = time.perf_counter(), time.time()
    results, _ = run_fit(FeatureSet.open(features_dir, storage), out_uri, config, storage)
    ray_s = time.perf_counter() - started
    workers.sample()
    worker_cpu_after = workers.worker_cpu()
    timeline_started = time.perf_counter()
    parts = timeline_breakdown(_quiet(ray.timeline), started_at, ray_s, cpus)
    parts["instrumentation_s"] = time.perf_counter() - timeline_started  # this benchmark's own, not the run's
    used = {pid: cpu - worker_cpu_before.get(pid, 0.0) for pid, cpu in worker_cpu_after.items()}
    parts["worker_cpu_s"] = sum(used.values())
    parts["busiest_worker_cpu_s"] = max(used.values(), default=0.0)
    parts["worker_processes_started"] = len(set(worker_cpu_after) - set(worker_cpu_before))
    ray.shutdown()
    return results, init_s, ray_s, parts


def _quiet(fn):
    import logging
    logger = logging.getLogger("ray")
    level = logger.level
    logger.setLevel(logging.ERROR)  # ray.timeline() warns about a future change on every call
    try:
        return fn()
    finally:
        logger.setLevel(level)


def timeline_breakdown(events: list[dict], started_at: float, wall_s: float, cpus: int) -> dict:
    """Where the Ray run's wall time went, from Ray's task events (microseconds since the epoch)."""
    tasks = [e for e in events if e.get("ph") == "X" and str(e.get("cat", "")).startswith("task::")]
    if not tasks:
        return {}
    fit = [e for e in tasks if "load_pooled" not in e["name"]]
    load = [e for e in tasks if "load_pooled" in e["name"]]
    args = [e for e in events if e.get("ph") == "X" and e.get("cat") == "task:deserialize_arguments"]
    busy = sum(e["dur"] for e in tasks) / 1e6
    first = min(e["ts"] for e in tasks) / 1e6
    last_fit_start = max(e["ts"] for e in fit) / 1e6 if fit else first
    end = max(e["ts"] + e["dur"] for e in tasks) / 1e6
    return {"fit_tasks": len(fit), "fit_task_s": sum(e["dur"] for e in fit) / 1e6, "load_tasks": len(load),
            "load_task_s": sum(e["dur"] for e in load) / 1e6,
            "deserialize_args_s": sum(e["dur"] for e in args) / 1e6,
            "worker_processes": len({e.get("tid") for e in tasks}),
            "first_task_after_s": first - started_at, "tail_after_last_start_s": end - last_fit_start,
            "idle_cpu_s": cpus * wall_s - busy}


# -- kNN scoring: faiss vs scikit-learn brute force -----------------------------------
def knn_benchmark(n_bank: int, n_queries: int, dim: int, threads: int, repeats: int = 2) -> tuple[float, float, bool]:
    import faiss
    from sklearn.neighbors import NearestNeighbors

    from mvtec_ray.threads import limited_threads
    rng = np.random.default_rng(0)
    bank = rng.random((n_bank, dim), dtype=np.float32)
    queries = rng.random((n_queries, dim), dtype=np.float32)
    faiss_s = sklearn_s = float("inf")
    with limited_threads(threads):
        for _ in range(repeats):  # best of: other load on the machine only ever adds time
            started = time.perf_counter()
            index = faiss.IndexFlatL2(dim)
            index.add(bank)
            squared, _ = index.search(queries, 1)
            faiss_s = min(faiss_s, time.perf_counter() - started)
            started = time.perf_counter()
            distances, _ = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(bank).kneighbors(queries)
            sklearn_s = min(sklearn_s, time.perf_counter() - started)
    same = bool(np.allclose(np.sqrt(np.maximum(squared[:, 0], 0)), distances[:, 0], rtol=1e-3))
    return faiss_s, sklearn_s, same


def run_side(args) -> int:
    """One side in this (cold) process; figures as name=value lines, results to OUT/results.parquet."""
    import logging
    logging.basicConfig(level=logging.ERROR)
    detectors = args.detectors.split(",")
    os.makedirs(args.out, exist_ok=True)
    if args.side == "seq":
        results, fit_s, fit_cpu = run_sequential(args.features, args.out, detectors)
        emit(fit_s=fit_s, fit_cpu_s=fit_cpu)
    else:
        results, init_s, fit_s, parts = run_ray(args.features, args.out, detectors, args.cpus)
        emit(init_s=init_s, fit_s=fit_s, **{f"part_{k}": float(v) for k, v in parts.items()})
    results.to_parquet(os.path.join(args.out, "results.parquet"), index=False)
    return 0


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--categories", type=int, default=15)
    parser.add_argument("--train", type=int, default=250, help="train vectors per category")
    parser.add_argument("--test", type=int, default=110, help="test vectors per category (30 %% good)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the embedded Ray")
    parser.add_argument("--detectors", default=",".join(POOLED))
    parser.add_argument("--knn-bank", type=int, default=50_000, help="0 skips the kNN comparison")
    parser.add_argument("--knn-queries", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    common.hidden(parser, "--side", choices=["seq", "ray"])
    common.hidden(parser, "--features", "--out")
    args = parser.parse_args(argv)
    if args.side:
        return run_side(args)
    import logging
    logging.basicConfig(level=logging.ERROR)  # a fit failure is an error cell: counted below, not logged
    detectors = args.detectors.split(",")

    with tempfile.TemporaryDirectory(prefix="bench-fit-") as tmp:
        work = Path(args.workdir or tmp)
        print(f"load average at start: {load_average()}")
        started = time.perf_counter()
        features_dir = write_feature_store(str(work / "features"), args.categories, args.train, args.test,
                                           args.dim, args.seed)
        n_tasks = args.categories * len(detectors)
        print(f"feature store: {args.categories} categories x (train {args.train}, val_good {max(2, args.train // 5)}, "
              f"val_synthetic {2 * max(2, args.train // 5)}, test {args.test}) x {args.dim}-d, "
              f"written in {time.perf_counter() - started:.1f} s")
        if args.knn_bank:
            faiss_s, sklearn_s, same = knn_benchmark(args.knn_bank, args.knn_queries, args.dim, threads=2)
            print(f"knn k=1 bank {args.knn_bank}x{args.dim} queries {args.knn_queries} threads 2: "
                  f"faiss {faiss_s:.2f} s, sklearn brute {sklearn_s:.2f} s (best of 2), "
                  f"sklearn/faiss={sklearn_s / faiss_s:.2f} (same distances: {same})")

        side_args = ["--features", features_dir, "--detectors", args.detectors, "--cpus", str(args.cpus)]
        seq = require_ok(run_cold(python("benchmarks/fit.py", "--side", "seq", "--out", str(work / "out-seq"),
                                         *side_args), echo=False, pss_every_s=TIMING_PSS_EVERY_S), "sequential side")
        ray_run = require_ok(run_cold(python("benchmarks/fit.py", "--side", "ray", "--out", str(work / "out-ray"),
                                             *side_args), echo=False, pss_every_s=TIMING_PSS_EVERY_S), "ray side")
        seq_s, seq_cpu = seq.figures["fit_s"], seq.figures["fit_cpu_s"]
        init_s, ray_s = ray_run.figures["init_s"], ray_run.figures["fit_s"]
        parts = {k[5:]: v for k, v in ray_run.figures.items() if k.startswith("part_")}
        print(f"sequential: {n_tasks} fits in a cold process, 1 thread: {seq.wall_s:.1f} s wall "
              f"({seq_s:.1f} s fitting, {seq_cpu:.1f} CPU-s)")
        print(f"ray: {n_tasks} tasks on {args.cpus} CPUs (1 CPU, 1 thread each), cold process: {ray_run.wall_s:.1f} s "
              f"wall ({init_s:.1f} s ray.init, {ray_s:.1f} s fitting, {parts.get('instrumentation_s', 0.0):.1f} s the "
              f"benchmark's ray.timeline(), not counted); peak PSS {ray_run.peak_pss_mb:.0f} MB "
              f"vs {seq.peak_pss_mb:.0f} MB (sampled every {TIMING_PSS_EVERY_S:.0f}s)")
        if parts:
            print("ray breakdown: " + ", ".join(f"{k}={v:.1f}" for k, v in parts.items()))
        import pandas as pd
        seq_results = pd.read_parquet(work / "out-seq" / "results.parquet")
        ray_results = pd.read_parquet(work / "out-ray" / "results.parquet")

        per_cat = {name: r[r["category"] != "mean"] for name, r in (("seq", seq_results), ("ray", ray_results))}
        errors = {name: int((r["status"] != "ok").sum()) for name, r in per_cat.items()}
        merged = per_cat["seq"].merge(per_cat["ray"], on=["category", "detector"], suffixes=("_seq", "_ray"))
        diff = float(np.nanmax(np.abs(merged["image_auroc_seq"] - merged["image_auroc_ray"]))) if len(merged) else 0.0
        print(f"cells: {len(per_cat['seq'])} sequential, {len(per_cat['ray'])} ray; error cells {errors}; "
              f"max |AUROC seq - ray| = {diff:.2g}")
        mean = seq_results[seq_results["category"] == "mean"].set_index("detector")
        print("mean image AUROC: " + ", ".join(f"{d} {mean.loc[d, 'image_auroc']:.3f}" for d in detectors
                                               if d in mean.index and "image_auroc" in mean.columns))
        for name, table in per_cat.items():
            fit_s = table.groupby("detector")[["fit_seconds", "score_seconds"]].sum()
            print(f"{name} seconds per detector (fit+score, all categories): " + ", ".join(
                f"{d} {fit_s.loc[d].sum():.1f}" for d in detectors if d in fit_s.index)
                  + f"; CPU seconds of all fits {table['cpu_seconds'].sum():.1f}")
        print(f"load average at end: {load_average()}")
        if parts.get("worker_cpu_s"):
            # CPU-seconds barely depend on other load on the machine; wall-clock ratios do
            emit(cpu_efficiency=seq_cpu / parts["worker_cpu_s"])
        emit(steady_parallel_efficiency=seq_s / (ray_s * args.cpus))
        # the Ray side's wall without this benchmark's own ray.timeline() call (instrumentation)
        ray_wall = ray_run.wall_s - parts.get("instrumentation_s", 0.0)
        emit(parallel_efficiency=seq.wall_s / (ray_wall * args.cpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())

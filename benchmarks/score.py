"""Scoring throughput and memory: the Ray Data `score` job vs a bare single-process loop; memory at N and 4N.

    python benchmarks/score.py [--images 1000] [--mem-images 250,1000] [--threads T] [--size 256]

1. Fits knn + patchcore on one generated category (``run_pipeline``, EfficientNet-Lite0, offline weights).
2. Writes distinct 256 px PNGs (generated normals and defects plus per-image noise).
3. Each measurement runs in its own fresh process (own Ray), so peaks do not carry over:
   * ray: ``run_scoring`` on an embedded Ray, timed from the call (Ray start excluded; model checks,
     listing and actor start included);
   * bare: decode (``prepare_batch``) + features and detectors (``Scorer``) + shard writing
     (``write_score_shards``) in one process, same batch size, with torch/faiss/BLAS threads = every CPU
     the Ray job may use (the same CPUs on both sides), timed from loading the models (as the Ray side
     counts its actors' start).
   Speed: ray vs bare on N images. Memory: the ray job at SMALL and LARGE = 4 x SMALL images. The default
   SMALL,LARGE is N/4,N so the N run is reused (on the shared 2-core machine 1000 + 4000 images took
   too long); ``--mem-images 1000,4000`` measures 4N = 4000 explicitly.
   Driver peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` of that process. Worker peak RSS: ``VmHWM``
   from ``/proc/<pid>/status`` of every ``ray::`` process descending from that driver, sampled every
   0.25 s by ``measure.TreeMonitor`` (VmHWM is the kernel's own per-process peak, so sampling only has
   to see each worker alive).
Prints ``score_ray/bare=`` (images/s), ``e2e_score_ray/bare=`` (wall of the whole cold process, Ray
start and model loading included), ``driver_mem_4N/N=`` and ``worker_mem_4N/N=`` last. Linux only (/proc).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from measure import TreeMonitor, emit, python

CATEGORY = "washer"
DETECTORS = ["knn", "patchcore"]


# -- setup (parent process) -------------------------------------------------------------
def fit_models(work: Path, size: int, image_size: int, num_cpus: int) -> Path:
    from mvtec_ray.config import load_config
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    from mvtec_ray.distributed.pipeline import run_pipeline
    data = work / "train-data"
    generate_sample_dataset(data, categories=[CATEGORY], seed=1,
                            spec=SampleSpec(n_train=24, n_test_good=4, n_test_defect_per_type=2, size=size))
    config = load_config(None, {"data": str(data), "out": str(work / "fit"), "extract.backbone": "efficientnet_lite0",
                                "extract.image_size": image_size, "detectors.names": DETECTORS,
                                "ray.num_cpus": num_cpus})
    outputs = run_pipeline(config)
    table = outputs.results[outputs.results["category"] == CATEGORY][["detector", "image_auroc", "status"]]
    print("fitted: " + ", ".join(f"{r.detector} (test AUROC {r.image_auroc:.3f}, {r.status})"
                                 for r in table.itertuples()), flush=True)
    import ray
    ray.shutdown()
    return work / "fit" / "models"


def make_images(folder: Path, n: int, size: int) -> None:
    """n distinct PNGs: rendered normals (and a few defects) plus per-pixel noise."""
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    generate_sample_dataset(folder / "_base", categories=[CATEGORY], seed=7,
                            spec=SampleSpec(n_train=32, n_test_good=0, n_test_defect_per_type=2, size=size))
    bases = [p for p in sorted((folder / "_base").rglob("*.png")) if "ground_truth" not in p.parts]
    common.noisy_copies(bases, folder / CATEGORY, n, amplitude=4, per_pixel=True, name="{:06d}.png")
    shutil.rmtree(folder / "_base")


def subset(source: Path, folder: Path, n: int) -> Path:
    """The first n images of ``source`` as hard links (same bytes, no copy)."""
    (folder / CATEGORY).mkdir(parents=True)
    for path in sorted((source / CATEGORY).glob("*.png"))[:n]:
        os.link(path, folder / CATEGORY / path.name)
    return folder


def child(args: list[str], env: dict | None = None) -> dict:
    """Run one measurement in a fresh process; it prints one JSON line last."""
    started = time.perf_counter()
    done = subprocess.run(python("benchmarks/score.py", *args), check=False, capture_output=True, text=True,
                          env={**os.environ, **(env or {})})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"measurement {args[:2]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall  # the whole cold process: imports, Ray start, model loading, scoring
    result["load"] = os.getloadavg()[1]  # 5-minute load average: the machine is shared, say how busy it was
    return result


# -- measurements (child processes) ------------------------------------------------------------
def worker_memory_summary(monitor: TreeMonitor, cpu_before: dict[int, float]) -> dict:
    """Memory of the ``ray::`` workers a :class:`measure.TreeMonitor` watched (``worker_memory``), and
    the CPU seconds of this driver and every process descending from it (this Ray's workers,
    raylet, GCS) since ``cpu_before``.

    Per worker: ``VmHWM`` (the kernel's peak RSS, which also counts the object store's shared pages
    the worker touched: bounded by the store's size) and the sampled peak of ``RssAnon`` (its private
    memory: what would grow if a worker held per-image state).
    """
    top = max(monitor.anon_kib, key=monitor.anon_kib.get, default=None)
    # the largest worker's private memory per quarter of its life: flat = no growth within the run
    series = monitor.anon_series.get(top, [(0.0, 0)])
    t0, t1 = series[0][0], series[-1][0] + 1e-9
    quarters = [max([kib for t, kib in series if q <= 4 * (t - t0) / (t1 - t0) < q + 1] or [0]) / 1024
                for q in range(4)]
    return {"worker_anon_quarters_mb": quarters, "worker_hwm_mb": max(monitor.hwm_kib.values(), default=0) / 1024,
            "worker_anon_mb": max(monitor.anon_kib.values(), default=0) / 1024,
            "workers_total_anon_mb": monitor.total_anon_kib / 1024, "workers": len(monitor.hwm_kib),
            "worker_top_name": monitor.titles.get(top, ""), "cpu_seconds": monitor.cpu_seconds(cpu_before)}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def driver_peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_ray(models: str, images: str, out: str, batch_size: int, num_cpus: int, threads: int | None) -> dict:
    from mvtec_ray.config import RayConfig, load_config
    from mvtec_ray.distributed.cluster import cluster_plan, connect
    from mvtec_ray.distributed.scoring import run_scoring
    config = load_config(None, {"out": out, "extract.batch_size": batch_size, "extract.torch_threads": threads})
    connect(RayConfig(num_cpus=num_cpus))
    monitor = TreeMonitor(pss_every_s=None, worker_memory=True)  # this driver and its Ray processes
    with monitor.watching(interval_s=0.25) as cpu_before:
        summary = run_scoring(config, models_uri=models, images_uri=images, detectors=DETECTORS)
    plan = cluster_plan(config.extract)
    return {"images": summary.scored_images, "errors": summary.errors, "seconds": summary.seconds,
            "driver_peak_mb": driver_peak_mb(), "threads": plan["threads"], "actors": plan["actors"],
            **worker_memory_summary(monitor, cpu_before)}


def measure_bare(models: str, images: str, out: str, batch_size: int, threads: int) -> dict:
    """decode + features + detectors + shard writing, one process, no Ray."""
    from mvtec_ray.config import ExtractConfig
    from mvtec_ray.deploy.listing import iter_listing
    from mvtec_ray.deploy.loaded_models import ModelSelection
    from mvtec_ray.deploy.model_files import list_models, load_model
    from mvtec_ray.deploy.scorer import Scorer, write_score_shards
    from mvtec_ray.deploy.scorer import prepare_or_reject as _prepare_or_reject
    from mvtec_ray.features.backbones import resolve_weights
    from mvtec_ray.storage import Storage
    storage = Storage()
    started = time.perf_counter()
    pairs = [p for p in list_models(storage, models) if p[1] in DETECTORS]
    info = load_model(storage, models, *pairs[0]).info
    schema = info["schema"]
    weights = resolve_weights(schema["backbone"], "imagenet", storage)
    config = ExtractConfig(backbone=schema["backbone"], image_size=schema["image_size"], batch_size=batch_size)
    selection = ModelSelection(models, pairs, schema["backbone"], schema["patch_dim"])
    scorer = Scorer(selection, storage, weights.state_dict, map_size=128, threads=threads, scored_at=time.time())
    setup = time.perf_counter() - started
    listing = next(iter_listing(storage, images, [c for c, _ in pairs], None, chunk=10 ** 9))
    cpu = _own_cpu()
    scored = 0
    for i in range(0, len(listing), batch_size):
        part = listing.iloc[i:i + batch_size]
        batch = _prepare_or_reject({k: part[k].to_numpy(dtype=object) for k in part.columns}, config, storage)
        counts = write_score_shards(scorer(batch), out, storage)
        scored += int(counts["images"].sum())
    # model loading included, as the Ray side's run_scoring includes its model checks and actor start
    seconds = time.perf_counter() - started
    return {"images": scored, "seconds": seconds, "setup_seconds": setup, "driver_peak_mb": driver_peak_mb(),
            "cpu_seconds": _own_cpu() - cpu}


# -- orchestration -------------------------------------------------------------------------
def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", type=int, default=1000, help="N: images for the speed comparison")
    parser.add_argument("--mem-images", default=None,
                        help="SMALL,LARGE image counts of the memory comparison (default N/4,N: the N run is reused, "
                             "so the default costs N/4 extra images, not 4N; e.g. 1000,4000)")
    parser.add_argument("--size", type=int, default=256, help="PNG side in pixels")
    parser.add_argument("--image-size", type=int, default=224, help="model input size")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument("--work", help="keep inputs and outputs here (default: a temporary folder)")
    common.hidden(parser, "--child", choices=["ray", "bare"])
    common.hidden(parser, "--models", "--input", "--out")
    parser.add_argument("--threads", type=int, help="torch/faiss/BLAS threads of the scoring actor and of the bare "
                        "loop (default: what the job picks for this machine)")
    args = parser.parse_args()
    if args.child == "ray":
        print(json.dumps(measure_ray(args.models, args.input, args.out, args.batch_size, args.num_cpus, args.threads)))
        return
    if args.child == "bare":
        print(json.dumps(measure_bare(args.models, args.input, args.out, args.batch_size, args.threads)))
        return

    n = args.images
    small, large = (int(v) for v in args.mem_images.split(",")) if args.mem_images else (max(1, n // 4), n)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-score-"))
    started = time.perf_counter()
    models = fit_models(work, args.size, args.image_size, args.num_cpus)
    print(f"fit: {time.perf_counter() - started:.1f}s", flush=True)
    started = time.perf_counter()
    sizes = sorted({n, small, large})
    make_images(work / "all", sizes[-1], args.size)
    inputs = {k: subset(work / "all", work / f"in-{k}", k) for k in sizes}
    print(f"generated {sizes[-1]} distinct PNGs of {args.size}x{args.size} in {time.perf_counter() - started:.1f}s",
          flush=True)
    side_args = ["--models", str(models), "--batch-size", str(args.batch_size), "--num-cpus", str(args.num_cpus)]
    ray_common = side_args + (["--threads", str(args.threads)] if args.threads else [])

    runs = {}
    for k in sorted({n, small, large}, key=lambda k: (k != n, k)):  # N first, then the bare loop right after it
        m = runs[k] = child(["--child", "ray", "--input", str(inputs[k]), "--out", str(work / f"out-ray-{k}"),
                             *ray_common])
        print(f"ray  {k} images: {m['images']} scored in {m['seconds']:.1f}s = {m['images'] / m['seconds']:.2f} img/s, "
              f"{m['cpu_seconds'] / m['images']:.3f} CPU-s/image (run_scoring wall time incl. model checks and actor "
              f"start; {m['actors']} actor x {m['threads']} threads; load average {m['load']:.1f})", flush=True)
        if k == n:
            # the same CPUs as the Ray job: every CPU it was given, as threads of the one process
            bare = child(["--child", "bare", "--input", str(inputs[n]), "--out", str(work / "out-bare"),
                          "--threads", str(args.num_cpus), *side_args])
            print(f"bare {n} images: {bare['images']} scored in {bare['seconds']:.1f}s = "
                  f"{bare['images'] / bare['seconds']:.2f} img/s, {bare['cpu_seconds'] / bare['images']:.3f} "
                  f"CPU-s/image (decode + features + detectors + shard writes in one process, batch "
                  f"{args.batch_size}, {args.num_cpus} threads; {bare['setup_seconds']:.1f}s of it model "
                  f"loading, as the Ray side counts its actor start; load average {bare['load']:.1f}); peak RSS {bare['driver_peak_mb']:.0f} MB", flush=True)
    for k in (small, large):
        m = runs[k]
        print(f"memory at {k} images: driver peak RSS {m['driver_peak_mb']:.0f} MB; {m['workers']} ray:: worker "
              f"processes over the run, largest: peak RSS {m['worker_hwm_mb']:.0f} MB, peak private (RssAnon) "
              f"{m['worker_anon_mb']:.0f} MB ({m['worker_top_name']}; by quarter of its life "
              f"{', '.join(f'{v:.0f}' for v in m['worker_anon_quarters_mb'])} MB); all workers together at "
              f"most {m['workers_total_anon_mb']:.0f} MB private")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    assert bare["images"] == n and all(runs[k]["images"] == k for k in runs), (bare, runs)
    ratio = "4N/N" if large == 4 * small else f"{large}/{small}"
    big, low = runs[large], runs[small]
    print(f"memory compared at N={small} and {large} images; worker_mem = the largest worker's peak private "
          f"memory; its peak RSS incl. shared object-store pages: {big['worker_hwm_mb'] / low['worker_hwm_mb']:.2f}")
    print(f"cpu ray/bare={(runs[n]['cpu_seconds'] / n) / (bare['cpu_seconds'] / n):.2f} (CPU-seconds per image; "
          f"less sensitive than wall time to the other users of this machine)")
    emit(**{"score_ray/bare": (runs[n]["images"] / runs[n]["seconds"]) / (bare["images"] / bare["seconds"]),
            "e2e_score_ray/bare": bare["wall"] / runs[n]["wall"],
            f"driver_mem_{ratio}": big["driver_peak_mb"] / low["driver_peak_mb"],
            f"worker_mem_{ratio}": big["worker_anon_mb"] / low["worker_anon_mb"]}, digits=2)


if __name__ == "__main__":
    main()

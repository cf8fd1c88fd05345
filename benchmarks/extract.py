"""Extraction, end to end: the Ray Data pipeline against a bare loop over the same library functions.

    python benchmarks/extract.py [--images 300] [--size 900] [--backbone resnet50] [--stages auto|fused|staged]

MVTec-size PNGs are generated once; then each side runs as a cold process on the same CPUs (the
bare loop with as many torch threads as CPUs): decode, embed, write Parquet shards. Speed does not
depend on the weights' values: without cached ImageNet weights the backbone runs with random
weights, which the output says. Prints per side the wall seconds, seconds until the first shard was
written and the steady-state rate after it, then ``e2e_ray/bare=`` (images/s of the whole cold
process, start-up included, Ray's against the bare loop's) and ``steady_ray/bare=``.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from baselines import bare_extract, steady_rate
from measure import TIMING_PSS_EVERY_S, emit, load_average, python, require_ok, run_cold


def make_images(root: Path, n: int, size: int) -> None:
    """``n`` distinct PNGs of ``size`` px under ``root/bench/train/good`` (and one test image)."""
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    base = root.parent / "_base"  # the generator's own output stays outside the catalogued root
    generate_sample_dataset(base, categories=["carpet_like"], spec=SampleSpec(
        n_train=8, n_test_good=1, n_test_defect_per_type=1, size=size))
    sources = sorted((base / "carpet_like" / "train" / "good").glob("*.png"))
    train = root / "bench" / "train" / "good"
    common.noisy_copies(sources, train, n, amplitude=3, per_pixel=False)
    test = root / "bench" / "test" / "good"
    test.mkdir(parents=True)
    shutil.copy(train / "0000.png", test / "0000.png")


def side(which: str, data: str, out: str, args) -> None:
    started = time.perf_counter()
    from mvtec_ray.config import ExtractConfig, RayConfig
    from mvtec_ray.data.catalog import build_catalog
    from mvtec_ray.errors import WeightsUnavailable
    from mvtec_ray.features.backbones import resolve_weights
    from mvtec_ray.storage import Storage, join
    storage = Storage()
    try:
        weights = resolve_weights(args.backbone, "imagenet")
    except WeightsUnavailable:
        weights = resolve_weights(args.backbone, "random")
    config = ExtractConfig(backbone=args.backbone, weights="imagenet" if weights.pretrained else "random",
                           batch_size=args.batch_size, holdout_fraction=0.0, synthetic_per_image=0,
                           stages=args.stages)
    catalog = build_catalog(data, storage)
    timeline: list[tuple[float, int]] = []
    if which == "bare":
        from mvtec_ray.threads import pin_threads
        threads = os.cpu_count() or 1
        _blas_limit = pin_threads(threads)  # the BLAS limit holds while it lives
        rows = bare_extract(catalog, config, weights, join(out, config.fingerprint()), storage, threads,
                            on_batch=lambda t, n: timeline.append((t, n)))
    else:
        from mvtec_ray.distributed.cluster import cluster_plan, connect
        from mvtec_ray.distributed.extraction import run_extraction
        connect(RayConfig())
        print(f"ray plan: {cluster_plan(config)}")
        result = run_extraction(catalog, out, config, storage, weights, progress=timeline)
        rows = int(result.counts["rows"].sum())
    first_s, steady = steady_rate(timeline)
    shard_bytes = sum(p.stat().st_size for p in Path(out).rglob("*.parquet"))
    source_bytes = sum(p.stat().st_size for p in Path(data).rglob("*.png"))
    emit(weights_pretrained=int(weights.pretrained), rows=rows, first_batch_s=first_s, steady_img_s=steady,
         in_process_s=time.perf_counter() - started, shard_kb_per_image=shard_bytes / 1024 / max(1, rows),
         source_kb_per_image=source_bytes / 1024 / max(1, rows))


def main() -> None:
    parser = common.parser(__doc__)
    common.hidden(parser, "--side", choices=["bare", "ray"])
    common.hidden(parser, "--data", "--out")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=900)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stages", default="auto", choices=["auto", "fused", "staged"])
    args = parser.parse_args()
    if args.side:
        side(args.side, args.data, args.out, args)
        return
    scratch = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    try:
        started = time.perf_counter()
        make_images(scratch / "data", args.images, args.size)
        print(f"generated {args.images} PNGs of {args.size}x{args.size} in {time.perf_counter() - started:.1f}s")
        print(f"load average before: {load_average()}")
        options = ["--backbone", args.backbone, "--batch-size", str(args.batch_size), "--stages", args.stages]
        runs = {}
        for which in ("bare", "ray"):
            print(f"[{which}] cold process")
            runs[which] = require_ok(run_cold(python("benchmarks/extract.py", "--side", which, "--data",
                                                     str(scratch / "data"), "--out", str(scratch / which),
                                                     *options), pss_every_s=TIMING_PSS_EVERY_S), which)
            m = runs[which]
            print(f"[{which}] wall {m.wall_s:.1f}s ({args.images / m.wall_s:.2f} img/s end to end), "
                  f"first shard after {m.figures.get('first_batch_s', float('nan')):.1f}s in-process, "
                  f"steady {m.figures.get('steady_img_s', float('nan')):.2f} img/s, CPU {m.cpu_s:.0f}s, "
                  f"peak PSS {m.peak_pss_mb:.0f} MB (sampled every {TIMING_PSS_EVERY_S:.0f}s; {m.describe_peak()})")
        print(f"load average after: {load_average()}")
        bare, ray = runs["bare"], runs["ray"]
        emit(bare_e2e_img_s=args.images / bare.wall_s, ray_e2e_img_s=args.images / ray.wall_s,
             bare_steady_img_s=bare.figures["steady_img_s"], ray_steady_img_s=ray.figures["steady_img_s"])
        emit(**{"e2e_ray/bare": bare.wall_s / ray.wall_s,
                "steady_ray/bare": ray.figures["steady_img_s"] / bare.figures["steady_img_s"],
                "mem_ray/bare": ray.peak_pss_mb / bare.peak_pss_mb})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

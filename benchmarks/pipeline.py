"""The demo's work two ways: ``mvtec-ray run`` on an embedded Ray against a bare single process
calling the same library functions in a loop (decode, embed, write shards, fit, evaluate, report).

    python benchmarks/pipeline.py [--data DIR] [--backbone efficientnet_lite0] [--detectors a,b]

Both sides start as cold processes on the same CPUs (the bare one runs torch, BLAS and faiss with
as many threads as there are CPUs). Prints wall seconds, CPU seconds and peak PSS of each whole
process tree, then ``run/bare=`` (wall) and ``mem_run/bare=`` (peak PSS, Ray's daemons and workers
included, against the bare process).
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
from baselines import bare_extract
from measure import TIMING_PSS_EVERY_S, emit, load_average, python, require_ok, run_cold


def bare(data: str, out: str, backbone: str, detectors: list[str] | None, config_file: str | None) -> None:
    """The pipeline's work in this one process, through the library's own functions."""
    import numpy as np
    started = time.perf_counter()
    threads = os.cpu_count() or 1
    from mvtec_ray.threads import pin_threads
    _blas_limit = pin_threads(threads)  # torch, faiss, BLAS; the BLAS limit holds while it lives
    from mvtec_ray.config import load_config
    from mvtec_ray.data.catalog import build_catalog
    from mvtec_ray.deploy.model_files import update_manifest
    from mvtec_ray.evaluation.summary import summarise
    from mvtec_ray.features.backbones import resolve_weights
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.fit.cell import fit_category_detector
    from mvtec_ray.report.html import write_report
    from mvtec_ray.report.outputs import write_outputs
    from mvtec_ray.storage import Storage, join

    overrides = {"data": data, "out": out, "extract.backbone": backbone, "detectors.names": detectors}
    config = load_config(config_file, overrides)
    storage = Storage(config.s3)
    catalog = build_catalog(config.data, storage, config.categories)
    weights = resolve_weights(config.extract.backbone, config.extract.weights, storage)
    out_dir = join(out, "features", config.extract.fingerprint())
    rows = bare_extract(catalog, config.extract, weights, out_dir, storage, threads)
    extract_s = time.perf_counter() - started
    features = FeatureSet.open(out_dir, storage)
    metadata = features.metadata()
    outcomes = []
    for category in features.categories():
        pooled = features.load_pooled(category)
        for name in config.detectors.names:
            outcomes.append(fit_category_detector(features, category, name, config.detectors.params.get(name, {}),
                                                  config.evaluation, out, storage, threads, pooled, metadata))
    import pandas as pd
    results = summarise(pd.DataFrame([o.row for o in outcomes]))
    scores = pd.concat([o.scores for o in outcomes if len(o.scores)], ignore_index=True)
    update_manifest(storage, join(out, "models"), [o.row for o in outcomes], metadata.get("fingerprint"))
    write_outputs(out, storage, config, results, scores, features.error_rows().to_pandas(), catalog.skipped)
    write_report(out)
    ok = results[results["category"] != "mean"] if "category" in results else results
    emit(rows=rows, fits=len(outcomes), fit_errors=int((ok.get("status") == "error").sum()),
         extract_s=extract_s, total_s=time.perf_counter() - started, mean_auroc=float(np.nanmean(ok["image_auroc"])))


def main() -> None:
    parser = common.parser(__doc__)
    common.hidden(parser, "--side", choices=["bare", "ray"])
    parser.add_argument("--data", help="dataset root (default: the generated sample data, made here)")
    parser.add_argument("--out")
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--detectors", help="comma-separated (default: every default detector)")
    parser.add_argument("--config", help="a YAML config for both sides (e.g. extract.actors for the Ray side)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--passes", default="timing,memory",
                        help="timing (wall, PSS read every 5 s) and/or memory (PSS read every 0.5 s)")
    args = parser.parse_args()
    detectors = args.detectors.split(",") if args.detectors else None
    if args.side == "bare":
        bare(args.data, args.out, args.backbone, detectors, args.config)
        return
    if args.side == "ray":
        from mvtec_ray.cli import main as cli
        argv = ["run", "--data", args.data, "--out", args.out, "--backbone", args.backbone]
        argv += ["--config", args.config] if args.config else []
        sys.exit(cli(argv + (["--detectors", args.detectors] if args.detectors else [])))

    scratch = tempfile.mkdtemp(prefix="bench-pipeline-")
    try:
        data = args.data or os.path.join(scratch, "data")
        if not args.data:
            from mvtec_ray.data.sample_data import generate_sample_dataset
            generate_sample_dataset(data)
        print(f"load average before: {load_average()}")
        side_args = ["--data", data, "--backbone", args.backbone]
        side_args += ["--detectors", args.detectors] if args.detectors else []
        side_args += ["--config", os.path.abspath(args.config)] if args.config else []
        # two passes per side: the wall time with PSS read rarely (reading it costs CPU, more for the
        # side with more processes), then the memory with PSS read every 0.5 s
        timing, memory = {}, {}
        passes = [p for p in (("timing", TIMING_PSS_EVERY_S, timing), ("memory", 0.5, memory))
                  if p[0] in args.passes.split(",")]
        for name, pss_every_s, sides in passes:
            for side in ("bare", "ray"):
                print(f"[{side}, {name} pass] cold process")
                sides[side] = require_ok(run_cold(python("benchmarks/pipeline.py", "--side", side, "--out",
                                                         os.path.join(scratch, f"{side}-{name}"), *side_args),
                                                  pss_every_s=pss_every_s), side)
                m = sides[side]
                print(f"[{side}, {name} pass] wall {m.wall_s:.1f}s, CPU {m.cpu_s:.1f}s, peak PSS {m.peak_pss_mb:.0f} MB "
                      f"(read every {pss_every_s:g}s) over up to {m.peak_processes} processes (MB at the peak: "
                      f"{m.describe_peak()}; CPU-s by process: {m.describe_cpu()})")
        print(f"load average after: {load_average()}")
        if timing:
            emit(bare_wall_s=timing["bare"].wall_s, run_wall_s=timing["ray"].wall_s,
                 bare_cpu_s=timing["bare"].cpu_s, run_cpu_s=timing["ray"].cpu_s)
            emit(**{"run/bare": timing["ray"].wall_s / timing["bare"].wall_s})
        if memory:
            emit(bare_pss_mb=memory["bare"].peak_pss_mb, run_pss_mb=memory["ray"].peak_pss_mb,
                 memory_pass_bare_wall_s=memory["bare"].wall_s, memory_pass_run_wall_s=memory["ray"].wall_s)
            emit(**{"mem_run/bare": memory["ray"].peak_pss_mb / memory["bare"].peak_pss_mb})
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()

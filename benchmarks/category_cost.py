"""One large category end to end: how long validation + test scoring takes against the fit, per detector.

    python benchmarks/category_cost.py [--train 600] [--test-good 160] [--defects-per-type 160]
        [--size 256] [--category washer] [--detectors patchcore,padim] [--workdir DIR]

Writes one generated category (``mvtec-ray sample-data``'s generator, ``--train`` normal training
images; with the default hold-out 20 % of them become validation normals, each with 2 synthetic
defects) and runs ``mvtec-ray run`` on it in a child process (EfficientNet-Lite0, an embedded local
Ray on 2 CPUs, full-resolution pixel metrics and overlays as by default). The defaults give a
600-image category with 120 + 240 validation and 640 test images: about 1,000 scored. Prints, per
detector, ``fit_seconds/<d>=`` and ``score_seconds/<d>=`` (the fit task's own timers: the fit, then
scoring validation and test with maps, the pixel threshold, pixel metrics and overlays),
``score_to_fit/<d>=``, ``overlay_seconds/<d>=`` (the part of the scoring that writes the overlays,
``evaluation.overlay_format``'s default JPEG; ``--overlay-format png`` for the lossless ones),
``n_train/<d>=`` and ``n_scored/<d>=``.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import pandas as pd
from measure import emit


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--test-good", type=int, default=160)
    parser.add_argument("--defects-per-type", type=int, default=160)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--category", default="washer")
    parser.add_argument("--detectors", default="patchcore,padim")
    parser.add_argument("--overlay-format", choices=("jpeg", "png"), default="jpeg")
    parser.add_argument("--workdir", help="keep the data and the run here (default: a temporary folder)")
    args = parser.parse_args()

    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset

    work = Path(args.workdir or tempfile.mkdtemp(prefix="category-cost-"))
    data, out = work / "data", work / "run"
    try:
        common.print_load()
        spec = SampleSpec(n_train=args.train, n_test_good=args.test_good,
                          n_test_defect_per_type=args.defects_per_type, size=args.size)
        generate_sample_dataset(data, categories=[args.category], spec=spec, overwrite=True)
        config = work / "config.yaml"
        config.write_text(f"evaluation:\n  overlay_format: {args.overlay_format}\n", encoding="utf-8")
        common.mvtec_ray_cli("run", "--data", str(data), "--out", str(out), "--backbone", "efficientnet_lite0",
                             "--detectors", args.detectors, "--num-cpus", "2", "--config", str(config))
        results = pd.read_parquet(out / "results.parquet")
        cells = results[(results["category"] == args.category)].set_index("detector")
        for detector in args.detectors.split(","):
            row = cells.loc[detector]
            scored = int(row["n_val_good"] + row["n_val_synthetic"] + row["n_test_good"] + row["n_test_defect"])
            emit(**{f"fit_seconds/{detector}": row["fit_seconds"], f"score_seconds/{detector}": row["score_seconds"],
                    f"score_to_fit/{detector}": row["score_seconds"] / row["fit_seconds"],
                    f"overlay_seconds/{detector}": row.get("overlay_seconds", float("nan"))}, digits=2)
            emit(**{f"n_train/{detector}": int(row["n_train"]), f"n_scored/{detector}": scored,
                    f"image_auroc/{detector}": round(float(row["image_auroc"]), 3)})
        common.print_load("load_average_end")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

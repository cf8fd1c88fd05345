"""PatchCore coreset at scale: sharded (composable) greedy vs the single greedy, IVF vs exact bank.

    python benchmarks/coreset.py --features FEATURES [--sizes 250000,500000,1000000]

FEATURES: an extraction of the generated data with EfficientNet-Lite0 at 224 px, e.g.

    python -c "from mvtec_ray.data.sample_data import *; generate_sample_dataset('runs/bench/data', seed=7,
               spec=SampleSpec(n_train=100, n_test_good=10, n_test_defect_per_type=6))"
    python -m mvtec_ray extract --data runs/bench/data --out runs/bench/features --backbone efficientnet_lite0

1. shard size chosen on validation data (val_good + val_synthetic image AUROC, per category),
   never on test: the largest speed-up whose mean validation AUROC is within 0.005 of the
   single greedy; then ``coreset_auroc_delta`` = test image AUROC (sharded - single greedy);
2. scaling: real-like patches (the categories' training patch maps, tiled with small Gaussian
   jitter) at each size, sharded and single greedy (same projection, same greedy code; above
   ``--baseline-full-max`` the single greedy is timed on its first steps and extrapolated:
   every step costs the same), seconds and peak RSS of each, in a fresh process each;
3. faiss IVF vs exact search on the largest bank: recall@1, distance error, AUROC;
4. a PatchCore fit (defaults) of a 600-image category at 224 px (28 x 28 patches).
Prints ``name=value`` lines.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import resource
import sys
import time

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import numpy as np
from measure import proc_status_kib

MiB = 2**20
JITTER = 0.1  # jitter std as a fraction of the features' overall std


def load_split(features, category: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = list(features.iter_patches(category, split))
    return np.concatenate([p["X"] for p in parts]), np.concatenate([p["label"] for p in parts])


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 127


def load_test_masks(features, category: str, size: int = 112) -> np.ndarray:
    """Test masks at a reduced size (a relative comparison of coreset options, not the protocol)."""
    from mvtec_ray.data.images import decode_mask_png
    return np.stack([_resize_mask(decode_mask_png(png), size) if png else np.zeros((size, size), bool)
                     for p in features.iter_patches(category, "test", with_masks=True) for png in p["mask_png"]])


def auroc(labels, scores) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


def real_like(base: np.ndarray, n_patches: int, seed: int = 0) -> np.ndarray:
    """``base`` patch maps tiled (with Gaussian jitter on every copy) to >= n_patches patches."""
    per_image = base.shape[1] * base.shape[2]
    n_images = math.ceil(n_patches / per_image)
    rng = np.random.default_rng(seed)
    sigma = JITTER * float(base.astype(np.float32).std())
    out = np.empty((n_images, *base.shape[1:]), dtype=np.float16)
    for lo in range(0, n_images, len(base)):
        m = min(len(base), n_images - lo)
        noise = rng.standard_normal((m, *base.shape[1:]), dtype=np.float32) * sigma
        out[lo:lo + m] = base[:m] + noise
    return out


def _rss_mb() -> float:
    rss = proc_status_kib(os.getpid(), "VmRSS")
    return rss[0] / 1024 if rss else float("nan")


def _measure(args) -> dict:
    """In a fresh process: one coreset (or a timed prefix of the single greedy), seconds + peak RSS."""
    base_path, n_patches, shard, steps_cap = args
    import torch

    from mvtec_ray.detectors.coreset import (
        coreset_size,
        greedy_kcenter,
        project_source,
        select_coreset,
    )
    X = real_like(np.load(base_path), n_patches)
    before = _rss_mb()
    t0 = time.perf_counter()
    if steps_cap:  # the single greedy's first steps, extrapolated to all of them
        Zt, _, _, _ = project_source(X, 128, 0, 1024 * MiB, torch.device("cpu"))
        t1 = time.perf_counter()
        k = coreset_size(Zt.shape[1], 0.1)
        greedy_kcenter(Zt, steps_cap, 0)
        per_step = (time.perf_counter() - t1) / steps_cap
        seconds = (t1 - t0) + per_step * k
    else:
        select_coreset(X, 0.1, 128, 0, shard_patches=shard)
        seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "peak_mb": peak - before, "n": int(X.shape[0] * X.shape[1] * X.shape[2])}


def measure(base_path: str, n: int, shard: int, steps_cap: int = 0) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, ((base_path, n, shard, steps_cap),))


def fit_eval(params: dict, train, val, test, masks=None) -> dict:
    """Fit seconds, val / test image AUROC, test pixel AUROC, and the bank's covering radius
    of the training patches (full dimension)."""
    from mvtec_ray.detectors.patch import PatchCore
    from mvtec_ray.evaluation.pixel_metrics import pixel_auroc
    t0 = time.perf_counter()
    det = PatchCore(**params).fit(train)
    fit = time.perf_counter() - t0
    scores, maps = det.score_with_maps(test[0], masks.shape[1:] if masks is not None else None)
    D, _ = det._index.search(train.reshape(-1, train.shape[-1]).astype(np.float32), 1)
    return {"fit_s": fit, "val": auroc(val[1], det.score(val[0])), "test": auroc(test[1], scores),
            "pixel": pixel_auroc(maps, masks) if masks is not None else float("nan"),
            "radius": float(np.sqrt(max(D.max(), 0.0)))}


def main() -> int:
    parser = common.parser(__doc__)
    parser.add_argument("--features", required=True)
    parser.add_argument("--sizes", default="250000,500000,1000000")
    parser.add_argument("--shards", default="32768,16384,8192,4096,2048", help="shard sizes to choose from")
    parser.add_argument("--baseline-full-max", type=int, default=250_000,
                        help="largest size at which the single greedy runs to the end")
    parser.add_argument("--baseline-steps", type=int, default=1500)
    parser.add_argument("--no-baseline", action="store_true", help="time the sharded coreset only")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: choose,scaling,ivf,fit600")
    parser.add_argument("--shard", type=int, default=0, help="shard size to use when 'choose' is skipped")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    from mvtec_ray.detectors.patch import PatchCore
    from mvtec_ray.features.store import FeatureSet
    features = FeatureSet.open(args.features)
    cats = features.categories()
    common.print_load()
    data, masks = {}, {}
    for c in cats:
        train, _ = load_split(features, c, "train")
        vg, vgl = load_split(features, c, "val_good")
        vs, vsl = load_split(features, c, "val_synthetic")
        test = load_split(features, c, "test")
        data[c] = (train, (np.concatenate([vg, vs]), np.r_[vgl, vsl]), test)
        masks[c] = load_test_masks(features, c)
    print(f"categories={','.join(cats)} train_patches_per_category={data[cats[0]][0].shape[0] * 784} "
          f"patch_dim={data[cats[0]][0].shape[-1]}", flush=True)

    # 1. shard size on validation data
    shard = args.shard
    if "choose" not in skip:
        rows, base_res = {}, None
        for option in [0] + [int(s) for s in args.shards.split(",")]:
            res = [fit_eval({"coreset_shard_patches": option}, *data[c], masks[c]) for c in cats]
            rows[option] = {k: float(np.mean([r[k] for r in res])) for k in res[0]}
            ratio = np.mean([r["radius"] / r0["radius"] for r, r0 in zip(res, base_res)]) if option else 1.0
            rows[option]["radius_ratio"] = float(ratio)
            base_res = res if not option else base_res
            print(f"option shard_patches={option} fit_seconds_mean={rows[option]['fit_s']:.1f} "
                  f"val_auroc_mean={rows[option]['val']:.4f} covering_radius_vs_single={ratio:.3f}", flush=True)
        # validation only: within 0.005 val AUROC and 2x the covering radius, then the fastest
        ok = [o for o in rows if o and rows[o]["val"] >= rows[0]["val"] - 0.005 and rows[o]["radius_ratio"] <= 2]
        shard = min(ok, key=lambda o: rows[o]["fit_s"]) if ok else 0
        print(f"chosen_shard_patches={shard}")
        print(f"coreset_auroc_delta={rows[shard]['test'] - rows[0]['test']:.4f} "
              f"(test image AUROC sharded {rows[shard]['test']:.4f} vs single greedy {rows[0]['test']:.4f})")
        print(f"coreset_pixel_auroc_delta={rows[shard]['pixel'] - rows[0]['pixel']:.4f} "
              f"(test pixel AUROC {rows[shard]['pixel']:.4f} vs {rows[0]['pixel']:.4f})", flush=True)

    base = np.concatenate([data[c][0] for c in cats])
    base_path = f"/tmp/coreset_bench_base_{os.getpid()}.npy"
    np.save(base_path, base)
    sizes = [int(s) for s in args.sizes.split(",")]

    # 2. scaling
    if "scaling" not in skip and shard:
        fast, slow = {}, {}
        for n in sizes:
            fast[n] = measure(base_path, n, shard)
            print(f"size={fast[n]['n']} sharded_seconds={fast[n]['seconds']:.1f} "
                  f"sharded_peak_mb={fast[n]['peak_mb']:.0f}", flush=True)
            if args.no_baseline:
                continue
            cap = 0 if n <= args.baseline_full_max else args.baseline_steps
            slow[n] = measure(base_path, n, 0, cap)
            print(f"size={slow[n]['n']} single_greedy_seconds{'_extrapolated' if cap else ''}="
                  f"{slow[n]['seconds']:.1f} single_greedy_peak_mb={slow[n]['peak_mb']:.0f}"
                  f"{f' (from its first {cap} steps)' if cap else ''}", flush=True)
        a, b = sizes[-2], sizes[-1]
        exp = math.log(fast[b]["seconds"] / fast[a]["seconds"]) / math.log(fast[b]["n"] / fast[a]["n"])
        print(f"coreset_scaling_exponent={exp:.2f}", flush=True)
        if slow:
            exp0 = math.log(slow[b]["seconds"] / slow[a]["seconds"]) / math.log(slow[b]["n"] / slow[a]["n"])
            print(f"single_greedy_scaling_exponent={exp0:.2f}")
            print(f"speedup_at_{fast[b]['n']}={slow[b]['seconds'] / fast[b]['seconds']:.1f}", flush=True)

    # 3. IVF vs exact
    if "ivf" not in skip:
        X = real_like(base, sizes[-1])
        det = PatchCore(coreset_shard_patches=shard or 16384, index="flat").fit(X)
        bank = det._index.reconstruct_n(0, det.bank_size)
        queries = np.concatenate([data[c][2][0] for c in cats]).reshape(-1, bank.shape[1]).astype(np.float32)
        queries = queries[np.random.default_rng(0).choice(len(queries), min(20000, len(queries)), replace=False)]
        t0 = time.perf_counter()
        D0, I0 = det._index.search(queries, 1)
        t_flat = time.perf_counter() - t0
        print(f"ivf_bank_rows={len(bank)} flat_search_ms_per_1k_queries={1000 * t_flat / len(queries) * 1000:.0f}")
        for nprobe in (8, 16, 32):
            ivf = PatchCore(index="ivf", nprobe=nprobe)
            ivf.grid_ = det.grid_
            ivf._set_index(ivf._build_index(bank))
            t0 = time.perf_counter()
            D1, I1 = ivf._index.search(queries, 1)
            t_ivf = time.perf_counter() - t0
            err = np.sqrt(np.maximum(D1, 0)) / np.maximum(np.sqrt(np.maximum(D0, 0)), 1e-6) - 1
            print(f"ivf_nprobe={nprobe} recall_at_1={float((I1 == I0).mean()):.3f} "
                  f"distance_overestimate_median={float(np.median(err)):.4f} p99={float(np.quantile(err, 0.99)):.4f} "
                  f"search_ms_per_1k_queries={1000 * t_ivf / len(queries) * 1000:.0f}", flush=True)
        # AUROC cost on each category's own bank, IVF forced at the default nprobe
        deltas = []
        for c in cats:
            train, _, test = data[c]
            exact = PatchCore(coreset_shard_patches=shard, index="flat").fit(train)
            approx = PatchCore(coreset_shard_patches=shard, index="ivf").fit(train)
            deltas.append(auroc(test[1], approx.score(test[0])) - auroc(test[1], exact.score(test[0])))
        print(f"ivf_auroc_delta_mean={np.mean(deltas):.4f} (per category: "
              f"{', '.join(f'{d:+.4f}' for d in deltas)}; nprobe 8, banks of {exact.bank_size} rows)", flush=True)

    # 4. a 600-image category at 224 px
    if "fit600" not in skip:
        X = real_like(base, 600 * 784, seed=1)[:600]
        t0 = time.perf_counter()
        det = PatchCore(coreset_shard_patches=shard or PatchCore.default_params()["coreset_shard_patches"]).fit(X)
        print(f"patchcore_fit_600_images_seconds={time.perf_counter() - t0:.1f} patches={det.fit_stats_['n_patches']} "
              f"bank={det.bank_size} index={det.fit_stats_['index']} shards={det.fit_stats_['n_shards']}")
    common.print_load("load_average_end")
    return 0


if __name__ == "__main__":
    sys.exit(main())

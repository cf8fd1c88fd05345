"""PatchCore scoring cost against the memory bank's size: the default search vs exact search.

    python benchmarks/score_bank.py [--images 100,600,2400] [--test 200] [--val 40] [--dim 1536] [--grid 28]
    python benchmarks/score_bank.py --quick        # tiny sizes, under a minute: checks the script runs

Features: synthetic patch maps of one kind, float16 ``(n, grid, grid, dim)`` as the feature store
holds them; by default shaped as the default extraction's (``extract.backbone: resnet50``, layers 2+3
= 512 + 1024 = 1536 channels, ``patch_dim: null``, 28 x 28 patches at 224 px; EfficientNet-Lite0's
are 40 + 112 = 152 channels: ``--dim 152``). A normal patch is a fixed per-position mean plus a
fixed random low-rank (``--rank``) variation plus isotropic noise, clipped at 0 (post-ReLU); an
anomalous image carries one blob of 2-8 neighbouring patches shifted along a random direction
(``--shift``, in units of the normal patches' spread). Half the validation and half the test images
are anomalous. The training images are one set: the bank at N images is built from its first N.

For each size: PatchCore with its defaults (``coreset_ratio`` 0.1, ``index: auto`` = exact below
``ivf_min_bank`` bank rows, IVF above with ``nprobe: auto`` chosen at fit; nothing tuned) and the
same with ``index: flat`` (exact search; same seed, so the same coreset), each fitted on the N
training images, then one ``score()`` over the fixed validation + test images, timed (the search;
no maps). CPU only (``use_gpu: false``). Prints ``bank_rows/N=``, ``score_ms_per_image/<search>/N=``
(search: ``default``, ``exact``), ``fit_seconds/<search>/N=`` (the whole fit: coreset, index and,
for IVF, the ``nprobe`` choice), ``score_to_fit/<search>/N=`` (seconds to score the validation +
test images over fit seconds: the "scoring within 3x the fit" check at a real category's counts,
e.g. ``--images 600 --test 800 --val 200``), ``nprobe/N=`` (the default search's IVF lists per
patch; 0 = exact search), ``recall/N=`` and ``recall_hard/N=`` (the share of its held-out patches,
and of their hardest tenth, whose IVF patch score is within 1% of the exact one at that ``nprobe``;
1 for exact search), ``rechecked_per_image/N=`` (patches per scored image whose exact distance IVF
scoring looked up to make the image maximum exact), ``auroc/<search>/N=`` (image AUROC on the test
images), ``auroc_delta/N=`` (default - exact), then ``bank_growth_exponent=`` (the default search:
slope of log(ms per image) against log(bank rows), least squares over the sizes),
``bank_growth_exponent_exact=`` and ``auroc_delta=`` (at the largest size). Exact search grows with
exponent ~1 (every query meets every bank row); a search that does not grow with the bank stays
well below. PatchCore's IVF scoring re-checks each image's maximum patch exactly, so its image
scores equal exact search's and ``auroc_delta`` is 0 up to rounding; ``nprobe`` sets the cost and
how close the other patch scores (the maps) are, which ``recall`` measures. These features are
noise-dominated (nearest-bank distances within a few percent of each other), the hard case for a
partitioned search: ``recall`` here is well below what real features get at the same ``nprobe``.

The full sizes take a while on a small CPU machine (exact search over the 2,400-image bank, ~190k
rows of 1536 values, is ~4.5e11 flops per image). ``--quick``: 10, 20 and 40 images of 14 x 14
patches, 16 test and 8 validation images, and ``ivf_min_bank`` 500 so that, as at full size (where
the 100-image bank stays under PatchCore's 20,000 rows), the smaller banks use exact search and
the largest IVF.
"""
from __future__ import annotations

import math
import time

import common  # first: the benchmarks' shared start (sys.path, Ray's environment)
import numpy as np
from measure import emit

QUICK = {"images": "10,20,40", "test": 16, "val": 8, "grid": 14, "ivf_min_bank": 500}


class PatchWorld:
    """One kind of object: the fixed distribution every normal patch is drawn from."""

    def __init__(self, grid: int, dim: int, rank: int, noise: float, seed: int):
        rng = np.random.default_rng(seed)
        self.grid, self.dim, self.noise = grid, dim, noise
        # per-position mean: a smooth low-rank spatial pattern (the object sits where it always sits)
        yy, xx = np.meshgrid(np.linspace(-1, 1, grid), np.linspace(-1, 1, grid), indexing="ij")
        spatial = np.stack([np.ones_like(yy), yy, xx, yy * xx, yy ** 2, xx ** 2], -1).reshape(grid * grid, -1)
        self.mean = (spatial @ rng.normal(0, 0.5, (spatial.shape[1], dim)) + 0.5).astype(np.float32)
        # variation: rank ``rank``, unit variance per channel, plus isotropic noise of std ``noise``
        self.basis = (rng.normal(size=(rank, dim)) / math.sqrt(rank)).astype(np.float32)
        # the normal patches' spread: the expected distance of a patch from its position's mean
        self.spread = math.sqrt(dim * (1.0 + noise ** 2))

    def normal(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` normal images, float16 ``(n, grid, grid, dim)``, made in float32 chunks of ~64 MiB."""
        g2, out = self.grid * self.grid, np.empty((n, self.grid, self.grid, self.dim), np.float16)
        step = max(1, (64 << 20) // (g2 * self.dim * 4))
        for lo in range(0, n, step):
            m = min(step, n - lo)
            x = rng.standard_normal((m * g2, self.basis.shape[0]), dtype=np.float32) @ self.basis
            x += rng.standard_normal(x.shape, dtype=np.float32) * self.noise
            x = x.reshape(m, g2, self.dim) + self.mean[None]
            out[lo:lo + m] = np.maximum(x, 0).reshape(m, self.grid, self.grid, self.dim)
        return out

    def with_defects(self, X: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
        """``X`` with one blob of 2-8 neighbouring patches per image moved ``shift`` spreads along a
        random direction."""
        X = X.copy()
        for i in range(len(X)):
            direction = rng.normal(size=self.dim).astype(np.float32)
            direction *= shift * self.spread / np.linalg.norm(direction)
            y, x = (int(v) for v in rng.integers(1, self.grid - 1, size=2))
            cells = [(y + dy, x + dx) for dy in (0, 1, -1) for dx in (0, 1, -1)][: int(rng.integers(2, 9))]
            for cy, cx in cells:
                X[i, cy, cx] = np.maximum(X[i, cy, cx].astype(np.float32) + direction, 0)
        return X


def scored_set(world: PatchWorld, n: int, shift: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images, the second half anomalous: (features, labels)."""
    good = world.normal(n - n // 2, rng)
    bad = world.with_defects(world.normal(n // 2, rng), shift, rng)
    return np.concatenate([good, bad]), np.r_[np.zeros(len(good), np.int8), np.ones(len(bad), np.int8)]


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score
    return float(roc_auc_score(labels, scores))


def measure_bank(train: np.ndarray, scored: np.ndarray, n_test: int, test_labels: np.ndarray,
                 index: str | None, ivf_min_bank: int | None) -> dict:
    """Fit PatchCore (its defaults, ``index`` when given) on ``train``; time one ``score()`` of ``scored``."""
    from mvtec_ray.detectors.patch import PatchCore
    params = {"use_gpu": False}
    if index is not None:
        params["index"] = index
    if ivf_min_bank is not None:
        params["ivf_min_bank"] = ivf_min_bank
    detector = PatchCore(**params)
    started = time.perf_counter()
    detector.fit(train)
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    scores = detector.score(scored)
    score_s = time.perf_counter() - started
    stats = detector.fit_stats_
    ivf = stats["index"] == "ivf"
    return {"bank_rows": detector.bank_size, "index": stats["index"], "fit_s": fit_s, "score_s": score_s,
            "ms_per_image": 1000 * score_s / len(scored), "auroc": auroc(test_labels, scores[-n_test:]),
            "coreset": detector.coreset_indices_, "nprobe": stats["nprobe"] if ivf else 0,
            "recall": _number(stats.get("nprobe_recall")) if ivf else 1.0,
            "recall_hard": _number(stats.get("nprobe_recall_hard")) if ivf else 1.0,
            "rechecked_per_image": detector.search_stats_["rechecked"] / len(scored)}


def _number(value: float | None) -> float:
    """A fit statistic, NaN where it was not measured (an explicit ``nprobe``, no held-out patches)."""
    return float("nan") if value is None else float(value)


def slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    if len(x) < 2:
        return float("nan")
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--images", default="100,600,2400", help="training images per bank, comma-separated")
    parser.add_argument("--test", type=int, default=200, help="test images scored (half anomalous; AUROC)")
    parser.add_argument("--val", type=int, default=40, help="validation images scored too (half anomalous)")
    parser.add_argument("--dim", type=int, default=1536, help="patch channels (1536: resnet50 layers 2+3)")
    parser.add_argument("--grid", type=int, default=28, help="patches per side (28 at 224 px)")
    parser.add_argument("--rank", type=int, default=24, help="rank of the normal patches' variation")
    parser.add_argument("--noise", type=float, default=0.35, help="isotropic noise against the low-rank part")
    parser.add_argument("--shift", type=float, default=0.8, help="defect shift, in normal spreads")
    parser.add_argument("--ivf-min-bank", type=int, default=None,
                        help="PatchCore's ivf_min_bank for the default search (default: PatchCore's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (under a minute), see above")
    args = parser.parse_args()
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    sizes = sorted({int(v) for v in str(args.images).split(",") if v.strip()})
    if not sizes or sizes[0] < 1 or args.test < 2:
        parser.error("--images needs positive sizes and --test at least 2 images")

    common.print_load()
    rng = np.random.default_rng(args.seed)
    world = PatchWorld(args.grid, args.dim, args.rank, args.noise, args.seed)
    started = time.perf_counter()
    train = world.normal(sizes[-1], rng)
    val, _ = scored_set(world, args.val, args.shift, rng)
    test, test_labels = scored_set(world, args.test, args.shift, rng)
    scored = np.concatenate([val, test])
    print(f"features: {sizes[-1]} training + {len(scored)} scored images of {args.grid}x{args.grid}x{args.dim} "
          f"float16 in {time.perf_counter() - started:.1f}s", flush=True)

    rows, ms, ms_exact = [], [], []
    for n in sizes:
        default = measure_bank(train[:n], scored, len(test), test_labels, None, args.ivf_min_bank)
        exact = measure_bank(train[:n], scored, len(test), test_labels, "flat", None)
        if not np.array_equal(default["coreset"], exact["coreset"]):
            print(f"warning: the two banks at {n} images differ (coreset not deterministic)", flush=True)
        print(f"{n} images: bank {default['bank_rows']} rows, default search = {default['index']} "
              f"(fit {default['fit_s']:.1f}s), exact fit {exact['fit_s']:.1f}s", flush=True)
        emit(**{f"bank_rows/{n}": default["bank_rows"]})
        emit(**{f"score_ms_per_image/default/{n}": default["ms_per_image"],
                f"score_ms_per_image/exact/{n}": exact["ms_per_image"]})
        emit(**{f"fit_seconds/{name}/{n}": run["fit_s"] for name, run in (("default", default), ("exact", exact))})
        emit(**{f"score_to_fit/{name}/{n}": run["score_s"] / run["fit_s"]
                for name, run in (("default", default), ("exact", exact))}, digits=2)
        emit(**{f"nprobe/{n}": default["nprobe"]})
        emit(**{f"recall/{n}": default["recall"], f"recall_hard/{n}": default["recall_hard"]}, digits=4)
        emit(**{f"rechecked_per_image/{n}": default["rechecked_per_image"]})
        emit(**{f"auroc/default/{n}": default["auroc"], f"auroc/exact/{n}": exact["auroc"],
                f"auroc_delta/{n}": default["auroc"] - exact["auroc"]}, digits=4)
        rows.append(default["bank_rows"])
        ms.append(default["ms_per_image"])
        ms_exact.append(exact["ms_per_image"])
        last_delta = default["auroc"] - exact["auroc"]
    emit(bank_growth_exponent=slope(rows, ms), bank_growth_exponent_exact=slope(rows, ms_exact), digits=2)
    emit(auroc_delta=last_delta, digits=4)
    common.print_load("load_average_end")


if __name__ == "__main__":
    main()

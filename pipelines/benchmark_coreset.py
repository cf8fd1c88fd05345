"""Benchmark streaming PatchCore coreset selection on synthetic patch maps.

    .venv/bin/python pipelines/benchmark_coreset.py [--images 300] [--grid 28] [--dim 152 1536]

For each dim: generates N images of (grid x grid x dim) float16 patch maps chunk by chunk
(never all at once), fits PatchCore (10 % coreset, memory budget below the full float32
bank) and prints timings and peak RSS. Then times a naive numpy full-dimension greedy
k-center and the same torch greedy without projection on a subset of patches,
extrapolates both to the full problem, and prints the speed-up last.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mvtec_ray.detectors.coreset import coreset_size, greedy_kcenter  # noqa: E402
from mvtec_ray.detectors.patch import PatchCore  # noqa: E402

MiB = 2**20


class SyntheticPatchSource:
    """Re-iterable source of CNN-like patch maps, regenerated per chunk from a seed.

    A few smooth latent fields per image, mixed into ``dim`` channels, ReLU, noise,
    then the 3x3 neighbourhood average PatchCore's extractor applies.
    """

    def __init__(self, n_images: int, grid: int, dim: int, chunk: int = 16, seed: int = 0,
                 latent: int = 16) -> None:
        self.n_images, self.grid, self.dim, self.chunk, self.seed = n_images, grid, dim, chunk, seed
        self.mix = np.random.default_rng(seed).normal(size=(latent, dim)).astype(np.float32)
        self.latent = latent

    def __iter__(self):
        yy, xx = np.mgrid[0:self.grid, 0:self.grid].astype(np.float32) / self.grid
        for ci, start in enumerate(range(0, self.n_images, self.chunk)):
            m = min(self.chunk, self.n_images - start)
            rng = np.random.default_rng([self.seed, ci])
            out = np.empty((m, self.grid, self.grid, self.dim), dtype=np.float16)
            for i in range(m):  # one image at a time keeps float32 temporaries small
                f = rng.uniform(0, 3, size=(1, 1, self.latent, 2)).astype(np.float32)
                ph = rng.uniform(0, 2 * np.pi, size=(1, 1, self.latent)).astype(np.float32)
                fields = np.sin(2 * np.pi * (f[..., 0] * xx[:, :, None]
                                             + f[..., 1] * yy[:, :, None]) + ph)
                x = torch.from_numpy(fields @ self.mix).relu_()
                x += 0.3 * torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
                x = F.avg_pool2d(x.permute(2, 0, 1)[None], 3, stride=1, padding=1,
                                 count_include_pad=False)[0].permute(1, 2, 0)
                out[i] = x.numpy()
            yield out


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    try:  # Linux: "5" resets this process's VmHWM
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def subset(source: SyntheticPatchSource, n_patches: int) -> np.ndarray:
    """The first ``n_patches`` patches as one float32 array (baselines only)."""
    out = np.empty((n_patches, source.dim), dtype=np.float32)
    filled = 0
    for chunk in source:
        flat = chunk.reshape(-1, chunk.shape[-1])[:n_patches - filled]
        out[filled:filled + len(flat)] = flat
        filled += len(flat)
        if filled == n_patches:
            break
    return out


def naive_numpy_step_seconds(X: np.ndarray, steps: int) -> float:
    """Textbook full-dimension greedy: one full (n, C) difference array per step."""
    mind = np.full(len(X), np.inf, dtype=np.float32)
    c = 0
    mind = np.minimum(mind, np.linalg.norm(X - X[c], axis=1))  # warm-up step, not timed
    c = int(np.argmax(mind))
    t = time.perf_counter()
    for _ in range(steps):
        mind = np.minimum(mind, np.linalg.norm(X - X[c], axis=1))
        c = int(np.argmax(mind))
    return (time.perf_counter() - t) / steps


def torch_noproj_step_seconds(Zt: torch.Tensor, steps: int, threads: int) -> float:
    t = time.perf_counter()
    greedy_kcenter(Zt, steps, 0, threads=threads)
    return (time.perf_counter() - t) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--images-large", type=int, default=None,
                    help="images for dims >= 1024 (default: --images)")
    ap.add_argument("--grid", type=int, default=28)
    ap.add_argument("--dim", type=int, nargs="+", default=[152, 1536])
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--projection-dim", type=int, default=128)
    ap.add_argument("--budget-fraction", type=float, default=0.25,
                    help="memory budget as a fraction of the full float32 bank")
    ap.add_argument("--chunk", type=int, default=0,
                    help="images per source chunk (0: float16 chunk at most half the budget)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--coreset-threads", type=int, default=1)
    ap.add_argument("--baseline-patches", type=int, default=0,
                    help="patches for the baselines (0: all; a subset fits caches better, "
                         "which flatters the baselines)")
    ap.add_argument("--baseline-steps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads "
          f"(greedy loop: {args.coreset_threads or 'torch default'}), "
          f"cuda={torch.cuda.is_available()}", flush=True)

    results = []
    for dim in args.dim:
        n_img = args.images_large if (dim >= 1024 and args.images_large) else args.images
        n_patches = n_img * args.grid ** 2
        full_mb = n_patches * dim * 4 / MiB
        budget_mb = args.budget_fraction * full_mb
        chunk = args.chunk or max(1, int(budget_mb * MiB / 2 // (args.grid ** 2 * dim * 2)))
        src = SyntheticPatchSource(n_img, args.grid, dim, chunk=chunk, seed=args.seed)
        print(f"\n== dim {dim}: {n_img} images x {args.grid}x{args.grid} patches, ratio {args.ratio}, "
              f"source chunks of {chunk} images (float16)", flush=True)
        t = time.perf_counter()
        for _ in src:
            pass
        gen_s = time.perf_counter() - t
        rss0 = rss_mb()
        clean_peak = reset_peak_rss()
        det = PatchCore(coreset_ratio=args.ratio, projection_dim=args.projection_dim,
                        seed=args.seed, memory_budget_mb=budget_mb,
                        coreset_threads=args.coreset_threads)
        det.fit(src)
        st = det.fit_stats_
        peak = peak_rss_mb()
        assert st["n_coreset"] == coreset_size(n_patches, args.ratio) == det.bank_size
        print(f"n_patches            {st['n_patches']}")
        print(f"coreset size         {st['n_coreset']}  (ceil({args.ratio} * n))")
        print(f"coreset seconds      {st['coreset_seconds']:.1f}  (pass 1 generate+project "
              f"{st['projection_seconds']:.1f}, greedy {st['greedy_seconds']:.1f}, "
              f"pass 2 generate+gather {st['gather_seconds']:.1f}); index {st['index_seconds']:.2f}")
        print(f"  of which data generation ~{gen_s:.1f} s per pass (timed separately)")
        print(f"greedy ms / step     {1e3 * st['greedy_seconds'] / st['n_coreset']:.2f}")
        print(f"peak RSS             {peak:.0f} MiB {'(fit only)' if clean_peak else '(process)'}; "
              f"{rss0:.0f} MiB before fit -> +{peak - rss0:.0f} MiB")
        print(f"full float32 bank    {full_mb:.1f} MiB  (budget {budget_mb:.1f} MiB; "
              f"largest chunk {st['max_chunk_bytes'] / MiB:.1f} MiB; projected "
              f"{st['projected_bytes'] / MiB:.1f} MiB; memory bank {st['bank_bytes'] / MiB:.1f} MiB)",
              flush=True)
        results.append((dim, n_patches, st["n_coreset"], st["coreset_seconds"],
                        st["greedy_seconds"], src))
        del det

    print("\n== baselines (same run, on the same patches held in float32; a few steps timed, "
          "extrapolated to all k steps)")
    ratios = []
    for dim, n_patches, k, ours, ours_greedy, src in results:
        n_sub = min(args.baseline_patches or n_patches, n_patches)
        X = subset(src, n_sub)
        scale = (n_patches / n_sub) * k  # per-step cost is linear in n
        naive = naive_numpy_step_seconds(X, args.baseline_steps) * scale
        Zt = torch.from_numpy(X.T.copy())
        del X
        noproj = torch_noproj_step_seconds(Zt, 4 * args.baseline_steps, args.coreset_threads) * scale
        del Zt
        print(f"dim {dim}: naive numpy full-dim greedy ({n_sub} patches, {args.baseline_steps} "
              f"steps) -> {naive:.0f} s extrapolated; same torch greedy without projection -> "
              f"{noproj:.0f} s; ours {ours:.0f} s (greedy {ours_greedy:.0f} s)", flush=True)
        ratios.append(f"dim {dim}: {naive / ours:.1f}x faster than the naive numpy greedy "
                      f"({naive:.0f} s -> {ours:.0f} s incl. data generation)")
    print("\nspeed-up  " + "; ".join(ratios))


if __name__ == "__main__":
    main()

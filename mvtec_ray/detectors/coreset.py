"""Streaming greedy k-center coreset selection (PatchCore).

The input is an ndarray ``(n, H, W, C)`` or a chunk source (see :mod:`.chunks`); with a
source's ``n_images`` known, coreset selection fills its projected matrix in place instead
of concatenating. The input is walked in float32 pieces no larger than a byte budget, so
the whole set never exists as one float32 array.

Coreset selection is two passes over the source:

1. project every patch to ``projection_dim`` with a seeded Gaussian random matrix
   (kept in RAM: ``n_patches x projection_dim`` float32) and run greedy k-center
   (farthest-point) selection on the projections;
2. gather the selected full-dimension rows chunk by chunk.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mvtec_ray.detectors.chunks import (
    budget_bytes,
    iter_budget_chunks,
    iter_chunks,
    iter_raw_chunks,
)
from mvtec_ray.threads import limited_threads


def coreset_size(n: int, ratio: float) -> int:
    """``ceil(ratio * n)`` clipped to ``[1, n]`` (tiny epsilon so 0.07*100 gives 7)."""
    if not 0 < ratio <= 1:
        raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
    return int(min(n, max(1, math.ceil(ratio * n - 1e-9))))


# -- device --------------------------------------------------------------------
def resolve_torch_device(use_gpu: Any) -> torch.device:
    """``"auto"``: CUDA when available; ``True`` asks for it but falls back to CPU."""
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


# -- projection + greedy -------------------------------------------------------
def gaussian_projection(in_dim: int, out_dim: int, seed: int) -> torch.Tensor | None:
    """Seeded ``(in_dim, out_dim)`` Gaussian JL matrix, or None when it would not shrink."""
    if not out_dim or out_dim >= in_dim:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    # N(0, 1/out_dim) keeps squared distances unbiased.
    return torch.randn(in_dim, out_dim, generator=gen) / math.sqrt(out_dim)


def greedy_kcenter(Zt: torch.Tensor, n_centres: int, start: int,
                   threads: int | None = 1) -> torch.Tensor:
    """Greedy farthest-point selection on the columns of ``Zt`` ``(d, n)``.

    ``Zt`` is column-major on purpose: ``Zt.t()`` is then a transposed view for which
    MKL gemv is ~3x faster than on a row-major ``(n, d)`` matrix (measured).
    Returns the selected column indices in selection order (int64, on ``Zt``'s device).
    Per step: one matrix-vector product plus a few in-place vector ops, no host sync.

    ``threads`` (CPU only; None keeps torch's setting): each step is memory-bound, so
    one thread is as fast as two on a 2-core box, while multi-thread barriers stall
    for milliseconds per step when other processes share the cores (measured 5 ms vs
    70 ms per step at 235k x 128).
    """
    d, n = Zt.shape
    if not 1 <= n_centres <= n:
        raise ValueError(f"n_centres must be in [1, {n}], got {n_centres}")
    if not 0 <= start < n:
        raise ValueError(f"start must be in [0, {n}), got {start}")
    norms = torch.empty(n, dtype=Zt.dtype, device=Zt.device)
    for sl in iter_chunks(n, 1 << 16):  # no full-size temporary
        norms[sl] = Zt[:, sl].square().sum(0)
    mind = torch.full((n,), math.inf, dtype=Zt.dtype, device=Zt.device)
    buf = torch.empty(n, dtype=Zt.dtype, device=Zt.device)
    selected = torch.empty(n_centres, dtype=torch.long, device=Zt.device)
    idx = torch.tensor([int(start)], dtype=torch.long, device=Zt.device)
    neg_inf = torch.tensor(-math.inf, dtype=Zt.dtype, device=Zt.device)
    limit = (limited_threads(int(threads), faiss=False, blas=False) if threads and Zt.device.type == "cpu"
             else contextlib.nullcontext())
    with limit:
        _greedy_loop(Zt, norms, mind, buf, selected, idx, neg_inf)
    return selected


def _greedy_loop(Zt, norms, mind, buf, selected, idx, neg_inf) -> None:
    d = Zt.shape[0]
    Z = Zt.t()
    with torch.inference_mode():
        for i in range(len(selected)):
            selected[i:i + 1] = idx
            centre = Zt.index_select(1, idx).view(d)
            torch.mv(Z, centre, out=buf)
            # squared distance = |z|^2 - 2 z.c + |c|^2
            buf.mul_(-2.0).add_(norms).add_(norms.index_select(0, idx))
            torch.minimum(mind, buf, out=mind)
            # chosen points can never come back, even with duplicates or rounding
            mind.index_put_((idx,), neg_inf)
            idx = torch.argmax(mind).view(1)


# -- sharded (composable) greedy ------------------------------------------------
def plan_shards(n: int, shard_patches: int) -> list[tuple[int, int]]:
    """Contiguous, balanced ``[lo, hi)`` column ranges of at most ``shard_patches`` (0: one shard)."""
    if n < 1:
        raise ValueError("no patches to shard")
    n_shards = 1 if not shard_patches or shard_patches >= n else math.ceil(n / int(shard_patches))
    edges = np.linspace(0, n, n_shards + 1).round().astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])]


def split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` centres shared in proportion to ``sizes`` (largest remainder), each in [1, size]."""
    sizes = np.asarray(sizes, dtype=np.int64)
    exact = total * sizes / sizes.sum()
    counts = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - counts), kind="stable")[:total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in np.clip(counts, 1, sizes)]


@dataclass(frozen=True)
class ShardJob:
    """One shard's greedy: pure data, so it can run in this process or in a Ray task."""

    lo: int
    hi: int
    n_centres: int
    start: int           # local index of the first centre
    threads: int | None = 1


def shard_jobs(n: int, ratio: float, shard_patches: int, oversample: float, seed: int,
               threads: int | None = 1) -> list[ShardJob]:
    """The per-shard greedy runs of a sharded coreset (see :func:`sharded_kcenter`)."""
    bounds = plan_shards(n, shard_patches)
    per_shard_total = coreset_size(n, min(1.0, ratio * max(1.0, float(oversample))))
    counts = split_count(per_shard_total, [hi - lo for lo, hi in bounds])
    rng = np.random.default_rng(seed)
    return [ShardJob(lo, hi, k, int(rng.integers(hi - lo)), threads)
            for (lo, hi), k in zip(bounds, counts)]


def run_shard_job(Zt_shard: torch.Tensor | np.ndarray, job: ShardJob,
                  device: torch.device | str | None = None) -> np.ndarray:
    """Greedy k-center on one shard's columns ``(d, hi - lo)``, on ``device`` if given
    (e.g. a GPU: the distance updates then run there); returns *global* column indices."""
    if isinstance(Zt_shard, np.ndarray):
        Zt_shard = torch.from_numpy(Zt_shard)
    if device is not None:
        Zt_shard = Zt_shard.to(device)
    if Zt_shard.shape[1] != job.hi - job.lo:
        raise ValueError(f"shard has {Zt_shard.shape[1]} columns, job wants {job.hi - job.lo}")
    if job.n_centres >= Zt_shard.shape[1]:
        local = np.arange(Zt_shard.shape[1], dtype=np.int64)
    else:
        local = greedy_kcenter(Zt_shard, job.n_centres, job.start, job.threads).cpu().numpy()
    return local + job.lo


def merge_shards(Zt: torch.Tensor, picked: Sequence[np.ndarray], n_centres: int, seed: int,
                 threads: int | None = 1) -> np.ndarray:
    """Composable coreset merge: greedy k-center over the union of the shards' centres."""
    union = np.concatenate(list(picked))
    if len(union) <= n_centres:
        return union
    sub = Zt.index_select(1, torch.from_numpy(union).to(Zt.device)).contiguous()
    start = int(np.random.default_rng(seed).integers(len(union)))
    return union[greedy_kcenter(sub, n_centres, start, threads).cpu().numpy()]


#: runs a list of shard jobs on the columns of ``Zt``; the default is in-process, in order
ShardRunner = Callable[[torch.Tensor, Sequence[ShardJob]], list[np.ndarray]]


def run_shards_here(Zt: torch.Tensor, jobs: Sequence[ShardJob]) -> list[np.ndarray]:
    # a contiguous copy per shard: gemv on a column slice of the full matrix is much slower
    return [run_shard_job(Zt[:, job.lo:job.hi].contiguous(), job) for job in jobs]


def sharded_kcenter(Zt: torch.Tensor, ratio: float, shard_patches: int, seed: int,
                    oversample: float = 1.0, threads: int | None = 1,
                    runner: ShardRunner | None = None) -> np.ndarray:
    """Greedy k-center per contiguous shard of ``shard_patches`` columns, then a merge.

    With ``oversample == 1`` each shard keeps its share of ``ratio`` and the union is the
    coreset: time ``n * ratio * shard_patches * d``, linear in ``n`` for a fixed shard size.
    With ``oversample > 1`` each shard keeps ``oversample`` times its share and a greedy
    over the union picks the final ``ratio * n`` (closer to the single greedy, but the merge
    grows with the square of the coreset). ``shard_patches == 0`` (or >= n) is the exact
    single greedy. The covering radius of the union is the largest of the shards'.
    """
    n = Zt.shape[1]
    n_centres = coreset_size(n, ratio)
    if len(plan_shards(n, shard_patches)) == 1:
        start = int(np.random.default_rng(seed).integers(n))  # the single greedy, as before
        if n_centres == n:
            return np.arange(n, dtype=np.int64)
        return greedy_kcenter(Zt, n_centres, start, threads).cpu().numpy()
    jobs = shard_jobs(n, ratio, shard_patches, oversample, seed, threads)
    picked = (runner or run_shards_here)(Zt, jobs)
    return merge_shards(Zt, picked, n_centres, seed + 1, threads)


def covering_radius(Z: np.ndarray, centres: np.ndarray) -> float:
    """max over points of the distance to the nearest centre (brute force, small inputs)."""
    Z = np.asarray(Z, dtype=np.float64)
    C = Z[np.asarray(centres)]
    d2 = ((Z[:, None, :] - C[None, :, :]) ** 2).sum(-1)
    return float(np.sqrt(d2.min(1).max()))


@dataclass
class CoresetResult:
    indices: np.ndarray            # selected global patch indices, selection order
    bank: np.ndarray               # (n_centres, C) float32, same order as ``indices``
    grid: tuple[int, int, int]     # (H, W, C)
    n_images: int
    stats: dict[str, Any] = field(default_factory=dict)


def n_images_hint(X: Any) -> int | None:
    """Image count if known up front: ``len`` of an ndarray, or a source's ``n_images``."""
    if isinstance(X, np.ndarray):
        return int(X.shape[0])
    hint = getattr(X, "n_images", None)
    return int(hint) if hint is not None else None


def project_source(X: Any, projection_dim: int, seed: int, max_bytes: int,
                   device: torch.device) -> tuple[torch.Tensor, tuple[int, int, int], int, dict]:
    """Pass 1: every patch projected; returns ``Zt`` ``(d, n_patches)`` float32 on ``device``.

    With a known image count the result is filled in place; otherwise the projected
    pieces are concatenated at the end, so for a moment they exist twice.
    """
    parts: list[torch.Tensor] = []
    out: torch.Tensor | None = None
    hint = n_images_hint(X)
    proj: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None
    n_rows = n_images = max_chunk = 0
    for chunk in iter_budget_chunks(X, max_bytes, bytes_per_value=8):
        if grid is None:
            grid = tuple(int(s) for s in chunk.shape[1:])  # type: ignore[assignment]
            proj = gaussian_projection(grid[2], projection_dim, seed)
            if proj is not None:
                proj = proj.to(device)
            dim = grid[2] if proj is None else proj.shape[1]
            if hint:
                out = torch.empty(dim, hint * grid[0] * grid[1], device=device)
        max_chunk = max(max_chunk, chunk.nbytes)
        n_images += len(chunk)
        flat = torch.from_numpy(chunk).reshape(-1, chunk.shape[-1]).to(device)
        z = flat if proj is None else flat @ proj
        if out is not None and n_rows + len(z) <= out.shape[1]:
            out[:, n_rows:n_rows + len(z)] = z.t()  # column-major, see greedy_kcenter
        else:
            if out is not None:  # the hint was wrong: keep what we have as a piece
                parts.append(out[:, :n_rows].clone())
                out = None
            parts.append(z.t().contiguous())
        n_rows += len(z)
        del flat, z
    if grid is None:
        raise ValueError("no patch maps to fit on (empty input)")
    if out is not None:
        Zt = out[:, :n_rows] if n_rows < out.shape[1] else out
        peak = out.numel() * 4
    else:
        Zt = torch.cat(parts, dim=1)
        peak = 2 * Zt.numel() * 4
        del parts
    if not Zt.is_contiguous():
        Zt = Zt.contiguous()
    stats = {"max_chunk_bytes": int(max_chunk),
             "projected_bytes": int(Zt.numel() * Zt.element_size()),
             "projected_peak_bytes": int(peak)}
    if proj is None and stats["projected_bytes"] > max_bytes:
        # without a projection the greedy needs every patch in float32
        warnings.warn(f"coreset: no projection (C={grid[2]} <= projection_dim), so all patches "
                      f"({stats['projected_bytes'] / 2**20:.1f} MiB float32) are held, over the "
                      f"memory budget; set projection_dim below C", RuntimeWarning, stacklevel=3)
    return Zt, grid, n_images, stats  # type: ignore[return-value]


def gather_rows(X: Any, indices: np.ndarray, n_cols: int, max_bytes: int) -> np.ndarray:
    """Pass 2: rows ``indices`` (global flattened patch order) of ``X`` as float32, same order."""
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    sorted_idx = indices[order]
    out = np.empty((len(indices), n_cols), dtype=np.float32)
    offset = 0
    for raw in iter_raw_chunks(X):
        rows_per_image = raw.shape[1] * raw.shape[2]
        lo = np.searchsorted(sorted_idx, offset)
        hi = np.searchsorted(sorted_idx, offset + len(raw) * rows_per_image)
        if hi > lo:
            local = sorted_idx[lo:hi] - offset
            flat = raw.reshape(-1, raw.shape[3])  # view for contiguous chunks; rows copied below
            out[order[lo:hi]] = flat[local]
        offset += len(raw) * rows_per_image
    if offset <= sorted_idx[-1]:
        raise ValueError("the chunk source yielded fewer patches on the second pass")
    return out


def select_coreset(X: Any, ratio: float = 0.1, projection_dim: int = 128, seed: int = 0,
                   memory_budget_mb: float = 1024, device: torch.device | str = "cpu",
                   threads: int | None = 1, shard_patches: int = 0, oversample: float = 1.0,
                   runner: ShardRunner | None = None) -> CoresetResult:
    """Streaming PatchCore coreset: project (pass 1), greedy k-center, gather (pass 2).

    ``shard_patches`` / ``oversample``: see :func:`sharded_kcenter`; ``runner`` runs the
    shard greedies elsewhere (e.g. as Ray tasks, :mod:`mvtec_ray.distributed.coreset`).
    ``memory_budget_mb`` bounds each float32 chunk made from the input. On top of it
    live the projected matrix (``n_patches x projection_dim`` float32) and the bank
    (``n_coreset x C`` float32); with ``projection_dim >= C`` nothing is projected and
    the greedy works on all patches in float32 (warned about when over budget).
    """
    device = torch.device(device)
    max_bytes = budget_bytes(memory_budget_mb)
    t0 = time.perf_counter()
    Zt, grid, n_images, stats = project_source(X, projection_dim, seed, max_bytes, device)
    t1 = time.perf_counter()
    n = Zt.shape[1]
    n_centres = coreset_size(n, ratio)
    indices = sharded_kcenter(Zt, ratio, shard_patches, seed, oversample, threads, runner)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    del Zt
    bank = gather_rows(X, indices, grid[2], max_bytes)
    t3 = time.perf_counter()
    stats.update({
        "n_images": int(n_images), "n_patches": int(n), "n_coreset": int(n_centres),
        "projection_dim": int(min(projection_dim or grid[2], grid[2])),
        "projection_seconds": t1 - t0, "greedy_seconds": t2 - t1, "gather_seconds": t3 - t2,
        "coreset_seconds": t3 - t0, "bank_bytes": int(bank.nbytes),
        "n_shards": len(plan_shards(n, shard_patches)), "oversample": float(oversample),
        "full_float32_bytes": int(n * grid[2] * 4), "device": device.type,
    })
    return CoresetResult(indices=indices, bank=bank, grid=grid, n_images=n_images, stats=stats)

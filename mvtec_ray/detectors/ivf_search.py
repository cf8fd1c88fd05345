"""Searching a faiss IVF index's lists with matrix products (CPU).

faiss's CPU IVF search scans each query's lists vector by vector (about 18 GFLOP/s on one
core of the 2-core development machine). A batch of patch queries from a few images probes each
list many times, so the same search as one matrix product per list (the queries that probe it
against its vectors) runs at BLAS speed: measured on one core, 784-patch images against a
37k-row bank, 4.1 / 3.8 ms per image at 16 / 32 images per call vs faiss's 10 ms (see
docs/measured.md, ``benchmarks/score_bank.py``). Results are faiss's: the same lists per query
(the index's own quantizer), the nearest rows within them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np


def ivf_list(index: Any, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """The vectors ``(n, d)`` float32 and ids of one inverted list, read in place where the
    storage allows (raw float32, or raw float16 decoded)."""
    lists = index.invlists
    n = int(lists.list_size(list_no))
    ids = faiss.rev_swig_ptr(lists.get_ids(list_no), n).copy() if n else np.zeros(0, np.int64)
    if not n:
        return np.zeros((0, index.d), np.float32), ids
    codes = faiss.rev_swig_ptr(lists.get_codes(list_no), n * index.code_size)
    if isinstance(index, faiss.IndexIVFFlat):
        return codes.view(np.float32).reshape(n, index.d), ids
    if (isinstance(index, faiss.IndexIVFScalarQuantizer) and not index.by_residual
            and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16):
        return codes.view(np.float16).reshape(n, index.d).astype(np.float32), ids
    return index.reconstruct_batch(ids), ids  # any other IVF storage: decoded through faiss


def ivf_exact_search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (squared L2, ids) of ``queries`` over *every* list of an IVF ``index``.

    List by list with faiss's brute-force search (BLAS for more than a few queries), merged in a
    heap: the bank is read once per call and never copied whole, unlike probing all lists.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    heap = faiss.ResultHeap(len(queries), k)
    if len(queries):
        for list_no in range(index.nlist):
            vectors, ids = ivf_list(index, list_no)
            if len(ids):
                D, local = faiss.knn(queries, vectors, min(k, len(ids)))
                heap.add_result(D, ids[local])
    heap.finalize()
    return heap.D, heap.I


@dataclass
class DecodedLists:
    """An IVF index's vectors decoded once to float32, less their mean (``centre``): distances
    taken as ``|q|^2 + |x|^2 - 2 q.x`` about the mean keep the digits that post-ReLU features'
    large common offset would cost about the origin. ``vectors`` are in list order (list ``l``
    is rows ``offsets[l]:offsets[l + 1]``), with their squared ``norms`` and ``ids``."""

    vectors: np.ndarray
    norms: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    centre: np.ndarray

    @classmethod
    def of(cls, index: Any) -> DecodedLists:
        parts = [ivf_list(index, list_no) for list_no in range(index.nlist)]
        sizes = [len(ids) for _, ids in parts]
        vectors = np.ascontiguousarray(np.concatenate([v for v, _ in parts]), dtype=np.float32)
        centre = vectors.mean(0, dtype=np.float64).astype(np.float32) if len(vectors) else np.zeros(index.d, np.float32)
        vectors -= centre
        return cls(vectors, np.einsum("ij,ij->i", vectors, vectors), np.concatenate([i for _, i in parts]),
                   np.concatenate([[0], np.cumsum(sizes)]), centre)

    @staticmethod
    def nbytes_for(index: Any) -> int:
        """Bytes :meth:`of` holds for ``index``: its vectors as float32."""
        return int(index.ntotal) * int(index.d) * 4


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """Columns of each row's ``k`` smallest entries (unordered for k > 1)."""
    return dist.argmin(1)[:, None] if k == 1 else np.argpartition(dist, k - 1, axis=1)[:, :k]


def _distances(centred_queries: np.ndarray, vectors: np.ndarray, norms: np.ndarray) -> np.ndarray:
    dist = centred_queries @ vectors.T
    dist *= -2.0  # in place: |q|^2 + |x|^2 - 2 q.x without temporaries
    dist += norms[None, :]
    dist += np.einsum("ij,ij->i", centred_queries, centred_queries)[:, None]
    return dist


def _sorted(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    if D.shape[1] > 1:
        best = np.argsort(D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, best, axis=1), np.take_along_axis(I, best, axis=1)
    return np.maximum(D, 0.0), I


def decoded_exact_search(lists: DecodedLists, queries: np.ndarray, k: int,
                         block_bytes: int = 64 << 20) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-NN (squared L2 ascending, ids) over all of ``lists`` as matrix products, a block of
    queries at a time (``block_bytes`` of distances). Several times faster than ``faiss.knn`` for
    the few dozen queries of a re-check (measured: 32 queries, 37k x 152 bank: 5.4 vs 24.7 ms)."""
    queries = np.ascontiguousarray(queries, dtype=np.float32) - lists.centre
    n, total = len(queries), len(lists.ids)
    kk = min(k, total)
    D = np.full((n, k), np.inf, np.float32)
    I = np.full((n, k), -1, np.int64)
    step = max(1, block_bytes // max(1, 4 * total))
    for start in range(0, n if total else 0, step):
        rows = slice(start, min(n, start + step))
        dist = _distances(queries[rows], lists.vectors, lists.norms)
        near = _nearest(dist, kk)
        D[rows, :kk], I[rows, :kk] = np.take_along_axis(dist, near, axis=1), lists.ids[near]
    return _sorted(D, I, k)


def ivf_blas_search(index: Any, lists: DecodedLists, queries: np.ndarray, k: int,
                    nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)`` with ``nprobe`` lists per query: (squared L2 ``(n, k)``
    ascending, ids; -1 / inf where the lists hold fewer than ``k`` rows), list by list as one
    matrix product of the queries that probe the list against its vectors."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    nprobe = max(1, min(int(nprobe), index.nlist))
    _, probed = index.quantizer.search(queries, nprobe)  # (n, nprobe): the lists faiss would scan
    centred = queries - lists.centre
    D = np.full((n, nprobe * k), np.inf, np.float32)
    I = np.full((n, nprobe * k), -1, np.int64)
    pair_list = probed.ravel()
    order = np.argsort(pair_list, kind="stable")
    starts = np.searchsorted(pair_list[order], np.arange(index.nlist + 1))
    for list_no in np.flatnonzero(np.diff(starts)):
        a, b = lists.offsets[list_no], lists.offsets[list_no + 1]
        if a == b:
            continue
        pairs = order[starts[list_no]:starts[list_no + 1]]
        rows, slots = pairs // nprobe, pairs % nprobe
        dist = _distances(centred[rows], lists.vectors[a:b], lists.norms[a:b])
        kk = min(k, b - a)
        near = _nearest(dist, kk)
        cols = slots[:, None] * k + np.arange(kk)[None, :]
        D[rows[:, None], cols] = np.take_along_axis(dist, near, axis=1)
        I[rows[:, None], cols] = lists.ids[a + near]
    return _sorted(D, I, k)

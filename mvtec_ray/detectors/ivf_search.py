"""Searching a faiss IVF index's lists with matrix products (CPU).

faiss's CPU IVF search scans each query's lists vector by vector (about 18 GFLOP/s on one
core of the 2-core test machine). A batch of patch queries from a few images probes each list
many times, so the same search as one matrix product per list (the queries that probe it
against its vectors) runs at BLAS speed: 2.5x faster for 16 images of 784 patches against a
37k-row bank (``benchmarks/score_bank.py``). Results are faiss's: the same lists per query
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
    """An IVF index's lists decoded once to float32: ``vectors`` in list order (list ``l`` is rows
    ``offsets[l]:offsets[l + 1]``), their ``ids``, each list's centroid, and the vectors less
    their list's centroid (``centred``) with their squared norms, for :func:`ivf_blas_search`."""

    vectors: np.ndarray
    ids: np.ndarray
    offsets: np.ndarray
    centroids: np.ndarray
    centred: np.ndarray
    centred_norms: np.ndarray

    @classmethod
    def of(cls, index: Any) -> DecodedLists:
        parts = [ivf_list(index, list_no) for list_no in range(index.nlist)]
        sizes = [len(ids) for _, ids in parts]
        vectors = np.ascontiguousarray(np.concatenate([v for v, _ in parts]), dtype=np.float32)
        centroids = index.quantizer.reconstruct_n(0, index.nlist).astype(np.float32)
        centred = vectors - np.repeat(centroids, sizes, axis=0)
        return cls(vectors, np.concatenate([i for _, i in parts]), np.concatenate([[0], np.cumsum(sizes)]),
                   centroids, centred, np.einsum("ij,ij->i", centred, centred))

    @staticmethod
    def nbytes_for(index: Any) -> int:
        """Bytes :meth:`of` holds for ``index``: its vectors twice, as float32."""
        return 2 * int(index.ntotal) * int(index.d) * 4


def ivf_blas_search(index: Any, lists: DecodedLists, queries: np.ndarray, k: int,
                    nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)`` with ``nprobe`` lists per query: (squared L2 ``(n, k)``
    ascending, ids; -1 / inf where the lists hold fewer than ``k`` rows), list by list as one
    matrix product. Distances are computed about each list's centroid, where queries and
    vectors are small, so rounding stays near that of a direct difference."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    nprobe = max(1, min(int(nprobe), index.nlist))
    _, probed = index.quantizer.search(queries, nprobe)  # (n, nprobe): the lists faiss would scan
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
        sub = queries[rows] - lists.centroids[list_no]
        dist = sub @ lists.centred[a:b].T
        dist *= -2.0  # in place: |q - c|^2 + |x - c|^2 - 2 (q - c).(x - c), no temporaries
        dist += lists.centred_norms[None, a:b]
        dist += np.einsum("ij,ij->i", sub, sub)[:, None]
        kk = min(k, b - a)
        near = dist.argmin(1)[:, None] if kk == 1 else np.argpartition(dist, kk - 1, axis=1)[:, :kk]
        cols = slots[:, None] * k + np.arange(kk)[None, :]
        D[rows[:, None], cols] = np.maximum(np.take_along_axis(dist, near, axis=1), 0.0)
        I[rows[:, None], cols] = lists.ids[a + near]
    if D.shape[1] > 1:  # the lists' candidates, nearest first
        best = np.argsort(D, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(D, best, axis=1), np.take_along_axis(I, best, axis=1)
    return D, I

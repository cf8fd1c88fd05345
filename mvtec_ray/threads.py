"""Thread limits for torch, BLAS/OpenMP and faiss, in one place.

Ray sets ``OMP_NUM_THREADS=1`` in ``num_cpus=1`` workers and a reused worker keeps the thread
count of its first import, so every actor and task sets its threads explicitly through here.
"""
from __future__ import annotations

from contextlib import contextmanager


def _set_counts(torch_threads: int, faiss_threads: int | None) -> tuple[int, int | None]:
    """Set torch's and (if installed) faiss's thread counts; return the previous ones."""
    import torch
    previous = torch.get_num_threads(), None
    torch.set_num_threads(torch_threads)
    try:
        import faiss
    except ImportError:
        return previous
    previous = previous[0], faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(faiss_threads or torch_threads)
    return previous


def pin_threads(n: int):
    """Pin torch, faiss and BLAS/OpenMP to ``n`` threads for the rest of this process (an actor's
    life). Returns the BLAS limiter, which the caller keeps alive as long as the limit should hold."""
    from threadpoolctl import threadpool_limits
    _set_counts(n, n)
    return threadpool_limits(limits=n)


@contextmanager
def limited_threads(n: int):
    """Pin torch, BLAS/OpenMP and faiss to ``n`` threads while the block runs."""
    from threadpoolctl import threadpool_limits
    previous = _set_counts(n, n)
    with threadpool_limits(limits=n):
        try:
            yield
        finally:
            _set_counts(*previous)

"""Thread limits for torch, BLAS/OpenMP and faiss, in one place.

Ray sets ``OMP_NUM_THREADS=1`` in ``num_cpus=1`` workers and a reused worker keeps the thread
count of its first import, so every actor and task sets its threads explicitly through here.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext


def _libraries(torch: bool, faiss: bool) -> tuple:
    """The torch and faiss modules asked for (None where not asked for, or faiss not installed)."""
    torch_module = faiss_module = None
    if torch:
        import torch as torch_module
    if faiss:
        try:
            import faiss as faiss_module
        except ImportError:
            pass
    return torch_module, faiss_module


def _get_counts(torch_module, faiss_module) -> tuple[int | None, int | None]:
    return (None if torch_module is None else torch_module.get_num_threads(),
            None if faiss_module is None else faiss_module.omp_get_max_threads())


def _set_counts(torch_module, faiss_module, torch_threads: int | None, faiss_threads: int | None) -> None:
    if torch_module is not None and torch_threads is not None:
        torch_module.set_num_threads(torch_threads)
    if faiss_module is not None and faiss_threads is not None:
        faiss_module.omp_set_num_threads(faiss_threads)


def pin_threads(n: int):
    """Pin torch, faiss and BLAS/OpenMP to ``n`` threads for the rest of this process (an actor's
    life). Returns the BLAS limiter, which the caller keeps alive as long as the limit should hold."""
    from threadpoolctl import threadpool_limits
    _set_counts(*_libraries(True, True), n, n)
    return threadpool_limits(limits=n)


@contextmanager
def limited_threads(n: int, *, torch: bool = True, faiss: bool = True, blas: bool = True):
    """Pin torch, BLAS/OpenMP and faiss to ``n`` threads while the block runs, then restore them.

    ``torch=False`` / ``faiss=False`` / ``blas=False`` leave that library's setting alone (e.g. only
    torch for a torch loop; BLAS and faiss for a faiss search)."""
    libraries = _libraries(torch, faiss)
    # read both counts before setting either (torch and faiss may share one OpenMP runtime), and set
    # them inside the BLAS/OpenMP limiter, which on exit restores the OpenMP counts it found on entry
    previous = _get_counts(*libraries)
    if blas:
        from threadpoolctl import threadpool_limits
        limiter = threadpool_limits(limits=n)
    else:
        limiter = nullcontext()
    with limiter:
        _set_counts(*libraries, n, n)
        try:
            yield
        finally:
            _set_counts(*libraries, *previous)

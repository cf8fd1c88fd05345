"""Chunked input shared by the detectors: row slices, and patch-map chunk sources.

Patch detectors accept either an ndarray ``(n, H, W, C)`` or a *chunk source*: any object
whose ``__iter__`` yields ndarray chunks ``(n_i, H, W, C)`` and that can be iterated more
than once. A source may also expose ``n_images`` (total image count). The helpers here walk
such inputs in float32 pieces no larger than a byte budget, so the whole set never exists
as one float32 array.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np


def iter_chunks(n: int, chunk: int) -> Iterator[slice]:
    """Slices of ``range(n)`` of at most ``chunk`` rows."""
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


# -- chunk sources -----------------------------------------------------------
class ArrayChunks:
    """Re-iterable chunk source over an ndarray or a list of ndarrays.

    Yields views ``(<= chunk_size, H, W, C)`` in the stored dtype. Counts passes and
    the largest chunk handed out, so tests can check how a detector consumed it.
    """

    def __init__(self, data: np.ndarray | Sequence[np.ndarray], chunk_size: int = 16) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        self.parts = [data] if isinstance(data, np.ndarray) else list(data)
        for part in self.parts:
            if np.ndim(part) != 4:
                raise ValueError(f"ArrayChunks wants (n, H, W, C) arrays, got shape {np.shape(part)}")
        self.chunk_size = int(chunk_size)
        #: optional protocol attribute: lets pass 1 fill one preallocated array
        self.n_images = sum(len(p) for p in self.parts)
        self.n_passes = 0
        self.max_chunk_rows = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        self.n_passes += 1
        for part in self.parts:
            for sl in iter_chunks(len(part), self.chunk_size):
                chunk = part[sl]
                self.max_chunk_rows = max(self.max_chunk_rows, len(chunk))
                yield chunk

    def __repr__(self) -> str:
        return f"ArrayChunks(n_images={self.n_images}, chunk_size={self.chunk_size})"


def budget_bytes(memory_budget_mb: float) -> int:
    return max(1, int(float(memory_budget_mb) * 2**20))


def iter_raw_chunks(X: Any) -> Iterator[np.ndarray]:
    """Chunks ``(n_i, H, W, C)`` of ``X`` in their stored dtype (no conversion)."""
    if isinstance(X, np.ndarray):
        if X.ndim != 4:
            raise ValueError(f"patch maps must be (n, H, W, C), got shape {X.shape}")
        yield X
        return
    if not hasattr(X, "__iter__"):
        raise TypeError(f"expected an ndarray or a re-iterable chunk source, got {type(X).__name__}")
    for chunk in X:
        chunk = np.asarray(chunk)
        if chunk.ndim == 3:  # a lone image
            chunk = chunk[None]
        if chunk.ndim != 4:
            raise ValueError(f"chunks must be (n, H, W, C), got shape {chunk.shape}")
        if len(chunk):
            yield chunk


def iter_budget_chunks(X: Any, max_bytes: int, bytes_per_value: int = 4,
                       channels: np.ndarray | Callable[[int], np.ndarray] | None = None
                       ) -> Iterator[np.ndarray]:
    """float32 chunks of ``X`` with at most ``max_bytes`` per chunk (at least one image).

    ``bytes_per_value`` lets callers reserve room for their own temporaries;
    ``channels`` (indices, or a function of C giving them) selects channels *before*
    the float32 copy.
    """
    grid: tuple[int, ...] | None = None
    for raw in iter_raw_chunks(X):
        if grid is None:
            grid = raw.shape[1:]
            if callable(channels):
                channels = np.asarray(channels(raw.shape[3]))
        elif raw.shape[1:] != grid:
            raise ValueError(f"inconsistent patch-map shape: {raw.shape[1:]} after {grid}")
        c = raw.shape[3] if channels is None else len(channels)
        per_image = raw.shape[1] * raw.shape[2] * c * bytes_per_value
        rows = max(1, max_bytes // max(1, per_image))
        for sl in iter_chunks(len(raw), rows):
            part = raw[sl] if channels is None else raw[sl][..., channels]
            yield np.ascontiguousarray(part, dtype=np.float32)

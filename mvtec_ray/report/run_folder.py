"""A run's output folder as the report reads it, local or ``s3://``, and the loaders of what it points to.

Nothing outside the run folder is read through :meth:`RunFolder.read` (``safe_join``, symlinks
resolved); source images and masks (:meth:`RunFolder.source`) are read from local paths, or from S3
with the run's credentials when the run itself is on S3. A missing or unreadable file is ``None``
(the report shows a placeholder); a storage outage still raises.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from mvtec_ray.errors import StorageError, StorageUnavailable
from mvtec_ray.storage import Storage, is_s3, join, safe_join

THUMB = 192  # px, longest side of the example thumbnails


class RunFolder:
    """A run's output folder, local or ``s3://``; source images and masks are read from local paths, or
    from S3 with the run's credentials when the run itself is on S3."""

    def __init__(self, uri, storage: Storage | None = None) -> None:
        self.uri = str(uri)
        self.storage = storage or Storage()

    @property
    def name(self) -> str:
        return self.uri.rstrip("/").rsplit("/", 1)[-1]

    def read(self, relative: str) -> bytes | None:
        """A file of the run, or None when missing, unreadable or outside the run folder."""
        try:
            target = safe_join(self.uri, relative)
        except StorageError:
            return None
        if not is_s3(target):
            path = Path(target).resolve()  # symlinks too: nothing outside the folder is read
            if not path.is_relative_to(Path(self.uri).resolve()) or not path.is_file():
                return None
        return self._bytes_or_none(target)

    def write(self, relative: str, data: bytes) -> str:
        target = join(self.uri, relative)
        self.storage.write_bytes(target, data)
        return target

    def exists(self, relative: str) -> bool:
        return self.storage.exists(join(self.uri, relative))

    def source(self, uri: str) -> bytes | None:
        """Bytes of an image or mask the run read, or None where it cannot be read from here."""
        if not uri:
            return None
        if is_s3(uri) and not is_s3(self.uri):
            return None  # a local report of S3 data: no credentials assumed
        if not is_s3(uri) and not Path(uri).is_file():
            return None  # e.g. "bucket/key", or a path of another machine
        return self._bytes_or_none(uri)

    def _bytes_or_none(self, uri: str) -> bytes | None:
        """The file's bytes, or None when it is missing or unreadable; a storage outage still raises."""
        try:
            return self.storage.read_bytes(uri)
        except StorageUnavailable:
            raise
        except (FileNotFoundError, StorageError):
            return None


def read_parquet(run: RunFolder, name: str, columns: Iterable[str]) -> pd.DataFrame:
    """A Parquet file of the run, or an empty frame with ``columns`` when it is missing."""
    data = run.read(name)
    if data is not None:
        return pd.read_parquet(io.BytesIO(data))
    return pd.DataFrame(columns=list(columns))


def load_rgb(data: bytes | None) -> np.ndarray | None:
    """An image's bytes -> uint8 RGB, longest side at most :data:`THUMB`; None when not an image."""
    if not data:
        return None
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (THUMB, THUMB))  # JPEG: decode at reduced size
            im = im.convert("RGB")
            im.thumbnail((THUMB, THUMB))
            return np.asarray(im)
    except (OSError, ValueError):
        return None


def load_mask(data: bytes | None, shape: tuple[int, int] | None) -> np.ndarray | None:
    """A mask's bytes -> bool at ``shape`` (the displayed image's), else a thumbnail; None when unreadable."""
    if not data:
        return None
    try:
        from PIL import Image
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("L")
            if shape:  # match the displayed image so the two line up
                im = im.resize((shape[1], shape[0]), Image.Resampling.NEAREST)
            else:
                im.thumbnail((THUMB, THUMB))
            return np.asarray(im) > 127
    except (OSError, ValueError):
        return None


def load_map(run: RunFolder, rel: str) -> np.ndarray | None:
    """A ``.npy`` anomaly map of the run as 2-D float32; None when missing or not a 2-D array."""
    if not rel:
        return None
    try:
        data = run.read(rel)  # safe_join: a map_file never points outside the run folder
        if data is None:
            return None
        m = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError):
        return None
    m = np.squeeze(np.asarray(m, dtype=np.float32))
    return m if m.ndim == 2 else None

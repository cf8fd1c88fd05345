"""The listing of an images folder to score (local or S3): the catalog's safe walk (:meth:`Storage.iter_walk`),
the version (:meth:`Storage.version_of`) and category of each file, problems as rows."""
from __future__ import annotations

import posixpath
from collections.abc import Iterator

import pandas as pd
import pyarrow.fs as pafs

from mvtec_ray.data.catalog import IMAGE_EXTENSIONS
from mvtec_ray.storage import Storage

LISTING_COLUMNS = ["uri", "version", "category", "problem"]


#: listed files filtered against the index at a time on the driver
LISTING_CHUNK = 4096


def _walk(storage: Storage, images_uri: str) -> Iterator[tuple[pafs.FileInfo | None, str, str]]:
    """:meth:`Storage.iter_walk` (the catalog's walk: symlink loops listed once, broken links and
    fifos as problems), or the one file ``images_uri`` names."""
    storage.check_reachable(images_uri)
    if storage.is_dir(images_uri):
        yield from storage.iter_walk(images_uri)
        return
    fs, path = storage.resolve(images_uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield info, info.path, ""
    else:
        yield None, path, "not a regular file (fifo, socket or device)"


def iter_listing(storage: Storage, images_uri: str, categories: list[str], category: str | None,
                 chunk: int = LISTING_CHUNK, max_file_bytes: int | None = None) -> Iterator[pd.DataFrame]:
    """Every file under ``images_uri`` with its version, category and, when it cannot be scored, why.

    The category is ``category`` (``--category``) for every file when given; otherwise the nearest
    folder in the path that names a model's category; otherwise the first folder under
    ``images_uri``, reported as a category without a model.
    """
    _, root = storage.resolve(images_uri)
    root = root.replace("\\", "/").rstrip("/")
    known = set(categories)
    rows: list[dict] = []
    for info, listed_path, walk_problem in _walk(storage, images_uri):
        path = listed_path.replace("\\", "/")
        parts = path.split("/")
        name = parts[-1]
        folders = parts[:-1]
        relative = path[len(root) + 1:].split("/")[:-1] if path.startswith(root + "/") else []
        found = category or next((p for p in reversed(folders) if p in known), "")
        problem = ""
        if walk_problem:  # a symlink loop, a broken link, a fifo, an unlistable folder
            problem = walk_problem
        elif name.startswith("."):
            problem = "hidden file"
        elif posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            problem = f"not an image file (extension {posixpath.splitext(name)[1] or 'none'})"
        elif "ground_truth" in (relative or folders[-2:]):
            problem = "defect mask (ground_truth folder), not an image to score"
        elif max_file_bytes and info is not None and (info.size or 0) > max_file_bytes:
            problem = f"image file too large ({info.size} bytes > max_file_bytes {max_file_bytes})"
        elif not found and relative:
            found = relative[0]
            problem = f"no model for category {found!r} (models exist for {', '.join(categories)})"
        elif not found:
            problem = f"no category in the path and no --category (models exist for {', '.join(categories)})"
        rows.append({"uri": storage.uri_of(images_uri, listed_path),
                     "version": storage.version_of(images_uri, info) if info is not None else "",
                     "category": found, "problem": problem})
        if len(rows) >= chunk:
            yield pd.DataFrame(rows, columns=LISTING_COLUMNS)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=LISTING_COLUMNS)


def list_images(storage: Storage, images_uri: str, categories: list[str], category: str | None,
                max_file_bytes: int | None = None) -> pd.DataFrame:
    """The whole listing at once (small inputs, tests); the job itself streams :func:`iter_listing`."""
    chunks = list(iter_listing(storage, images_uri, categories, category, max_file_bytes=max_file_bytes))
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=LISTING_COLUMNS)

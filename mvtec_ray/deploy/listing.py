"""The listing of an images folder to score (local or S3): one safe walk, the category of each file, problems as rows."""
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


def _walk(storage: Storage, images_uri: str) -> Iterator[pafs.FileInfo]:
    """Files under ``images_uri`` one folder at a time (memory: the largest folder, not the tree)."""
    storage.check_reachable(images_uri)
    if not storage.is_dir(images_uri):
        fs, path = storage.resolve(images_uri)
        yield fs.get_file_info(path)
        return
    stack = [images_uri]
    while stack:
        folder = stack.pop()
        infos = sorted(storage.list(folder), key=lambda i: i.path)
        subfolders = []
        for info in infos:
            if info.type == pafs.FileType.Directory:
                subfolders.append(storage.uri_of(images_uri, info.path))
            elif info.type == pafs.FileType.File:
                yield info
        stack.extend(reversed(subfolders))


def iter_listing(storage: Storage, images_uri: str, categories: list[str], category: str | None,
                 chunk: int = LISTING_CHUNK) -> Iterator[pd.DataFrame]:
    """Every file under ``images_uri`` with its version, category and, when it cannot be scored, why.

    The category is ``category`` (``--category``) for every file when given; otherwise the nearest
    folder in the path that names a model's category; otherwise the first folder under
    ``images_uri``, reported as a category without a model.
    """
    _, root = storage.resolve(images_uri)
    root = root.replace("\\", "/").rstrip("/")
    known = set(categories)
    rows: list[dict] = []
    for info in _walk(storage, images_uri):
        path = info.path.replace("\\", "/")
        parts = path.split("/")
        name = parts[-1]
        folders = parts[:-1]
        relative = path[len(root) + 1:].split("/")[:-1] if path.startswith(root + "/") else []
        found = category or next((p for p in reversed(folders) if p in known), "")
        problem = ""
        if name.startswith("."):
            problem = "hidden file"
        elif posixpath.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            problem = f"not an image file (extension {posixpath.splitext(name)[1] or 'none'})"
        elif "ground_truth" in (relative or folders[-2:]):
            problem = "defect mask (ground_truth folder), not an image to score"
        elif not found and relative:
            found = relative[0]
            problem = f"no model for category {found!r} (models exist for {', '.join(categories)})"
        elif not found:
            problem = f"no category in the path and no --category (models exist for {', '.join(categories)})"
        rows.append({"uri": storage.uri_of(images_uri, info.path), "version": f"{info.size}-{info.mtime_ns or 0}",
                     "category": found, "problem": problem})
        if len(rows) >= chunk:
            yield pd.DataFrame(rows, columns=LISTING_COLUMNS)
            rows = []
    if rows:
        yield pd.DataFrame(rows, columns=LISTING_COLUMNS)


def list_images(storage: Storage, images_uri: str, categories: list[str], category: str | None) -> pd.DataFrame:
    """The whole listing at once (small inputs, tests); the job itself streams :func:`iter_listing`."""
    chunks = list(iter_listing(storage, images_uri, categories, category))
    return pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=LISTING_COLUMNS)

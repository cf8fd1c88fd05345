"""A table of images (CSV or Parquet, local or s3://) -> the same :class:`Catalog` as a folder gives.

Columns: ``path, category, split (train|test), label (0 good, 1 defect)``, optional
``defect_type, mask_path`` and ``image_id``. Relative paths resolve against the manifest's folder.
``image_id`` (default ``<category>/<split>/<defect_type>/<file name>``, as the folder catalog
names images) seeds the validation hold-out and the synthetic defects: equal ids give equal
results, whatever the files are called. Every bad row is a one-line :class:`CatalogError` naming
the row (the first one, with the count of the others); nothing is dropped silently.
"""
from __future__ import annotations

import io
import os
import posixpath

import pandas as pd
import pyarrow.fs as pafs

from mvtec_ray.data.catalog import ENTRY_COLUMNS, SKIPPED_COLUMNS, Catalog, category_name_problem
from mvtec_ray.errors import CatalogError
from mvtec_ray.storage import Storage, is_s3

REQUIRED_COLUMNS = ["path", "category", "split", "label"]
OPTIONAL_COLUMNS = ["defect_type", "mask_path", "image_id"]


def build_manifest_catalog(uri: str, storage: Storage | None = None,
                           categories: list[str] | None = None) -> Catalog:
    storage = storage or Storage()
    uri = str(uri)
    table, is_csv = _read_table(uri, storage)
    name = posixpath.basename(uri.rstrip("/")) or uri
    missing = [c for c in REQUIRED_COLUMNS if c not in table.columns]
    if missing:
        raise CatalogError(f"manifest {name} lacks column(s) {', '.join(missing)} "
                           f"(needs {', '.join(REQUIRED_COLUMNS)}; optional {', '.join(OPTIONAL_COLUMNS)})")
    if table.empty:
        raise CatalogError(f"manifest {name} lists no images")
    base = _folder_of(uri)
    where = [f"{name} line {i + 2}" if is_csv else f"{name} row {i + 1}" for i in range(len(table))]
    problems: list[str] = []
    rows: list[dict] = []
    for i, record in enumerate(table.to_dict("records")):
        row, problem = _parse_row(record, base)
        if problem:
            problems.append(f"{where[i]}: {problem}")
        else:
            row["_where"] = where[i]
            rows.append(row)
    _raise_first(problems)

    found = sorted({r["category"] for r in rows})
    if categories:
        unknown = sorted(set(categories) - set(found))
        if unknown:
            raise CatalogError(f"categories not in manifest {name}: {', '.join(unknown)} (found: {', '.join(found)})")
    selected = [r for r in rows if not categories or r["category"] in categories]
    skipped = [(r["uri"], r["category"], "category not selected") for r in rows
               if categories and r["category"] not in categories]

    first_at: dict[tuple[str, str], str] = {}
    for row in selected:
        for key in (("path", row["uri"]), ("image_id", row["image_id"])):
            if key in first_at:
                problems.append(f"{row['_where']}: {key[0]} {key[1]!r} listed twice (first at {first_at[key]})")
            first_at.setdefault(key, row["_where"])
    _raise_first(problems)

    infos = _stat_all(storage, [r["uri"] for r in selected] + [r["mask_uri"] for r in selected if r["mask_uri"]])
    for row in selected:
        for column, target in (("path", row["uri"]), ("mask_path", row["mask_uri"])):
            if target and infos[target].type != pafs.FileType.File:
                kind = "a folder, not a file" if infos[target].type == pafs.FileType.Directory else "file not found"
                problems.append(f"{row['_where']}: {column} {kind}: {target}")
    _raise_first(problems)

    warnings: list[str] = []
    for category in sorted({r["category"] for r in selected}):
        cat_rows = [r for r in selected if r["category"] == category]
        if not any(r["split"] == "train" for r in cat_rows):
            raise CatalogError(f"category {category!r} has no train images in manifest {name}")
        test_labels = {r["label"] for r in cat_rows if r["split"] == "test"}
        if not test_labels:
            raise CatalogError(f"category {category!r} has no test images in manifest {name}")
        if test_labels == {1}:
            warnings.append(f"{category}: the test split has no good image (AUROC and false alarms cannot be measured)")
        if test_labels == {0}:
            warnings.append(f"{category}: the test split has no defect image (AUROC and recall cannot be measured)")
    entries = []
    for row in selected:
        info = infos[row["uri"]]
        if row["label"] == 1 and not row["mask_uri"]:
            warnings.append(f"{row['category']}: defect image without a mask: {row['image_id']}")
        entries.append({**{k: row[k] for k in ("image_id", "uri", "category", "split", "label", "defect_type",
                                               "mask_uri")},
                        "size_bytes": int(info.size or 0), "version": storage.version_of(row["uri"], info)})
    frame = pd.DataFrame(entries, columns=ENTRY_COLUMNS).sort_values("image_id", ignore_index=True)
    return Catalog(root=uri, entries=frame, skipped=pd.DataFrame(skipped, columns=SKIPPED_COLUMNS),
                   warnings=warnings)


def _read_table(uri: str, storage: Storage) -> tuple[pd.DataFrame, bool]:
    ext = posixpath.splitext(uri.rstrip("/"))[1].lower()
    if ext not in (".csv", ".parquet", ".pq"):
        raise CatalogError(f"manifest must be a .csv or .parquet file: {uri}")
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise CatalogError(f"manifest not found: {uri}") from None
    try:
        if ext == ".csv":
            # everything as text: labels like "1" and "1.0" and empty optional cells are parsed per row
            table, is_csv = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig"), True
        else:
            table, is_csv = pd.read_parquet(io.BytesIO(data)), False
    except Exception as exc:  # noqa: BLE001 - any parser error is a bad manifest
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CatalogError(f"cannot read manifest {uri}: {first}") from None
    table.columns = [str(c).strip() for c in table.columns]
    return table, is_csv


def _folder_of(uri: str) -> str:
    if is_s3(uri):
        return posixpath.dirname(uri.rstrip("/"))
    return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))


def _resolve(path: str, base: str) -> str:
    if is_s3(path):
        return path
    if is_s3(base):
        bucket_and_key = posixpath.normpath(posixpath.join(base[len("s3://"):], path))
        return f"s3://{bucket_and_key}"
    return os.path.normpath(os.path.join(base, os.path.expanduser(path)))


def _text(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(value).strip()


def _parse_row(record: dict, base: str) -> tuple[dict, str]:
    path, category, split = _text(record.get("path")), _text(record.get("category")), _text(record.get("split"))
    if not path:
        return {}, "empty path"
    problem = category_name_problem(category)
    if problem:
        return {}, f"category {category!r}: {problem}"
    if split not in ("train", "test"):
        return {}, f"unknown split {split!r} (expected train or test)"
    label_text = _text(record.get("label"))
    label = {"0": 0, "1": 1, "0.0": 0, "1.0": 1, "False": 0, "True": 1}.get(label_text)
    if label is None:
        return {}, f"label must be 0 (good) or 1 (defect), got {label_text!r}"
    if split == "train" and label == 1:
        return {}, "train images must be good (label 0); defects belong to the test split"
    defect_type = _text(record.get("defect_type")) or ("defect" if label else "good")
    if label == 0 and defect_type != "good":
        return {}, f"a good image (label 0) with defect_type {defect_type!r}"
    if label == 1 and defect_type == "good":
        return {}, "a defect image (label 1) with defect_type 'good'"
    mask_path = _text(record.get("mask_path"))
    if mask_path and label == 0:
        return {}, "mask_path given for a good image (label 0)"
    uri = _resolve(path, base)
    image_id = _text(record.get("image_id")) or f"{category}/{split}/{defect_type}/{posixpath.basename(path)}"
    return {"image_id": image_id, "uri": uri, "category": category, "split": split, "label": label,
            "defect_type": defect_type, "mask_uri": _resolve(mask_path, base) if mask_path else ""}, ""


def _stat_all(storage: Storage, uris: list[str]) -> dict[str, pafs.FileInfo]:
    """One batched ``get_file_info`` per filesystem (one listing call per file on S3, no downloads)."""
    groups: dict[int, tuple[pafs.FileSystem, list[str], list[str]]] = {}
    for uri in dict.fromkeys(uris):
        fs, path = storage.resolve(uri)
        groups.setdefault(id(fs), (fs, [], []))
        groups[id(fs)][1].append(uri)
        groups[id(fs)][2].append(path)
    infos: dict[str, pafs.FileInfo] = {}
    for fs, group_uris, paths in groups.values():
        found = storage.retry(f"cannot check the files of the manifest ({group_uris[0]}, ...)",
                              lambda fs=fs, paths=paths: fs.get_file_info(paths))
        infos.update(zip(group_uris, found))
    return infos


def _raise_first(problems: list[str]) -> None:
    if problems:
        more = f" (and {len(problems) - 1} more bad row(s))" if len(problems) > 1 else ""
        raise CatalogError(problems[0] + more)


def dataset_catalog(data: str, manifest: str, storage: Storage, categories: list[str] | None = None) -> Catalog:
    """The catalog of a run: from ``manifest`` when given, else from the folder ``data``."""
    from mvtec_ray.data.catalog import build_catalog
    if data and manifest:
        raise CatalogError("give either a dataset folder (--data) or a manifest (--manifest), not both")
    if manifest:
        return build_manifest_catalog(manifest, storage, categories)
    return build_catalog(data, storage, categories)

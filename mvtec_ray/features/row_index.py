"""The row index of a features folder: which shard holds each row's latest outcome (pure pandas/pyarrow).

``FEATURES/<fingerprint>/_rows.arrow`` (an Arrow IPC file; not ``*.parquet``, so globs and dataset
readers of the shards never pick it up) is written by every extraction run, atomically and just
before ``_SUCCESS.json``. It lists every row the current catalog expects, once, with the shard
that holds its latest outcome; readers of the store (:class:`~mvtec_ray.features.store.FeatureSet`)
read exactly those (row_id, shard) pairs, so rows of images that left the catalog, of an earlier
version of a file, or of an error since retried are never read although their shards remain. Its
schema metadata records the catalog it belongs to (root, number of images, a digest of their ids
and versions). A features folder without it (written before the index) is read with the older
rule: every row_id once, its first occurrence in shard order.

============== ====================================================================
row_id          ``<image_id>#<variant>``, unique
image_id        the source image
category, split
source_version  the catalog's version of the source image the row was extracted from
status          ``ok`` or ``error``
shard           the shard's path relative to the fingerprint folder: ``<category>/<split>/part-*.parquet``
============== ====================================================================
"""
from __future__ import annotations

import hashlib
import io
import json

import pandas as pd
import pyarrow as pa

from mvtec_ray.errors import UserError
from mvtec_ray.storage import Storage, join

ROW_INDEX = "_rows.arrow"
INDEX_COLUMNS = ["row_id", "image_id", "category", "split", "source_version", "status", "shard"]
_META_KEY = b"mvtec_ray_catalog"


def catalog_identity(root: str, entries: pd.DataFrame) -> dict:
    """Which catalog a features folder belongs to: its root, its number of images and a digest of
    every (image_id, version)."""
    digest = hashlib.sha256()
    for image_id, version in sorted(zip(entries["image_id"], entries["version"].astype(str))):
        digest.update(f"{image_id}\t{version}\n".encode())
    return {"root": str(root), "images": int(len(entries)), "digest": digest.hexdigest()[:16]}


def build_row_index(expected: pd.DataFrame, reused: dict[str, str], produced: pd.DataFrame) -> pd.DataFrame:
    """Every expected row (:func:`~mvtec_ray.features.plan.expected_rows`) with the shard of its latest
    outcome: the one this run wrote (``produced``: row_id, status, file), else the reused one."""
    index = expected.copy()
    latest = produced.drop_duplicates("row_id", keep="last").set_index("row_id") if len(produced) else None
    shards = index["row_id"].map(reused)
    status = pd.Series("ok", index=index.index, dtype=object).where(shards.notna())
    if latest is not None:
        new_shard, new_status = index["row_id"].map(latest["file"]), index["row_id"].map(latest["status"])
        shards, status = new_shard.where(new_shard.notna(), shards), new_status.where(new_status.notna(), status)
    missing = index.loc[shards.isna(), "row_id"]
    if len(missing):
        raise RuntimeError(f"extraction lost {len(missing)} rows (e.g. {sorted(missing)[:3]}); "
                           f"nothing marked complete")
    index["status"], index["shard"] = status.astype(str), shards.astype(str)
    return index[INDEX_COLUMNS].reset_index(drop=True)


def check_error_budget(index: pd.DataFrame, errors: pd.DataFrame, max_fraction: float) -> None:
    """Stop with one line when a (category, split) has more than ``max_fraction`` of its rows in error.

    ``errors``: the error rows (row_id, source_uri, error), for the message's first examples."""
    if max_fraction >= 1.0 or index.empty:
        return
    counts = index.assign(bad=index["status"] != "ok").groupby(["category", "split"], sort=True)["bad"].agg(
        ["sum", "size"])
    over = counts[counts["sum"] > max_fraction * counts["size"]]
    if over.empty:
        return
    (category, split), worst = next(iter(over.iterrows()))
    bad_ids = set(index.loc[(index["category"] == category) & (index["split"] == split)
                            & (index["status"] != "ok"), "row_id"])
    examples = errors[errors["row_id"].isin(bad_ids)].drop_duplicates("source_uri").head(3)
    first = "; ".join(f"{uri}: {error}" for uri, error in zip(examples["source_uri"], examples["error"]))
    more = f" (and {len(over) - 1} more category/split over budget)" if len(over) > 1 else ""
    raise UserError(f"extraction stopped: {category}/{split}: {int(worst['sum'])} of {int(worst['size'])} rows "
                    f"could not be read ({worst['sum'] / worst['size']:.0%}, more than extract.max_error_fraction="
                    f"{max_fraction:g}){more}; first: {first or 'no details'}; fix those files (or raise "
                    f"extract.max_error_fraction) and run again: finished rows are kept, errors are retried")


def write_row_index(storage: Storage, root: str, index: pd.DataFrame, catalog: dict) -> None:
    """``root/_rows.arrow``, atomically (Storage.write_bytes)."""
    table = pa.Table.from_pandas(index[INDEX_COLUMNS].astype(str), preserve_index=False)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(catalog, sort_keys=True).encode()})
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression="zstd")) as writer:
        writer.write_table(table)
    storage.write_bytes(join(root, ROW_INDEX), sink.getvalue())


def read_row_index(storage: Storage, root: str) -> tuple[pd.DataFrame, dict] | None:
    """(index, catalog identity), or None for a features folder without an index (older versions)."""
    uri = join(root, ROW_INDEX)
    if not storage.exists(uri):
        return None
    data = storage.read_bytes(uri)
    try:
        table = pa.ipc.open_file(io.BytesIO(data)).read_all()
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"corrupt row index {uri}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}"
                        f"; run extract again to rewrite it") from None
    missing = set(INDEX_COLUMNS) - set(table.column_names)
    if missing:
        raise UserError(f"row index {uri} lacks columns {sorted(missing)}; run extract again to rewrite it")
    catalog = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
    return table.to_pandas(), catalog

"""The feature store: Parquet shards partitioned by category and split.

Layout under a features root (local or s3://)::

    FEATURES/<fingerprint>/_extract.json          run metadata (backbone, weights, sizes, versions)
    FEATURES/<fingerprint>/_SUCCESS.json          written last: counts, the catalog; absent = incomplete
    FEATURES/<fingerprint>/_rows.arrow            written just before it: the row index (row_index.py)
    FEATURES/<fingerprint>/<category>/<split>/part-<hash>.parquet

``<fingerprint>`` hashes the extraction settings, so a changed config never mixes with old
shards. Every row a run produces is in a shard, as ``status == "ok"`` with features or as
``status == "error"`` with a reason and null features. A re-run into the same folder adds shards
(errors retried, rows of changed files extracted again) and never rewrites the shard of a row it
reuses, so a row_id may be stored more than once; the row index ``_rows.arrow`` names, for every row the
catalog of the latest run expects, the one shard holding its latest outcome, and every reader
(:meth:`FeatureSet.read`, :meth:`FeatureSet.iter_patches` and what is built on them) reads exactly
those (row_id, shard) pairs. Without an index (features written before it), every reader counts a
row_id once: its first occurrence in shard path order within its category. Opening a complete
folder checks ``_SUCCESS.json``'s row count against the shards; a shard that cannot be parsed is
one line naming it.

Row schema (one row per image variant):

========== =========================================================================
row_id      ``<image_id>#<variant>``, unique
image_id    ``<category>/<train|test>/<type>/<file name>`` of the source image
source_uri  where the source image was read from
source_version  size and modification time of the source when read
category, split   split: train | val_good | val_synthetic | test
label       0 good, 1 defect (real or synthetic)
defect_type ``good``, the MVTec defect folder, or ``synthetic_<kind>``
mask_uri    the ground-truth mask file of a real defect (empty otherwise)
variant     ``orig``, ``aug<k>`` (augmented copy) or ``syn<k>`` (synthetic anomaly)
aug_params  JSON of the exact transform / defect parameters
status, error
mask_png    PNG bytes of the defect mask at ``image_size``, resized and cropped as the image (empty when none)
source_height, source_width   int32: the source image's own size (0 if unreadable), for full-resolution pixel metrics
pooled      fixed-shape tensor float32 (D,)
patches     fixed-shape tensor float16 (H, W, C), null for rows without patch maps
padim       fixed-shape tensor float16 (H1, W1, d): PaDiM's layer1-3 maps, null without patch maps (see below)
========== =========================================================================

``padim`` holds the stride-4, -8 and -16 maps (ResNet layer1-3), the coarser ones upsampled to the
stride-4 grid (nearest), restricted to a fixed random subset of ``d`` channels (see
``backbones.FeatureExtractor``), computed in the same forward pass as ``patches``; the column is
absent when ``padim_channels`` is 0.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mvtec_ray.config import ExtractConfig
from mvtec_ray.data.catalog import check_category_name
from mvtec_ray.errors import UserError
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.row_index import ROW_INDEX, read_row_index
from mvtec_ray.storage import Storage, join, safe_join
from mvtec_ray.versions import FEATURE_PACKAGES, package_versions

if TYPE_CHECKING:  # torch: only an extracting process imports it
    from mvtec_ray.features.backbones import ResolvedWeights

EXTRACT_META = "_extract.json"
SUCCESS = "_SUCCESS.json"
METADATA_KEY = b"mvtec_ray"
SPLITS = ("train", "val_good", "val_synthetic", "test")
TENSOR_COLUMNS = ("pooled", "patches", "padim")
META_COLUMNS = ["row_id", "image_id", "source_uri", "source_version", "category", "split", "label",
                "defect_type", "mask_uri", "variant", "aug_params", "status", "error"]


def tensor_array(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """An Arrow fixed-shape tensor column (canonical extension type) with optional nulls."""
    values = np.ascontiguousarray(values)
    shape = values.shape[1:]
    flat = pa.array(values.reshape(-1))
    size = int(np.prod(shape)) if shape else 1
    mask = None if valid is None else pa.array(~np.asarray(valid, bool))
    storage = pa.FixedSizeListArray.from_arrays(flat, size, mask=mask)
    tensor_type = pa.fixed_shape_tensor(flat.type, list(shape))
    return pa.ExtensionArray.from_storage(tensor_type, storage)


def tensor_to_numpy(column: pa.ChunkedArray | pa.Array, dtype=None) -> np.ndarray:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    shape = tuple(column.type.shape)
    storage = column.storage
    size = int(np.prod(shape)) if shape else 1
    # .values keeps the slots of null rows (flatten() would drop them and break the reshape)
    flat = storage.values.slice(storage.offset * size, len(storage) * size).to_numpy(zero_copy_only=False)
    out = flat.reshape((len(column),) + shape)
    return out.astype(dtype, copy=False) if dtype is not None else out


def shard_name(row_ids: list[str]) -> str:
    digest = hashlib.blake2b("\n".join(sorted(row_ids)).encode(), digest_size=10).hexdigest()
    return f"part-{digest}.parquet"


def build_table(batch: dict[str, np.ndarray], metadata: dict) -> pa.Table:
    columns = {name: pa.array(list(batch[name])) for name in META_COLUMNS}
    columns["label"] = pa.array(np.asarray(batch["label"], dtype=np.int8))
    columns["mask_png"] = pa.array([bytes(b) for b in batch["mask_png"]], type=pa.binary())
    n = len(batch["row_id"])
    for key in ("source_height", "source_width"):
        columns[key] = pa.array(np.asarray(batch.get(key, np.zeros(n)), dtype=np.int32))
    ok = np.asarray(batch["status"]) == "ok"
    columns["pooled"] = tensor_array(np.asarray(batch["pooled"], dtype=np.float32), ok)
    for key in ("patches", "padim"):
        if key in batch:
            has_maps = ok & np.asarray(batch["with_patches"], bool)
            columns[key] = tensor_array(np.asarray(batch[key], dtype=np.float16), has_maps)
    table = pa.table(columns)
    return table.replace_schema_metadata({METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()})


def write_parquet(table: pa.Table, sink) -> None:
    """zstd; no dictionary or statistics for the tensor columns: on float16 patch maps they are
    useless and more than double the write time (measured 26 -> 12 ms per ResNet50 image)."""
    plain = [name for name in table.column_names if name not in TENSOR_COLUMNS]
    pq.write_table(table, sink, compression="zstd", use_dictionary=plain, write_statistics=plain)


def write_shards(batch: dict[str, np.ndarray], root: str, storage: Storage, metadata: dict) -> dict[str, np.ndarray]:
    """Write one shard per (category, split) in the batch; return a small per-row record."""
    categories, splits = np.asarray(batch["category"]), np.asarray(batch["split"])
    files = np.empty(len(categories), dtype=object)
    for category in np.unique(categories):
        check_category_name(str(category), "feature shard")
        for split in np.unique(splits[categories == category]):
            index = np.flatnonzero((categories == category) & (splits == split))
            part = {key: np.asarray(value)[index] for key, value in batch.items()}
            table = build_table(part, metadata)
            name = shard_name(list(part["row_id"]))
            uri = safe_join(root, posixpath.join(str(category), str(split), name))
            sink = io.BytesIO()
            write_parquet(table, sink)
            storage.write_bytes(uri, sink.getvalue())
            files[index] = posixpath.join(str(category), str(split), name)
    return {"row_id": np.asarray(batch["row_id"]), "image_id": np.asarray(batch["image_id"]),
            "source_uri": np.asarray(batch["source_uri"]), "category": categories, "split": splits,
            "status": np.asarray(batch["status"]), "error": np.asarray(batch["error"]), "file": files}


@dataclass
class FeatureSet:
    """Read access to one complete extraction (``FEATURES/<fingerprint>``)."""

    root: str
    storage: Storage
    #: per shard URI, which of its rows are the first occurrence of their row_id; None = all of them
    _first_rows: dict = field(default_factory=dict, repr=False, compare=False)
    #: the row index once read: "rows" (DataFrame or None), "catalog", "by_shard" (URI -> its row_ids)
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {"root": self.root, "storage": self.storage}  # caches are rebuilt where a copy reads

    def __setstate__(self, state: dict) -> None:
        self.root, self.storage, self._first_rows, self._index = state["root"], state["storage"], {}, {}

    @classmethod
    def open(cls, features: str, storage: Storage | None = None, require_complete: bool = True) -> FeatureSet:
        """``features`` is a fingerprint folder, or a features root holding exactly one complete run."""
        storage = storage or Storage()
        if storage.exists(join(features, EXTRACT_META)):
            fs = cls(features, storage)
        else:
            if not storage.exists(features):
                raise UserError(f"features not found: {features}")
            candidates = [info.base_name for info in storage.list(features)
                          if storage.exists(join(features, info.base_name, SUCCESS))]
            if len(candidates) != 1:
                raise UserError(f"{features} holds {len(candidates)} complete extractions "
                                f"({', '.join(candidates) or 'none'}); pass the one to use: {features}/<fingerprint>")
            fs = cls(join(features, candidates[0]), storage)
        if require_complete and not fs.complete:
            raise UserError(f"extraction at {fs.root} is incomplete (no {SUCCESS}); run extract again to finish it")
        if require_complete:
            fs.check_counts()
        return fs

    def row_index(self) -> pd.DataFrame | None:
        """The row index (:mod:`~mvtec_ray.features.row_index`); None for a folder written before it."""
        if "rows" not in self._index:
            found = read_row_index(self.storage, self.root)
            self._index["rows"], self._index["catalog"] = found if found is not None else (None, {})
            if found is not None:
                rows = found[0]
                self._index["by_shard"] = {self._shard_uri(shard): set(group) for shard, group in
                                           rows.groupby("shard", sort=False)["row_id"]}
        return self._index["rows"]

    def catalog(self) -> dict:
        """The catalog the latest extraction read (root, images, digest); {} without a row index."""
        self.row_index()
        return self._index["catalog"]

    def _shard_uri(self, shard: str) -> str:
        return safe_join(self.root, shard)

    def check_counts(self) -> None:
        """``_SUCCESS.json``'s row count against the shards: one line when they disagree (a shard
        deleted or replaced after the extraction finished, a ``_SUCCESS.json`` of another run)."""
        recorded = self.success().get("rows")
        if recorded is None:
            return
        index = self.row_index()
        problems = []
        if index is None:
            ids: set[str] = set()
            for found in _parallel(self._row_ids_of, self._listed_shard_uris()):
                ids.update(found)
            if len(ids) != recorded:
                problems.append(f"the shards hold {len(ids)}")
        else:
            if len(index) != recorded:
                problems.append(f"{ROW_INDEX} lists {len(index)}")
            by_shard = self._index["by_shard"]
            uris = sorted(by_shard)
            for uri, rows in zip(uris, _parallel(self._num_rows_or_none, uris)):
                if rows is None:
                    problems.append(f"{uri} is missing")
                elif rows < len(by_shard[uri]):
                    problems.append(f"{uri} holds {rows} of its {len(by_shard[uri])} rows")
        if problems:
            more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
            raise UserError(f"features at {self.root} do not match {SUCCESS}, which records {recorded} rows: "
                            f"{'; '.join(problems[:2])}{more}; run extract again")

    def _num_rows_or_none(self, uri: str) -> int | None:
        fs, path = self.storage.resolve(uri)

        def read() -> int:
            with fs.open_input_file(path) as handle:  # the footer only
                return _parsed(uri, lambda: pq.ParquetFile(handle).metadata.num_rows)
        try:
            return self.storage.retry(f"cannot read {uri}", read)
        except FileNotFoundError:
            return None

    @property
    def complete(self) -> bool:
        return self.storage.exists(join(self.root, SUCCESS))

    def metadata(self) -> dict:
        return json.loads(self.storage.read_bytes(join(self.root, EXTRACT_META)))

    def success(self) -> dict:
        return json.loads(self.storage.read_bytes(join(self.root, SUCCESS)))

    def categories(self) -> list[str]:
        """The categories of the row index; without one, the category folders. Names starting with
        ``_`` are the store's own (the category rule,
        :func:`~mvtec_ray.data.catalog.check_category_name`, refuses them as categories); any other
        name the rule refuses (e.g. ``mean`` in an extraction made before the rule) fails in one line."""
        index = self.row_index()
        if index is not None:
            names = list(index["category"].unique())
        else:
            names = [info.base_name for info in self.storage.list(self.root)
                     if info.type.name == "Directory" and not info.base_name.startswith("_")]
        return sorted(check_category_name(name, f"features {self.root}") for name in names)

    def shard_uris(self, category: str | None = None, split: str | None = None) -> list[str]:
        """The shards the readers read in the scope: those the row index names, else every shard."""
        index = self.row_index()
        if index is None:
            return self._listed_shard_uris(category, split)
        scope = index["category"] == check_category_name(category, "features") if category is not None else None
        if split is not None:
            scope = (index["split"] == split) & (scope if scope is not None else True)
        shards = index["shard"] if scope is None else index.loc[scope, "shard"]
        return sorted({self._shard_uri(shard) for shard in shards})

    def _listed_shard_uris(self, category: str | None = None, split: str | None = None) -> list[str]:
        base = self.root if category is None else safe_join(self.root, check_category_name(category, "features"))
        if split is not None:
            base = safe_join(base, split)
        return sorted(self.storage.uri_of(self.root, info.path) for info in self.storage.iter_files(base)
                      if info.base_name.endswith(".parquet"))

    def read(self, category: str | None = None, split: str | None = None,
             columns: list[str] | None = None) -> pa.Table:
        """Rows of every shard in the scope, each row_id once (see the module docstring)."""
        tables = [self._read_unique(uri, columns) for uri in self.shard_uris(category, split)]
        if not tables:
            return pa.table({})
        return pa.concat_tables(tables)

    def _read_shard(self, uri: str, columns: list[str] | None) -> pa.Table:
        data = self.storage.read_bytes(uri)
        return _parsed(uri, lambda: pq.read_table(io.BytesIO(data), columns=columns), in_memory=True)

    def _read_unique(self, uri: str, columns: list[str] | None) -> pa.Table:
        if self.row_index() is None:
            table = self._read_shard(uri, columns)
            keep = self._first_rows_of(uri)
            return table if keep is None else table.filter(pa.array(keep))
        wanted = self._index["by_shard"].get(uri, set())
        table = self._read_shard(uri, None if columns is None else list(dict.fromkeys([*columns, "row_id"])))
        ids = table.column("row_id").to_pylist()
        keep = np.fromiter((i in wanted for i in ids), dtype=bool, count=len(ids))
        if len(set(np.asarray(ids, dtype=object)[keep])) != len(wanted):
            raise UserError(f"feature shard {uri} lacks rows the row index ({ROW_INDEX}) lists; run extract again")
        if not keep.all():
            table = table.filter(pa.array(keep))
        return table if columns is None or "row_id" in columns else table.drop_columns(["row_id"])

    def _first_rows_of(self, uri: str) -> np.ndarray | None:
        """Which rows of the shard at ``uri`` are the first occurrence of their row_id in its category;
        None when all are. Computed once per category from the row_id column alone."""
        if uri not in self._first_rows:
            category = uri.replace("\\", "/").split("/")[-3]  # <category>/<split>/part-*.parquet
            seen: set[str] = set()
            for shard in self._listed_shard_uris(category):
                ids = self._row_ids_of(shard)
                keep = np.fromiter((i not in seen for i in ids), dtype=bool, count=len(ids))
                seen.update(ids)
                self._first_rows[shard] = None if keep.all() else keep
        return self._first_rows.get(uri)

    def _column_names(self, uri: str) -> set[str]:
        fs, path = self.storage.resolve(uri)

        def read() -> set[str]:
            with fs.open_input_file(path) as handle:  # the footer only
                return _parsed(uri, lambda: set(pq.ParquetFile(handle).schema_arrow.names))
        return self.storage.retry(f"cannot read {uri}", read)

    def _read_columns(self, uri: str, columns: list[str]) -> pa.Table:
        fs, path = self.storage.resolve(uri)

        def read() -> pa.Table:
            with fs.open_input_file(path) as handle:  # ranged reads: these columns only
                return _parsed(uri, lambda: pq.ParquetFile(handle).read(columns=columns))
        return self.storage.retry(f"cannot read {uri}", read)

    def _row_ids_of(self, uri: str) -> list[str]:
        return self._read_columns(uri, ["row_id"]).column("row_id").to_pylist()

    def row_ids(self) -> set[str]:
        index = self.row_index()
        if index is not None:
            return set(index["row_id"])
        return set(self.read(columns=["row_id"]).column("row_id").to_pylist()) if self.shard_uris() else set()

    def stored_rows(self) -> pd.DataFrame:
        """Every row of every shard in the folder as written (no index, no de-duplication), in shard
        path order, with its shard's relative path: what a re-run compares the catalog against
        (``features.plan.STORED_COLUMNS``)."""
        columns = ["row_id", "image_id", "split", "source_version", "status"]
        uris = self._listed_shard_uris()
        parts = []
        for uri, table in zip(uris, _parallel(lambda u: self._read_columns(u, columns), uris)):
            part = table.to_pandas()
            part["shard"] = "/".join(uri.replace("\\", "/").split("/")[-3:])  # <category>/<split>/part-*.parquet
            parts.append(part)
        if not parts:
            return pd.DataFrame(columns=[*columns, "shard"])
        return pd.concat(parts, ignore_index=True)

    def load_pooled(self, category: str) -> dict[str, dict[str, np.ndarray]]:
        """{split: {"X", "label", "row_id", "image_id", "defect_type", "source_uri"}} of ok rows."""
        table = self.read(category, columns=["row_id", "image_id", "source_uri", "mask_uri", "split", "label",
                                             "defect_type", "status", "pooled"])
        return _by_split(table, "pooled", np.float32)

    def iter_patches(self, category: str, split: str, with_masks: bool = False,
                     column: str = "patches", min_images: int = 0) -> Iterator[dict]:
        """Shard by shard: {"X": (n, H, W, C) float16 of ``column`` (patches or padim), "row_id", "label",
        ["mask_png", "source_hw"]} of ok rows; consecutive shards joined until a part holds at least
        ``min_images`` (scoring searches a batch of images at once faster than a few at a time)."""
        parts = self._iter_shard_patches(category, split, with_masks, column)
        return _joined(parts, min_images) if min_images > 1 else parts

    def _iter_shard_patches(self, category: str, split: str, with_masks: bool, column: str) -> Iterator[dict]:
        wanted = ["row_id", "image_id", "source_uri", "mask_uri", "defect_type", "label", "status", column] + (
            ["mask_png", "source_height", "source_width"] if with_masks else [])
        for uri in self.shard_uris(category, split):
            names = self._column_names(uri)
            if column not in names:
                raise UserError(f"features at {self.root} have no {column!r} column (extracted with "
                                f"patch_maps=none, padim_channels=0 or an older version); extract again")
            table = self._read_unique(uri, [c for c in wanted if c in names])
            keep = np.asarray(table.column("status").to_pylist()) == "ok"
            if not keep.any():
                continue
            table = table.filter(pa.array(keep))
            has = np.asarray(table.column(column).is_valid())
            if not has.all():
                table = table.filter(pa.array(has))
            if table.num_rows == 0:
                continue
            item = {"X": tensor_to_numpy(table.column(column)),
                    "row_id": np.asarray(table.column("row_id").to_pylist()),
                    "image_id": np.asarray(table.column("image_id").to_pylist(), dtype=object),
                    "source_uri": np.asarray(table.column("source_uri").to_pylist(), dtype=object),
                    "defect_type": np.asarray(table.column("defect_type").to_pylist(), dtype=object),
                    "mask_uri": np.asarray(table.column("mask_uri").to_pylist(), dtype=object),
                    "label": np.asarray(table.column("label").to_numpy())}
            if with_masks:
                item["mask_png"] = table.column("mask_png").to_pylist()
                n = table.num_rows
                item["source_hw"] = np.stack([
                    np.asarray(table.column(c).to_numpy()) if c in table.column_names else np.zeros(n, np.int32)
                    for c in ("source_height", "source_width")], axis=1)
            yield item

    def error_rows(self) -> pa.Table:
        table = self.read(columns=["row_id", "image_id", "source_uri", "category", "split", "status", "error"])
        if table.num_rows == 0:
            return table
        return table.filter(pa.compute.equal(table.column("status"), "error"))


def _joined(parts: Iterator[dict], min_images: int) -> Iterator[dict]:
    """Consecutive parts concatenated key by key until each holds at least ``min_images`` rows."""
    pending: list[dict] = []
    for part in parts:
        pending.append(part)
        if sum(len(p["X"]) for p in pending) >= min_images:
            yield _concatenated(pending)
            pending = []
    if pending:
        yield _concatenated(pending)


def _concatenated(parts: list[dict]) -> dict:
    if len(parts) == 1:
        return parts[0]
    return {key: (sum((p[key] for p in parts), []) if isinstance(parts[0][key], list)
                  else np.concatenate([p[key] for p in parts])) for key in parts[0]}


def _parsed(uri: str, parse, in_memory: bool = False):
    """``parse()``, with a shard that is not valid Parquet reported in one line naming it (an
    OSError counts as corruption only when parsing bytes already read: otherwise it may be the
    storage's, which :meth:`Storage.retry` classifies)."""
    corrupt = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) + ((OSError,) if in_memory else ())
    try:
        return parse()
    except corrupt as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(f"corrupt feature shard {uri}: {reason}; delete it and run extract again "
                        f"(its rows are extracted again)") from None


def _parallel(fn, items: list) -> list:
    """``[fn(item) for item in items]``, a few at a time (one S3 round trip each)."""
    if len(items) < 4:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(16, len(items))) as pool:
        return list(pool.map(fn, items))


class PatchChunks:
    """A re-iterable chunk source of patch maps (``column``: patches or padim) for one (category, split),
    read shard by shard."""

    def __init__(self, features: FeatureSet, category: str, split: str, column: str = "patches"):
        self.features, self.category, self.split, self.column = features, category, split, column

    def __iter__(self) -> Iterator[np.ndarray]:
        for item in self.features.iter_patches(self.category, self.split, column=self.column):
            yield item["X"]


def _by_split(table: pa.Table, column: str, dtype) -> dict[str, dict[str, np.ndarray]]:
    if table.num_rows == 0:
        return {}
    ok = np.asarray(table.column("status").to_pylist()) == "ok"
    table = table.filter(pa.array(ok))
    splits = np.asarray(table.column("split").to_pylist())
    features = tensor_to_numpy(table.column(column), dtype)
    out = {}
    for split in SPLITS:
        index = np.flatnonzero(splits == split)
        if len(index) == 0:
            continue
        out[split] = {"X": features[index],
                      "label": table.column("label").to_numpy()[index].astype(np.int8),
                      **{key: np.asarray(table.column(key).to_pylist(), dtype=object)[index]
                         for key in ("row_id", "image_id", "defect_type", "source_uri", "mask_uri")}}
    return out


def extraction_metadata(config: ExtractConfig, weights: ResolvedWeights, probe_shapes: dict) -> dict:
    """What ``_extract.json`` records of an extraction: weights, preprocessing, shapes, config, versions."""
    spec = BACKBONES[config.backbone]
    return {
        **weights.identity(), "pretrained": weights.pretrained, "fingerprint": config.fingerprint(),
        "image_size": config.image_size, "resize_to": config.resize_to, "resize": config.resize,
        "normalisation": {"mean": spec.mean, "std": spec.std}, "patch_layers": list(spec.patch_layers),
        "padim_layers": list(spec.padim_layers), "patch_dim": config.patch_dim, "tile_size": config.tile_size,
        **probe_shapes,
        "config": config.model_dump(mode="json"),
        "versions": package_versions(FEATURE_PACKAGES, with_python=True),
    }

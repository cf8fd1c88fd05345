"""The work plan of an extraction: which variant rows of which source images are still to produce (pure).

Reuse rules of a re-run into the same features folder (:func:`reuse_stored_rows`): a stored row is
reused only when its ``source_version`` is the catalog's version of its image, its split is the
planned one and its status is ``ok``; an error row is tried again on every run; a row whose source
changed is extracted again; a row whose image left the catalog is never read again (it stays in
its shard but not in the row index, see :mod:`mvtec_ray.features.row_index`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from mvtec_ray.config import ExtractConfig
from mvtec_ray.data.synthetic import row_rng

PLAN_COLUMNS = ["image_id", "uri", "version", "category", "split", "label", "defect_type", "mask_uri",
                "variants", "size_bytes"]  # size_bytes: as listed (-1 unknown), checked before a file is read


def plan_work(entries: pd.DataFrame, config: ExtractConfig, done_row_ids: set[str] | None = None,
              known_splits: dict[str, str] | None = None) -> pd.DataFrame:
    """One row per source image with the variants still to produce (comma-separated).

    Held-out train images (val_good) also give the synthetic anomalies (val_synthetic), so
    validation never shares a source image with training. ``known_splits`` (image_id -> split of
    an earlier run) keeps earlier images where they were: a grown dataset only adds images.
    """
    done = done_row_ids or set()
    known = known_splits or {}
    rows = []
    for category, group in entries.groupby("category", sort=True):
        train = group[group["split"] == "train"].sort_values("image_id")
        n_hold = 0
        if config.holdout_fraction > 0 and len(train) > 1:
            n_hold = max(config.min_holdout, int(round(config.holdout_fraction * len(train))))
            n_hold = min(n_hold, len(train) - 1)
        ids = list(train["image_id"])
        # an empty file can only become an error row: never spend a validation slot on it
        empty = set(train.loc[train["size_bytes"] == 0, "image_id"]) if "size_bytes" in train else set()
        held = {i for i in ids if known.get(i) == "val_good"}
        # the fresh run's draw order, skipping images already placed: a run resumed after a crash
        # holds out exactly what an uninterrupted run would; a grown dataset only adds images
        for k in row_rng(config.seed, category, "holdout").permutation(len(ids)):
            if len(held) >= n_hold:
                break
            if known.get(ids[k]) not in ("train", "val_good") and ids[k] not in empty:
                held.add(ids[k])
        for row in group.itertuples(index=False):
            if row.split == "test":
                split, variants = "test", ["orig"]
            elif row.image_id in held:
                split, variants = "val_good", ["orig"] + [f"syn{k}" for k in range(1, config.synthetic_per_image + 1)]
            else:
                split, variants = "train", ["orig"] + [f"aug{k}" for k in range(1, config.augment_copies + 1)]
            todo = [v for v in variants if f"{row.image_id}#{v}" not in done]
            if todo:
                rows.append({"image_id": row.image_id, "uri": row.uri, "version": row.version,
                             "category": category, "split": split, "label": int(row.label),
                             "defect_type": row.defect_type, "mask_uri": row.mask_uri,
                             "variants": ",".join(todo), "size_bytes": int(getattr(row, "size_bytes", -1))})
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def expected_row_ids(plan: pd.DataFrame) -> list[str]:
    """The row ids ``plan`` produces (:func:`expected_rows`' ``row_id`` column)."""
    return expected_rows(plan)["row_id"].tolist()


#: the stored rows a re-run compares against (:meth:`FeatureSet.stored_rows`), in shard order
STORED_COLUMNS = ["row_id", "image_id", "split", "source_version", "status", "shard"]
EXPECTED_COLUMNS = ["row_id", "image_id", "source_version", "category", "split"]


def expected_rows(plan: pd.DataFrame) -> pd.DataFrame:
    """One row per variant row of ``plan``: row_id, image_id, source_version, category, split (a
    synthetic variant's split is ``val_synthetic``)."""
    rows = [(f"{image_id}#{v}", image_id, str(version), category,
             "val_synthetic" if v.startswith("syn") else split)
            for image_id, version, category, split, variants in zip(
                plan["image_id"], plan["version"], plan["category"], plan["split"], plan["variants"])
            for v in variants.split(",")]
    return pd.DataFrame(rows, columns=EXPECTED_COLUMNS)


def known_splits_of(stored: pd.DataFrame, entries: pd.DataFrame) -> dict[str, str]:
    """image_id -> split (synthetic rows count as val_good) of the stored rows read from the
    catalog's current version of their image: a re-run keeps the validation holdout of images that
    stay, and takes nothing from rows of another dataset or of an earlier version of a file."""
    if stored.empty:
        return {}
    versions = dict(zip(entries["image_id"], entries["version"].astype(str)))
    current = stored[stored["source_version"].astype(str) == stored["image_id"].map(versions)]
    first = current.drop_duplicates("image_id", keep="first")
    return {image_id: "val_good" if split == "val_synthetic" else split
            for image_id, split in zip(first["image_id"], first["split"])}


@dataclass
class Reuse:
    """What a re-run takes from the stored rows (:func:`reuse_stored_rows`)."""

    shards: dict[str, str] = field(default_factory=dict)  #: row_id -> shard (relative path) of each reused row
    retried: int = 0   #: expected rows whose stored outcome for this source version is an error: tried again
    changed: int = 0   #: expected rows stored only from another version of their source: extracted again
    dropped: int = 0   #: stored row ids the catalog no longer expects (e.g. the image was deleted): never read again


def reuse_stored_rows(expected: pd.DataFrame, stored: pd.DataFrame) -> Reuse:
    """The reuse rules (module docstring): ``expected`` from :func:`expected_rows` of the full plan,
    ``stored`` every stored row (``STORED_COLUMNS``) in shard order; of several reusable copies of a
    row the first in shard order is taken."""
    if stored.empty:
        return Reuse()
    merged = stored[STORED_COLUMNS].merge(expected[["row_id", "source_version", "split"]], on="row_id",
                                          how="inner", suffixes=("", "_now"), sort=False)
    same = (merged["source_version"].astype(str) == merged["source_version_now"]) & \
        (merged["split"] == merged["split_now"])
    ok = merged[same & (merged["status"] == "ok")].drop_duplicates("row_id", keep="first")
    shards = dict(zip(ok["row_id"], ok["shard"]))
    current = set(merged.loc[same, "row_id"])
    present = set(merged["row_id"])
    return Reuse(shards=shards, retried=len(current - set(shards)), changed=len(present - current),
                 dropped=len(set(stored["row_id"]) - set(expected["row_id"])))

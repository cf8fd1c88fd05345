"""The work plan of an extraction: which variant rows of which source images are still to produce (pure)."""
from __future__ import annotations

import pandas as pd

from mvtec_ray.config import ExtractConfig
from mvtec_ray.data.synthetic import row_rng

PLAN_COLUMNS = ["image_id", "uri", "version", "category", "split", "label", "defect_type", "mask_uri",
                "variants"]


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
                             "variants": ",".join(todo)})
    return pd.DataFrame(rows, columns=PLAN_COLUMNS)


def expected_row_ids(plan: pd.DataFrame) -> list[str]:
    return [f"{image_id}#{v}" for image_id, variants in zip(plan["image_id"], plan["variants"])
            for v in variants.split(",")]

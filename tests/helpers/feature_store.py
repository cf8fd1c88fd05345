"""A small hand-built feature store (no image extraction): two categories, pooled vectors and
optionally patch / PaDiM maps, complete as extraction leaves it (used by the fit, report and
feature-store tests)."""
from __future__ import annotations

import json

import numpy as np

from mvtec_ray.features.store import (
    EXTRACT_META,
    META_COLUMNS,
    SUCCESS,
    FeatureSet,
    write_shards,
)
from mvtec_ray.storage import Storage, join

CATEGORIES = ["alpha", "beta"]
DIM = 24
GRID = (4, 4, 8)  # patch maps of the store: 4x4 positions, 8 channels
SIZES = {"train": 40, "val_good": 8, "val_synthetic": 16, "test": 24}


def _split_rows(rng, category: str, split: str, n: int, center: np.ndarray) -> dict:
    label = np.zeros(n, np.int8)
    if split == "val_synthetic":
        label[:] = 1
    elif split == "test":
        label[n // 3:] = 1  # a third good, the rest defective
    X = center + rng.normal(0, 1, (n, DIM))
    X[label == 1, :4] += rng.uniform(2.0, 4.0, (int(label.sum()), 1))  # defects: a shift in a few channels
    P = rng.normal(0, 1, (n, *GRID))
    for i in np.flatnonzero(label):  # defects: one patch position shifted
        P[i, rng.integers(GRID[0]), rng.integers(GRID[1]), :3] += rng.uniform(4.0, 6.0)
    folder = "test" if split == "test" else "train"
    image_ids = [f"{category}/{folder}/{'defect' if y else 'good'}/{split}_{i:03d}.png" for i, y in enumerate(label)]
    return {"row_id": [f"{i}#orig" for i in image_ids], "image_id": image_ids, "split": [split] * n,
            "label": label, "defect_type": ["defect" if y else "good" for y in label], "pooled": X.astype(np.float32),
            "patches": P.astype(np.float16)}


def write_store(root, seed: int = 0, shuffle_test_labels: bool = False, patches: bool = False) -> FeatureSet:
    """A complete store as extraction leaves it; optionally the test labels permuted, features unchanged,
    and with patch maps (for the patch detectors)."""
    storage = Storage()
    out = join(str(root), "fp0")
    metadata = {"backbone": "handmade", "weights": "none", "weights_sha256": "", "pretrained": False,
                "fingerprint": "fp0", "image_size": 32, "pooled_dim": DIM,
                "patch_shape": list(GRID) if patches else None, "padim_shape": list(GRID) if patches else None,
                "patch_dim": None}
    for c, category in enumerate(CATEGORIES):
        rng = np.random.default_rng([seed, c])
        center = rng.uniform(0, 3, DIM)
        for split, n in SIZES.items():
            part = _split_rows(rng, category, split, n, center)
            if shuffle_test_labels and split == "test":
                order = np.random.default_rng(99).permutation(n)
                part["label"], part["defect_type"] = part["label"][order], list(np.asarray(part["defect_type"])[order])
            batch = {k: np.asarray(v, dtype=object) for k, v in part.items() if k not in ("label", "pooled", "patches")}
            if patches:  # PaDiM reads its own column: the same maps here
                batch.update(patches=part["patches"], padim=part["patches"], with_patches=np.ones(n, bool),
                             source_height=np.full(n, 32, np.int32), source_width=np.full(n, 32, np.int32))
            batch.update(label=part["label"], pooled=part["pooled"], category=np.full(n, category, dtype=object),
                         status=np.full(n, "ok", dtype=object), mask_png=np.full(n, b"", dtype=object))
            batch["source_uri"] = batch["image_id"]
            for column in META_COLUMNS:
                batch.setdefault(column, np.full(n, "", dtype=object))
            write_shards(batch, out, storage, metadata)
    storage.write_bytes(join(out, EXTRACT_META), json.dumps(metadata).encode())
    rows = len(CATEGORIES) * sum(SIZES.values())  # FeatureSet.open checks the count against the shards
    storage.write_bytes(join(out, SUCCESS), json.dumps({"rows": rows, "errors": 0}).encode())
    return FeatureSet.open(out, storage)

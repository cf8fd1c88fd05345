"""A small hand-made feature store with patch and PaDiM maps, real source images and real mask files.

Input size 32 px, sources and masks 64 px. Test defects are 1-px horizontal scratches on an even
row: nearest downsampling to 32 px (what the stored ``mask_png`` holds) loses them entirely.
Validation holds held-out normals and synthetic defects (a blob, with its 32 px mask).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from mvtec_ray.data.images import decode_mask, encode_mask_png
from mvtec_ray.features.store import (
    EXTRACT_META,
    META_COLUMNS,
    SUCCESS,
    FeatureSet,
    write_shards,
)
from mvtec_ray.storage import Storage, join

CATEGORY = "plate"
INPUT = 32          # model input size
SOURCE = 64         # source image and mask size
GRID, C = 8, 8      # patch grid (stride 4) and channels
PADIM_GRID, D = 16, 6
SIZES = {"train": 12, "val_good": 3, "val_synthetic": 6, "test": 8}


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def scratch_mask(row: int) -> np.ndarray:
    mask = np.zeros((SOURCE, SOURCE), bool)
    mask[row, 8:56] = True
    return mask


def _maps(rng, n: int, hot_rows: list[tuple[int, int] | None]) -> tuple[np.ndarray, np.ndarray]:
    """Patch and PaDiM maps: noise, plus a shifted band where ``hot_rows`` (input-pixel rows) says."""
    patches = rng.normal(0, 0.1, (n, GRID, GRID, C))
    padim = rng.normal(0, 0.1, (n, PADIM_GRID, PADIM_GRID, D))
    for i, rows in enumerate(hot_rows):
        if rows is None:
            continue
        top, bottom = rows  # in input pixels
        patches[i, top * GRID // INPUT:max(top * GRID // INPUT + 1, bottom * GRID // INPUT), 2:-2] += 1.5
        padim[i, top * PADIM_GRID // INPUT:max(top * PADIM_GRID // INPUT + 1, bottom * PADIM_GRID // INPUT), 4:-4] += 1.5
    return patches.astype(np.float16), padim.astype(np.float16)


def write_pixel_store(root: Path, seed: int = 0) -> tuple[FeatureSet, list[Path]]:
    """The store and the test mask files (which a test may rewrite)."""
    storage = Storage()
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir(parents=True)
    out = join(str(root / "features"), "fp1")
    metadata = {"backbone": "handmade", "weights": "none", "weights_sha256": "", "pretrained": False,
                "fingerprint": "fp1", "image_size": INPUT, "resize_to": None, "pooled_dim": 4,
                "patch_shape": [GRID, GRID, C], "padim_shape": [PADIM_GRID, PADIM_GRID, D], "patch_dim": None}
    mask_files = []
    for split, n in SIZES.items():
        labels = np.zeros(n, np.int8)
        hot: list = [None] * n
        mask_png, mask_uri = [b""] * n, [""] * n
        if split == "val_synthetic":
            labels[:] = 1
            for i in range(n):
                top = 6 + 3 * i
                blob = np.zeros((INPUT, INPUT), bool)
                blob[top:top + 4, 8:24] = True
                mask_png[i], hot[i] = encode_mask_png(blob), (top, top + 4)
        if split == "test":
            labels[n // 2:] = 1
            for i in range(n // 2, n):
                row = 16 + 8 * (i - n // 2)  # even: lost by 64 -> 32 px nearest downsampling
                path = images / f"mask_{i}.png"
                path.write_bytes(_png(scratch_mask(row).astype(np.uint8) * 255))
                mask_files.append(path)
                mask_uri[i] = str(path)
                mask_png[i] = encode_mask_png(decode_mask(path.read_bytes(), INPUT))  # as extraction stores it
                hot[i] = (row // 2, row // 2 + 1)
        patches, padim = _maps(rng, n, hot)
        folder = "test" if split == "test" else "train"
        image_ids, sources = [], []
        for i in range(n):
            kind = "scratch" if labels[i] and split == "test" else "good"
            image_ids.append(f"{CATEGORY}/{folder}/{kind}/{split}_{i:03d}.png")
            source = images / f"{split}_{i:03d}.png"
            source.write_bytes(_png(rng.integers(0, 255, (SOURCE, SOURCE, 3), dtype=np.uint8)))
            sources.append(str(source))
        batch = {"row_id": np.asarray([f"{x}#orig" for x in image_ids], dtype=object),
                 "image_id": np.asarray(image_ids, dtype=object), "source_uri": np.asarray(sources, dtype=object),
                 "category": np.full(n, CATEGORY, dtype=object), "split": np.full(n, split, dtype=object),
                 "label": labels, "defect_type": np.asarray(["scratch" if y and split == "test" else
                                                             "synthetic_spot" if y else "good" for y in labels],
                                                            dtype=object),
                 "mask_uri": np.asarray(mask_uri, dtype=object), "status": np.full(n, "ok", dtype=object),
                 "mask_png": np.asarray(mask_png, dtype=object), "with_patches": np.ones(n, bool),
                 "source_height": np.full(n, SOURCE, np.int32), "source_width": np.full(n, SOURCE, np.int32),
                 "pooled": rng.normal(size=(n, 4)).astype(np.float32), "patches": patches, "padim": padim}
        for column in META_COLUMNS:
            batch.setdefault(column, np.full(n, "", dtype=object))
        write_shards(batch, out, storage, metadata)
    storage.write_bytes(join(out, EXTRACT_META), json.dumps(metadata).encode())
    storage.write_bytes(join(out, SUCCESS), json.dumps({"rows": sum(SIZES.values()), "errors": 0}).encode())
    return FeatureSet.open(out, storage), mask_files

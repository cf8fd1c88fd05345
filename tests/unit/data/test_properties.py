"""Property-based tests: path joining, catalog bookkeeping on random trees, image decoding."""
from __future__ import annotations

import io
import os
import posixpath
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.images import DecodeError, decode_image
from mvtec_ray.errors import CatalogError, StorageError
from mvtec_ray.storage import printable_path, safe_join
from tests.helpers.bad_files import encode, image_files

FAST = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- safe_join ------------------------------------------------------------------------
segments = st.sampled_from(["a", "b c", "..", ".", "", "...", "..a", "x..", "\\..", "é", "~", "a\\b", "\x00"])
relatives = st.builds(lambda parts, lead: ("/" if lead else "") + "/".join(parts),
                      st.lists(segments, min_size=1, max_size=6), st.booleans())


@FAST
@given(relatives)
def test_safe_join_never_escapes(relative):
    for base in ("/srv/out", "s3://bucket/out"):
        try:
            joined = safe_join(base, relative)
        except StorageError:
            continue
        if base.startswith("s3://"):
            inside = posixpath.normpath(joined[len("s3://"):])
            assert inside == "bucket/out" or inside.startswith("bucket/out/"), (relative, joined)
        else:
            assert os.path.commonpath([base, os.path.normpath(joined)]) == base, (relative, joined)
        assert "\x00" not in joined


@FAST
@given(st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=40))
def test_map_files_stay_in_their_folder(image_id):
    # (ids come from UTF-8 names: the catalog skips others, so no NUL and no lone surrogates)
    from mvtec_ray.fit.cell import _save_map
    from mvtec_ray.storage import Storage
    with tempfile.TemporaryDirectory() as tmp:
        relative = _save_map(Storage(), tmp, "knn", image_id, np.zeros((2, 2), np.float32))
        [written] = [p for p in Path(tmp).rglob("*") if p.is_file()]
        assert written.parent == Path(tmp, "maps", "knn") and written == Path(tmp, relative)


# -- catalog on random trees ----------------------------------------------------------
# mostly under one valid category, so most trees catalogue; the rest probe the refusals
first = st.sampled_from(["cat"] * 12 + ["dog", ".hidden", ""])
second = st.sampled_from(["train", "test", "test", "ground_truth", "other", ".git", "a.png", ""])
third = st.sampled_from(["good", "good", "crack", "hole", ".tmp", "b.png", ""])
deeper = st.lists(st.sampled_from(["good", "crack", "x", ".y"]), max_size=2)
names = st.sampled_from(["000.png", "001.png", "000_mask.png", "001_mask.png", "000_mask.bmp", "002.JPG",
                         "notes.txt", ".DS_Store", "noext", "003.tiff", "é 4.png", "001.jpg",
                         "caf\udce9.png"])  # a Latin-1 byte: not UTF-8
extra = st.builds(lambda parts, more, name: "/".join([p for p in parts if p] + more + [name]),
                  st.tuples(first, second, third), deeper, names)
CORE = ["cat/train/good/000.png", "cat/test/good/000.png", "cat/test/crack/000.png"]
trees = st.lists(extra, min_size=1, max_size=20).map(lambda paths: CORE + paths)


@FAST
@given(trees)
@example(CORE + ["cat/ground_truth/crack/000_mask.png", "cat/ground_truth/crack/000_mask.bmp",
                 "cat/ground_truth/crack/000.png"])  # three masks for one image
def test_catalog_accounts_for_every_file_once(paths):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp, "root")
        written = set()
        for rel in paths:
            target = root / rel
            if any(p.is_file() for p in [*target.parents][: len(Path(rel).parts) - 1]) or target.is_dir():
                continue  # a file already took this name as a folder (or the reverse)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"x")
            written.add(printable_path(str(target)))
        if not written:
            return
        try:
            catalog = build_catalog(str(root))
        except CatalogError:
            event("layout refused")
            return  # a broken layout is refused as a whole, with a reason
        event("catalogued")
        entries = list(catalog.entries["uri"])
        skipped = list(catalog.skipped["uri"])
        masks = sorted(set(catalog.entries["mask_uri"]) - {""})
        accounted = entries + skipped + masks
        assert len(accounted) == len(set(accounted)), "a file is counted twice"
        assert set(accounted) == written, set(accounted) ^ written
        assert (catalog.skipped["reason"] != "").all()
        assert catalog.entries["image_id"].is_unique


# -- decoding ----------------------------------------------------------------------------
SAMPLES = [data for data, expected in image_files().values() if expected == "ok"] + [
    encode(Image.new("RGB", (20, 20)), "WEBP")]


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_decode_error(data):
    try:
        array = decode_image(data, 24)
    except DecodeError as exc:
        assert str(exc) and "\n" not in str(exc)
        event(str(exc).split(" (")[0].split(":")[0])
        return
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8


@FAST
@given(st.sampled_from(SAMPLES), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                                          max_size=8), st.integers(0, 10**6))
def test_damaged_images_only_raise_decode_error(data, flips, cut):
    damaged = bytearray(data)
    for position, value in flips:
        damaged[position % len(damaged)] = value
    damaged = bytes(damaged[: max(1, cut % (len(damaged) + 1))])
    try:
        array = decode_image(damaged, 24)
    except DecodeError as exc:
        event(str(exc).split(" (")[0].split(":")[0])
        return
    event("decoded")
    assert array.shape == (24, 24, 3) and array.dtype == np.uint8


@FAST
@given(st.integers(16, 48), st.integers(16, 48), st.sampled_from(["L", "RGB", "RGBA", "P", "I;16"]),
       st.sampled_from(["PNG", "JPEG", "BMP", "TIFF", "WEBP"]), st.integers(16, 64), st.integers(0, 2**31))
def test_valid_small_images_decode_to_the_right_shape(height, width, mode, fmt, size, seed):
    if (fmt == "JPEG" and mode in ("RGBA", "P", "I;16")) or (fmt in ("BMP", "WEBP") and mode == "I;16"):
        return  # combinations those formats cannot store
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        image = Image.fromarray(rng.integers(0, 255, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    array = decode_image(buffer.getvalue(), size)
    assert array.shape == (size, size, 3) and array.dtype == np.uint8

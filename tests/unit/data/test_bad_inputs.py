"""Bad files: each decodes or fails with its own reason; a seeded dataset loses nothing end to end."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.images import DecodeError, DecodeLimits, decode_image, decode_mask
from tests.helpers.bad_files import (
    encode,
    every_entry,
    huge_png,
    image_files,
    rotated_jpeg,
    sample_rgb,
    seed_bad_files,
)

FILES = image_files()


@pytest.mark.parametrize("name", sorted(FILES))
def test_decode_each_file(name):
    data, expected = FILES[name]
    if expected == "ok":
        array = decode_image(data, 32)
        assert array.shape == (32, 32, 3) and array.dtype == np.uint8
        assert array.std() > 1, "decoded to a flat image"
    else:
        with pytest.raises(DecodeError, match=expected.split(":", 1)[1]):
            decode_image(data, 32)


def test_reasons_are_clean_one_liners():
    for name, (data, expected) in FILES.items():
        if expected != "ok":
            with pytest.raises(DecodeError) as info:
                decode_image(data, 32)
            message = str(info.value)
            assert "\n" not in message and len(message) < 200 and " at 0x" not in message, (name, message)


def test_sixteen_bit_uses_the_full_range():
    grey = decode_image(FILES["grey16.png"][0], 64)[..., 0].astype(int)
    assert grey[0].mean() < 10 and grey[-1].mean() > 245  # a 0..65535 ramp (row by row) becomes 0..255


def test_alpha_is_composited_on_black():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, 16:, 3] = 255  # left half fully transparent
    array = decode_image(encode(__import__("PIL.Image").Image.fromarray(rgba, "RGBA"), "PNG"), 32)
    assert array[:, :12, 0].max() == 0 and array[:, 20:, 0].min() == 200


@pytest.mark.parametrize("orientation,top,bottom,left,right", [
    (1, None, None, "red", "blue"),   # no rotation
    (3, None, None, "blue", "red"),   # 180 degrees
    (6, "red", "blue", None, None),   # rotate 90 clockwise: the left edge goes on top
    (8, "blue", "red", None, None),   # rotate 90 counter-clockwise
])
def test_exif_orientation_is_applied(orientation, top, bottom, left, right):
    array = decode_image(rotated_jpeg(orientation), 32).astype(int)
    colour = {"red": 0, "blue": 2}

    def dominant(region):
        return "red" if region[..., 0].mean() > region[..., 2].mean() else "blue"
    if top:
        assert dominant(array[:8]) == top and dominant(array[-8:]) == bottom
    if left:
        assert dominant(array[:, :8]) == left and dominant(array[:, -8:]) == right
    assert set(colour) >= {dominant(array[:8]), dominant(array[:, :8])}


def test_huge_image_rejected_before_decoding_and_memory_bounded(tmp_path):
    """8000x8000 is over the default max_image_pixels (60 M): rejected from the header alone.
    Under a raised limit it decodes, and peak memory stays near the raw pixel buffer (192 MB)."""
    path = tmp_path / "huge.png"
    path.write_bytes(huge_png())
    script = f"""
import json, resource
from mvtec_ray.data.images import DecodeError, DecodeLimits, decode_image
data = open({str(path)!r}, "rb").read()
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
base = peak()
try:
    decode_image(data, 224)
    rejected = ""
except DecodeError as exc:
    rejected = str(exc)
after_reject = peak()
shape = decode_image(data, 224, DecodeLimits(max_pixels=70_000_000)).shape
print(json.dumps({{"rejected": rejected, "reject_mb": after_reject - base, "decode_mb": peak() - base,
                  "shape": list(shape)}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "too large (8000x8000" in result["rejected"] and "max_image_pixels" in result["rejected"]
    assert result["reject_mb"] < 20, result
    raw_mb = 8000 * 8000 * 3 / 2**20
    assert result["shape"] == [224, 224, 3]
    assert result["decode_mb"] < 1.6 * raw_mb, result


def test_masks_and_limits():
    with pytest.raises(DecodeError, match="empty"):
        decode_mask(b"", 16)
    with pytest.raises(DecodeError, match="not a readable mask"):
        decode_mask(b"garbage", 16)
    mask = decode_mask(encode(sample_rgb().convert("L"), "PNG"), 16)
    assert mask.shape == (16, 16) and mask.dtype == bool
    with pytest.raises(DecodeError, match="too small"):
        decode_image(FILES["photo.jpg"][0], 32, DecodeLimits(min_side=100))


def test_catalog_accounts_for_every_file(tmp_path):
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    root = tmp_path / "data"
    generate_sample_dataset(root, categories=["washer"], seed=1,
                            spec=SampleSpec(n_train=4, n_test_good=2, n_test_defect_per_type=1, size=64))
    seeded = seed_bad_files(root, "washer")
    catalog = build_catalog(str(root))
    skipped = dict(zip(catalog.skipped["uri"], catalog.skipped["reason"]))
    assert set(skipped) == set(seeded.skipped), set(skipped) ^ set(seeded.skipped)
    for path, words in seeded.skipped.items():
        assert words in skipped[path], (path, skipped[path])
    entries = set(catalog.entries["uri"])
    assert set(seeded.errors) | seeded.ok <= entries
    masks = set(catalog.entries["mask_uri"]) - {""}
    assert entries | set(skipped) | masks == every_entry(root)
    assert len(entries) + len(skipped) + len(masks) == len(every_entry(root))
    assert "café naïve 01 ✓.png" in " ".join(catalog.entries["image_id"])


@pytest.fixture(scope="module")
def seeded_run(ray_session, tmp_path_factory):
    from mvtec_ray.config import load_config
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    from mvtec_ray.distributed.pipeline import run_pipeline
    base = tmp_path_factory.mktemp("seeded")
    root, out = base / "data", base / "out"
    generate_sample_dataset(root, categories=["washer"], seed=2,
                            spec=SampleSpec(n_train=8, n_test_good=2, n_test_defect_per_type=1, size=64))
    seeded = seed_bad_files(root, "washer")
    config = load_config(None, {"data": str(root), "out": str(out), "extract.backbone": "efficientnet_lite0",
                                "extract.image_size": 64, "extract.batch_size": 8,
                                "detectors.names": ["knn", "patchcore"],
                                # a few good images beside one of each bad file: far over the default error budget
                                "extract.max_error_fraction": 1.0})
    outputs = run_pipeline(config)
    return seeded, out, outputs


def test_seeded_run_completes_and_reconciles(seeded_run):
    seeded, out, outputs = seeded_run
    assert (outputs.results.loc[outputs.results["category"] != "mean", "status"] == "ok").all(), outputs.results

    errors = pd.read_parquet(out / "errors.parquet")
    by_file = errors.groupby("source_uri")["error"].first().to_dict()
    assert set(by_file) == set(seeded.errors), set(by_file) ^ set(seeded.errors)
    for path, words in seeded.errors.items():
        assert words in by_file[path], (path, by_file[path])

    skipped = pd.read_csv(out / "skipped.csv", keep_default_na=False)
    assert set(skipped["uri"]) == set(seeded.skipped), set(skipped["uri"]) ^ set(seeded.skipped)
    assert (skipped["reason"] != "").all()

    # every shard row, without de-duplication: one row per (image, variant), one status per file
    fdir = outputs.extraction.features_dir
    rows = pd.concat([pq.read_table(p, columns=["row_id", "source_uri", "status"]).to_pandas()
                      for p in sorted(__import__("pathlib").Path(fdir).rglob("part-*.parquet"))])
    assert rows["row_id"].is_unique
    status = rows.groupby("source_uri")["status"].agg(set)
    assert (status.map(len) == 1).all(), status[status.map(len) > 1]
    ok_files = set(status[status == {"ok"}].index)
    error_files = set(status[status == {"error"}].index)
    assert error_files == set(seeded.errors)
    assert seeded.ok <= ok_files

    masks = set(build_catalog(str(seeded.root)).entries["mask_uri"]) - {""}
    universe = every_entry(seeded.root)
    parts = [ok_files, error_files, set(skipped["uri"]), masks]
    assert sum(len(p) for p in parts) == len(universe), "a file is counted twice"
    assert set().union(*parts) == universe, universe ^ set().union(*parts)

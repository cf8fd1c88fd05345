"""Strict decoding: full-length corrupt files are decode errors (never training images), poison
inputs are refused by size or by their first bytes before they are read, masks must fit their image."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mvtec_ray.config import ExtractConfig
from mvtec_ray.data.images import (
    HEADER_BYTES,
    HEADER_FIRST_ABOVE,
    DecodeError,
    decode_image,
    decode_mask,
    encode_mask_png,
    image_dimensions,
    jpeg_entropy_problem,
    jpeg_problem,
    read_image_file,
)
from mvtec_ray.deploy.listing import list_images
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.storage import Storage
from tests.helpers.bad_files import corrupt_files, encode, image_files, jpeg_zero_run, sample_rgb

CORRUPT = corrupt_files()


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_full_length_corrupt_files_are_decode_errors(name):
    data, words = CORRUPT[name]
    with pytest.raises(DecodeError) as caught:
        decode_image(data, 64)
    assert words.lower() in str(caught.value).lower(), str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("kwargs", [{"quality": 90}, {"quality": 75, "progressive": True},
                                    {"quality": 95, "subsampling": 0}, {"quality": 90, "optimize": True}])
def test_valid_jpegs_stay_valid(kwargs):
    rgb = sample_rgb(200, 300, seed=3)
    data = encode(rgb, "JPEG", **kwargs)
    assert jpeg_problem(data) is None
    assert decode_image(data, 64).shape == (64, 64, 3)
    # an EXIF thumbnail (its own end-of-image marker inside APP1) and a trailer after the end
    exif = Image.Exif()
    exif[0x0112] = 1
    with_exif = encode(rgb, "JPEG", exif=exif.tobytes(), **kwargs) + b"camera trailer \x00\x00"
    assert jpeg_problem(with_exif) is None
    assert decode_image(with_exif, 64).shape == (64, 64, 3)


def test_damaged_jpeg_scan_data_with_its_structure_intact_is_a_decode_error():
    """A zero run or flipped bytes inside the scan leave every marker in place: Pillow decodes
    garbage with status ok, the structural walk sees nothing; libjpeg-turbo's strict decode does."""
    rgb = sample_rgb(256, 256, seed=4)
    data = encode(rgb, "JPEG", quality=90)
    zero_run = jpeg_zero_run(data)
    assert jpeg_problem(zero_run) is None  # the segment walk cannot see it
    Image.open(io.BytesIO(zero_run)).load()  # nor Pillow: the pixels are garbage, no error
    with pytest.raises(DecodeError, match="corrupt JPEG data"):
        decode_image(zero_run, 64)
    assert jpeg_entropy_problem(data) is None and decode_image(data, 64).shape == (64, 64, 3)
    for kwargs in ({"quality": 75, "progressive": True}, {"quality": 95, "subsampling": 0}):
        assert jpeg_entropy_problem(encode(rgb, "JPEG", **kwargs)) is None


def test_restart_markers_and_black_webps_stay_valid():
    rgb = sample_rgb(256, 256, seed=1)
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", quality=90, restart_marker_blocks=4)
    assert b"\xff\xd0" in buffer.getvalue() and jpeg_problem(buffer.getvalue()) is None
    black = Image.new("RGB", (1024, 768))  # a lossy WebP of black ends in some zero bytes: still fine
    for kwargs in ({"quality": 90}, {"lossless": True}):
        assert decode_image(encode(black, "WEBP", **kwargs), 64).max() == 0


def test_every_good_sample_file_still_decodes():
    for name, (data, expected) in image_files().items():
        if expected == "ok":
            assert decode_image(data, 64).shape == (64, 64, 3), name


class CountingStorage(Storage):
    """A Storage whose files are in memory and which counts the bytes read from them."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__()
        self.files, self.bytes_read, self.opened, self.reads = files, 0, 0, 0

    def resolve(self, uri):
        return self, uri

    def open_input_stream(self, path):
        if path not in self.files:
            raise FileNotFoundError(path)
        self.opened += 1
        owner, inner = self, io.BytesIO(self.files[path])

        class Stream(io.RawIOBase):
            def read(self, n=-1):
                data = inner.read(n)
                owner.bytes_read += len(data)
                owner.reads += 1  # on S3 each read of a stream is a ranged GET
                return data

        return Stream()


def _batch(uri: str, size_bytes: int, label: int = 0, mask_uri: str = "") -> dict[str, np.ndarray]:
    row = {"image_id": "c/test/x/a.png", "uri": uri, "version": "1", "category": "c", "split": "test",
           "label": label, "defect_type": "x" if label else "good", "mask_uri": mask_uri, "variants": "orig",
           "size_bytes": size_bytes}
    return {k: np.asarray([v], dtype=object if isinstance(v, str) else None) for k, v in row.items()}


def test_listed_size_over_max_file_bytes_is_an_error_row_before_any_read():
    storage = CountingStorage({"big.png": encode(sample_rgb(), "PNG")})
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64, max_file_bytes=4096)
    rows = prepare_batch(_batch("big.png", 5 * 1024 ** 3), config, storage)  # listed: 5 GiB
    assert list(rows["status"]) == ["error"] and "file too large" in rows["error"][0]
    assert storage.opened == 0 and storage.bytes_read == 0


def test_a_non_image_is_refused_on_its_first_bytes():
    blob = b"PK\x03\x04 a multi-GB archive named .png " + bytes(HEADER_FIRST_ABOVE + 1024 * 1024)
    storage = CountingStorage({"blob.png": blob})
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64)
    rows = prepare_batch(_batch("blob.png", len(blob)), config, storage)
    assert list(rows["status"]) == ["error"] and "not a readable image" in rows["error"][0]
    assert storage.bytes_read <= HEADER_BYTES


def test_a_small_file_is_read_in_one_request_and_its_header_still_checked():
    """Below HEADER_FIRST_ABOVE the header is checked in memory: one read per image (on S3 one GET,
    so a flaky endpoint fails no more requests than before the check)."""
    image = encode(sample_rgb(), "PNG")
    blob = b"PK\x03\x04 an archive named .png " + bytes(100_000)
    storage = CountingStorage({"a.png": image, "blob.png": blob})
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64)
    assert list(prepare_batch(_batch("a.png", len(image)), config, storage)["status"]) == ["ok"]
    assert (storage.opened, storage.reads) == (1, 1)
    rows = prepare_batch(_batch("blob.png", len(blob)), config, storage)
    assert list(rows["status"]) == ["error"] and "not a readable image" in rows["error"][0]
    assert (storage.opened, storage.reads) == (2, 2)


def test_a_file_grown_past_the_limit_since_its_listing_is_read_only_up_to_it():
    data = encode(sample_rgb(), "PNG") + bytes(100_000)
    storage = CountingStorage({"grown.png": data})
    with pytest.raises(DecodeError, match="too large"):
        read_image_file(storage, "grown.png", max_file_bytes=20_000, size_bytes=1000)
    assert storage.bytes_read <= 20_001
    assert read_image_file(storage, "grown.png", max_file_bytes=len(data)) == data


def test_score_listing_marks_files_over_max_file_bytes(tmp_path):
    folder = tmp_path / "washer"
    folder.mkdir()
    (folder / "small.png").write_bytes(encode(sample_rgb(), "PNG"))
    (folder / "huge.png").write_bytes(bytes(50_000))
    listing = list_images(Storage(), str(tmp_path), ["washer"], None, max_file_bytes=20_000).set_index("uri")
    assert "too large" in listing.loc[str(folder / "huge.png"), "problem"]
    assert listing.loc[str(folder / "small.png"), "problem"] == ""


def _png_with_orientation(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(Image.fromarray(array), "PNG", exif=exif.tobytes())


def test_mask_exif_orientation_is_applied_like_the_images():
    mask = np.zeros((32, 64), np.uint8)
    mask[:, :32] = 255  # left half marked
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = 255
    for orientation in (1, 6, 3):
        image_bytes = _png_with_orientation(image, orientation)
        decoded_image = decode_image(image_bytes, 32)[..., 0] > 127
        decoded_mask = decode_mask(_png_with_orientation(mask, orientation), 32,
                                   image_hw=image_dimensions(image_bytes))
        assert (decoded_mask == decoded_image).all(), orientation
    assert decode_mask(_png_with_orientation(mask, 6), None).shape == (64, 32)  # full resolution, turned


def test_a_mask_of_another_size_than_its_image_is_an_error_row(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(encode(sample_rgb(48, 64), "PNG"))
    wrong = tmp_path / "a_mask.png"
    wrong.write_bytes(encode_mask_png(np.ones((48, 48), bool)))  # 48x48 for a 64x48 image
    right = tmp_path / "b_mask.png"
    right.write_bytes(encode_mask_png(np.ones((48, 64), bool)))
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=32)
    rows = prepare_batch(_batch(str(image), image.stat().st_size, 1, str(wrong)), config, Storage())
    assert list(rows["status"]) == ["error"] and "mask is 48x48 but its image is 64x48" in rows["error"][0]
    rows = prepare_batch(_batch(str(image), image.stat().st_size, 1, str(right)), config, Storage())
    assert list(rows["status"]) == ["ok"]


def test_full_length_corrupt_files_become_error_rows_in_extraction(tmp_path):
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=32)
    for name in ("zero_half.jpg", "zero_half.webp", "broken_tag.tiff"):
        path = tmp_path / name
        path.write_bytes(CORRUPT[name][0])
        rows = prepare_batch(_batch(str(path), path.stat().st_size), config, Storage())
        assert list(rows["status"]) == ["error"], name


def test_strict_decoding_in_threads_leaves_the_warning_filters_as_they_were():
    import threading
    import warnings
    before = list(warnings.filters)
    good, bad = encode(sample_rgb(), "PNG"), CORRUPT["broken_tag.tiff"][0]
    errors = []

    def work():
        for _ in range(20):
            decode_image(good, 32)
            try:
                decode_image(bad, 32)
                errors.append("accepted")
            except DecodeError:
                pass

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and warnings.filters == before

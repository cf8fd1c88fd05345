"""Generators for awkward image files, and a dataset seeded with one of each (tests and demos)."""
from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mvtec_ray.storage import printable_path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(array: np.ndarray) -> bytes:
    """PNG written by hand, so 16-bit grey and 48-bit RGB are possible (Pillow writes neither)."""
    array = np.asarray(array)
    height, width = array.shape[:2]
    colour = {2: 0, 3: 2}[array.ndim]
    depth = 16 if array.dtype == np.uint16 else 8
    rows = b"".join(b"\x00" + array[y].astype(">u2" if depth == 16 else "u1").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")


def huge_png(width: int = 8000, height: int = 8000) -> bytes:
    """A black RGB PNG of width x height streamed through zlib (186 KB for 8000x8000)."""
    packer = zlib.compressobj(9)
    row = b"\x00" + bytes(width * 3)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def sample_rgb(height: int = 48, width: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8))


def rotated_jpeg(orientation: int = 6) -> bytes:
    """64x32 JPEG, left half red, right half blue, with an EXIF orientation tag."""
    image = Image.new("RGB", (64, 32), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 32, 32))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def image_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, expected): ``ok`` or ``error:<words of the reason>``."""
    rgb = sample_rgb()
    png = encode(rgb, "PNG")
    grey16 = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    rgb48 = np.stack([grey16, grey16[::-1], np.full_like(grey16, 30000)], axis=-1)
    return {
        "zero_bytes.png": (b"", "error:empty file"),
        "truncated.png": (png[: len(png) // 2], "error:truncated"),
        "text_named.png": (b"this is a text file, not a picture\n" * 4, "error:not a readable image"),
        "tiny_8x8.png": (encode(rgb.resize((8, 8)), "PNG"), "error:too small"),
        "huge_8000x8000.png": (huge_png(), "error:too large"),
        "photo.jpg": (encode(rgb, "JPEG", quality=90), "ok"),
        "scan.tiff": (encode(rgb, "TIFF"), "ok"),
        "legacy.bmp": (encode(rgb, "BMP"), "ok"),
        "grey16.png": (raw_png(grey16), "ok"),
        "rgb48.png": (raw_png(rgb48), "ok"),
        "alpha.png": (encode(rgb.convert("RGBA"), "PNG"), "ok"),
        "grey.png": (encode(rgb.convert("L"), "PNG"), "ok"),
        "palette.png": (encode(rgb.convert("P"), "PNG"), "ok"),
        "exif_rotated.jpg": (rotated_jpeg(6), "ok"),
        "café naïve 01 ✓.png": (png, "ok"),
    }


@dataclass
class SeededDataset:
    root: Path
    errors: dict[str, str]   # path -> words of the error reason
    skipped: dict[str, str]  # path -> words of the skip reason
    ok: set[str]             # seeded paths that must decode fine


def seed_bad_files(root: Path, category: str) -> SeededDataset:
    """Put one of each awkward file into a generated dataset; returns what each must produce."""
    root = Path(root)
    cat = root / category
    good_test, good_train = cat / "test" / "good", cat / "train" / "good"
    errors, skipped, ok = {}, {}, set()
    for _i, (name, (data, expected)) in enumerate(image_files().items()):
        # a couple in train/good: their error rows then cover every variant of a training image
        target = (good_train if name in ("zero_bytes.png", "truncated.png") else good_test) / name
        target.write_bytes(data)
        if expected == "ok":
            ok.add(str(target))
        else:
            errors[str(target)] = expected.split(":", 1)[1]
    first_good = sorted(good_train.glob("0*.png"))[0]
    link = good_test / "symlink_to_train.png"
    os.symlink(os.path.relpath(first_good, good_test), link)
    ok.add(str(link))
    os.symlink("does_not_exist.png", good_test / "dangling_link.png")
    skipped[str(good_test / "dangling_link.png")] = "broken symbolic link"
    os.symlink("..", good_train / "loop")  # train/good/loop -> train: a cycle
    skipped[str(good_train / "loop")] = "listed already"
    os.mkfifo(good_test / "fifo.png")  # reading it would block forever
    skipped[str(good_test / "fifo.png")] = "not a regular file"
    latin1 = os.fsencode(good_test) + b"/caf\xe9_latin1.png"  # not UTF-8: Arrow cannot hold the name
    with open(latin1, "wb") as handle:
        handle.write(encode(sample_rgb(), "PNG"))
    skipped[printable_path(os.fsdecode(latin1))] = "not valid UTF-8"
    for path, reason in [(root / ".DS_Store", "file at the dataset root"),
                         (good_test / ".DS_Store", "hidden file"),
                         (good_test / "._photo.png", "hidden file"),
                         (cat / ".cache" / "thumbs.png", "hidden file"),
                         (good_test / "extra" / "deeper.png", "not in the MVTec layout"),
                         (cat / "train" / "good" / "nested" / "again" / "x.png", "not in the MVTec layout"),
                         (cat / "validation" / "good" / "v.png", "not in the MVTec layout"),
                         (cat / "notes" / "readme.txt", "not an image file"),
                         (good_test / "animation.gif", "not an image file")]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(sample_rgb(), "PNG") if path.suffix in (".png", ".gif") else b"notes\n")
        skipped[str(path)] = reason
    return SeededDataset(root, errors, skipped, ok)


def every_entry(root: Path) -> set[str]:
    """Every file, link, fifo and folder symlink under ``root``, not following links (names as
    the catalog prints them)."""
    found = set()
    for folder, dirs, names in os.walk(root, followlinks=False):
        found.update(os.path.join(folder, d) for d in dirs if os.path.islink(os.path.join(folder, d)))
        found.update(os.path.join(folder, n) for n in names)
    return {printable_path(p) for p in found}


# -- full-length corrupt files: every byte there, the content broken ------------------------------


def zero_filled_half(data: bytes) -> bytes:
    """The first half of ``data`` and zeros for the rest, at full length (a copy cut short on a
    preallocated or sparse file)."""
    return data[: len(data) // 2] + bytes(len(data) - len(data) // 2)


def jpeg_bad_marker(data: bytes) -> bytes:
    """A JPEG with two entropy-coded bytes in the middle of its scan turned into ``FF 13``, a marker
    that cannot occur there (what flipped bits in the image data look like to a decoder)."""
    body = bytearray(data)
    start = data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2:][:2], "big")
    k = start + (len(data) - start) // 2
    while body[k - 1] == 0xFF or body[k] == 0xFF:  # not next to an existing marker or stuffing
        k += 1
    body[k:k + 2] = b"\xff\x13"
    return bytes(body)


def jpeg_zero_run(data: bytes) -> bytes:
    """A JPEG whose scan data has a run of zero bytes in its middle and is otherwise intact (its
    end-of-image marker included): what a lost disk block looks like."""
    body = bytearray(data)
    start = data.index(b"\xff\xda") + 2 + int.from_bytes(data[data.index(b"\xff\xda") + 2:][:2], "big")
    middle = start + (len(data) - start) // 2
    body[middle:middle + (len(data) - start) // 4] = bytes((len(data) - start) // 4)
    return bytes(body)


def tiff_broken_tag(image: Image.Image) -> bytes:
    """An uncompressed TIFF whose Software tag points past the end of the file (a damaged IFD:
    Pillow only warns, "Tag data larger than file", and decodes the pixels)."""
    from PIL import TiffImagePlugin
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[305] = "x" * 40  # Software, stored outside the IFD entry
    data = bytearray(encode(image, "TIFF", tiffinfo=info))
    assert data[:2] == b"II"
    ifd = struct.unpack_from("<I", data, 4)[0]
    for k in range(struct.unpack_from("<H", data, ifd)[0]):
        entry = ifd + 2 + 12 * k
        if struct.unpack_from("<H", data, entry)[0] == 305:
            struct.pack_into("<I", data, entry + 8, len(data) + 4096)
            return bytes(data)
    raise AssertionError("no Software tag written")


def corrupt_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, words of the reason): full-length corrupt files. Pillow alone decodes the
    first four with status ok (garbage pixels); the others it refuses itself."""
    rgb = sample_rgb(128, 128)
    jpeg = encode(rgb, "JPEG", quality=90)
    progressive = encode(rgb, "JPEG", quality=90, progressive=True)
    return {
        "zero_half.jpg": (zero_filled_half(jpeg), "no end-of-image marker"),
        "zero_half.webp": (zero_filled_half(encode(rgb, "WEBP", quality=90)), "zero bytes"),
        "zero_half_lossless.webp": (zero_filled_half(encode(rgb, "WEBP", lossless=True)), "zero bytes"),
        "broken_tag.tiff": (tiff_broken_tag(rgb), "truncated file read"),
        "zero_half_progressive.jpg": (zero_filled_half(progressive), "truncated"),
        "bad_marker.jpg": (jpeg_bad_marker(jpeg), "broken data stream"),
        "zero_half_lzw.tiff": (zero_filled_half(encode(rgb, "TIFF", compression="tiff_lzw")), "not a readable image"),
    }

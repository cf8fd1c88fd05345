"""Image decoding, augmentation and synthetic anomalies: pure numpy / PIL / torchvision.

Everything here works on one image at a time and is deterministic for a seed, so a row
can be traced back to its source file and the exact transform parameters.
"""
from __future__ import annotations

import io
import re
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:
    from mvtec_ray.storage import Storage

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never half an image


class DecodeError(ValueError):
    """The bytes are not a usable image; the message is the recorded reason."""


#: formats decode_image accepts; the rest of Pillow's plugins (EPS via Ghostscript, PSD, ...) are
#: never tried on untrusted bytes
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "DIB", "TIFF", "WEBP")  # JPEG also opens MPO files
#: EXIF orientation -> the transpose that undoes it (as in ImageOps.exif_transpose)
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


@dataclass(frozen=True)
class DecodeLimits:
    """Peak memory of one decode is about ``max_pixels`` x bytes per pixel of the source (<= 8)."""

    max_pixels: int = 60_000_000
    min_side: int = 16


def _open(data: bytes, limits: DecodeLimits, what: str = "image") -> Image.Image:
    """Header only: format, size and the pixel limits are checked before anything is decoded."""
    check_header(data[:HEADER_BYTES], what)
    try:
        with _strict():
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise DecodeError(f"not a readable {what} (unknown format; expected PNG, JPEG, BMP, TIFF or WebP)") from None
    except Image.DecompressionBombError as exc:
        raise DecodeError(f"{what} too large ({_short(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - any failure on untrusted bytes is a decode error
        raise DecodeError(f"corrupt {what} header: {_short(exc)}") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise DecodeError(f"{what} too large ({width}x{height} = {width * height} pixels "
                          f"> max_image_pixels {limits.max_pixels})")
    if min(width, height) < limits.min_side:
        raise DecodeError(f"{what} too small ({width}x{height} < {limits.min_side} px)")
    return image


#: bytes of a file read first: its format is checked on them before the whole file is read
HEADER_BYTES = 64


def check_header(head: bytes, what: str = "image") -> str:
    """The format the first bytes of a file announce (one of :data:`ALLOWED_FORMATS`), or
    :class:`DecodeError`: a text file or a multi-GB blob is refused on its first bytes."""
    if not head:
        raise DecodeError("empty file (0 bytes)")
    Image.init()
    for fmt in ALLOWED_FORMATS:
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            verdict = accept(head) if accept else False
        except Exception:  # noqa: BLE001 - a plugin's check on too few bytes
            verdict = False
        if verdict and not isinstance(verdict, str):  # a str is Pillow's "recognised but unsupported"
            return fmt
    raise DecodeError(f"not a readable {what} (unknown format; expected PNG, JPEG, BMP, TIFF or WebP)")


#: files listed at most this large (or of unknown size: masks) are read in one request, bounded by
#: max_file_bytes, and their header checked in memory; a larger file's header is read first, so a
#: multi-GB non-image costs a few bytes. On S3 each read is a request, and a flaky endpoint fails
#: requests, not bytes
HEADER_FIRST_ABOVE = 16 * 1024 * 1024


def read_image_file(storage: Storage, uri: str, max_file_bytes: int, size_bytes: int | None = None,
                    what: str = "image") -> bytes:
    """The bytes of an image (or mask) file, refused before they are read when the listed
    ``size_bytes`` is over ``max_file_bytes``, refused on its first bytes when they are no image,
    and read only up to the limit (a file that grew since its listing is refused too)."""
    from mvtec_ray.storage import TooLarge
    if size_bytes is not None and size_bytes > max_file_bytes:
        raise DecodeError(f"{what} file too large ({size_bytes} bytes > max_file_bytes {max_file_bytes})")
    try:
        if size_bytes is None or size_bytes <= HEADER_FIRST_ABOVE:
            data = storage.read_bytes(uri, max_bytes=max_file_bytes)
            check_header(data[:HEADER_BYTES], what)
            return data
        return storage.read_bytes(uri, max_bytes=max_file_bytes, head=lambda h: check_header(h, what),
                                  head_bytes=HEADER_BYTES)
    except TooLarge as exc:
        raise DecodeError(f"{what} file too large ({exc})") from None


#: warning filters are process-wide: two threads in catch_warnings at once (the service decodes in
#: threads) could leave "error" installed for the whole process, so strict sections take turns
_STRICT = threading.Lock()


@contextmanager
def _strict():
    """Decoder warnings are errors (a half-broken file is a decode error, never a training image);
    our own ``max_pixels`` applies, so Pillow's bomb warning is not one."""
    with _STRICT, warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _load(image: Image.Image, data: bytes) -> None:
    """Decode the pixels strictly: decoder warnings are errors, and the container is checked for
    the corruption decoders let through (a JPEG whose end-of-image marker is gone, e.g. a
    zero-filled second half; a WebP ending in a long run of zero bytes)."""
    with _strict():
        image.load()
    problem = None
    if image.format in ("JPEG", "MPO"):
        problem = jpeg_problem(data) or jpeg_entropy_problem(data)
    elif image.format == "WEBP":
        problem = _zero_tail_problem(data)
    if problem:
        raise DecodeError(problem)


#: libjpeg-turbo's words for damaged image data: Pillow drops these warnings and decodes garbage
_JPEG_DAMAGE = ("corrupt", "premature", "extraneous", "huffman", "marker", "bogus", "invalid")


def jpeg_entropy_problem(data: bytes) -> str | None:
    """Why a JPEG's compressed image data is damaged, or None: libjpeg-turbo (through simplejpeg)
    decodes every entropy-coded byte with its warnings as errors, at 1/8 scale (the DCT scaling
    still reads every coefficient: cheap, and nothing is kept). Flipped bytes and zero runs inside
    the scan that leave the segment structure intact are only found this way."""
    try:
        import simplejpeg
    except ImportError:  # an optional speed-up elsewhere; here the structural check still runs
        return None
    try:
        simplejpeg.decode_jpeg(data, strict=True, min_height=1, min_width=1)
    except (ValueError, RuntimeError) as exc:
        message = str(exc)
        if any(word in message.lower() for word in _JPEG_DAMAGE):
            return f"corrupt JPEG data ({message.splitlines()[0][:120]})"
    return None  # anything else (e.g. a colour space simplejpeg does not convert): Pillow decoded it


#: inside a JPEG's entropy-coded data a 0xFF byte is followed by 0x00 (stuffing), a restart
#: marker 0xD0-0xD7 or a fill 0xFF; anything else ends the scan
_SCAN_END = re.compile(rb"\xff(?=[^\x00\xd0-\xd7\xff])")


def jpeg_problem(data: bytes) -> str | None:
    """Why a JPEG is structurally broken, or None: walks the segments and the scans' data up to
    the first end-of-image marker (libjpeg only warns about what this finds, and Pillow drops
    its warnings). Data after that marker (MPO frames, camera trailers) is not looked at."""
    n, pos, scans = len(data), 2, 0
    while True:
        if pos + 2 > n:
            return "truncated or corrupt JPEG (no end-of-image marker)"
        if data[pos] != 0xFF:
            return f"corrupt JPEG (no segment marker at byte {pos})"
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0xD9:
            return None if scans else "corrupt JPEG (no image data before the end-of-image marker)"
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # restart markers and TEM stand alone
            pos += 2
            continue
        if marker < 0xC0:
            return f"corrupt JPEG data (invalid marker 0x{marker:02X} at byte {pos})"
        if pos + 4 > n:
            return "truncated or corrupt JPEG (no end-of-image marker)"
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            return f"corrupt JPEG (segment length {length} at byte {pos})"
        pos += 2 + length
        if marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            scans += 1
            found = _SCAN_END.search(data, pos)
            if found is None:
                return "truncated or corrupt JPEG (no end-of-image marker)"
            pos = found.start()


def _zero_tail_problem(data: bytes) -> str | None:
    """A compressed file whose last quarter (and at least 512 bytes) is zero bytes was partly
    written or zero-filled: valid WebPs end in at most a few percent of zeros (an all-black
    7000x8000 lossy WebP: 5.4 %)."""
    zeros = len(data) - len(data.rstrip(b"\0"))
    if zeros >= 512 and zeros * 4 >= len(data):
        return f"corrupt image: the file ends in {zeros} zero bytes of {len(data)} (partly written or zero-filled)"
    return None


def crop_offset(size: int, resize_to: int | None) -> int:
    """First row/column of the centre crop of ``size`` from a ``resize_to`` square (0 without crop),
    rounded as torchvision's ``center_crop``."""
    return 0 if not resize_to or resize_to <= size else int(round((resize_to - size) / 2.0))


def crop_box(height: int, width: int, size: int, resize_to: int | None) -> tuple[int, int, int, int]:
    """The centre crop in a ``height`` x ``width`` original's own pixels: (top, left, bottom, right).

    The model sees the crop of ``size`` from the image resized to ``resize_to``; its maps cover
    this region of the original (and of its full-resolution mask)."""
    if not resize_to or resize_to <= size:
        return 0, 0, height, width
    start = crop_offset(size, resize_to) / resize_to
    stop = (crop_offset(size, resize_to) + size) / resize_to
    return (int(round(height * start)), int(round(width * start)),
            int(round(height * stop)), int(round(width * stop)))


def centre_crop(array: np.ndarray, size: int, resize_to: int | None) -> np.ndarray:
    offset = crop_offset(size, resize_to)
    return array[offset:offset + size, offset:offset + size]


#: how a source becomes the model's square input: "stretch" (both sides to the size, aspect lost)
#: or "pad" (longer side to the size, aspect kept, centred on black)
RESIZE_MODES = ("stretch", "pad")


def content_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a ``height`` x ``width`` image inside the ``size`` square when
    resized with its aspect kept (longer side = ``size``) and centred (``resize="pad"``)."""
    scale = size / max(height, width)
    h = min(size, max(1, int(round(height * scale))))
    w = min(size, max(1, int(round(width * scale))))
    return (size - h) // 2, (size - w) // 2, h, w


def _check_resize(resize: str, resize_to: int | None) -> None:
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "pad" and resize_to:
        raise ValueError("resize 'pad' does not combine with a centre crop (resize_to)")


def _pad_square(image: Image.Image, box: tuple[int, int, int, int], size: int, mode: str) -> Image.Image:
    canvas = Image.new(mode, (size, size), 0)
    canvas.paste(image, (box[1], box[0]))
    return canvas


def image_dimensions(data: bytes, limits: DecodeLimits = DecodeLimits()) -> tuple[int, int]:
    """(height, width) of an image as decoded (EXIF orientation applied), from its header only."""
    image = _open(data, limits)
    width, height = image.size
    return (width, height) if _orientation(image) in (5, 6, 7, 8) else (height, width)


def decode_image(data: bytes, size: int, limits: DecodeLimits = DecodeLimits(),
                 resize_to: int | None = None, resize: str = "stretch") -> np.ndarray:
    """Bytes -> RGB uint8 array (size, size, 3), EXIF orientation applied.

    With ``resize_to``: resized to ``resize_to`` square, then the centre ``size`` square cropped
    (the PatchCore / anomalib preprocessing). ``resize="pad"``: the longer side to ``size``, the
    aspect kept, centred on black (:func:`content_box`). Raises :class:`DecodeError` with a
    reason, and nothing else, whatever the bytes.
    """
    _check_resize(resize, resize_to)
    image = _open(data, limits)
    full = max(size, resize_to or size)
    try:
        width, height = image.size  # before draft(), which shrinks a JPEG's size
        if image.format in ("JPEG", "MPO"):
            image.draft("RGB", (full, full))  # decode JPEGs at reduced scale: faster, less memory
        _load(image, data)
        orientation = _orientation(image)
        transposed = orientation in (5, 6, 7, 8)
        target = (full, full)
        if resize == "pad":
            box = content_box(*((width, height) if transposed else (height, width)), size)
            target = (box[2], box[3]) if transposed else (box[3], box[2])  # (w, h) before the transpose
        image = _small_rgb(image, target)  # shrink before any other full-size copy
        if orientation in _ORIENTATION:
            image = image.transpose(_ORIENTATION[orientation])
        if resize == "pad":
            image = _pad_square(image, box, size, "RGB")
        array = centre_crop(np.asarray(image, dtype=np.uint8), size, resize_to)
    except DecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DecodeError(f"corrupt or truncated image: {_short(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - e.g. struct.error, IndexError from a broken file
        raise DecodeError(f"corrupt image ({type(exc).__name__}: {_short(exc)})") from None
    if array.shape != (size, size, 3):
        raise DecodeError(f"decoded to an unexpected shape {array.shape}")
    return array


def decode_mask(data: bytes, size: int | None, limits: DecodeLimits = DecodeLimits(),
                resize_to: int | None = None, resize: str = "stretch",
                image_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Mask bytes -> bool array (size, size), resized, cropped or padded as :func:`decode_image`
    does; nearest resampling keeps it binary. ``size=None``: the mask at its own full resolution.

    EXIF orientation is applied as to images. ``image_hw``: the (height, width) of the mask's
    image as decoded (:func:`image_dimensions`); a mask of another size is a :class:`DecodeError`,
    never silently stretched onto it."""
    _check_resize(resize, resize_to)
    mask = _open(data, DecodeLimits(limits.max_pixels, 1), "mask")
    try:
        _load(mask, data)
        orientation = _orientation(mask)
        mask = mask.convert("L")
        if orientation in _ORIENTATION:
            mask = mask.transpose(_ORIENTATION[orientation])
        if image_hw is not None and (mask.size[1], mask.size[0]) != tuple(image_hw):
            raise DecodeError(f"mask is {mask.size[0]}x{mask.size[1]} but its image is "
                              f"{image_hw[1]}x{image_hw[0]} (width x height)")
        if size is None:
            return np.asarray(mask) > 127
        if resize == "pad":
            box = content_box(mask.size[1], mask.size[0], size)
            small = mask.resize((box[3], box[2]), Image.Resampling.NEAREST)
            return np.asarray(_pad_square(small, box, size, "L")) > 127
        full = max(size, resize_to or size)
        mask = mask.resize((full, full), Image.Resampling.NEAREST)
        return centre_crop(np.asarray(mask), size, resize_to) > 127
    except DecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure on untrusted bytes is a decode error
        raise DecodeError(f"unreadable mask: {_short(exc)}") from None


def encode_mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=("PNG",)).convert("L")) > 127


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block is not a broken image
        return 1


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _small_rgb(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Any Pillow mode -> RGB of ``size`` (w, h); resized in the source's own depth, converted small."""
    def shrink(im: Image.Image) -> Image.Image:
        return im.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)

    mode = image.mode
    if mode in _HIGH_BIT_MODES:
        _, peak = image.getextrema()
        peak = float(peak) if peak == peak else 0.0  # NaN
        if mode == "F":
            top = 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0  # [0, 1] floats are common
        else:
            # 16-bit sources use the full 16-bit range, as Pillow does for 48-bit RGB PNGs
            top = 65535.0 if mode.startswith("I;16") or peak > 255 else 255.0
        small = np.nan_to_num(np.asarray(shrink(image.convert("F")), dtype=np.float32), nan=0.0, posinf=top, neginf=0.0)
        gray = np.clip(small * (255.0 / top) + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in image.info):
        small = shrink(image.convert("RGBA"))  # Pillow resizes RGBA premultiplied
        return Image.alpha_composite(Image.new("RGBA", small.size, (0, 0, 0, 255)), small).convert("RGB")
    if mode not in ("RGB", "L"):
        image = image.convert("L" if mode == "1" else "RGB")  # P, CMYK, YCbCr, LAB, HSV, 1
    return shrink(image).convert("RGB")


def _short(exc: BaseException) -> str:
    return (str(exc) or type(exc).__name__).splitlines()[0][:160]


# -- augmentation -------------------------------------------------------------


# -- synthetic anomalies ------------------------------------------------------



"""Image decoding, augmentation and synthetic anomalies: pure numpy / PIL / torchvision.

Everything here works on one image at a time and is deterministic for a seed, so a row
can be traced back to its source file and the exact transform parameters.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, ImageDraw, ImageFile, UnidentifiedImageError

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
    if not data:
        raise DecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # our own max_pixels applies; Pillow's bomb warning would reject below it
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
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
        image.load()
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
                resize_to: int | None = None, resize: str = "stretch") -> np.ndarray:
    """Mask bytes -> bool array (size, size), resized, cropped or padded as :func:`decode_image`
    does; nearest resampling keeps it binary. ``size=None``: the mask at its own full resolution."""
    _check_resize(resize, resize_to)
    mask = _open(data, DecodeLimits(limits.max_pixels, 1), "mask")
    try:
        mask.load()
        mask = mask.convert("L")
        if size is None:
            return np.asarray(mask) > 127
        if resize == "pad":
            box = content_box(mask.size[1], mask.size[0], size)
            small = mask.resize((box[3], box[2]), Image.Resampling.NEAREST)
            return np.asarray(_pad_square(small, box, size, "L")) > 127
        full = max(size, resize_to or size)
        mask = mask.resize((full, full), Image.Resampling.NEAREST)
        return centre_crop(np.asarray(mask), size, resize_to) > 127
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
def sample_augmentation(rng: np.random.Generator, ops: list[str]) -> dict:
    """Draw concrete transform parameters (recorded with the row)."""
    params: dict = {}
    if "hflip" in ops and rng.random() < 0.5:
        params["hflip"] = True
    if "vflip" in ops and rng.random() < 0.5:
        params["vflip"] = True
    if "rot90" in ops:
        params["rot90"] = int(rng.integers(0, 4))
    if "affine" in ops:
        params["affine"] = {"scale": round(float(rng.uniform(0.9, 1.1)), 4),
                            "translate": [int(rng.integers(-8, 9)), int(rng.integers(-8, 9))]}
    if "blur" in ops and rng.random() < 0.3:
        params["blur_sigma"] = round(float(rng.uniform(0.3, 1.2)), 4)
    if "noise" in ops and rng.random() < 0.3:
        params["noise_std"] = round(float(rng.uniform(1.0, 6.0)), 4)
        params["noise_seed"] = int(rng.integers(0, 2**31 - 1))
    if "color" in ops:
        params["brightness"] = round(float(rng.uniform(0.9, 1.1)), 4)
        params["contrast"] = round(float(rng.uniform(0.9, 1.1)), 4)
    return params


def apply_augmentation(image: np.ndarray, params: dict) -> np.ndarray:
    """Apply recorded parameters with torchvision.transforms.v2 (uint8 HWC in and out)."""
    # writable and contiguous (a copy only when needed): torch warns on read-only arrays
    tensor = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)
    if params.get("hflip"):
        tensor = TF.horizontal_flip(tensor)
    if params.get("vflip"):
        tensor = TF.vertical_flip(tensor)
    if params.get("rot90"):
        tensor = torch.rot90(tensor, k=params["rot90"], dims=(1, 2))
    if "affine" in params:
        a = params["affine"]
        tensor = TF.affine(tensor, angle=0.0, translate=a["translate"], scale=a["scale"], shear=[0.0, 0.0],
                           interpolation=TF.InterpolationMode.BILINEAR)
    if "blur_sigma" in params:
        sigma = params["blur_sigma"]
        kernel = max(3, int(2 * math.ceil(3 * sigma) + 1))
        tensor = TF.gaussian_blur(tensor, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    if "brightness" in params:
        tensor = TF.adjust_brightness(tensor, params["brightness"])
    if "contrast" in params:
        tensor = TF.adjust_contrast(tensor, params["contrast"])
    out = tensor.permute(1, 2, 0).numpy()
    if "noise_std" in params:
        noise = np.random.default_rng(params["noise_seed"]).normal(0.0, params["noise_std"], out.shape)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


# -- synthetic anomalies ------------------------------------------------------
def make_synthetic_anomaly(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one local defect; returns (image, bool mask, parameters)."""
    h, w = image.shape[:2]
    out = image.copy()
    if kind == "scratch":
        pil = Image.fromarray(out)
        mask_img = Image.new("L", (w, h), 0)
        n = int(rng.integers(3, 6))
        x0, y0 = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        angle = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.15, 0.35) * min(h, w)
        points = []
        for i in range(n):
            t = i / (n - 1) - 0.5
            bend = rng.normal(0, 0.05) * length
            points.append((x0 + t * length * math.cos(angle) - bend * math.sin(angle),
                           y0 + t * length * math.sin(angle) + bend * math.cos(angle)))
        width = max(2, int(round(rng.uniform(0.008, 0.02) * min(h, w))))
        colour = tuple(int(c) for c in (rng.integers(0, 50, 3) if rng.random() < 0.5 else rng.integers(205, 256, 3)))
        ImageDraw.Draw(pil).line(points, fill=colour, width=width, joint="curve")
        ImageDraw.Draw(mask_img).line(points, fill=255, width=width, joint="curve")
        out, mask = np.asarray(pil).copy(), np.asarray(mask_img) > 0
        params = {"points": [[round(x, 1), round(y, 1)] for x, y in points], "width": width, "colour": colour}
    elif kind == "spot":
        radius = rng.uniform(0.03, 0.08) * min(h, w)
        cy, cx = rng.uniform(radius, h - radius), rng.uniform(radius, w - radius)
        yy, xx = np.mgrid[0:h, 0:w]
        distance = np.sqrt(((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * rng.uniform(0.6, 1.4))) ** 2)
        alpha = np.clip(1.2 - distance, 0, 1)[..., None]
        colour = rng.integers(0, 90, 3).astype(np.float32)
        out = (out * (1 - alpha) + colour * alpha).astype(np.uint8)
        mask = alpha[..., 0] > 0.2
        params = {"center": [round(cy, 1), round(cx, 1)], "radius": round(radius, 1), "colour": colour.tolist()}
    elif kind in ("cutpaste", "missing", "twist"):
        ph, pw = (int(rng.uniform(0.08, 0.2) * h), int(rng.uniform(0.08, 0.2) * w))
        y, x = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
        mask = np.zeros((h, w), bool)
        if kind == "cutpaste":
            sy, sx = int(rng.integers(0, h - ph)), int(rng.integers(0, w - pw))
            patch = image[sy:sy + ph, sx:sx + pw].astype(np.float32)
            patch = patch * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30)
            out[y:y + ph, x:x + pw] = np.clip(np.rot90(patch, k=int(rng.integers(0, 4)))[:ph, :pw]
                                              if ph == pw else patch, 0, 255).astype(np.uint8)
            mask[y:y + ph, x:x + pw] = True
            params = {"box": [y, x, ph, pw], "source": [sy, sx]}
        elif kind == "missing":
            fill = np.median(image.reshape(-1, 3), axis=0) if rng.random() < 0.5 else rng.integers(0, 40, 3)
            out[y:y + ph, x:x + pw] = np.asarray(fill, dtype=np.uint8)
            mask[y:y + ph, x:x + pw] = True
            params = {"box": [y, x, ph, pw], "fill": np.asarray(fill).astype(int).tolist()}
        else:  # a local swirl: pixels inside a disc rotated by an angle falling off with radius
            radius = max(ph, pw) / 1.5
            cy, cx = y + ph / 2, x + pw / 2
            strength = rng.uniform(1.5, 3.0) * (1 if rng.random() < 0.5 else -1)
            yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
            dy, dx = yy - cy, xx - cx
            r = np.sqrt(dy ** 2 + dx ** 2)
            theta = strength * np.clip(1 - r / radius, 0, 1) ** 2
            sy = np.clip(cy + dy * np.cos(theta) - dx * np.sin(theta), 0, h - 1).astype(int)
            sx = np.clip(cx + dy * np.sin(theta) + dx * np.cos(theta), 0, w - 1).astype(int)
            out = image[sy, sx]
            moved = (np.abs(out.astype(int) - image.astype(int)).sum(-1) > 12) & (r < radius)
            mask = moved if moved.any() else (r < radius * 0.5)
            params = {"center": [round(cy, 1), round(cx, 1)], "radius": round(radius, 1),
                      "strength": round(strength, 3)}
    else:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}")
    params["kind"] = kind
    return np.ascontiguousarray(out), mask, params


def params_json(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))


def row_rng(*keys: object) -> np.random.Generator:
    """A generator seeded from stable keys (strings hashed with blake2b, not Python's hash)."""
    import hashlib
    digest = hashlib.blake2b("|".join(map(str, keys)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))

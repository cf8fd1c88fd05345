"""Per-image overlays of a patch detector: image | ground truth | anomaly map | predicted outline.

Composed in numpy and encoded with Pillow (a matplotlib figure per image would cost ~10x more). JPEG
by default: an overlay is for the eye, and on photographs JPEG encodes ~15x faster than even PNG at
level 1 (the maps and predicted masks, which are data, stay lossless: ``.npy`` and PNG).
The image is what the model saw (resized, centre-cropped when configured); the ground truth,
map and predicted mask (``map >= pixel threshold``) are resized onto it
(:func:`~mvtec_ray.evaluation.maps.resize_map`, as the pixel metrics resize). One colour range per
(category, detector) so maps compare across images.
"""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from mvtec_ray.evaluation.maps import resize_map

PANELS = ("image", "ground truth", "anomaly map", "predicted outline")
GAP = 4
#: ``evaluation.overlay_format`` -> file suffix
SUFFIXES = {"jpeg": "jpg", "png": "png"}
HEADER = 28  # two text lines: the caption, then the panel titles


def _outline(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    edge = mask & ~ndimage.binary_erosion(mask)
    return ndimage.binary_dilation(edge)


def render_overlay(image: np.ndarray, truth: np.ndarray, anomaly_map: np.ndarray, threshold: float,
                   vmin: float, vmax: float, caption: str = "", image_format: str = "png") -> bytes:
    """The four panels side by side, encoded as ``image_format`` (``png`` or ``jpeg``; ``image``: uint8 (s, s, 3))."""
    from matplotlib import colormaps
    size = image.shape[0]
    truth = resize_map(truth, (size, size), nearest=True)
    amap = resize_map(anomaly_map, (size, size))
    predicted = amap >= threshold
    base = image.astype(np.float32)

    tinted = base.copy()
    tinted[truth] = 0.45 * tinted[truth] + 0.55 * np.array([255, 0, 0], np.float32)
    scaled = np.clip((amap - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0, 1)
    heat = colormaps["jet"](scaled)[..., :3] * 255
    blended = 0.5 * base + 0.5 * heat
    outlined = base.copy()
    outlined[_outline(truth)] = (0, 220, 0)
    outlined[_outline(predicted)] = (255, 230, 0)

    panels = [base, tinted, blended, outlined]
    canvas = np.full((HEADER + size, len(panels) * size + (len(panels) - 1) * GAP, 3), 255, np.uint8)
    for k, panel in enumerate(panels):
        x = k * (size + GAP)
        canvas[HEADER:, x:x + size] = np.clip(panel, 0, 255).astype(np.uint8)
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    draw.text((2, 1), caption + "   (outline: predicted yellow, truth green)", fill=(0, 0, 0))
    for k, title in enumerate(PANELS):
        draw.text((k * (size + GAP) + 2, 14), title, fill=(0, 0, 0))
    buffer = io.BytesIO()
    if image_format == "jpeg":
        picture.save(buffer, format="JPEG", quality=90)
    else:
        picture.save(buffer, format="PNG", compress_level=1)  # several times faster than 6, still lossless
    return buffer.getvalue()


def overlay_name(detector: str, image_id: str, suffix: str = "png") -> str:
    """``overlays/<detector>/<image id without extension, / as __>-<8 hex>.<suffix>`` (relative to the run
    folder). The 8 hex digits are of the whole image id's sha1, so ``x.png`` and ``x.jpg`` of one
    folder (or ``a/b.png`` and ``a__b.png``) never share an overlay."""
    stem = image_id.rsplit(".", 1)[0] if "." in image_id.rsplit("/", 1)[-1] else image_id
    digest = hashlib.sha1(image_id.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"overlays/{detector}/{stem.replace('/', '__')}-{digest}.{suffix}"

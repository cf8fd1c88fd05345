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

import functools
import hashlib
import io

import numpy as np
from PIL import Image, ImageDraw

from mvtec_ray.evaluation.maps import resize_map

PANELS = ("image", "ground truth", "anomaly map", "predicted outline")
GAP = 4
#: ``evaluation.overlay_format`` -> file suffix
SUFFIXES = {"jpeg": "jpg", "png": "png"}
HEADER = 28  # two text lines: the caption, then the panel titles


def _outline(mask: np.ndarray) -> np.ndarray:
    """The mask's edge (pixels with a 4-neighbour outside it, or on the border), grown by one pixel
    to its 4-neighbours: ``ndimage.binary_erosion`` / ``binary_dilation``'s result with their
    default cross, by array shifts (several times faster on one panel)."""
    if not mask.any():
        return mask
    inner = np.zeros_like(mask)
    inner[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                         & mask[1:-1, :-2] & mask[1:-1, 2:])
    edge = mask & ~inner
    grown = edge.copy()
    grown[1:] |= edge[:-1]
    grown[:-1] |= edge[1:]
    grown[:, 1:] |= edge[:, :-1]
    grown[:, :-1] |= edge[:, 1:]
    return grown


@functools.cache
def _jet() -> np.ndarray:
    """matplotlib's ``jet`` as its 256-entry table (RGB 0-255): indexed as the colormap indexes a
    value in [0, 1] (``min(int(256 v), 255)``)."""
    from matplotlib import colormaps
    return np.round(colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint16)


@functools.cache
def _titles(width: int, size: int) -> np.ndarray:
    """The header's panel-title line (rows ``14:HEADER``), drawn once per canvas size."""
    strip = Image.new("RGB", (width, HEADER - 14), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for k, title in enumerate(PANELS):
        draw.text((k * (size + GAP) + 2, 0), title, fill=(0, 0, 0))
    return np.asarray(strip)


def render_overlay(image: np.ndarray, truth: np.ndarray, anomaly_map: np.ndarray, threshold: float,
                   vmin: float, vmax: float, caption: str = "", image_format: str = "png") -> bytes:
    """The four panels side by side, encoded as ``image_format`` (``png`` or ``jpeg``; ``image``: uint8 (s, s, 3))."""
    size = image.shape[0]
    truth = resize_map(truth, (size, size), nearest=True)
    amap = resize_map(anomaly_map, (size, size))
    predicted = amap >= threshold
    image = np.ascontiguousarray(image, dtype=np.uint8)
    canvas = np.full((HEADER + size, len(PANELS) * size + (len(PANELS) - 1) * GAP, 3), 255, np.uint8)
    image_panel, truth_panel, map_panel, outline_panel = (
        canvas[HEADER:, k * (size + GAP):k * (size + GAP) + size] for k in range(len(PANELS)))
    # composed in uint8 straight into the canvas: no float copies of the image
    image_panel[:] = image
    truth_panel[:] = image
    truth_panel[truth] = (0.45 * image[truth] + np.array([140.25, 0, 0])).astype(np.uint8)  # 55 % red
    scaled = np.clip((amap - vmin) / (vmax - vmin if vmax > vmin else 1.0), 0, 1)
    heat = np.take(_jet(), np.minimum((scaled * 256).astype(np.intp), 255), axis=0)
    map_panel[:] = (image.astype(np.uint16) + heat) >> 1  # half image, half colour map
    outline_panel[:] = image
    outline_panel[_outline(truth)] = (0, 220, 0)
    outline_panel[_outline(predicted)] = (255, 230, 0)
    canvas[14:HEADER] = _titles(canvas.shape[1], size)
    picture = Image.fromarray(canvas)
    ImageDraw.Draw(picture).text((2, 1), caption + "   (outline: predicted yellow, truth green)", fill=(0, 0, 0))
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

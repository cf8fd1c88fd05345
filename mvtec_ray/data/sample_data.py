"""Deterministic synthetic dataset in the exact MVTec AD layout (demo data and tests).

Layout written under ``root``::

    <category>/train/good/000.png ...
    <category>/test/good/000.png ...
    <category>/test/<defect_type>/000.png ...
    <category>/ground_truth/<defect_type>/000_mask.png   (0/255, mode "L")

Normal images vary (texture phase, object pose, noise, exposure) so a detector must
learn "normal"; defects are local (roughly 1-8 % of the image) and have no global
brightness signature, because exposure jitter is applied after the defect is drawn
and is much larger than a defect's effect on the mean.

``SampleSpec(difficulty="hard")`` makes the defects small (0.1-1.5 % of the image),
thin and faint, and normal images vary more (illumination fields, defocus, larger pose
jitter, stronger noise and exposure jitter), so detectors no longer all score 1.0.
The knobs of each level are one ``Difficulty``; ``"standard"`` is the dataset above,
byte for byte.

Every image has its own generator seeded by ``(seed, category, split, index)`` so a
subset of categories reproduces the same bytes as the full set.
"""
from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import gaussian_filter

DEFAULT_CATEGORIES: tuple[str, ...] = ("carpet_like", "washer", "grid_gray")

#: defect types per category, in the order they are generated
DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    "carpet_like": ("color", "contamination", "thread"),
    "washer": ("contamination", "missing_part", "scratch"),
    "grid_gray": ("broken", "contamination", "thread"),
}

#: extra categories, generated only when asked for by name (not part of the default demo set)
EXTRA_DEFECT_TYPES: dict[str, tuple[str, ...]] = {
    # an elongated part (4:1 images) with thin defects: aspect-preserving resizing matters
    "rod_long": ("crack", "scratch", "dent"),
}
ALL_CATEGORIES: tuple[str, ...] = DEFAULT_CATEGORIES + tuple(EXTRA_DEFECT_TYPES)
DEFECT_TYPES.update(EXTRA_DEFECT_TYPES)

#: categories written as 1-channel PNGs (like MVTec's grid / screw / zipper)
GRAYSCALE_CATEGORIES: frozenset[str] = frozenset({"grid_gray"})


@dataclass(frozen=True)
class Difficulty:
    """The knobs of one difficulty level: how big and how strong defects are, how much normal images vary.

    Factors multiply the standard geometry and amplitudes, so the standard level (all factors 1,
    no illumination field, no defocus) draws the same random numbers and does the same
    arithmetic as the generator always did. ``contrast`` fades the defects that add something
    (spots, tints, strokes); removed material (a missing part, broken wires) is only smaller.
    """
    area_bounds: tuple[float, float]      # a defect mask's area (fraction of the image); shapes redrawn until inside
    area_fallback: float                  # when no redraw lands inside: keep the one closest to this area
    blob_area: float                      # multiplies the drawn area of blobs (spots, tints, bites, holes, dents)
    stroke_length: float                  # multiplies the length of scratches, threads and cracks
    stroke_width: float                   # multiplies stroke widths ...
    min_stroke_px: int                    # ... down to this many pixels
    contrast: float                       # multiplies a defect's blend alpha: how far its pixels move
    pose_jitter: float                    # multiplies the object categories' shift / rotation / size jitter
    pixel_noise: float                    # multiplies the per-pixel texture noise of every scene
    lighting: float                       # amplitude of a smooth illumination field (gradient + vignette); 0: none
    defocus_px: tuple[float, float]       # Gaussian blur sigma range in px at 256 px; (0, 0): none
    exposure_gain: tuple[float, float]    # exposure jitter, applied after the defect like a camera
    exposure_offset: float


DIFFICULTIES: dict[str, Difficulty] = {
    "standard": Difficulty(area_bounds=(0.006, 0.085), area_fallback=0.03, blob_area=1.0,
                           stroke_length=1.0, stroke_width=1.0, min_stroke_px=3, contrast=1.0,
                           pose_jitter=1.0, pixel_noise=1.0, lighting=0.0, defocus_px=(0.0, 0.0),
                           exposure_gain=(0.9, 1.1), exposure_offset=0.02),
    # subtle defects on images that vary more, like real inspection data
    "hard": Difficulty(area_bounds=(0.001, 0.015), area_fallback=0.005, blob_area=0.3,
                       stroke_length=0.6, stroke_width=0.6, min_stroke_px=2, contrast=0.5,
                       pose_jitter=3.0, pixel_noise=1.5, lighting=0.12, defocus_px=(0.0, 0.8),
                       exposure_gain=(0.85, 1.15), exposure_offset=0.04),
}
STANDARD = DIFFICULTIES["standard"]


@dataclass(frozen=True)
class SampleSpec:
    n_train: int = 40
    n_test_good: int = 10
    n_test_defect_per_type: int = 6
    size: int = 256
    difficulty: Literal["standard", "hard"] = "standard"

    def __post_init__(self) -> None:
        for name in ("n_train", "n_test_good", "n_test_defect_per_type"):
            if getattr(self, name) < 0:
                raise ValueError(f"SampleSpec.{name} must be >= 0")
        # geometry scales with size; below 64 px the defects become a few pixels
        if not 64 <= self.size <= 2048:
            raise ValueError("SampleSpec.size must be in [64, 2048] (256..512 intended)")
        if self.difficulty not in DIFFICULTIES:
            raise ValueError(f"SampleSpec.difficulty must be one of {list(DIFFICULTIES)}, "
                             f"not {self.difficulty!r}")


# ----------------------------------------------------------------------------- helpers

def _rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    # crc32 is stable across processes, unlike hash()
    key = [seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index]
    return np.random.default_rng(key)


def _grid(s: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    return xx, yy


def _smooth_noise(rng: np.random.Generator, s: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-std low-frequency noise: a ``cells x cells`` field upsampled."""
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    arr = np.asarray(Image.fromarray(small).resize((s, s), Image.BICUBIC), dtype=np.float32)
    return (arr - arr.mean()) / (arr.std() + 1e-6)


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
    """Gaussian blur of a [0, 1] float map via PIL (fast, C)."""
    if radius <= 0:
        return a.astype(np.float32)
    img = Image.fromarray((np.clip(a, 0, 1) * 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) / 255.0


def _blob(rng: np.random.Generator, s: int, center: tuple[float, float], area: float) -> np.ndarray:
    """Irregular filled blob (bool mask) of roughly ``area`` (fraction of the image)."""
    xx, yy = _grid(s)
    r0 = np.sqrt(area * s * s / np.pi)
    dx, dy = xx - center[0], yy - center[1]
    theta = np.arctan2(dy, dx)
    stretch = rng.uniform(0.7, 1.0)  # slightly elongated
    rot = rng.uniform(0, np.pi)
    u = dx * np.cos(rot) + dy * np.sin(rot)
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) / stretch
    radius = np.full_like(theta, r0)
    for k in (2, 3, 5):  # wobbly outline, not a perfect ellipse
        radius += r0 * rng.uniform(0.04, 0.14) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(u, v) < radius * np.sqrt(stretch)


def _curve(rng: np.random.Generator, s: int, start: tuple[float, float], length: float,
           width: int) -> np.ndarray:
    """A curved stroke (quadratic Bezier) of given chord length and width, as a bool mask."""
    ang = rng.uniform(0, 2 * np.pi)
    p0 = np.array(start, dtype=np.float64)
    p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
    normal = np.array([-np.sin(ang), np.cos(ang)])
    p1 = (p0 + p2) / 2 + normal * length * rng.uniform(-0.35, 0.35)
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    img = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(img)
    draw.line([tuple(p) for p in pts], fill=255, width=width, joint="curve")
    r = width / 2  # round caps
    for p in (pts[0], pts[-1]):
        draw.ellipse([p[0] - r, p[1] - r, p[0] + r, p[1] + r], fill=255)
    return np.asarray(img) > 127


def _sample_mask(rng: np.random.Generator, make: Callable[[], np.ndarray],
                 allowed: np.ndarray | None = None, level: Difficulty = STANDARD) -> np.ndarray:
    """Redraw ``make()`` until its (allowed) area is within the level's defect area bounds."""
    best = None
    lo, hi = level.area_bounds
    target = level.area_fallback
    for _ in range(40):
        m = make()
        if allowed is not None:
            m = m & allowed
        frac = m.mean()
        if lo <= frac <= hi and m.any():
            return m
        if m.any() and (best is None or abs(frac - target) < abs(best.mean() - target)):
            best = m
    assert best is not None and best.any()
    return best


def _lum(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 2 else img @ np.array([0.299, 0.587, 0.114], np.float32)


def _blend(img: np.ndarray, alpha: np.ndarray, target: np.ndarray) -> np.ndarray:
    a = alpha if img.ndim == 2 else alpha[..., None]
    return img * (1 - a) + target * a


# ----------------------------------------------------------------------------- scenes
# Each renderer returns (image float32 in ~[0, 1], HxW or HxWx3; region where defects go;
# the pure background, for "missing part" style defects).

def _carpet(rng: np.random.Generator, s: int, level: Difficulty = STANDARD):
    xx, yy = _grid(s)
    ang = np.deg2rad(rng.uniform(-4, 4))
    period = s / 21.0 * rng.uniform(0.96, 1.04)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    warp = 0.6 * period * _smooth_noise(rng, s, 4)  # gentle waviness of the weave
    ph1, ph2 = rng.uniform(0, 2 * np.pi, 2)
    weave = np.sin(2 * np.pi * (u + warp) / period + ph1) * np.sin(2 * np.pi * (v - warp) / period + ph2)
    fibres = _blur(0.5 + 0.18 * level.pixel_noise * rng.standard_normal((s, s)), 0.8) - 0.5
    lum = (0.52 + 0.10 * weave + 0.05 * _smooth_noise(rng, s, 6)
           + 0.6 * fibres).astype(np.float32)
    base = np.array([0.78, 0.55, 0.40], np.float32) * rng.uniform(0.97, 1.03, 3).astype(np.float32)
    img = lum[..., None] * (base / base.mean())
    return img, np.ones((s, s), bool), None


def _washer(rng: np.random.Generator, s: int, level: Difficulty = STANDARD):
    xx, yy = _grid(s)
    noise, jit = level.pixel_noise, level.pose_jitter
    # conveyor-belt background
    bg_l = (0.20 + 0.03 * _smooth_noise(rng, s, 3)
            + 0.015 * noise * rng.standard_normal((s, s)).astype(np.float32))
    bg = bg_l[..., None] * np.array([0.9, 1.05, 1.0], np.float32)
    # fixed pose with small jitter
    cx, cy = s / 2 + rng.uniform(-0.025 * jit, 0.025 * jit, 2) * s
    rot = np.deg2rad(rng.uniform(-6 * jit, 6 * jit))
    r_out = 0.38 * s * rng.uniform(1 - 0.015 * jit, 1 + 0.015 * jit)
    r_in = 0.17 * s * rng.uniform(1 - 0.015 * jit, 1 + 0.015 * jit)
    dx, dy = xx - cx, yy - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx) - rot
    phi_w = (phi + np.pi) % (2 * np.pi) - np.pi
    # anti-aliased ring with a notch at the top-right that fixes the orientation
    alpha = np.clip(r_out - r + 0.5, 0, 1) * np.clip(r - r_in + 0.5, 0, 1)
    notch = (np.abs(phi_w + np.pi / 4) * r < 0.045 * s) & (r > r_out - 0.07 * s)
    alpha = np.where(notch, 0.0, alpha).astype(np.float32)
    # brushed metal: lit from one side, concentric tool marks
    rn = (r - r_in) / (r_out - r_in)
    light = 0.12 * np.cos(phi - rng.uniform(-0.3, 0.3) - 2.2)
    marks = 0.03 * np.sin(2 * np.pi * r / (0.012 * s) + rng.uniform(0, 2 * np.pi))
    bevel = -0.08 * (np.exp(-((rn - 0.0) / 0.08) ** 2) + np.exp(-((rn - 1.0) / 0.08) ** 2))
    metal_l = (0.62 + light + marks + bevel + 0.03 * _smooth_noise(rng, s, 8)
               + 0.02 * noise * rng.standard_normal((s, s))).astype(np.float32)
    metal = metal_l[..., None] * np.array([1.02, 1.0, 0.96], np.float32)
    # soft drop shadow under the part
    shadow = 1 - 0.35 * _blur(np.roll(np.roll(alpha, int(0.012 * s), 0), int(0.012 * s), 1), 0.02 * s)
    bg = bg * shadow[..., None]
    img = _blend(bg, alpha, metal)
    return img, alpha > 0.5, (bg, alpha, metal)


def _grid_gray(rng: np.random.Generator, s: int, level: Difficulty = STANDARD):
    xx, yy = _grid(s)
    ang = np.deg2rad(rng.uniform(-3, 3))
    period = s / 11.0 * rng.uniform(0.97, 1.03)
    u = xx * np.cos(ang) + yy * np.sin(ang)
    v = -xx * np.sin(ang) + yy * np.cos(ang)
    wob = 0.08 * period * _smooth_noise(rng, s, 3)  # wires are not perfectly straight
    half = 0.16 * period

    def wire(coord: np.ndarray, phase: float) -> np.ndarray:
        d = np.abs(((coord + wob + phase) % period) - period / 2)  # distance to wire centre
        return np.sqrt(np.clip(1 - (d / half) ** 2, 0, 1))  # round cross-section

    w = np.maximum(wire(u, rng.uniform(0, period)), wire(v, rng.uniform(0, period)))
    noise = level.pixel_noise
    bg = (0.16 + 0.04 * _smooth_noise(rng, s, 4)
          + 0.02 * noise * rng.standard_normal((s, s))).astype(np.float32)
    metal = 0.74 + 0.05 * _smooth_noise(rng, s, 10) + 0.03 * noise * rng.standard_normal((s, s))
    img = bg + (metal - bg) * w
    return img.astype(np.float32), np.ones((s, s), bool), (bg, w, metal)


def _rod_long(rng: np.random.Generator, s: int, level: Difficulty = STANDARD):
    """A machined rod lying along a 2s x s/2 image (4:1), in a fixed pose with small jitter."""
    h, w = s // 2, 2 * s
    noise, jit = level.pixel_noise, level.pose_jitter
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    bg_l = (0.18 + 0.03 * _smooth_noise(rng, w, 4)[:h]
            + 0.015 * noise * rng.standard_normal((h, w)).astype(np.float32))
    bg = bg_l[..., None] * np.array([1.0, 1.0, 1.05], np.float32)
    cy = h / 2 + rng.uniform(-0.03 * jit, 0.03 * jit) * h
    half = 0.17 * h * rng.uniform(1 - 0.02 * jit, 1 + 0.02 * jit)   # rod radius
    x0 = w * (0.05 + rng.uniform(-0.008 * jit, 0.008 * jit))
    x1 = w * (0.95 + rng.uniform(-0.008 * jit, 0.008 * jit))
    tilt = np.deg2rad(rng.uniform(-0.6 * jit, 0.6 * jit))
    d = (yy - cy) - (xx - w / 2) * np.tan(tilt)         # signed distance to the axis
    ends = np.minimum(xx - x0, x1 - xx)                  # rounded caps
    inside = np.clip(half - np.abs(d) + 0.5, 0, 1) * np.clip(ends + 0.5, 0, 1)
    t = np.clip(d / half, -1, 1)
    shade = 0.45 + 0.30 * np.sqrt(np.clip(1 - t ** 2, 0, 1)) + 0.18 * np.exp(-((t + 0.35) / 0.12) ** 2)
    grooves = 0.025 * np.sin(2 * np.pi * xx / (0.03 * s) + rng.uniform(0, 2 * np.pi))
    metal_l = (shade + grooves + 0.02 * noise * rng.standard_normal((h, w))).astype(np.float32)
    metal = metal_l[..., None] * np.array([1.0, 0.98, 0.94], np.float32)
    img = _blend(bg, inside.astype(np.float32), metal)
    region = inside > 0.5
    return img.astype(np.float32), region, (cy, half, x0, x1, tilt)


def _rod_defect(defect: str, rng: np.random.Generator, img: np.ndarray, region: np.ndarray,
                extra, s: int, level: Difficulty = STANDARD) -> tuple[np.ndarray, np.ndarray]:
    """Thin defects on the rod: a crack across it, a long fine scratch along it, a small dent."""
    length, width = level.stroke_length, level.stroke_width
    h, w = region.shape
    cy, half, x0, x1, tilt = extra
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    x = float(rng.uniform(x0 + 0.1 * (x1 - x0), x1 - 0.1 * (x1 - x0)))
    yc = cy + (x - w / 2) * np.tan(tilt)
    if defect == "crack":      # 2-3 px wide, across most of the rod's width
        y0, y1 = yc - half * rng.uniform(0.5, 0.9) * length, yc + half * rng.uniform(0.5, 0.9) * length
        pts = [(x + rng.normal(0, 1.5), y) for y in np.linspace(y0, y1, 6)]
        draw.line(pts, fill=255, width=max(2, round(int(rng.integers(2, 4)) * width)))  # 2 px: the floor
        colour = np.float32(0.06)
    elif defect == "scratch":  # 2 px wide, long, along the rod
        extent = rng.uniform(0.12, 0.25) * (x1 - x0) * length
        y = yc + rng.uniform(-0.6, 0.6) * half
        pts = [(xi, y + rng.normal(0, 0.8)) for xi in np.linspace(x - extent / 2, x + extent / 2, 8)]
        draw.line(pts, fill=255, width=max(2, round(2 * width)))
        colour = np.float32(0.95)
    elif defect == "dent":     # a small dark pit
        r = rng.uniform(0.15, 0.3) * half * np.sqrt(level.blob_area)
        y = yc + rng.uniform(-0.5, 0.5) * half
        draw.ellipse([x - r, y - r * rng.uniform(0.6, 1.0), x + r, y + r * rng.uniform(0.6, 1.0)], fill=255)
        colour = np.float32(0.10)
    else:
        raise ValueError(f"unknown defect type {defect!r} for category 'rod_long'")
    mask = (np.asarray(canvas) > 127) & region
    if not mask.any():  # never an empty mask: keep the stroke where it missed the part
        mask = np.asarray(canvas) > 127
    alpha = np.maximum(_blur(mask.astype(np.float32), 0.5), mask) * 0.9 * level.contrast
    return _blend(img, alpha, colour * np.ones(3, np.float32)), mask


_SCENES = {"carpet_like": _carpet, "washer": _washer, "grid_gray": _grid_gray, "rod_long": _rod_long}


# ----------------------------------------------------------------------------- defects

def _random_point(rng: np.random.Generator, region: np.ndarray, margin: int) -> tuple[float, float]:
    inner = np.zeros_like(region)
    inner[margin:-margin, margin:-margin] = region[margin:-margin, margin:-margin]
    ys, xs = np.nonzero(inner if inner.any() else region)
    i = rng.integers(len(xs))
    return float(xs[i]), float(ys[i])


def _stroke(rng, img, region, s, width_frac, length_frac, colour_fn, level: Difficulty):
    """Scratch / thread: several-px-wide curved line, brighter or darker than the surface."""
    width = max(level.min_stroke_px, int(round(s * rng.uniform(*width_frac) * level.stroke_width)))
    mask = _sample_mask(rng, lambda: _curve(rng, s, _random_point(rng, region, s // 8),
                                            s * rng.uniform(*length_frac) * level.stroke_length, width),
                        region, level)
    alpha = np.maximum(_blur(mask.astype(np.float32), 0.7), mask)  # solid core, soft edge
    return _blend(img, alpha * 0.9 * level.contrast, colour_fn(img)), mask


def _spot(rng, img, region, s, tint, level: Difficulty):
    """Contamination: dark (or bright) blob with soft edges and a mottled inside."""
    mask = _sample_mask(rng, lambda: _blob(rng, s, _random_point(rng, region, s // 6),
                                           rng.uniform(0.015, 0.05) * level.blob_area), region, level)
    alpha = _blur(mask.astype(np.float32), 0.012 * s)
    alpha = np.where(mask, np.maximum(alpha, 0.55), alpha * 0.6)  # visible core, soft rim
    mottle = 1 + 0.25 * _smooth_noise(rng, s, 24)
    target = (tint * mottle[..., None]) if img.ndim == 3 else tint * mottle
    return _blend(img, alpha * 0.92 * level.contrast, target.astype(np.float32)), mask


def _apply_defect(category: str, defect: str, rng: np.random.Generator, img: np.ndarray,
                  region: np.ndarray, extra, s: int,
                  level: Difficulty = STANDARD) -> tuple[np.ndarray, np.ndarray]:
    polarity = rng.choice([-1.0, 1.0])
    if defect == "contamination":
        if img.ndim == 3:
            dark = np.array([0.16, 0.11, 0.07], np.float32)
            bright = np.array([0.92, 0.90, 0.84], np.float32)
        else:
            dark, bright = np.float32(0.05), np.float32(0.95)
        return _spot(rng, img, region, s, dark if polarity < 0 else bright, level)

    if defect in ("thread", "scratch"):
        if defect == "thread" and img.ndim == 3:  # a stray fibre of another colour
            col = np.array([[0.85, 0.82, 0.70], [0.20, 0.22, 0.35]][int(polarity > 0)], np.float32)
            fn = lambda im: np.broadcast_to(col, im.shape)
        else:
            fn = lambda im: np.clip(im + 0.38 * polarity, 0.02, 0.98)
        width = (0.018, 0.028) if defect == "scratch" else (0.015, 0.024)
        return _stroke(rng, img, region, s, width, (0.4, 0.65), fn, level)

    if defect == "color":
        # hue change with the luminance kept: invisible to a brightness statistic
        mask = _sample_mask(rng, lambda: _blob(rng, s, _random_point(rng, region, s // 6),
                                               rng.uniform(0.02, 0.06) * level.blob_area), level=level)
        alpha = np.where(mask, 1.0, _blur(mask.astype(np.float32), 0.006 * s) * 0.5)
        tints = np.array([[0.35, 0.55, 1.35], [0.45, 1.25, 0.55], [1.45, 0.55, 0.75]], np.float32)
        tint = tints[rng.integers(len(tints))]
        tint = tint / (tint @ np.array([0.299, 0.587, 0.114], np.float32))
        target = _lum(img)[..., None] * tint
        return _blend(img, alpha.astype(np.float32) * 0.9 * level.contrast, target), mask

    if defect == "missing_part":
        bg, alpha, metal = extra

        def chunk() -> np.ndarray:
            # a bite out of the rim: blob centred on the outer edge
            ys, xs = np.nonzero(region)
            cy, cx = ys.mean(), xs.mean()
            r_out = np.sqrt(region.sum() / np.pi + (0.17 * s) ** 2)
            a = rng.uniform(0, 2 * np.pi)
            c = (cx + r_out * np.cos(a), cy + r_out * np.sin(a))
            return _blob(rng, s, c, rng.uniform(0.03, 0.07) * level.blob_area)

        mask = _sample_mask(rng, chunk, region, level)
        cut = np.maximum(_blur(mask.astype(np.float32), 0.6), mask)
        new_alpha = alpha * (1 - cut)
        return _blend(bg, new_alpha, metal), mask

    if defect == "broken":
        bg, w, metal = extra
        mask = _sample_mask(rng, lambda: _blob(rng, s, _random_point(rng, region, s // 6),
                                               rng.uniform(0.015, 0.04) * level.blob_area), level=level)
        # wires torn: removed inside, frayed bright ends bent around the hole's rim
        rim = _blur(mask.astype(np.float32), 0.01 * s) * (~mask)
        w2 = w * (1 - mask) + np.clip(rim * 1.6, 0, 1) * w.max() * 0.5 * (~mask)
        w2 = np.clip(w2, 0, 1)
        return (bg + (metal - bg) * w2).astype(np.float32), mask

    raise ValueError(f"unknown defect type {defect!r} for category {category!r}")


# ----------------------------------------------------------------------------- rendering

def _illumination(rng: np.random.Generator, shape: tuple[int, int], strength: float) -> np.ndarray:
    """A smooth gain field around 1: a linear gradient in a random direction and an off-centre vignette."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx - w / 2) / max(h, w), (yy - h / 2) / max(h, w)  # about [-0.5, 0.5]
    ang = rng.uniform(0, 2 * np.pi)
    gradient = 2 * (u * np.cos(ang) + v * np.sin(ang))
    cx, cy = rng.uniform(-0.25, 0.25, 2)
    vignette = 0.25 - 2 * ((u - cx) ** 2 + (v - cy) ** 2)  # bright near its centre, dark at the corners
    gain, fall = rng.uniform(0.2, 1.0, 2)
    return (1 + strength * (gain * gradient + fall * vignette)).astype(np.float32)


def _camera(rng: np.random.Generator, img: np.ndarray, s: int, level: Difficulty) -> np.ndarray:
    """What the camera adds after the scene (and its defect): illumination, defocus, exposure jitter."""
    if level.lighting > 0:
        field = _illumination(rng, img.shape[:2], level.lighting)
        img = img * (field if img.ndim == 2 else field[..., None])
    if level.defocus_px[1] > 0:
        sigma = rng.uniform(*level.defocus_px) * s / 256
        img = gaussian_filter(img, sigma=(sigma, sigma) + (0,) * (img.ndim - 2), mode="nearest")
    # exposure jitter after the defect: dwarfs any defect's effect on the mean
    gain = rng.uniform(*level.exposure_gain)
    return img * np.float32(gain) + np.float32(rng.uniform(-level.exposure_offset, level.exposure_offset))


def _render(category: str, rng: np.random.Generator, s: int, defect: str | None,
            level: Difficulty = STANDARD):
    img, region, extra = _SCENES[category](rng, s, level)
    mask = None
    if defect is not None and category == "rod_long":
        img, mask = _rod_defect(defect, rng, img, region, extra, s, level)
    elif defect is not None:
        img, mask = _apply_defect(category, defect, rng, img, region, extra, s, level)
    img = _camera(rng, img, s, level)
    out = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out, mask


def _save_png(arr: np.ndarray, path: Path) -> None:
    # compress_level 1: several times faster than the default, PNG is still lossless
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def _name(i: int, n: int) -> str:
    return f"{i:0{max(3, len(str(max(n - 1, 0))))}d}"


def generate_sample_dataset(root: str | Path, categories: Iterable[str] | None = None,
                            seed: int = 0, spec: SampleSpec = SampleSpec(),
                            overwrite: bool = False) -> dict:
    """Write a synthetic MVTec-AD-layout dataset under ``root``.

    Returns ``{category: {"train": n, "test_good": n, "test_defect": {type: n}}}``.
    An existing non-empty category folder raises ``FileExistsError`` unless
    ``overwrite`` (then that category folder is replaced).
    """
    cats = tuple(DEFAULT_CATEGORIES if categories is None else categories)
    unknown = [c for c in cats if c not in _SCENES]
    if unknown:
        raise ValueError(f"unknown categories {unknown}; known: {list(ALL_CATEGORIES)}")
    if int(seed) != seed or seed < 0:
        raise ValueError("seed must be a non-negative integer")
    seed = int(seed)
    root = Path(root)
    s = spec.size
    level = DIFFICULTIES[spec.difficulty]
    summary: dict = {}
    for cat in dict.fromkeys(cats):  # de-duplicate, keep order
        cdir = root / cat
        if cdir.exists() and any(cdir.iterdir()):
            if not overwrite:
                raise FileExistsError(f"{cdir} exists and is not empty (pass overwrite=True)")
            shutil.rmtree(cdir)
        gray = cat in GRAYSCALE_CATEGORIES

        def write(split: str, n: int, defect: str | None) -> None:
            out = cdir / split
            out.mkdir(parents=True, exist_ok=True)
            if defect is not None:
                gt = cdir / "ground_truth" / defect
                gt.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr, mask = _render(cat, _rng(seed, cat, split, i), s, defect, level)
                if gray and arr.ndim == 3:
                    arr = np.asarray(Image.fromarray(arr).convert("L"))
                _save_png(arr, out / f"{_name(i, n)}.png")
                if mask is not None:
                    _save_png(mask.astype(np.uint8) * 255, gt / f"{_name(i, n)}_mask.png")

        write("train/good", spec.n_train, None)
        write("test/good", spec.n_test_good, None)
        for d in DEFECT_TYPES[cat]:
            write(f"test/{d}", spec.n_test_defect_per_type, d)
        summary[cat] = {"train": spec.n_train, "test_good": spec.n_test_good,
                        "test_defect": {d: spec.n_test_defect_per_type for d in DEFECT_TYPES[cat]}}
    return summary

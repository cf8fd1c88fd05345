"""Synthetic defects with masks, drawn on held-out normal images for validation."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import uniform_filter

from mvtec_ray.data.noise import foreign_texture, fractal_noise


def make_synthetic_anomaly(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """Draw one local defect of ``kind``; returns (image, bool mask, parameters ready for JSON).

    Kinds: scratch, spot, cutpaste, twist, missing (the branches below); perlin (DRAEM), scar (CutPaste-scar),
    crack and blob (small low-contrast defects), each a function at the end of the module.
    """
    if kind in _KIND_FUNCTIONS:
        out, mask, params = _KIND_FUNCTIONS[kind](image, rng)
        return np.ascontiguousarray(out), mask, {**params, "kind": kind}
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


def row_rng(*keys: object) -> np.random.Generator:
    """A generator seeded from stable keys (strings hashed with blake2b, not Python's hash)."""
    import hashlib
    digest = hashlib.blake2b("|".join(map(str, keys)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


# -- the literature's kinds (DRAEM, CutPaste) and small low-contrast defects, one function each --------------
def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def _signs_with_headroom(levels: np.ndarray, rng: np.random.Generator, p_dark: float = 0.5) -> tuple[np.ndarray, int]:
    """-1 (darker) or +1 (lighter) per brightness level: one random choice, turned towards the side with room
    where there is none (a lighter line on white would be clipped away, a label on unchanged pixels)."""
    sign = -1 if rng.random() < p_dark else 1
    return np.where(levels > 200, -1.0, np.where(levels < 55, 1.0, float(sign))).astype(np.float32), sign


def _perlin(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """DRAEM: Perlin noise thresholded into an irregular region, a foreign texture blended in with opacity beta."""
    h, w = image.shape[:2]
    noise_seed = int(rng.integers(2 ** 31))  # recorded: the region can be redrawn from the parameters
    base_cells, octaves = int(2 ** rng.integers(1, 4)), int(rng.integers(3, 5))
    noise = fractal_noise((h, w), base_cells, octaves, np.random.default_rng(noise_seed))
    area = float(np.exp(rng.uniform(np.log(0.005), np.log(0.08))))  # log-uniform: small regions as often as large
    threshold = float(np.quantile(noise, 1 - area))  # the quantile lands the area in range, no retries
    mask = noise > threshold
    if not mask.any():  # a tiny image: the peak pixel at least
        mask = noise >= noise.max()
    beta = float(rng.uniform(0.2, 0.8))
    texture, texture_params = foreign_texture(image, rng)
    out = image.copy()
    out[mask] = _to_uint8((1 - beta) * image[mask] + beta * texture[mask])
    return out, mask, {"noise_seed": noise_seed, "base_cells": base_cells, "octaves": octaves,
                       "threshold": round(threshold, 4), "area": round(float(mask.mean()), 4),
                       "beta": round(beta, 3), "texture": texture_params}


def _scar(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """CutPaste-scar: a long thin strip cut out, colour-jittered, rotated and pasted elsewhere."""
    h, w = image.shape[:2]
    side = min(h, w)
    width = max(2, round(float(rng.uniform(0.01, 0.06)) * side))
    length = min(w, max(2 * width, round(float(rng.uniform(0.05, 0.2)) * side)))
    sy, sx = int(rng.integers(0, h - width + 1)), int(rng.integers(0, w - length + 1))
    patch = image[sy:sy + width, sx:sx + length].astype(np.float32)
    gain = rng.uniform(0.85, 1.15, 3)
    signs, sign = _signs_with_headroom(patch.mean(-1, keepdims=True), rng)
    offset = float(rng.uniform(10, 40))
    patch = patch * gain.astype(np.float32) + signs * offset
    angle = float(rng.uniform(0, np.pi))
    cos, sin = np.cos(angle), np.sin(angle)
    half_y = abs(length / 2 * sin) + abs(width / 2 * cos)  # half extents of the rotated strip
    half_x = abs(length / 2 * cos) + abs(width / 2 * sin)
    cy = float(rng.uniform(half_y, h - half_y)) if h > 2 * half_y else h / 2
    cx = float(rng.uniform(half_x, w - half_x)) if w > 2 * half_x else w / 2
    # every target pixel in strip coordinates (u along the strip, v across): inside -> the patch pixel there
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xx + 0.5 - cx) * cos + (yy + 0.5 - cy) * sin
    v = -(xx + 0.5 - cx) * sin + (yy + 0.5 - cy) * cos
    mask = (np.abs(u) < length / 2) & (np.abs(v) < width / 2)
    pu = np.clip(np.floor(u[mask] + length / 2).astype(int), 0, length - 1)
    pv = np.clip(np.floor(v[mask] + width / 2).astype(int), 0, width - 1)
    out = image.copy()
    out[mask] = _to_uint8(patch[pv, pu])
    return out, mask, {"source": [sy, sx], "width": width, "length": length, "center": [round(cy, 1), round(cx, 1)],
                       "angle_deg": round(float(np.degrees(angle)), 1), "gain": np.round(gain, 3).tolist(),
                       "offset": round(offset * sign, 1)}


def _meander(start: tuple[float, float], heading: float, length: float, steps: int, rng: np.random.Generator,
             h: int, w: int) -> list[tuple[float, float]]:
    """A polyline (x, y) that wanders: every step turns the heading a little; it bounces off the image's edges."""
    points, (x, y) = [start], start
    for _ in range(steps):
        heading += float(rng.normal(0, 0.45))
        dx, dy = length / steps * np.cos(heading), length / steps * np.sin(heading)
        if not 0 <= x + dx <= w - 1:
            dx, heading = -dx, np.pi - heading
        if not 0 <= y + dy <= h - 1:
            dy, heading = -dy, -heading
        x, y = float(np.clip(x + dx, 0, w - 1)), float(np.clip(y + dy, 0, h - 1))
        points.append((x, y))
    return points


def _crack(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """A thin meandering line with 0-2 short branches, a little darker (or lighter) than the surface around it."""
    h, w = image.shape[:2]
    side = min(h, w)
    width = max(1, round(float(rng.uniform(0.004, 0.013)) * side))
    length = float(rng.uniform(0.2, 0.5)) * side
    heading = float(rng.uniform(0, 2 * np.pi))
    start = (float(rng.uniform(0.15, 0.85)) * w, float(rng.uniform(0.15, 0.85)) * h)
    trunk = _meander(start, heading, length, int(rng.integers(6, 12)), rng, h, w)
    branches = []
    for _ in range(int(rng.integers(0, 3))):
        at = int(rng.integers(1, len(trunk) - 1))
        along = np.arctan2(trunk[at + 1][1] - trunk[at][1], trunk[at + 1][0] - trunk[at][0])  # the trunk's direction
        turn = float(rng.uniform(0.5, 1.2)) * (1 if rng.random() < 0.5 else -1)
        branches.append(_meander(trunk[at], float(along) + turn, length * float(rng.uniform(0.2, 0.4)),
                                 int(rng.integers(2, 5)), rng, h, w))
    mask_img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask_img)
    for line, line_width in [(trunk, width)] + [(branch, max(1, width - 1)) for branch in branches]:
        draw.line(line, fill=255, width=line_width, joint="curve" if line_width > 1 else None)
    mask = np.asarray(mask_img) > 0
    # the change is a fraction of the local brightness: a crack in a dark part stays dark-on-dark
    local = uniform_filter(image.mean(-1, dtype=np.float32), size=max(3, side // 16))
    contrast = float(rng.uniform(0.1, 0.35))
    signs, sign = _signs_with_headroom(local[mask], rng, p_dark=0.75)
    delta = signs * np.maximum(contrast * local[mask], 4.0)
    out = image.copy()
    out[mask] = _to_uint8(image[mask] + delta[:, None])
    rounded = [[[round(x, 1), round(y, 1)] for x, y in line] for line in [trunk] + branches]
    return out, mask, {"points": rounded[0], "branches": rounded[1:], "width": width,
                       "contrast": round(contrast * sign, 3)}


def _blob(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """One to three small irregular blobs with soft edges, shaded or tinted (blowholes, small stains)."""
    h, w = image.shape[:2]
    side = min(h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    pixels = image.astype(np.float32)
    mode = ("shade", "shade", "tint")[int(rng.integers(3))]
    alpha, shade, blobs = np.zeros((h, w), np.float32), np.zeros((h, w), np.float32), []
    for _ in range(int(rng.integers(1, 4))):
        radius = max(1.5, float(rng.uniform(0.01, 0.03)) * side)
        cy, cx = float(rng.uniform(radius, h - radius)), float(rng.uniform(radius, w - radius))
        lobes, phases = rng.uniform(0, 0.25, 2), rng.uniform(0, 2 * np.pi, 2)  # an irregular outline, not a disc
        phi = np.arctan2(yy - cy, xx - cx)
        outline = radius * (1 + lobes[0] * np.cos(2 * phi + phases[0]) + lobes[1] * np.cos(3 * phi + phases[1]))
        s = np.clip((1.15 - np.hypot(yy - cy, xx - cx) / outline) / 0.65, 0, 1)  # 1 inside, 0 past the outline
        blob_alpha = s * s * (3 - 2 * s)
        blob = {"center": [round(cy, 1), round(cx, 1)], "radius": round(radius, 2), "lobes": np.round(lobes, 3).tolist()}
        if mode == "shade":  # each blob darker or lighter than the surface under it, by a fraction of its brightness
            level = float(pixels[blob_alpha > 0.15].mean())
            signs, _ = _signs_with_headroom(np.asarray(level), rng)
            amount = float(signs) * max(float(rng.uniform(0.15, 0.45)) * level, 12.0)
            shade += blob_alpha * amount
            blob["amount"] = round(amount, 1)
        alpha = np.maximum(alpha, blob_alpha)
        blobs.append(blob)
    if mode == "shade":
        out, params = pixels + shade[..., None], {}
    else:
        colour, strength = rng.integers(0, 256, 3).astype(np.float32), float(rng.uniform(0.35, 0.7))
        out = pixels + alpha[..., None] * strength * (colour - pixels)
        params = {"colour": colour.tolist(), "strength": round(strength, 3)}
    return _to_uint8(out), alpha > 0.15, {"blobs": blobs, "mode": mode, **params}


_KIND_FUNCTIONS = {"perlin": _perlin, "scar": _scar, "crack": _crack, "blob": _blob}

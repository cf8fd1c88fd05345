"""Synthetic defects with masks, drawn on held-out normal images for validation."""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


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


def row_rng(*keys: object) -> np.random.Generator:
    """A generator seeded from stable keys (strings hashed with blake2b, not Python's hash)."""
    import hashlib
    digest = hashlib.blake2b("|".join(map(str, keys)).encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))

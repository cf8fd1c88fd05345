"""Fractal Perlin noise and procedural textures for the synthetic defects (numpy only)."""
from __future__ import annotations

import numpy as np


def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at the lattice points
    return t * t * t * (t * (t * 6 - 15) + 10)


def perlin_noise(shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """One octave of gradient noise over ``shape``, with ``cells`` lattice cells per side; about [-0.7, 0.7]."""
    h, w = shape
    cy, cx = max(1, int(cells[0])), max(1, int(cells[1]))
    angles = rng.uniform(0, 2 * np.pi, (cy + 1, cx + 1))
    gy, gx = np.sin(angles), np.cos(angles)
    # pixel centres in lattice units; any shape works, the cells need not divide it
    y = (np.arange(h) + 0.5) * cy / h
    x = (np.arange(w) + 0.5) * cx / w
    iy, ix = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - iy)[:, None], (x - ix)[None, :]
    iy, ix = iy[:, None], ix[None, :]

    def corner(dy: int, dx: int) -> np.ndarray:  # dot product of the corner's gradient with the offset to it
        return gy[iy + dy, ix + dx] * (fy - dy) + gx[iy + dy, ix + dx] * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    return top * (1 - uy) + bottom * uy


def fractal_noise(shape: tuple[int, int], base_cells: int, octaves: int, rng: np.random.Generator) -> np.ndarray:
    """Sum of ``octaves`` Perlin octaves, each with twice the cells and half the amplitude of the last.

    ``base_cells`` lattice cells span the shorter side; octaves finer than 2 px per cell are skipped.
    """
    h, w = shape
    total = np.zeros(shape)
    for octave in range(max(1, octaves)):
        per_short_side = base_cells * 2 ** octave
        if octave > 0 and min(h, w) / per_short_side < 2:
            break
        cells = (max(1, round(per_short_side * h / min(h, w))), max(1, round(per_short_side * w / min(h, w))))
        total += perlin_noise(shape, cells, rng) / 2 ** octave
    return total


def stripes(shape: tuple[int, int], period: float, angle: float) -> np.ndarray:
    """A sinusoidal stripe pattern in [0, 1]: ``period`` pixels between stripes, at ``angle`` radians."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)


def foreign_texture(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A float HxWx3 texture from another source than the spot it will cover, and its parameters.

    DRAEM pastes DTD textures; here the image itself flipped, shifted and colour-shifted (the part's own
    material, out of place), stripes or fractal noise between two random colours.
    """
    h, w = image.shape[:2]
    source = ("self", "stripes", "noise")[int(rng.integers(3))]
    if source == "self":
        flips = [bool(rng.random() < 0.5), bool(rng.random() < 0.5)]
        shift = [int(rng.integers(h)), int(rng.integers(w))]
        channels = rng.permutation(3)
        gain, offset = float(rng.uniform(0.6, 1.0)), float(rng.uniform(25, 60))
        texture = image[::-1 if flips[0] else 1, ::-1 if flips[1] else 1][..., channels].astype(np.float32)
        texture = np.roll(texture, shift, axis=(0, 1)) * gain
        # bright texture darker, dark lighter: never the covered material back unchanged, even on a plain surface
        texture += np.where(texture.mean(-1, keepdims=True) > 128, -offset, offset)
        return texture, {"source": source, "flips": flips, "shift": shift, "channels": channels.tolist(),
                         "gain": round(gain, 3), "offset": round(offset, 1)}
    low, high = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    if source == "stripes":
        period = max(3.0, float(rng.uniform(0.03, 0.15)) * min(h, w))
        angle = float(rng.uniform(0, np.pi))
        pattern, params = stripes((h, w), period, angle), {"period": round(period, 1), "angle": round(angle, 3)}
    else:
        cells = int(rng.integers(4, 17))
        pattern = fractal_noise((h, w), cells, 3, rng)
        pattern = (pattern - pattern.min()) / max(float(np.ptp(pattern)), 1e-6)
        params = {"cells": cells}
    texture = low + (high - low) * pattern[..., None].astype(np.float32)
    return texture, {"source": source, "colours": [low.tolist(), high.tolist()], **params}

"""The overlay's four panels hold what they say, composed in uint8 (checked against scipy's
morphology and matplotlib's colour map, which the fast composition replaced)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image
from scipy import ndimage

from mvtec_ray.report.overlays import GAP, HEADER, _outline, render_overlay


@pytest.mark.parametrize("seed", range(4))
def test_outline_is_scipys_edge_grown_by_one(seed):
    rng = np.random.default_rng(seed)
    mask = ndimage.binary_opening(rng.random((40, 50)) > 0.4)
    mask[0, :7] = mask[:, -1] = True  # touching the border: the border counts as outside
    want = ndimage.binary_dilation(mask & ~ndimage.binary_erosion(mask))
    np.testing.assert_array_equal(_outline(mask), want)


def test_panels_image_truth_map_and_outlines():
    size = 64
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    truth = np.zeros((size, size), bool)
    truth[10:30, 12:40] = True
    amap = np.linspace(0, 2, size * size, dtype=np.float32).reshape(size, size)
    encoded = render_overlay(image, truth, amap, threshold=1.5, vmin=0.0, vmax=2.0, caption="x", image_format="png")
    canvas = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    assert canvas.shape == (HEADER + size, 4 * size + 3 * GAP, 3)
    panels = [canvas[HEADER:, k * (size + GAP):k * (size + GAP) + size].astype(int) for k in range(4)]
    np.testing.assert_array_equal(panels[0], image)
    # ground truth: 55 % red inside the mask, the image elsewhere
    np.testing.assert_array_equal(panels[1][~truth], image[~truth])
    red = 0.45 * image[truth] + 0.55 * np.array([255, 0, 0])
    assert np.abs(panels[1][truth] - red).max() <= 1
    # map: half image, half matplotlib's jet of the map scaled to [vmin, vmax]
    jet = colormaps["jet"](np.clip(amap / 2.0, 0, 1))[..., :3] * 255
    assert np.abs(panels[2] - (0.5 * image + 0.5 * jet)).max() <= 1
    # outlines: predicted (map >= 1.5) in yellow over the truth's green
    predicted = _outline(amap >= 1.5)
    green = _outline(truth) & ~predicted
    assert (panels[3][predicted] == (255, 230, 0)).all() and (panels[3][green] == (0, 220, 0)).all()
    untouched = ~(_outline(truth) | predicted)
    np.testing.assert_array_equal(panels[3][untouched], image[untouched])

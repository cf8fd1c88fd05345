"""Synthetic defect kinds (mvtec_ray/data/synthetic.py): local, deterministic, recorded, sized like real defects."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, gaussian_filter

from mvtec_ray.config import ExtractConfig, params_json
from mvtec_ray.data.synthetic import make_synthetic_anomaly, row_rng

OLD_KINDS = ["scratch", "spot", "cutpaste", "twist", "missing"]
NEW_KINDS = ["perlin", "scar", "crack", "blob"]
KINDS = OLD_KINDS + NEW_KINDS
#: mask area as a fraction of the image, per kind (blob and crack small on purpose: real misses are small)
AREA = {"scratch": (0.0005, 0.03), "spot": (0.001, 0.05), "cutpaste": (0.003, 0.05), "twist": (0.001, 0.1),
        "missing": (0.003, 0.05), "perlin": (0.003, 0.10), "scar": (0.0005, 0.03), "crack": (0.0002, 0.03),
        "blob": (0.0001, 0.03)}
#: the older soft-edged kinds leave faint changes just past their mask (a spot's fading rim, a swirl's tail)
SOFT_EDGED = {"spot", "twist"}
DRAWS = 6


def surface(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A textured, mid-grey part: a gradient, blotches and grain, well inside [0, 255] on all channels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 90 + 60 * xx + 30 * yy
    blotches = gaussian_filter(rng.normal(0, 1, (h, w)), max(h, w) / 20) * 200
    pixels = base[..., None] + blotches[..., None] + rng.normal(0, 6, (h, w, 3)) + np.array([5.0, 0.0, -10.0])
    return np.clip(pixels, 40, 215).astype(np.uint8)


IMAGE = surface(96, 128)


def draw(image: np.ndarray, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    return make_synthetic_anomaly(image, kind, row_rng("test", kind, seed))


def change(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    return np.abs(out.astype(int) - image.astype(int)).sum(-1)


@pytest.mark.parametrize("kind", KINDS)
def test_the_same_seed_draws_the_same_defect_and_other_seeds_others(kind):
    out, mask, params = draw(IMAGE, kind, 0)
    again, mask_again, params_again = draw(IMAGE, kind, 0)
    assert np.array_equal(out, again) and np.array_equal(mask, mask_again) and params == params_again
    others = [draw(IMAGE, kind, seed) for seed in range(1, 4)]
    assert all(not np.array_equal(mask, other_mask) for _, other_mask, _ in others)


@pytest.mark.parametrize("kind", KINDS)
def test_the_defect_is_drawn_inside_its_mask_and_nowhere_else(kind):
    for seed in range(DRAWS):
        out, mask, params = draw(IMAGE, kind, seed)
        assert out.shape == IMAGE.shape and out.dtype == np.uint8 and out.flags.c_contiguous
        assert mask.shape == IMAGE.shape[:2] and mask.dtype == bool
        low, high = AREA[kind]
        assert low <= mask.mean() <= high, (seed, mask.mean(), params)
        changed = change(IMAGE, out)
        near = binary_dilation(mask, iterations=2)
        assert (changed[mask] > 0).mean() > 0.8, (seed, params)  # the mask is really drawn on
        assert changed[near].sum() >= 0.9 * changed.sum(), (seed, params)
        if kind in SOFT_EDGED:
            assert (changed[~near] > 12).mean() < 0.01, (seed, params)
        else:
            assert changed[~near].max(initial=0) == 0, (seed, params)


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_are_plain_json_and_name_their_kind(kind):
    for seed in range(DRAWS):
        _, _, params = draw(IMAGE, kind, seed)
        assert json.loads(params_json(params))["kind"] == kind
        if kind in NEW_KINDS:  # no numpy scalars or arrays left for params_json's fallback to stringify
            assert json.loads(json.dumps(params)) == params


def test_a_crack_is_a_thin_low_contrast_line_not_a_black_stroke():
    local_mean = gaussian_filter(IMAGE.mean(-1), 4)
    for seed in range(DRAWS * 2):
        out, mask, params = draw(IMAGE, "crack", seed)
        per_channel = np.abs(out.astype(float) - IMAGE.astype(float)).mean(-1)
        assert 2.0 <= per_channel[mask].mean() < 0.4 * local_mean[mask].mean(), (seed, params)
        assert 1 <= params["width"] <= 3 and len(params["branches"]) <= 2
        lines = [np.array(params["points"])] + [np.array(branch) for branch in params["branches"]]
        path_length = sum(np.hypot(*np.diff(line, axis=0).T).sum() for line in lines)
        # the mask is the recorded path drawn `width` wide (branches a pixel thinner), not a region around it
        assert 0.4 <= mask.sum() / (params["width"] * path_length) <= 1.6, (seed, params)


def test_a_scar_covers_its_rotated_strip():
    for seed in range(DRAWS * 2):
        _, mask, params = draw(IMAGE, "scar", seed)
        assert params["length"] >= 2 * params["width"]  # long and thin
        assert mask.sum() == pytest.approx(params["length"] * params["width"], rel=0.35), params
        ys, xs = np.nonzero(mask)
        center = [float(ys.mean() + 0.5), float(xs.mean() + 0.5)]
        assert center == pytest.approx(params["center"], abs=1.5)


def test_perlin_regions_are_irregular_with_their_opacity_and_area_recorded():
    for seed in range(DRAWS * 2):
        out, mask, params = draw(IMAGE, "perlin", seed)
        ys, xs = np.nonzero(mask)
        box = (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
        assert mask.sum() < 0.8 * box  # not a rectangle
        assert 0.2 <= params["beta"] <= 0.8 and params["area"] == pytest.approx(mask.mean(), abs=1e-4)


def test_blobs_are_small_and_soft():
    side = min(IMAGE.shape[:2])
    for seed in range(DRAWS * 2):
        _, mask, params = draw(IMAGE, "blob", seed)
        assert 1 <= len(params["blobs"]) <= 3
        assert all(blob["radius"] <= 0.03 * side + 1e-6 or blob["radius"] == 1.5 for blob in params["blobs"])
        assert mask.sum() <= sum(np.pi * (1.5 * blob["radius"]) ** 2 for blob in params["blobs"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(40, 64), (64, 40)])
def test_small_and_non_square_images(kind, shape):
    image = surface(*shape, seed=1)
    for seed in range(DRAWS):
        out, mask, params = draw(image, kind, seed)
        assert out.shape == image.shape and out.dtype == np.uint8 and mask.shape == shape and mask.any(), params
        assert change(image, out)[binary_dilation(mask, iterations=2)].sum() > 0


@pytest.mark.parametrize("kind", NEW_KINDS)
def test_new_kinds_work_on_the_smallest_images(kind):
    image = surface(16, 24, seed=2)
    for seed in range(DRAWS):
        out, mask, _ = draw(image, kind, seed)
        assert out.shape == image.shape and mask.any()


def test_an_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="unknown synthetic anomaly kind"):
        draw(IMAGE, "smudge", 0)


def test_the_config_accepts_every_kind():
    assert ExtractConfig(synthetic_kinds=KINDS).synthetic_kinds == KINDS

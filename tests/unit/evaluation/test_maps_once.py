"""A test image's map is upsampled and blurred once: the map at the ground truth's resolution and the
saved map are both resized from the one smoothed map at the input size, and equal what a separate
``maps_from_patch_scores`` at each size gave before."""
from __future__ import annotations

import numpy as np
import pytest

from mvtec_ray.config import EvaluationConfig
from mvtec_ray.data.images import content_box
from mvtec_ray.detectors.patch import PatchCore
from mvtec_ray.evaluation.maps import resize_map
from mvtec_ray.evaluation.pixel_protocol import PixelProtocol, maps_at
from mvtec_ray.fit.cell import fit_category_detector
from mvtec_ray.storage import Storage
from tests.helpers.pixel_store import CATEGORY, SIZES, write_pixel_store


def _patch(n=5, grid=28, seed=0):
    rng = np.random.default_rng(seed)
    patch = rng.normal(size=(n, grid, grid)).astype(np.float32)
    patch[:, 10:12, 14] += 6
    return patch


def test_maps_at_the_truths_and_the_saved_size_equal_a_smoothing_per_size():
    detector = PatchCore()
    patch = _patch()
    shapes = [(900, 900), (224, 224), (300, 410), (900, 900), (100, 60)]
    protocol = PixelProtocol("full", 128, 224)
    square = protocol.input_maps(detector, patch)
    assert square.shape == (5, 224, 224)
    for got, expected in zip(protocol.at_truth(square, shapes, [(0, 0)] * 5), maps_at(detector, patch, shapes, 224)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    saved = detector.maps_from_patch_scores(patch, (128, 128), 224)
    np.testing.assert_allclose(np.stack(protocol.at_size(square, 128)), saved, rtol=0, atol=1e-6)
    # maps() is the same two steps
    for a, b in zip(protocol.maps(detector, patch, shapes, [(0, 0)] * 5), protocol.at_truth(square, shapes, [(0, 0)] * 5)):
        np.testing.assert_array_equal(a, b)


def test_padded_maps_lose_the_padding_before_the_one_resize():
    detector = PatchCore()
    patch = _patch(n=2, seed=1)
    protocol = PixelProtocol("full", 128, 224, resize="pad")
    hws = [(600, 900), (900, 450)]
    square = protocol.input_maps(detector, patch)
    for m, hw, got in zip(square, hws, protocol.at_truth(square, hws, hws)):
        top, left, h, w = content_box(*hw, 224)
        np.testing.assert_array_equal(got, resize_map(m[top:top + h, left:left + w], hw))


def test_a_fit_smooths_each_test_map_once(tmp_path):
    """With saved maps and overlays on, every image's patch scores go through the smoothing once
    (validation and test alike); before, a test image was smoothed a second time for its saved map."""
    store = write_pixel_store(tmp_path / "store")
    features, _ = store
    calls: list[int] = []
    original = PatchCore.maps_from_patch_scores

    def counting(self, patch, output_size, input_size=None):
        calls.append(len(patch))
        return original(self, patch, output_size, input_size)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PatchCore, "maps_from_patch_scores", counting)
        outcome = fit_category_detector(features, CATEGORY, "patchcore", {"projection_dim": 0, "coreset_ratio": 0.5},
                                        EvaluationConfig(save_maps=True, overlays=True), str(tmp_path / "out"),
                                        Storage())
    assert outcome.row["status"] == "ok", outcome.row
    assert sum(calls) == SIZES["val_good"] + SIZES["val_synthetic"] + SIZES["test"]
    assert list((tmp_path / "out" / "maps" / "patchcore").glob("*.npy"))  # the saved maps were written

"""The MVTec pixel evaluation protocol: full-resolution masks, size-invariant smoothing, a pixel
threshold chosen on validation only, predicted masks and per-image overlays (no Ray)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mvtec_ray.config import EvaluationConfig
from mvtec_ray.data.images import crop_box, decode_image
from mvtec_ray.detectors.patch import PatchCore, upsample_smooth
from mvtec_ray.evaluation.pixel_metrics import pixel_auroc, pixel_f1, pixel_f1_max
from mvtec_ray.evaluation.pixel_protocol import PixelProtocol, maps_at
from mvtec_ray.evaluation.thresholds import choose_pixel_threshold
from mvtec_ray.fit.cell import fit_category_detector
from mvtec_ray.storage import Storage
from tests.helpers.pixel_store import (
    CATEGORY,
    INPUT,
    SIZES,
    SOURCE,
    scratch_mask,
    write_pixel_store,
)


@pytest.fixture(scope="module")
def pixel_store(tmp_path_factory):
    return write_pixel_store(tmp_path_factory.mktemp("pixel"))


def _fit(store, tmp_path=None, detector="patchcore", **evaluation):
    features, _ = store
    params = {"projection_dim": 0, "coreset_ratio": 0.5} if detector == "patchcore" else {}
    outcome = fit_category_detector(features, CATEGORY, detector, params, EvaluationConfig(**evaluation),
                                    str(tmp_path) if tmp_path else None, Storage())
    assert outcome.row["status"] == "ok", outcome.row
    return outcome


# -- full resolution -------------------------------------------------------------------------------
def test_a_one_pixel_scratch_lost_by_downsampling_is_evaluated_at_full_resolution(tmp_path):
    """A hand-made map and mask: a 1-px scratch of a 256 px mask that nearest downsampling (to
    224, then 128 px) drops; the full-resolution protocol reads the mask file itself."""
    big = np.zeros((256, 256), bool)
    big[62, 32:224] = True  # kept at 224 px, lost at 128 px (the old two nearest steps)
    path = tmp_path / "mask.png"
    Image.fromarray(big.astype(np.uint8) * 255).save(path)
    stored = np.asarray(Image.fromarray(big.astype(np.uint8) * 255).resize((224, 224), Image.Resampling.NEAREST)) > 127
    png = io.BytesIO()
    Image.fromarray(stored.astype(np.uint8) * 255).save(png, format="PNG")

    reduced = PixelProtocol("reduced", 128, 224).ground_truth(Storage(), str(path), png.getvalue(), (256, 256))
    assert not reduced.any()  # the scratch vanished
    full = PixelProtocol("full", 128, 224).ground_truth(Storage(), str(path), png.getvalue(), (256, 256))
    assert full.shape == (256, 256) and full.sum() == big.sum()

    # a 14x14 patch-score map, hot on the scratch's patch row
    patch = np.zeros((1, 14, 14), np.float32)
    patch[0, 62 * 14 // 256, 2:12] = 5.0
    detector = PatchCore()
    [anomaly_map] = maps_at(detector, patch, [full.shape], 224)
    assert anomaly_map.shape == (256, 256)
    assert pixel_auroc([anomaly_map], [full]) > 0.95
    assert np.isnan(pixel_auroc(maps_at(detector, patch, [reduced.shape], 224), [reduced]))


def test_fit_reports_full_resolution_pixel_metrics_by_default(pixel_store):
    full = _fit(pixel_store).row
    assert full["pixel_eval"] == "full"
    assert full["pixel_auroc"] > 0.9 and full["pixel_pro"] > 0.5  # the 1-px scratches are found
    reduced = _fit(pixel_store, pixel_eval="reduced", pixel_eval_size=128).row
    assert reduced["pixel_eval"] == "128px"
    assert "pixel_auroc" not in reduced  # the stored 32 px masks lost every scratch


def test_ragged_maps_give_the_same_metrics_as_stacked_ones():
    rng = np.random.default_rng(0)
    maps = [rng.normal(size=(20, 30)).astype(np.float32), rng.normal(size=(40, 10)).astype(np.float32)]
    masks = [np.zeros((20, 30), bool), np.zeros((40, 10), bool)]
    masks[0][3:6, 4:9] = True
    masks[1][30:35, 2:4] = True
    maps[0][masks[0]] += 2
    flat_maps = np.concatenate([m.ravel() for m in maps])[None, None]
    flat_masks = np.concatenate([m.ravel() for m in masks])[None, None]
    assert pixel_auroc(maps, masks) == pytest.approx(pixel_auroc(flat_maps, flat_masks))
    f1 = pixel_f1(maps, masks, 1.0)["pixel_f1"]
    assert 0 < f1 <= pixel_f1_max(maps, masks) <= 1


def test_crop_box_matches_the_centre_crop_of_the_resized_image():
    assert crop_box(256, 256, 224, 256) == (16, 16, 240, 240)
    assert crop_box(900, 900, 224, 256) == (56, 56, 844, 844)
    assert crop_box(900, 600, 224, None) == (0, 0, 900, 600)
    image = np.zeros((512, 512, 3), np.uint8)
    image[32:480, 32:480] = 255  # exactly the crop's region at 512 px (256 -> 224 ~ 512 -> 448)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    cropped = decode_image(png.getvalue(), 224, resize_to=256)
    assert cropped.shape == (224, 224, 3) and cropped[2:-2, 2:-2].min() > 200


# -- smoothing ----------------------------------------------------------------------------------
def test_smoothing_does_not_depend_on_the_evaluation_size():
    rng = np.random.default_rng(1)
    patch = rng.normal(size=(2, 28, 28)).astype(np.float32)
    patch[:, 10:12, 14] += 6
    small = upsample_smooth(patch, (112, 112), 4.0, input_size=224)
    large = upsample_smooth(patch, (448, 448), 4.0, input_size=224)
    shrunk = large.reshape(2, 112, 4, 112, 4).mean(axis=(2, 4))
    spread = float(small.max() - small.min())
    assert np.abs(shrunk - small).max() < 0.02 * spread
    # at the input size it is the PatchCore / anomalib recipe: upsample to 224, blur sigma 4
    at_input = upsample_smooth(patch, (224, 224), 4.0, input_size=224)
    np.testing.assert_allclose(at_input, upsample_smooth(patch, (224, 224), 4.0), rtol=1e-5, atol=1e-5)


def test_detector_maps_are_smoothed_at_input_resolution(pixel_store):
    features, _ = pixel_store
    test = next(features.iter_patches(CATEGORY, "test"))["X"]
    detector = PatchCore(projection_dim=0).fit(next(features.iter_patches(CATEGORY, "train"))["X"])
    _, at_64 = detector.score_with_maps(test, (64, 64), input_size=INPUT)
    _, at_128 = detector.score_with_maps(test, (128, 128), input_size=INPUT)
    shrunk = at_128.reshape(len(test), 64, 2, 64, 2).mean(axis=(2, 4))
    assert np.abs(shrunk - at_64).max() < 0.02 * float(at_64.max() - at_64.min())


# -- pixel threshold on validation only ----------------------------------------------------------
def test_pixel_threshold_is_chosen_on_validation_masks_only(pixel_store, tmp_path):
    features, mask_files = pixel_store
    first = _fit(pixel_store).row
    assert first["pixel_threshold_rule"] == "pixel_between_0.999"  # the default rule
    assert 0 < first["pixel_f1"] <= first["pixel_f1_max"] <= 1  # the oracle is an upper bound
    originals = [p.read_bytes() for p in mask_files]
    try:
        for p in mask_files:  # different test masks: a scratch on another row
            Image.fromarray(scratch_mask(2).astype(np.uint8) * 255).save(p)
        second = _fit(pixel_store).row
    finally:
        for p, data in zip(mask_files, originals):
            p.write_bytes(data)
    assert second["pixel_threshold"] == first["pixel_threshold"]   # never looked at the test masks
    assert second["pixel_f1"] != first["pixel_f1"]                 # ... which the metrics do read


def test_choose_pixel_threshold_rules():
    maps = np.zeros((2, 8, 8), np.float32)
    masks = np.zeros((2, 8, 8), bool)
    maps[1, 2:4, 2:4], masks[1, 2:4, 2:4] = 5.0, True
    chosen = choose_pixel_threshold(maps, masks, rule="f1")
    assert chosen.rule == "pixel_val_f1_max" and 0 < chosen.value <= 5.0
    normal_only = choose_pixel_threshold(np.arange(128, dtype=np.float32).reshape(2, 8, 8), np.zeros((2, 8, 8), bool))
    assert normal_only.rule.startswith("pixel_normal_quantile")


def test_the_between_rule_lies_between_the_normal_quantile_and_the_synthetic_f1_threshold():
    rng = np.random.default_rng(0)
    maps = rng.uniform(1.0, 2.0, size=(6, 16, 16)).astype(np.float32)  # normal texture scores in [1, 2]
    masks = np.zeros(maps.shape, bool)
    maps[3:, 4:8, 4:8], masks[3:, 4:8, 4:8] = 20.0, True  # strong synthetic defects on three images
    low = choose_pixel_threshold(maps, masks, rule="normal:0.999").value
    high = choose_pixel_threshold(maps, masks, rule="f1").value
    between = choose_pixel_threshold(maps, masks, rule="between:0.999")
    assert between.rule == "pixel_between_0.999"
    assert low < between.value < high and between.value == pytest.approx(np.sqrt(low * high))
    # only the held-out normals (empty masks) decide the lower bound: defect pixels are never in it
    normal_pixels = maps[~masks.any(axis=(1, 2))].ravel()
    assert low == pytest.approx(np.quantile(normal_pixels, 0.999))
    with pytest.raises(ValueError, match="between"):
        choose_pixel_threshold(maps[3:], masks[3:], rule="between:0.999")  # no held-out normal image
    with pytest.raises(ValueError, match="quantile"):
        choose_pixel_threshold(maps, masks, rule="between:2")


# -- predicted masks and overlays ------------------------------------------------------------------
@pytest.mark.parametrize("detector", ["patchcore", "padim"])
def test_predicted_masks_and_overlays_for_every_test_image(pixel_store, tmp_path, detector):
    import pandas as pd

    from mvtec_ray.report.gallery import write_overlay_gallery
    outcome = _fit(pixel_store, tmp_path, detector)
    test = outcome.scores[outcome.scores["split"] == "test"]
    assert len(test) == SIZES["test"]
    for _, row in test.iterrows():
        overlay = Image.open(tmp_path / row["overlay_file"])
        assert row["overlay_file"].startswith(f"overlays/{detector}/")
        assert overlay.format == "JPEG" and row["overlay_file"].endswith(".jpg")  # the default format
        assert overlay.width == 4 * INPUT + 3 * 4  # four panels
        predicted = Image.open(tmp_path / row["pred_mask_file"])
        assert predicted.size == (SOURCE, SOURCE)  # the ground truth's full resolution
    results = pd.DataFrame([outcome.row])
    gallery = write_overlay_gallery(tmp_path, test.assign(threshold=outcome.row["threshold"]), results)
    page = (tmp_path / gallery).read_text()
    assert all(f.split("/", 1)[1] in page for f in test["overlay_file"])
    assert outcome.row["overlay_seconds"] > 0


def test_png_overlays_on_request_show_the_same_panels(pixel_store, tmp_path):
    jpeg = _fit(pixel_store, tmp_path / "jpeg")
    png = _fit(pixel_store, tmp_path / "png", overlay_format="png")
    jpeg_files = jpeg.scores.loc[jpeg.scores["split"] == "test", "overlay_file"]
    png_files = png.scores.loc[png.scores["split"] == "test", "overlay_file"]
    assert all(f.endswith(".png") for f in png_files)
    assert [f[:-4] for f in png_files] == [f[:-4] for f in jpeg_files]  # one name, another suffix
    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), np.float32)
    other = pixels(tmp_path / "png" / png_files.iloc[-1])
    for jpeg_file, png_file in list(zip(jpeg_files, png_files))[:-1]:
        lossless, lossy = pixels(tmp_path / "png" / png_file), pixels(tmp_path / "jpeg" / jpeg_file)
        assert Image.open(tmp_path / "png" / png_file).format == "PNG"
        assert lossless.shape == lossy.shape
        # the same picture within JPEG's error (the store's images are noise, JPEG's worst case), far
        # nearer to its own PNG than to another image's
        error = np.abs(lossless - lossy).mean()
        assert error < 12 and error < 0.5 * np.abs(other - lossy).mean()

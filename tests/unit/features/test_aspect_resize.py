"""Aspect-preserving resize (``extract.resize: pad``): decoding, masks, synthetic defects, the
elongated generated category, and anomaly maps cropped back onto the source before pixel
metrics. Pure: no Ray."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from mvtec_ray.config import EvaluationConfig, ExtractConfig
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.images import (
    content_box,
    decode_image,
    decode_mask,
    decode_mask_png,
)
from mvtec_ray.data.sample_data import (
    DEFAULT_CATEGORIES,
    SampleSpec,
    generate_sample_dataset,
)
from mvtec_ray.detectors.patch import PatchCore
from mvtec_ray.evaluation.pixel_metrics import pixel_auroc
from mvtec_ray.evaluation.pixel_protocol import PixelProtocol
from mvtec_ray.features.plan import plan_work
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.storage import Storage


def png(array: np.ndarray, **save) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def wide_image() -> np.ndarray:
    """100 x 400 RGB: a left-to-right ramp, so any squeeze or shift shows."""
    ramp = np.linspace(20, 250, 400)[None, :, None] * np.ones((100, 1, 3))
    return ramp.astype(np.uint8)


def test_content_box():
    assert content_box(100, 400, 64) == (24, 0, 16, 64)
    assert content_box(400, 100, 64) == (0, 24, 64, 16)
    assert content_box(50, 50, 64) == (0, 0, 64, 64)
    assert content_box(1, 5000, 64) == (31, 0, 1, 64)  # never an empty box


def test_pad_keeps_the_aspect_and_centres_on_black():
    data = png(wide_image())
    padded = decode_image(data, 64, resize="pad")
    top, left, h, w = content_box(100, 400, 64)
    assert padded.shape == (64, 64, 3)
    assert not padded[:top].any() and not padded[top + h:].any()
    expected = np.asarray(Image.fromarray(wide_image()).resize((w, h), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(padded[top:top + h].astype(int), expected.astype(int), atol=2)
    stretched = decode_image(data, 64)  # the default is unchanged: both sides to 64
    assert stretched.min() > 0 and np.array_equal(stretched, decode_image(data, 64, resize="stretch"))
    with pytest.raises(ValueError, match="resize"):
        decode_image(data, 64, resize="tile")
    with pytest.raises(ValueError, match="centre crop"):
        decode_image(data, 64, resize_to=80, resize="pad")
    with pytest.raises(ValidationError, match="resize_to"):
        ExtractConfig(resize="pad", resize_to=256)


def test_pad_follows_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: a 400-wide file shown 400 tall
    padded = decode_image(png(wide_image(), format="JPEG", exif=exif, quality=95), 64, resize="pad")
    top, left, h, w = content_box(400, 100, 64)
    assert (top, h) == (0, 64) and not padded[:, :left].any() and not padded[:, left + w:].any()
    assert padded[:, left:left + w].mean() > 50


def test_masks_are_placed_like_their_image():
    mask = np.zeros((100, 400), np.uint8)
    mask[40:60, 100:104] = 255  # a thin vertical crack
    placed = decode_mask(png(mask), 64, resize="pad")
    top, left, h, w = content_box(100, 400, 64)
    assert placed.shape == (64, 64) and placed[top:top + h].any()
    assert not placed[:top].any() and not placed[top + h:].any()
    square = np.zeros((80, 80), np.uint8)
    square[10:30, 5:9] = 255  # square sources: pad is the same as stretch
    np.testing.assert_array_equal(decode_mask(png(square), 64, resize="pad"), decode_mask(png(square), 64))


@pytest.mark.parametrize("resize, rows", [("pad", (0, 16)), ("stretch", (12, 16))])
def test_maps_go_back_onto_the_source(resize, rows):
    """One hot patch of an 8x8 grid (64 px input) lands where that patch's pixels came from in
    a 32 x 128 source: padded, input rows 24-31 are the source's rows 0-15; stretched, 12-15."""
    patch = np.zeros((1, 8, 8), np.float32)
    patch[0, 3, 6] = 1.0  # input pixels rows 24-31, columns 48-55 -> source columns 96-111
    detector = PatchCore(smoothing_sigma=0)
    for mode, size in (("full", 128), ("reduced", 64)):
        protocol = PixelProtocol(mode, size, 64, None, resize)
        truth = protocol.ground_truth(Storage(), "", b"", (32, 128))
        [anomaly_map] = protocol.maps(detector, patch, [truth.shape], [(32, 128)])
        assert anomaly_map.shape == truth.shape == ((32, 128) if mode == "full" else (16, 64) if resize == "pad" else (64, 64))
        if mode == "full":
            y, x = np.unravel_index(np.argmax(anomaly_map), anomaly_map.shape)
            assert rows[0] <= y < rows[1] and 96 <= x < 112, (y, x)


def test_validation_maps_lose_their_padding():
    protocol = PixelProtocol("full", 128, 64, None, "pad")
    maps, masks = protocol.input_frame(np.ones((2, 64, 64), np.float32), [np.zeros((64, 64), bool)] * 2,
                                       [(32, 128), (64, 64)])
    assert [m.shape for m in maps] == [(16, 64), (64, 64)] == [m.shape for m in masks]


@pytest.fixture(scope="module")
def rod_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("rod")
    generate_sample_dataset(root, categories=["rod_long"], seed=1,
                            spec=SampleSpec(n_train=10, n_test_good=3, n_test_defect_per_type=2, size=128))
    return root


def test_elongated_category_is_extra_and_has_thin_defects(rod_dataset):
    assert "rod_long" not in DEFAULT_CATEGORIES
    image = np.asarray(Image.open(rod_dataset / "rod_long" / "test" / "crack" / "000.png"))
    assert image.shape[:2] == (64, 256)     # 4:1
    for defect in ("crack", "scratch", "dent"):
        mask = np.asarray(Image.open(rod_dataset / "rod_long" / "ground_truth" / defect / "000_mask.png")) > 0
        assert mask.any() and mask.mean() < 0.02, defect


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_extraction_rows_of_an_elongated_part(rod_dataset, resize):
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64, resize=resize, synthetic_per_image=2)
    plan = plan_work(build_catalog(str(rod_dataset), Storage()).entries, config)
    rows = prepare_batch({k: plan[k].to_numpy() for k in plan}, config, Storage())
    assert (rows["status"] == "ok").all()
    top, left, h, w = content_box(64, 256, 64)
    synthetic = 0
    for i in range(len(rows["row_id"])):
        assert (rows["source_height"][i], rows["source_width"][i]) == (64, 256)
        image = rows["image"][i]
        assert (not image[:top].any()) == (resize == "pad")  # black bands only when padded
        if rows["label"][i] == 1 and resize == "pad":       # defects, real or synthetic, on the part only
            mask = decode_mask_png(rows["mask_png"][i])
            assert mask.any() and not mask[:top].any() and not mask[top + h:].any()
            synthetic += rows["split"][i] == "val_synthetic"
            if rows["split"][i] == "val_synthetic":
                assert json.loads(rows["aug_params"][i])["content_box"] == [top, left, h, w]
    assert synthetic > 0 or resize == "stretch"
    assert ExtractConfig(resize="pad").fingerprint() != ExtractConfig().fingerprint()


@pytest.fixture(scope="module")
def rod_features(rod_dataset, lite0_weights, tmp_path_factory):
    """Features of the rod in both modes, made by the extraction's own pieces without Ray."""
    from mvtec_ray.features.backbone_specs import BACKBONES
    from mvtec_ray.features.backbones import (
        FeatureExtractor,
        embed_images,
        prepare_for_device,
        probe_feature_shapes,
    )
    from mvtec_ray.features.store import (
        EXTRACT_META,
        SUCCESS,
        FeatureSet,
        extraction_metadata,
        write_shards,
    )
    storage, out = Storage(), {}
    model = prepare_for_device(FeatureExtractor(BACKBONES["efficientnet_lite0"], lite0_weights.state_dict), "cpu")
    catalog = build_catalog(str(rod_dataset), storage)
    for resize in ("stretch", "pad"):
        config = ExtractConfig(backbone="efficientnet_lite0", image_size=128, resize=resize, synthetic_per_image=1)
        plan = plan_work(catalog.entries, config)
        rows = prepare_batch({k: plan[k].to_numpy() for k in plan}, config, storage)
        rows["pooled"], rows["patches"], _ = embed_images(model, rows.pop("image"), True)
        root = str(tmp_path_factory.mktemp(resize))
        metadata = extraction_metadata(config, lite0_weights, probe_feature_shapes(config, lite0_weights))
        storage.write_bytes(f"{root}/{EXTRACT_META}", json.dumps(metadata).encode())
        write_shards(rows, root, storage, metadata)
        storage.write_bytes(f"{root}/{SUCCESS}", b"{}")
        out[resize] = FeatureSet.open(root, storage)
    return out


@pytest.mark.parametrize("resize", ["stretch", "pad"])
def test_pixel_metrics_are_computed_on_the_source_image(rod_features, resize):
    """The fit's pixel AUROC equals one recomputed by hand: square input-size maps, the padding
    cut away (pad), resized onto each full-resolution mask file (64 x 256)."""
    from mvtec_ray.fit.cell import fit_category_detector
    features = rod_features[resize]
    assert features.metadata()["resize"] == resize
    params = {"projection_dim": 0, "coreset_ratio": 0.5}
    row = fit_category_detector(features, "rod_long", "patchcore", params, EvaluationConfig(), None, Storage()).row
    assert row["status"] == "ok", row["error"]
    assert row["pixel_eval"] == "full" and np.isfinite(row["pixel_auroc"])

    detector = PatchCore(**params)
    detector.fit([part["X"] for part in features.iter_patches("rod_long", "train")])
    top, left, h, w = content_box(64, 256, 128) if resize == "pad" else (0, 0, 128, 128)
    maps, masks = [], []
    for part in features.iter_patches("rod_long", "test", with_masks=True):
        square = detector.anomaly_maps(part["X"], (128, 128), 128)
        for anomaly_map, mask_uri in zip(square, part["mask_uri"]):
            inside = torch.from_numpy(np.ascontiguousarray(anomaly_map[top:top + h, left:left + w]))[None, None]
            maps.append(torch.nn.functional.interpolate(inside, size=(64, 256), mode="bilinear",
                                                        align_corners=False)[0, 0].numpy())
            masks.append(decode_mask(Storage().read_bytes(mask_uri), None) if mask_uri else np.zeros((64, 256), bool))
    assert row["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks), abs=1e-6)


def test_models_saved_before_the_option_read_as_stretch(tmp_path):
    from mvtec_ray.deploy.model_files import MODEL_FILE, SCHEMA_KEYS, read_model_info
    schema = {k: None for k in SCHEMA_KEYS if k != "resize"}  # an older model.json: no "resize"
    folder = tmp_path / "washer" / "knn"
    folder.mkdir(parents=True)
    (folder / MODEL_FILE).write_text(json.dumps({
        "format": 1, "category": "washer", "detector": "knn", "threshold": 1.0, "schema": schema,
        "files": [], "version": "v", "input_kind": "pooled"}))
    assert read_model_info(Storage(), str(tmp_path), "washer", "knn")["schema"]["resize"] == "stretch"

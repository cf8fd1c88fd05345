"""PaDiM as in the paper: layer1-3 maps (no 3x3 averaging), nearest upsampling to layer1's grid,
a random channel subset sized per backbone, its own feature column; saved models score (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvtec_ray.config import EvaluationConfig, ExtractConfig
from mvtec_ray.deploy.model_files import load_model, save_model
from mvtec_ray.detectors.padim import PaDiM
from mvtec_ray.detectors.registry import detector_class
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.backbones import (
    FeatureExtractor,
    embed_images,
    padim_channel_index,
)
from mvtec_ray.fit.cell import fit_category_detector
from mvtec_ray.storage import Storage
from tests.helpers.pixel_store import CATEGORY, PADIM_GRID, D, write_pixel_store


def test_channel_count_per_backbone_as_anomalib():
    counts = {name: spec.padim_channels for name, spec in BACKBONES.items()}
    assert counts == {"resnet18": 100, "wide_resnet50_2": 550, "resnet50": 550,
                      "efficientnet_lite0": 100, "efficientnet_lite2": 100}
    assert BACKBONES["resnet50"].padim_layers == ("layer1", "layer2", "layer3")
    assert BACKBONES["efficientnet_lite0"].padim_layers == ("blocks.1", "blocks.2", "blocks.4")


@pytest.mark.parametrize("backbone, widths", [("resnet18", [64, 128, 256]),
                                              ("efficientnet_lite0", [24, 40, 112])])
def test_padim_maps_are_layer1_to_3_with_the_random_subset(backbone, widths):
    spec = BACKBONES[backbone]
    torch.manual_seed(0)
    model = FeatureExtractor(spec, None)
    seen = {}
    modules = dict(model.model.named_modules())
    for layer in spec.padim_layers:
        modules[layer].register_forward_hook(lambda _m, _i, out, layer=layer: seen.__setitem__(layer, out))
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 64, 64, 3), dtype=np.uint8))
    _, patches, padim = model(images, with_padim=True)
    assert padim.shape == (2, 16, 16, 100)  # layer1's stride-4 grid, the backbone's channel count
    assert [seen[layer].shape[1] for layer in spec.padim_layers] == widths
    grid = seen[spec.padim_layers[0]].shape[-2:]
    full = torch.cat([seen[spec.padim_layers[0]]] +
                     [F.interpolate(seen[layer], size=grid, mode="nearest") for layer in spec.padim_layers[1:]], 1)
    index = padim_channel_index(widths, 100)
    assert len(set(index.tolist())) == 100 and index.max() < sum(widths)
    assert any(index < widths[0]) and any(index >= widths[0] + widths[1])  # all three layers contribute
    torch.testing.assert_close(padim, full[:, torch.from_numpy(index)].permute(0, 2, 3, 1))
    # PatchCore's column is unchanged: 3x3-averaged layer2+3 at stride 8
    assert patches.shape[1:3] == (8, 8)
    # the one feature path gives the same maps, and none unless asked
    pooled, _, via_path = embed_images(model, images.numpy(), with_patches=False, with_padim=True)
    np.testing.assert_allclose(via_path, padim.numpy().astype(np.float16), rtol=1e-3, atol=1e-3)
    assert embed_images(model, images.numpy())[2] is None
    assert FeatureExtractor(spec, None, padim_channels=0)(images, with_padim=True)[2] is None


def test_padim_reads_its_own_column(tmp_path):
    assert detector_class("padim").feature_column == "padim"
    assert detector_class("patchcore").feature_column == "patches"
    features, _ = write_pixel_store(tmp_path)
    outcome = fit_category_detector(features, CATEGORY, "padim", {}, EvaluationConfig(), str(tmp_path / "out"),
                                    Storage())
    assert outcome.row["status"] == "ok", outcome.row
    model = load_model(Storage(), str(tmp_path / "out" / "models"), CATEGORY, "padim",
                       expect={"padim_shape": [PADIM_GRID, PADIM_GRID, D]}, probe=True)
    assert model.detector.grid_ == (PADIM_GRID, PADIM_GRID, D) and model.detector.mean_.shape == (PADIM_GRID ** 2, D)


def test_saved_padim_model_scores_through_the_scorer(tmp_path, small_dataset, lite0_weights):
    """Scoring computes PaDiM's input in the same forward pass and gives the fit-time scores."""
    from mvtec_ray.deploy.loaded_models import ModelSelection
    from mvtec_ray.deploy.scorer import Scorer
    from mvtec_ray.features.backbones import probe_feature_shapes
    from mvtec_ray.features.prepare import prepare_batch
    from mvtec_ray.features.store import extraction_metadata
    config = ExtractConfig(backbone="efficientnet_lite0", image_size=64, holdout_fraction=0.0,
                           synthetic_per_image=0)
    paths = sorted((small_dataset / "washer" / "train" / "good").glob("*.png"))[:10]
    batch = {"image_id": np.asarray([p.name for p in paths], dtype=object),
             "uri": np.asarray([str(p) for p in paths], dtype=object),
             "version": np.full(len(paths), "1", dtype=object), "category": np.full(len(paths), "washer", dtype=object),
             "split": np.full(len(paths), "train", dtype=object), "label": np.zeros(len(paths), np.int8),
             "defect_type": np.full(len(paths), "good", dtype=object), "mask_uri": np.full(len(paths), "", dtype=object),
             "variants": np.full(len(paths), "orig", dtype=object)}
    prepared = prepare_batch(batch, config, Storage())
    model = FeatureExtractor(BACKBONES["efficientnet_lite0"], lite0_weights.state_dict)
    _, _, padim = embed_images(model, prepared["image"], with_padim=True)
    detector = PaDiM().fit(padim[:8])
    metadata = extraction_metadata(config, lite0_weights, probe_feature_shapes(config, lite0_weights))
    models = str(tmp_path / "models")
    save_model(Storage(), models, "washer", detector, 1.0, "test", metadata)
    selection = ModelSelection(models, [("washer", "padim")], "efficientnet_lite0",
                               padim_channels=metadata["padim_shape"][-1], input_size=64)
    scorer = Scorer(selection, Storage(), lite0_weights.state_dict, map_size=32)
    rows = scorer({"image": prepared["image"][8:], "status": prepared["status"][8:],
                   "error": prepared["error"][8:], "source_uri": prepared["source_uri"][8:],
                   "source_version": prepared["source_version"][8:], "category": prepared["category"][8:]})
    np.testing.assert_allclose(rows["score"], detector.score(padim[8:]), rtol=1e-4)
    assert rows["map"].shape == (2, 32, 32)


def test_fit_in_blocks_of_positions_equals_one_pass():
    """A large Gaussian (e.g. 550 channels on a 56x56 grid) is fitted block by block within
    accumulator_budget_mb; the result is the same."""
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(20, 6, 5, 12)).astype(np.float16), rng.normal(size=(4, 6, 5, 12)).astype(np.float16)
    whole = PaDiM().fit(train)
    blocks = PaDiM(accumulator_budget_mb=7 * 12 * 12 * 16 / 2**20).fit(train)
    assert whole.fit_stats_["passes"] == 1 and blocks.fit_stats_["passes"] == 5  # 30 positions, 7 per block
    np.testing.assert_allclose(blocks.inv_cov_, whole.inv_cov_, rtol=1e-6)
    np.testing.assert_array_equal(blocks.score(test), whole.score(test))

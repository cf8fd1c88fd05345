"""Tiling (``extract.tile_size``): tiles cut in place, embedded as one batch, maps stitched back.

Geometry: a defect inside one tile changes the stitched maps at that tile's cells only; with a
backbone whose outputs do not overlap the tile borders, the stitched maps equal one pass over the
whole image; the scorer uses the same tiles as the extraction (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mvtec_ray.config import ExtractConfig
from mvtec_ray.features.backbone_specs import BACKBONES
from mvtec_ray.features.backbones import FeatureExtractor, embed_images, split_tiles, stitch_tiles

LITE0 = BACKBONES["efficientnet_lite0"]


def _images(n: int, side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


@pytest.mark.parametrize("per_side", [1, 2, 3])
def test_split_then_stitch_gives_the_image_back(per_side):
    images = torch.from_numpy(_images(2, 12 * per_side))
    tiles = split_tiles(images, per_side)
    assert tiles.shape == (2 * per_side ** 2, 12, 12, 3)
    torch.testing.assert_close(stitch_tiles(tiles, per_side), images)
    # row-major order: tile 1 of image 0 is its top row's second tile
    if per_side > 1:
        torch.testing.assert_close(tiles[1], images[0, :12, 12:24])


class _BlockMeans(FeatureExtractor):
    """A backbone whose every output cell sees only its own 8 x 8 pixels (no receptive field across
    tile borders): tiling must then change nothing."""

    def _embed(self, images, with_patches, with_padim):
        x = images.permute(0, 3, 1, 2).float()
        cells = F.avg_pool2d(x, 8).permute(0, 2, 3, 1)          # N, H/8, W/8, 3
        fine = F.avg_pool2d(x, 4).permute(0, 2, 3, 1)
        return cells.mean(dim=(1, 2)), cells, fine if with_padim else None


def test_stitched_maps_equal_one_pass_when_tiles_do_not_interact():
    images = torch.from_numpy(_images(3, 64))
    whole = _BlockMeans(LITE0, None)
    tiled = _BlockMeans(LITE0, None, tile_size=32)
    for one, stitched in zip(whole(images, with_padim=True), tiled(images, with_padim=True)):
        torch.testing.assert_close(stitched, one)
    assert tiled(images)[1].shape == (3, 8, 8, 3)


def test_a_defect_in_one_tile_lands_on_that_tiles_cells(lite0_weights):
    """Real weights, 2 x 2 tiles of 64 px: a bright square inside the top-right tile changes the
    stitched patch map there and nowhere in the other three tiles."""
    model = FeatureExtractor(LITE0, lite0_weights.state_dict, tile_size=64)
    clean = np.full((1, 128, 128, 3), 120, np.uint8)
    clean += np.random.default_rng(1).integers(0, 8, clean.shape, dtype=np.uint8)
    defect = clean.copy()
    defect[:, 20:36, 84:100] = 250                      # rows 20-35, columns 84-99: tile (0, 1)
    _, before, _ = embed_images(model, clean)
    _, after, _ = embed_images(model, defect)
    assert before.shape == (1, 16, 16, before.shape[-1])  # stride 8: 8 cells per tile, 2 tiles per side
    change = np.abs(after.astype(np.float32) - before.astype(np.float32)).sum(-1)[0]
    cell_y, cell_x = np.unravel_index(change.argmax(), change.shape)
    assert 20 // 8 <= cell_y <= 35 // 8 and 84 // 8 <= cell_x <= 99 // 8
    others = [change[:8, :8], change[8:, :8], change[8:, 8:]]
    assert max(block.max() for block in others) == 0.0   # the other tiles never saw the square


def test_tiles_are_checked_against_the_image():
    with pytest.raises(ValueError, match="must divide image_size"):
        ExtractConfig(image_size=448, tile_size=200)
    with pytest.raises(ValueError, match="must divide image_size"):
        ExtractConfig(image_size=224, tile_size=448)
    model = FeatureExtractor(LITE0, None, tile_size=32)
    with pytest.raises(ValueError, match="multiple of tile_size"):
        model(torch.zeros((1, 48, 48, 3), dtype=torch.uint8))


def test_tiling_is_part_of_the_feature_fingerprint():
    plain = ExtractConfig(image_size=448)
    assert ExtractConfig(image_size=448, tile_size=448).fingerprint() == plain.fingerprint()
    assert ExtractConfig(image_size=448, tile_size=224).fingerprint() != plain.fingerprint()


def test_the_scorer_tiles_as_the_extraction_did(tmp_path, small_dataset, lite0_weights):
    """Models fitted on tiled features record the tiling; the scorer built from them embeds the same
    tiles and reproduces the fit-time scores."""
    from mvtec_ray.config import RunConfig
    from mvtec_ray.deploy.loaded_models import ModelSet, plan_models
    from mvtec_ray.deploy.model_files import save_model
    from mvtec_ray.detectors.patch import PatchCore
    from mvtec_ray.features.backbones import probe_feature_shapes
    from mvtec_ray.features.store import extraction_metadata
    from mvtec_ray.storage import Storage

    config = ExtractConfig(backbone="efficientnet_lite0", image_size=128, tile_size=64)
    shapes = probe_feature_shapes(config, lite0_weights)
    assert shapes["patch_shape"][:2] == [16, 16]
    metadata = extraction_metadata(config, lite0_weights, shapes)
    assert metadata["tile_size"] == 64
    extractor = FeatureExtractor(LITE0, lite0_weights.state_dict, tile_size=64)
    images = _images(6, 128, seed=2)
    _, patches, _ = embed_images(extractor, images)
    detector = PatchCore(coreset_ratio=0.5).fit(patches[:4])
    models = str(tmp_path / "models")
    save_model(Storage(), models, "washer", detector, 1.0, "test", metadata)
    run = RunConfig(extract={"backbone": "efficientnet_lite0"})
    plan = plan_models(run, Storage(), models)
    assert plan.selection.tile_size == 64
    model_set = ModelSet.from_plan(plan, Storage())
    assert model_set.extractor.tile_size == 64
    _, scored, _ = embed_images(model_set.extractor, images[4:])
    np.testing.assert_allclose(detector.score(scored), detector.score(patches[4:]), rtol=1e-5)

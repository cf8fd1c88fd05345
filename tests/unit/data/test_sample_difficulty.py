"""The sample generator's difficulty levels: "standard" is the original dataset, "hard" has
small faint defects on normal images that vary more."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter

from mvtec_ray.cli import build_parser, main
from mvtec_ray.data import sample_data as sd
from mvtec_ray.data.sample_data import (
    DEFAULT_CATEGORIES,
    DEFECT_TYPES,
    DIFFICULTIES,
    SampleSpec,
    generate_sample_dataset,
)

HARD = DIFFICULTIES["hard"]
STANDARD = DIFFICULTIES["standard"]
#: defects that are removed material: smaller on "hard", but as strong as ever where they are
STRUCTURAL = {"missing_part", "broken"}


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _small(difficulty: str, **counts) -> SampleSpec:
    return SampleSpec(**{"n_train": 2, "n_test_good": 1, "n_test_defect_per_type": 1, **counts},
                      size=96, difficulty=difficulty)


def test_standard_is_the_default_and_hard_differs(tmp_path):
    assert SampleSpec().difficulty == "standard"
    cats = ["washer", "grid_gray"]
    generate_sample_dataset(tmp_path / "default", categories=cats, spec=_small("standard"))
    generate_sample_dataset(tmp_path / "standard", categories=cats, spec=_small("standard"))
    generate_sample_dataset(tmp_path / "hard", categories=cats, spec=_small("hard"))
    generate_sample_dataset(tmp_path / "hard_washer", categories=["washer"], spec=_small("hard"))
    default, standard, hard = (_bytes(tmp_path / n) for n in ("default", "standard", "hard"))
    assert default == standard and len(default) > 0
    assert hard.keys() == standard.keys()
    assert all(hard[k] != standard[k] for k in hard if "ground_truth" not in k)
    # per-image seeding holds on "hard" too: a subset reproduces the same files
    for k, v in _bytes(tmp_path / "hard_washer").items():
        assert hard[k] == v, k


def test_unknown_difficulty_is_rejected():
    with pytest.raises(ValueError, match="difficulty"):
        SampleSpec(difficulty="extreme")
    assert set(DIFFICULTIES) == {"standard", "hard"}


def test_standard_level_has_no_extra_nuisance():
    # what keeps "standard" byte-identical: no factor changes the original arithmetic or draws
    assert (STANDARD.blob_area, STANDARD.stroke_length, STANDARD.stroke_width, STANDARD.contrast,
            STANDARD.pose_jitter, STANDARD.pixel_noise) == (1.0,) * 6
    assert STANDARD.lighting == 0 and STANDARD.defocus_px == (0.0, 0.0)


def _mask_areas(level: sd.Difficulty, cat: str, defect: str, n: int = 4, s: int = 128) -> list[float]:
    areas = []
    for i in range(n):
        _, mask = sd._render(cat, np.random.default_rng([11, i]), s, defect, level)
        areas.append(float(mask.mean()))
    return areas


@pytest.mark.parametrize("cat", sd.ALL_CATEGORIES)
def test_hard_defects_are_smaller_and_never_empty(cat):
    for defect in DEFECT_TYPES[cat]:
        hard, standard = _mask_areas(HARD, cat, defect), _mask_areas(STANDARD, cat, defect)
        assert min(hard) > 0, (cat, defect, hard)
        assert np.mean(hard) < 0.75 * np.mean(standard), (cat, defect, hard, standard)
        if cat != "rod_long":  # the rod's thin defects are not area-bounded
            assert max(hard) <= HARD.area_bounds[1], (cat, defect, hard)


@pytest.mark.parametrize("cat", DEFAULT_CATEGORIES)
def test_hard_defect_is_fainter_and_inside_its_mask(cat):
    s = 128
    for defect in DEFECT_TYPES[cat]:
        change = {}
        for name, level in (("standard", STANDARD), ("hard", HARD)):
            per_image = []
            for i in range(3):
                rng = np.random.default_rng([3, i])
                img, region, extra = sd._SCENES[cat](rng, s, level)
                out, mask = sd._apply_defect(cat, defect, rng, img.copy(), region, extra, s, level)
                diff = np.abs(out - img)
                diff = diff.max(axis=-1) if diff.ndim == 3 else diff
                assert mask.any()
                assert diff[mask].mean() > 0.04, (cat, defect, name, i)  # still there
                near = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255)
                                  .filter(ImageFilter.MaxFilter(15))) > 0
                assert diff[~near].max() < 0.02, (cat, defect, name, i)  # and only there
                per_image.append(diff[mask].mean())
            change[name] = np.mean(per_image)
        if defect not in STRUCTURAL:
            assert change["hard"] < 0.7 * change["standard"], (cat, defect, change)


def _train_images(tmp_path: Path, difficulty: str, cat: str) -> np.ndarray:
    root = tmp_path / difficulty
    generate_sample_dataset(root, categories=[cat], spec=_small(difficulty, n_train=10, n_test_good=0,
                                                                  n_test_defect_per_type=0))
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float64)
                     for p in sorted((root / cat / "train" / "good").glob("*.png"))])


@pytest.mark.parametrize("cat", sd.ALL_CATEGORIES)
def test_hard_normal_images_vary_more(tmp_path, cat):
    standard, hard = _train_images(tmp_path, "standard", cat), _train_images(tmp_path, "hard", cat)
    # low-passed first: a texture's random phase alone already decorrelates single pixels;
    # what is left is pose, illumination and exposure
    def spread_per_pixel(imgs: np.ndarray) -> float:
        return float(gaussian_filter(imgs, (0, 6, 6)).std(axis=0).mean())

    assert spread_per_pixel(hard) > 1.2 * spread_per_pixel(standard), cat
    assert np.std(hard.mean(axis=(1, 2))) > np.std(standard.mean(axis=(1, 2))), cat  # exposure, lighting


def test_cli_difficulty_flag(tmp_path, monkeypatch):
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["sample-data"]._actions
                  if "--difficulty" in a.option_strings)
    assert list(action.choices) == list(DIFFICULTIES) and action.default == "standard"
    # the CLI's spec, made small so the test stays fast
    monkeypatch.setattr(sd, "SampleSpec", lambda difficulty: _small(difficulty))
    out = tmp_path / "cli"
    assert main(["sample-data", str(out), "--categories", "washer", "--difficulty", "hard"]) == 0
    generate_sample_dataset(tmp_path / "api", categories=["washer"], spec=_small("hard"))
    assert _bytes(out) == _bytes(tmp_path / "api")
    with pytest.raises(SystemExit) as exc:  # argparse's usage error
        main(["sample-data", str(tmp_path / "bad"), "--difficulty", "extreme"])
    assert exc.value.code == 2 and not (tmp_path / "bad").exists()

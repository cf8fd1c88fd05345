"""Tests for the synthetic MVTec-AD-layout generator."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from sklearn.metrics import roc_auc_score

from mvtec_ray.data import sample_data as sd
from mvtec_ray.data.sample_data import (
    DEFAULT_CATEGORIES,
    DEFECT_TYPES,
    SampleSpec,
    generate_sample_dataset,
)

SMALL = SampleSpec(n_train=2, n_test_good=2, n_test_defect_per_type=2)


@pytest.fixture(scope="module")
def default_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    t0 = time.perf_counter()
    summary = generate_sample_dataset(root)
    return root, summary, time.perf_counter() - t0


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_default_categories_cover_texture_object_and_gray():
    assert len(DEFAULT_CATEGORIES) >= 3
    assert set(DEFAULT_CATEGORIES) <= set(DEFECT_TYPES)
    assert any(c in sd.GRAYSCALE_CATEGORIES for c in DEFAULT_CATEGORIES)
    assert all(len(DEFECT_TYPES[c]) >= 2 for c in DEFAULT_CATEGORIES)


def test_generation_time(default_ds):
    assert default_ds[2] < 15.0


def test_layout_and_counts(default_ds):
    root, summary, _ = default_ds
    spec = SampleSpec()
    assert sorted(p.name for p in root.iterdir()) == sorted(DEFAULT_CATEGORIES)
    assert set(summary) == set(DEFAULT_CATEGORIES)
    for cat in DEFAULT_CATEGORIES:
        defects = DEFECT_TYPES[cat]
        c = root / cat
        assert _files(c) == ["ground_truth", "test", "train"]
        assert _files(c / "train") == ["good"]
        assert _files(c / "test") == sorted(("good",) + defects)
        assert _files(c / "ground_truth") == sorted(defects)
        assert _files(c / "train" / "good") == [f"{i:03d}.png" for i in range(spec.n_train)]
        assert _files(c / "test" / "good") == [f"{i:03d}.png" for i in range(spec.n_test_good)]
        for d in defects:
            n = spec.n_test_defect_per_type
            assert _files(c / "test" / d) == [f"{i:03d}.png" for i in range(n)]
            assert _files(c / "ground_truth" / d) == [f"{i:03d}_mask.png" for i in range(n)]
        assert summary[cat] == {"train": spec.n_train, "test_good": spec.n_test_good,
                                "test_defect": {d: spec.n_test_defect_per_type for d in defects}}


def test_image_modes_and_single_size(default_ds):
    root = default_ds[0]
    for cat in DEFAULT_CATEGORIES:
        want = "L" if cat in sd.GRAYSCALE_CATEGORIES else "RGB"
        sizes = set()
        for p in (root / cat).rglob("*.png"):
            with Image.open(p) as im:
                assert im.format == "PNG"
                sizes.add(im.size)
                if "ground_truth" not in p.parts:
                    assert im.mode == want, p
        assert sizes == {(256, 256)}, (cat, sizes)
    assert "grid_gray" in sd.GRAYSCALE_CATEGORIES


def test_masks_binary_nonempty_local(default_ds):
    root = default_ds[0]
    for cat in DEFAULT_CATEGORIES:
        for d in DEFECT_TYPES[cat]:
            for img_p in sorted((root / cat / "test" / d).glob("*.png")):
                mask_p = root / cat / "ground_truth" / d / f"{img_p.stem}_mask.png"
                assert mask_p.is_file()
                with Image.open(mask_p) as m, Image.open(img_p) as im:
                    assert m.mode == "L" and m.size == im.size
                    arr = np.asarray(m)
                assert set(np.unique(arr)) == {0, 255}, mask_p
                frac = (arr > 0).mean()
                assert 0.005 <= frac <= 0.10, (mask_p, frac)  # local, a few % of the image


def test_good_images_have_no_masks(default_ds):
    root = default_ds[0]
    for cat in DEFAULT_CATEGORIES:
        gt = root / cat / "ground_truth"
        assert not (gt / "good").exists()
        n_defect = sum(len(list((root / cat / "test" / d).glob("*.png"))) for d in DEFECT_TYPES[cat])
        assert len(list(gt.rglob("*"))) - len(DEFECT_TYPES[cat]) == n_defect  # only defect masks


def test_mean_brightness_does_not_separate_defects(default_ds):
    root = default_ds[0]
    for cat in DEFAULT_CATEGORIES:
        y, m = [], []
        for p in sorted((root / cat / "test").rglob("*.png")):
            with Image.open(p) as im:
                m.append(np.asarray(im.convert("L"), dtype=np.float64).mean())
            y.append(p.parent.name != "good")
        auc = roc_auc_score(y, m)
        assert 0.25 <= auc <= 0.75, (cat, auc)


def test_normal_images_vary(default_ds):
    root = default_ds[0]
    for cat in DEFAULT_CATEGORIES:
        arrs = [np.asarray(Image.open(p), dtype=np.float32)
                for p in sorted((root / cat / "train" / "good").glob("*.png"))[:6]]
        for i in range(len(arrs)):
            for j in range(i + 1, len(arrs)):
                assert np.abs(arrs[i] - arrs[j]).mean() > 3.0, (cat, i, j)


def _bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_deterministic_per_seed_and_subset(tmp_path, default_ds):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    generate_sample_dataset(a, categories=["washer", "grid_gray"], seed=0, spec=SMALL)
    generate_sample_dataset(b, categories=["washer", "grid_gray"], seed=0, spec=SMALL)
    generate_sample_dataset(c, categories=["washer", "grid_gray"], seed=1, spec=SMALL)
    ba, bb, bc = _bytes(a), _bytes(b), _bytes(c)
    assert ba == bb and len(ba) > 0
    assert ba.keys() == bc.keys()
    images = [k for k in ba if "ground_truth" not in k]
    assert all(ba[k] != bc[k] for k in images)
    # per-image seeding: a subset / smaller spec reproduces the full default dataset's files
    full = default_ds[0]
    for k, v in ba.items():
        assert (full / k).read_bytes() == v, k


def test_defect_is_visible_and_inside_mask():
    s = 256
    for cat in DEFAULT_CATEGORIES:
        for d in DEFECT_TYPES[cat]:
            for i in range(2):
                rng = np.random.default_rng([7, i])
                img, region, extra = sd._SCENES[cat](rng, s)
                out, mask = sd._apply_defect(cat, d, rng, img.copy(), region, extra, s)
                diff = np.abs(out - img)
                diff = diff.max(axis=-1) if diff.ndim == 3 else diff
                # decent contrast where the mask says the defect is
                assert diff[mask].mean() > 0.12, (cat, d, i, diff[mask].mean())
                # nothing changes far from the mask (soft edges only nearby)
                near = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255)
                                  .filter(ImageFilter.MaxFilter(15))) > 0
                assert diff[~near].max() < 0.02, (cat, d, i)


def test_rejects_bad_input_and_existing_output(tmp_path):
    with pytest.raises(ValueError):
        generate_sample_dataset(tmp_path, categories=["nope"])
    with pytest.raises(ValueError):
        generate_sample_dataset(tmp_path, seed=-1)
    with pytest.raises(ValueError):
        SampleSpec(size=16)
    tiny = SampleSpec(n_train=1, n_test_good=1, n_test_defect_per_type=1)
    generate_sample_dataset(tmp_path, categories=["washer"], spec=tiny)
    with pytest.raises(FileExistsError):
        generate_sample_dataset(tmp_path, categories=["washer"], spec=tiny)
    # overwrite replaces the folder: no stale files from a larger earlier run survive
    generate_sample_dataset(tmp_path, categories=["washer"], spec=SampleSpec(2, 1, 1),
                            overwrite=True)
    generate_sample_dataset(tmp_path, categories=["washer"], spec=tiny, overwrite=True)
    assert _files(tmp_path / "washer" / "train" / "good") == ["000.png"]


def test_larger_size_supported(tmp_path):
    spec = SampleSpec(n_train=1, n_test_good=1, n_test_defect_per_type=1, size=320)
    generate_sample_dataset(tmp_path, categories=["carpet_like"], spec=spec)
    for p in (tmp_path / "carpet_like").rglob("*.png"):
        with Image.open(p) as im:
            assert im.size == (320, 320)

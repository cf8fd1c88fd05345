"""Catalog: a good layout, and each broken layout with its own one-line error."""
from __future__ import annotations

import shutil

import pytest

from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.errors import CatalogError, StorageError


@pytest.fixture
def dataset(small_dataset, tmp_path):
    root = tmp_path / "mvtec"
    shutil.copytree(small_dataset, root)
    return root


def test_good_layout_gives_every_image_once(dataset):
    catalog = build_catalog(str(dataset))
    entries = catalog.entries
    assert catalog.categories == ["grid_gray", "washer"]
    on_disk = sorted(p for p in dataset.rglob("*.png") if "ground_truth" not in p.parts)
    assert sorted(entries["uri"]) == sorted(str(p) for p in on_disk)
    assert entries["image_id"].is_unique
    train = entries[entries["split"] == "train"]
    assert (train["label"] == 0).all() and (train["defect_type"] == "good").all()
    defects = entries[entries["label"] == 1]
    assert len(defects) > 0 and (defects["mask_uri"] != "").all()
    assert (entries.loc[entries["label"] == 0, "mask_uri"] == "").all()
    assert catalog.warnings == [] and catalog.skipped.empty


def test_missing_root(tmp_path):
    with pytest.raises(StorageError, match="not found"):
        build_catalog(str(tmp_path / "nope"))


def test_no_categories(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CatalogError, match="no categories"):
        build_catalog(str(tmp_path / "empty"))


def test_category_without_train_good(dataset):
    shutil.rmtree(dataset / "washer" / "train")
    with pytest.raises(CatalogError, match="'washer' has no images in train/good"):
        build_catalog(str(dataset))


def test_category_without_test(dataset):
    shutil.rmtree(dataset / "washer" / "test")
    with pytest.raises(CatalogError, match="'washer' has no images in test/"):
        build_catalog(str(dataset))


def test_unknown_category_selected(dataset):
    with pytest.raises(CatalogError, match="categories not found.*bottle"):
        build_catalog(str(dataset), categories=["bottle"])


def test_missing_mask_and_stray_files_are_recorded(dataset):
    mask = next((dataset / "washer" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    (dataset / "washer" / "test" / "good" / "notes.txt").write_text("not an image")
    (dataset / "washer" / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    nested = dataset / "washer" / "train" / "good" / "extra"
    nested.mkdir()
    (nested / "x.png").write_bytes(b"")
    catalog = build_catalog(str(dataset))
    defect_id = mask.parent.name + "/" + mask.name.replace("_mask", "")
    row = catalog.entries[catalog.entries["image_id"] == f"washer/test/{defect_id}"]
    assert len(row) == 1 and row["mask_uri"].iloc[0] == ""
    assert any("without a mask" in w for w in catalog.warnings)
    reasons = dict(zip(catalog.skipped["uri"].map(lambda u: u.rsplit("/", 1)[-1]), catalog.skipped["reason"]))
    assert reasons["notes.txt"].startswith("not an image file")
    assert reasons[".DS_Store"] == "hidden file"
    assert reasons["x.png"].startswith("not in the MVTec layout")

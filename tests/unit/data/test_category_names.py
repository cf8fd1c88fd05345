"""One rule for category names (``check_category_name``), applied to dataset folders and manifests
alike: a name that would escape a store's folder, invent another category, hide behind a store's
own files or collide with the results' mean rows is refused with one line naming it."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from mvtec_ray.data.catalog import build_catalog, category_name_problem, check_category_name
from mvtec_ray.data.manifest import build_manifest_catalog
from mvtec_ray.errors import CatalogError

REFUSED = ["", ".", "..", "a/b", "a\\b", "_extract", "_x", ".hidden", "mean", " pad", "tab\tname", "x" * 129]
ACCEPTED = ["bottle", "metal_nut", "Mean", "grid-gray", "x" * 128, "a.b", "mean_value"]


@pytest.mark.parametrize("name", REFUSED)
def test_refused_names_say_which_value(name):
    with pytest.raises(CatalogError, match="category") as info:
        check_category_name(name, "somewhere")
    assert repr(name) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_names(name):
    assert check_category_name(name) == name and category_name_problem(name) == ""


def _manifest(tmp_path, category: str) -> str:
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    rows = [{"path": "a.png", "category": category, "split": "train", "label": 0},
            {"path": "b.png", "category": category, "split": "test", "label": 0}]
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize("name", ["..", ".", "_under", "mean", "a\\b"])
def test_manifest_refuses_the_same_names(tmp_path, name):
    with pytest.raises(CatalogError, match=r"m\.csv line 2: category .*: a category name|reserved") as info:
        build_manifest_catalog(_manifest(tmp_path, name))
    assert repr(name) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["_under", "mean"])
def test_folders_follow_the_same_rule(small_dataset, tmp_path, name):
    root = tmp_path / "mvtec"
    shutil.copytree(small_dataset / "washer", root / name)
    shutil.copytree(small_dataset / "washer", root / "washer")
    with pytest.raises(CatalogError, match=f"folder .*{name}: category {name!r}") as info:
        build_catalog(str(root))
    assert "\n" not in str(info.value)
    # the rule applies to what is used: an unselected folder is recorded as skipped, not refused
    catalog = build_catalog(str(root), categories=["washer"])
    assert catalog.categories == ["washer"]
    assert set(catalog.skipped.loc[catalog.skipped["category"] == name, "reason"]) == {"category not selected"}


def test_hidden_folders_stay_skipped(small_dataset, tmp_path):
    root = tmp_path / "mvtec"
    shutil.copytree(small_dataset / "washer", root / "washer")
    shutil.copytree(small_dataset / "washer", root / ".cache")
    catalog = build_catalog(str(root))
    assert catalog.categories == ["washer"] and set(catalog.skipped["reason"]) == {"hidden folder"}


@pytest.mark.parametrize("name", ["..", ".", "_extract.json", "a/../.."])
def test_the_feature_store_builds_no_path_from_a_bad_name(tmp_path, name):
    import numpy as np

    from mvtec_ray.features.store import write_shards
    from mvtec_ray.storage import Storage
    batch = {"category": np.asarray([name], dtype=object), "split": np.asarray(["train"], dtype=object),
             "row_id": np.asarray(["r#orig"], dtype=object)}
    with pytest.raises(CatalogError, match="category"):
        write_shards(batch, str(tmp_path / "features" / "fp"), Storage(), {})
    assert not any(tmp_path.rglob("*.parquet"))

"""Manifests: a CSV/Parquet table of images gives the same catalog (and the same results) as the folder."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from mvtec_ray.cli import main
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.manifest import build_manifest_catalog
from mvtec_ray.errors import CatalogError

COMPARED = ["image_id", "category", "split", "label", "defect_type", "size_bytes"]


@pytest.fixture(scope="module")
def one_category(tmp_path_factory):
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    root = tmp_path_factory.mktemp("manifest_data") / "mvtec"
    generate_sample_dataset(root, categories=["washer"], seed=5,
                            spec=SampleSpec(n_train=12, n_test_good=4, n_test_defect_per_type=1, size=128))
    return root


def flattened_copy(root, target, with_ids: bool = True) -> pd.DataFrame:
    """Copy every image and mask into one folder under new names; the manifest uses relative paths."""
    (target / "files").mkdir(parents=True)
    catalog = build_catalog(str(root))
    rows = []
    for i, entry in enumerate(catalog.entries.itertuples()):
        name = f"files/img_{i:04d}.png"
        shutil.copy(entry.uri, target / name)
        mask = ""
        if entry.mask_uri:
            mask = f"files/m_{i:04d}.png"
            shutil.copy(entry.mask_uri, target / mask)
        row = {"path": name, "category": entry.category, "split": entry.split, "label": entry.label,
               "defect_type": entry.defect_type, "mask_path": mask}
        if with_ids:
            row["image_id"] = entry.image_id
        rows.append(row)
    return pd.DataFrame(rows)


def test_manifest_gives_the_folder_catalog(one_category, tmp_path):
    folder = build_catalog(str(one_category))
    table = flattened_copy(one_category, tmp_path)
    table.to_csv(tmp_path / "images.csv", index=False)
    table.to_parquet(tmp_path / "images.parquet", index=False)
    for name in ("images.csv", "images.parquet"):
        catalog = build_manifest_catalog(str(tmp_path / name))
        pd.testing.assert_frame_equal(catalog.entries[COMPARED], folder.entries[COMPARED])
        assert catalog.entries["uri"].str.startswith(str(tmp_path / "files")).all()
        assert (catalog.entries["mask_uri"] != "").sum() == (folder.entries["mask_uri"] != "").sum() > 0
    # without image_id the ids follow the folder's naming scheme, from the new file names
    table.drop(columns=["image_id"]).to_csv(tmp_path / "no_ids.csv", index=False)
    catalog = build_manifest_catalog(str(tmp_path / "no_ids.csv"))
    assert catalog.entries["image_id"].str.match(r"washer/(train|test)/\w+/img_\d{4}\.png").all()


def test_manifest_on_s3(one_category, tmp_path, s3_server, s3_settings):
    from mvtec_ray.storage import Storage
    from tests.helpers.s3_upload import upload_tree
    table = flattened_copy(one_category, tmp_path)
    table.to_parquet(tmp_path / "images.parquet", index=False)
    upload_tree(s3_server["client"], s3_server["bucket"], tmp_path, "manifest-run")
    catalog = build_manifest_catalog(f"s3://{s3_server['bucket']}/manifest-run/images.parquet", Storage(s3_settings))
    folder = build_catalog(str(one_category))
    pd.testing.assert_frame_equal(catalog.entries[COMPARED], folder.entries[COMPARED])
    assert catalog.entries["uri"].str.startswith("s3://mvtec/manifest-run/files/img_").all()


def write_manifest(tmp_path, rows: list[dict]) -> str:
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "c.png").write_bytes(b"x")
    path = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


GOOD = [{"path": "a.png", "category": "c", "split": "train", "label": 0},
        {"path": "b.png", "category": "c", "split": "test", "label": 0},
        {"path": "c.png", "category": "c", "split": "test", "label": 1}]


@pytest.mark.parametrize("change, message", [
    ({"path": "gone.png"}, r"m\.csv line 4: path file not found: .*gone\.png$"),
    ({"split": "val"}, r"m\.csv line 4: unknown split 'val' \(expected train or test\)$"),
    ({"label": 2}, r"m\.csv line 4: label must be 0 \(good\) or 1 \(defect\), got '2'$"),
    ({"label": "bad"}, r"m\.csv line 4: label must be 0 \(good\) or 1 \(defect\), got 'bad'$"),
    ({"mask_path": "nomask.png"}, r"m\.csv line 4: mask_path file not found: .*nomask\.png$"),
    ({"path": "b.png"}, r"m\.csv line 4: path '.*b\.png' listed twice \(first at m\.csv line 3\)$"),
    ({"split": "train"}, r"m\.csv line 4: train images must be good \(label 0\); defects belong to the test split$"),
])
def test_each_bad_row_is_one_line_naming_it(tmp_path, change, message):
    rows = [dict(r) for r in GOOD]
    rows[2].update(change)
    with pytest.raises(CatalogError, match=message) as info:
        build_manifest_catalog(write_manifest(tmp_path, rows))
    assert "\n" not in str(info.value)


def test_missing_columns_and_file(tmp_path):
    path = write_manifest(tmp_path, [{"path": "a.png", "category": "c", "split": "train"}])
    with pytest.raises(CatalogError, match="lacks column.s. label"):
        build_manifest_catalog(path)
    with pytest.raises(CatalogError, match="manifest not found"):
        build_manifest_catalog(str(tmp_path / "nothing.csv"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(CatalogError, match="cannot read manifest .*broken.parquet"):
        build_manifest_catalog(str(tmp_path / "broken.parquet"))


def test_test_split_without_good_or_defect_warns(tmp_path):
    catalog = build_manifest_catalog(write_manifest(tmp_path, GOOD[:2]))
    assert any("no defect image" in w for w in catalog.warnings)
    catalog = build_manifest_catalog(write_manifest(tmp_path, [GOOD[0], GOOD[2]]))
    assert any("no good image" in w for w in catalog.warnings)
    catalog = build_manifest_catalog(write_manifest(tmp_path, GOOD))
    assert not [w for w in catalog.warnings if "test split" in w]


def test_cli_prints_the_row_and_exits_2(tmp_path, capsys):
    rows = [dict(r) for r in GOOD]
    rows[1]["split"] = "validation"
    code = main(["extract", "--manifest", write_manifest(tmp_path, rows), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == "mvtec-ray extract: error: m.csv line 3: unknown split 'validation' (expected train or test)"


COMMON = {"extract.backbone": "efficientnet_lite0", "extract.patch_maps": "none", "extract.holdout_fraction": 0.4,
          "detectors.names": ["knn", "mahalanobis", "lof"]}


@pytest.fixture(scope="module")
def folder_run(one_category, tmp_path_factory, ray_session):
    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.pipeline import run_pipeline
    out = tmp_path_factory.mktemp("folder_run")
    return run_pipeline(load_config(None, {"data": str(one_category), "out": str(out), **COMMON}))


def test_manifest_run_gives_the_folder_table(one_category, folder_run, tmp_path):
    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.pipeline import run_pipeline
    table = flattened_copy(one_category, tmp_path / "flat")
    table.to_csv(tmp_path / "flat" / "images.csv", index=False)
    by_manifest = run_pipeline(load_config(None, {"manifest": str(tmp_path / "flat" / "images.csv"),
                                                  "out": str(tmp_path / "b"), **COMMON}))
    metrics = ["category", "detector", "status", "image_auroc", "image_f1", "image_f1_max", "threshold",
               "n_train", "n_val_good", "n_val_synthetic", "n_test_good", "n_test_defect"]
    a, b = (o.results[metrics].sort_values(["category", "detector"], ignore_index=True)
            for o in (folder_run, by_manifest))
    assert (a["status"] == "ok").all() and len(a) == 8  # 3 detectors + best_on_validation, each + its mean
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
    keys = ["detector", "split", "image_id"]
    sa, sb = (o.scores.sort_values(keys, ignore_index=True) for o in (folder_run, by_manifest))
    assert list(sa["image_id"]) == list(sb["image_id"]) and len(sa) > 0
    np.testing.assert_allclose(sa["score"], sb["score"], rtol=1e-4, atol=1e-6)
    assert sb["input_uri"].str.contains("/flat/files/img_").all()


# -- search and the false-alarm budget on a whole run (here: the folder run's features, no second extraction)
GRIDS = {"knn": {"k": [1, 3, 6]}, "lof": {"n_neighbors": [2, 4, 8]}}


def test_run_with_search_and_a_false_alarm_budget(folder_run, tmp_path):
    import json

    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.report.html import write_report
    from mvtec_ray.report.outputs import write_outputs
    from mvtec_ray.report.tables import format_tuning_table
    from mvtec_ray.storage import Storage
    config = load_config(None, {"out": str(tmp_path), "detectors.names": ["knn", "lof"],
                                "search.enabled": True, "search.grids": GRIDS,
                                "evaluation.threshold_rule": "fpr:0.25"})
    storage = Storage()
    features = FeatureSet.open(folder_run.extraction.features_dir, storage)
    results, scores = run_fit(features, str(tmp_path), config, storage)
    write_outputs(str(tmp_path), storage, config, results, scores)
    search = pd.read_parquet(tmp_path / "search.parquet")
    assert len(search) == 8 and search.groupby("detector")["chosen"].sum().eq(1).all()
    assert {"category", "detector", "params", "val_auroc", "chosen", "fit_seconds"} <= set(search.columns)
    rows = (pd.read_parquet(tmp_path / "results.parquet")
            .query("category != 'mean' and detector != 'best_on_validation'").set_index("detector"))
    picked = search[search["chosen"]].set_index("detector")
    for detector in ("knn", "lof"):
        assert json.loads(rows.loc[detector, "params"]) == json.loads(picked.loc[detector, "params"])
        assert rows.loc[detector, "status"] == "ok" and not np.isnan(rows.loc[detector, "default_image_auroc"])
        best = search[search["detector"] == detector]["val_auroc"].max()
        assert picked.loc[detector, "val_auroc"] == best
        if picked.loc[detector, "trial"] == 0:
            assert rows.loc[detector, "default_image_auroc"] == rows.loc[detector, "image_auroc"]
    default_knn = folder_run.results.query("category != 'mean' and detector == 'knn'")["image_auroc"].iloc[0]
    assert rows.loc["knn", "default_image_auroc"] == pytest.approx(default_knn)
    assert set(rows["threshold_rule"]) == {"val_fpr_0.25"}
    # the false-alarm rate on the held-out normals is within the budget
    val_good = scores[scores["split"] == "val_good"]
    assert val_good["detector"].nunique() == 2 and val_good.groupby("detector").size().min() >= 4
    for detector, group in val_good.groupby("detector"):
        assert (group["score"] >= group["threshold"]).mean() <= 0.25, detector
    assert "knn" in format_tuning_table(results)
    assert rows["setting_changed"].tolist() == [bool(picked.loc[d, "trial"] != 0) for d in rows.index]
    html = write_report(str(tmp_path)).read_text()
    assert "Default vs tuned" in html and "chosen settings per category" in html

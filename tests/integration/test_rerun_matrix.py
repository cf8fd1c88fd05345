"""The re-run matrix: every way a re-run could act on old or wrong data, in one place.

Extraction and fit (first part): the same data twice, one file changed / removed / added, another
dataset with the same names, and an error file fixed in between. Kept lean: one category, a few
64 px images, EfficientNet-Lite0 without patch maps, kNN.

Batch scoring (second part): the index is keyed on (uri, version, detector, model version):
another detector, a refitted model and a file replaced with the same size and mtime are scored;
error rows are retried; the same job twice scores nothing the second time.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mvtec_ray.config import load_config
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
from mvtec_ray.distributed.scoring import run_scoring
from mvtec_ray.errors import UserError
from mvtec_ray.features.store import SUCCESS, FeatureSet, tensor_to_numpy
from mvtec_ray.storage import Storage
from tests.helpers.shards import raw_shard_rows

CATEGORY = "washer"
SPEC = SampleSpec(n_train=6, n_test_good=2, n_test_defect_per_type=1, size=64)
# 4 train + 2 val_good + 2 val_synthetic + 5 test rows
ROWS = 13
OVERRIDES = {"extract.backbone": "efficientnet_lite0", "extract.image_size": 64, "extract.batch_size": 8,
             "extract.torch_threads": 1, "extract.synthetic_per_image": 1, "extract.patch_maps": "none",
             "detectors.names": ["knn"], "evaluation.overlays": False, "evaluation.save_maps": False}


def _dataset(root: Path, seed: int) -> Path:
    generate_sample_dataset(root, categories=[CATEGORY], seed=seed, spec=SPEC)
    return root


def _config(data: Path, out: Path, **extra):
    return load_config(None, {"data": str(data), "out": str(out), **OVERRIDES, **extra})


def _extract(data: Path, features: Path, weights, **extra):
    from mvtec_ray.distributed.extraction import run_extraction
    config = _config(data, features, **extra)
    return run_extraction(build_catalog(str(data)), str(features), config.extract, Storage(), weights)


def _shards(folder: Path) -> set[str]:
    return {str(p) for p in folder.rglob("part-*.parquet")}


def _rows_by_image(features: FeatureSet) -> pd.DataFrame:
    return features.read(columns=["row_id", "image_id", "split", "source_version", "status", "error"]).to_pandas()


def _comparable(table: pd.DataFrame) -> pd.DataFrame:
    """A results or scores table without the columns that measure time or memory."""
    drop = [c for c in table.columns if re.search(r"second|_mb$|rss|memory|_at$", c)]
    return table.drop(columns=drop).reset_index(drop=True)


@pytest.fixture(scope="module")
def first_run(ray_session, tmp_path_factory):
    """Dataset A and one whole run of it; the tests below run again into the same OUT, in this
    order (the second one changes A's files, the third puts dataset B into the same OUT)."""
    from mvtec_ray.distributed.pipeline import run_pipeline
    base = tmp_path_factory.mktemp("rerun")
    data, out = _dataset(base / "a", seed=5), base / "out"
    outputs = run_pipeline(_config(data, out))
    return data, out, outputs


def test_same_data_twice_extracts_nothing_and_gives_the_same_results(first_run):
    from mvtec_ray.distributed.pipeline import run_pipeline
    data, out, first = first_run
    folder = Path(first.extraction.features_dir)
    shards, scores = _shards(folder), pd.read_parquet(out / "scores.parquet")
    again = run_pipeline(_config(data, out))
    assert again.extraction.skipped_existing == ROWS and _shards(folder) == shards
    assert json.loads((folder / SUCCESS).read_text())["extracted"] == 0
    pd.testing.assert_frame_equal(_comparable(again.results), _comparable(first.results))
    pd.testing.assert_frame_equal(_comparable(pd.read_parquet(out / "scores.parquet")), _comparable(scores))


def test_one_file_changed_removed_and_added(first_run, lite0_weights):
    data, out, first = first_run
    folder, features = Path(first.extraction.features_dir), out / "features"
    before, shards = _rows_by_image(FeatureSet(str(folder), Storage())), _shards(folder)
    pooled_before = FeatureSet(str(folder), Storage()).load_pooled(CATEGORY)["train"]
    train = sorted(before.loc[before["split"] == "train", "image_id"])
    changed, removed = train[0], train[1]
    path = data / changed
    flipped = Image.open(path).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    sink = io.BytesIO()
    flipped.save(sink, format="PNG")
    path.write_bytes(sink.getvalue())
    (data / removed).unlink()
    good = sorted((data / CATEGORY / "test" / "good").glob("*.png"))[0]
    shutil.copyfile(good, good.with_name("added.png"))
    added = f"{CATEGORY}/test/good/added.png"

    second = _extract(data, features, lite0_weights)
    written = pd.concat([pd.read_parquet(p, columns=["image_id"]) for p in _shards(folder) - shards])
    assert set(written["image_id"]) == {changed, added}  # exactly those rows extracted
    assert (second.changed, second.dropped, second.skipped_existing) == (1, 1, ROWS - 2)

    store = FeatureSet.open(str(folder))
    after = _rows_by_image(store)
    assert removed not in set(after["image_id"]) and added in set(after["image_id"])
    assert len(after) == ROWS and store.success()["rows"] == ROWS
    current = build_catalog(str(data)).entries.set_index("image_id")["version"]
    assert (after["source_version"] == after["image_id"].map(current)).all()
    # the fit's view: the removed image is not trained on, the changed one with its new pixels
    pooled = store.load_pooled(CATEGORY)["train"]
    assert removed + "#orig" not in set(pooled["row_id"])
    old = pooled_before["X"][list(pooled_before["row_id"]).index(changed + "#orig")]
    new = pooled["X"][list(pooled["row_id"]).index(changed + "#orig")]
    assert not np.allclose(old, new)
    assert removed + "#orig" in set(raw_shard_rows(folder)["row_id"])  # still stored, never read


def test_another_dataset_into_the_same_out_and_an_error_file_fixed(first_run, lite0_weights, tmp_path):
    _, out, first = first_run
    folder, features = Path(first.extraction.features_dir), out / "features"
    a_rows = FeatureSet.open(str(folder)).read(columns=["row_id", "pooled"])
    a_pooled = dict(zip(a_rows.column("row_id").to_pylist(), tensor_to_numpy(a_rows.column("pooled"))))

    # B: the same category and file names, other pictures; one defect's mask unreadable
    b = _dataset(tmp_path / "b", seed=8)
    mask = sorted((b / CATEGORY / "ground_truth").rglob("*.png"))[0]
    good_mask = mask.read_bytes()
    mask.write_bytes(b"not a mask")
    with pytest.raises(UserError, match=rf"{CATEGORY}/test: 1 of \d+ rows could not be read") as info:
        _extract(b, features, lite0_weights)
    assert "\n" not in str(info.value) and "max_error_fraction" in str(info.value)
    assert not (folder / SUCCESS).exists()  # stopped: nothing to fit on
    with pytest.raises(UserError, match="incomplete"):
        FeatureSet.open(str(folder))

    mask.write_bytes(good_mask)  # the image itself did not change: its error row is retried
    fixed = _extract(b, features, lite0_weights)
    assert (fixed.retried_errors, fixed.skipped_existing, fixed.changed) == (1, ROWS - 1, 0)
    assert fixed.errors.empty
    store = FeatureSet.open(str(folder))
    rows = _rows_by_image(store)
    assert len(rows) == ROWS and (rows["status"] == "ok").all() and store.error_rows().num_rows == 0
    # nothing of A is read: every row is B's version of its file, with B's features
    versions = build_catalog(str(b)).entries.set_index("image_id")["version"]
    assert (rows["source_version"] == rows["image_id"].map(versions)).all()
    b_rows = store.read(columns=["row_id", "pooled"])
    shared = [(r, v) for r, v in zip(b_rows.column("row_id").to_pylist(),
                                      tensor_to_numpy(b_rows.column("pooled"))) if r in a_pooled]
    assert len(shared) >= ROWS - 2 and not any(np.allclose(v, a_pooled[r]) for r, v in shared)
    assert store.catalog()["root"] == str(b) and store.success()["catalog"] == store.catalog()


# -- batch scoring ---------------------------------------------------------------------------------
def _scoring_config(fitted, out):
    return fitted[0].model_copy(update={"out": str(out)})


def _rows(out: Path, folder: str = "scores") -> pd.DataFrame:
    return pq.read_table(out / folder).to_pandas() if (out / folder).exists() else pd.DataFrame()


@pytest.fixture
def incoming(small_dataset, tmp_path) -> Path:
    """Two washer test images as fixed-size BMPs (same dimensions: same byte size)."""
    root = tmp_path / "in"
    (root / "washer").mkdir(parents=True)
    for i, path in enumerate(sorted((small_dataset / "washer" / "test").rglob("*.png"))[:2]):
        Image.open(path).convert("RGB").save(root / "washer" / f"{i}.bmp")
    return root


def test_a_second_detector_into_the_same_out_scores_every_image(fitted_lite0, incoming, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    first = run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (first.scored_images, first.score_rows) == (2, 2)
    again = run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (again.listed, again.already_scored, again.scored_images, again.errors) == (2, 2, 0, 0)
    second = run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["patchcore"])
    assert (second.already_scored, second.scored_images, second.score_rows) == (0, 2, 2)
    rows = _rows(out)
    assert sorted(rows.groupby("detector").size().items()) == [("knn", 2), ("patchcore", 2)]
    # both: each image lacks nothing now
    both = run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["knn", "patchcore"])
    assert (both.already_scored, both.scored_images) == (2, 0)


def test_a_refitted_model_rescores_old_images_and_only_with_itself(fitted_lite0, incoming, tmp_path):
    from mvtec_ray.distributed.pipeline import run_fit
    from mvtec_ray.features.store import FeatureSet
    from mvtec_ray.storage import Storage
    fit_out = tmp_path / "fit"
    shutil.copytree(fitted_lite0[1], fit_out / "models")
    out = tmp_path / "out"
    detectors = ["knn", "patchcore"]
    first = run_scoring(_scoring_config(fitted_lite0, out), str(fit_out / "models"), str(incoming), detectors=detectors)
    assert first.score_rows == 4
    old = _rows(out).set_index("detector")["model_version"].to_dict()
    features = FeatureSet.open(str(fitted_lite0[1].parent / "features"))
    config = fitted_lite0[0].model_copy(update={"out": str(fit_out)})
    config = config.model_copy(update={"detectors": config.detectors.model_copy(update={"names": ["knn"]})})
    results, _ = run_fit(features, str(fit_out), config, Storage())  # `mvtec-ray fit --detectors knn`
    assert (results.loc[results["category"] == "washer", "status"] == "ok").all()
    second = run_scoring(_scoring_config(fitted_lite0, out), str(fit_out / "models"), str(incoming), detectors=detectors)
    assert (second.scored_images, second.score_rows) == (2, 2)
    rows = _rows(out)
    new = rows[rows["scored_at"] == rows["scored_at"].max()]
    assert set(new["detector"]) == {"knn"} and (new["model_version"] != old["knn"]).all()


def test_a_file_replaced_with_the_same_size_and_mtime_is_rescored(fitted_lite0, incoming, small_dataset, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    target = incoming / "washer" / "0.bmp"
    st = target.stat()
    other = sorted((small_dataset / "washer" / "test").rglob("*.png"))[-1]
    buffer = io.BytesIO()
    Image.open(other).convert("RGB").save(buffer, format="BMP")
    assert len(buffer.getvalue()) == st.st_size  # fixed-size format: the size says nothing
    tmp = target.with_name("0.bmp.new")
    tmp.write_bytes(buffer.getvalue())
    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # what cp -p / rsync -t keep
    os.replace(tmp, target)
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = run_scoring(_scoring_config(fitted_lite0, out), models, str(incoming), detectors=["knn"])
    assert (again.already_scored, again.scored_images) == (1, 1)
    mine = _rows(out).query("input_uri == @target.as_posix()").sort_values("scored_at")
    assert len(mine) == 2 and mine["input_version"].nunique() == 2 and mine["score"].nunique() == 2


def test_an_error_row_is_retried_and_scored_once_fixed(fitted_lite0, incoming, tmp_path):
    out = tmp_path / "out"
    models = str(fitted_lite0[1])
    loose = incoming.parent / "loose"
    loose.mkdir()
    shutil.copy(incoming / "washer" / "0.bmp", loose / "x.bmp")
    # no category in the path and no --category: an error row
    first = run_scoring(_scoring_config(fitted_lite0, out), models, str(loose), detectors=["knn"])
    assert (first.scored_images, first.errors, first.known_errors) == (0, 1, 0)
    again = run_scoring(_scoring_config(fitted_lite0, out), models, str(loose), detectors=["knn"])
    assert (again.scored_images, again.errors, again.known_errors) == (0, 1, 1)  # retried, not written twice
    assert len(_rows(out, "errors")) == 1
    fixed = run_scoring(_scoring_config(fitted_lite0, out), models, str(loose), category="washer", detectors=["knn"])
    assert (fixed.scored_images, fixed.errors) == (1, 0)
    scores, errors = _rows(out), _rows(out, "errors")
    assert scores["input_version"].tolist() == errors["input_version"].tolist()  # the same file, same version
    assert scores["scored_at"].max() > errors["scored_at"].max()  # the latest outcome: scored
    assert np.isfinite(scores["score"]).all()

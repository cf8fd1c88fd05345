"""Re-runs into the same OUT: the same data twice, one file changed / removed / added, another dataset
with the same names, and an error file fixed in between. Kept lean: one category, a few 64 px
images, EfficientNet-Lite0 without patch maps, kNN."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mvtec_ray.config import load_config
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
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

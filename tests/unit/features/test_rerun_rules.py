"""Re-runs into the same features folder, without Ray: the reuse rules of the plan (source version,
errors retried, images gone), the row index every reader follows, the count check at open, a
corrupt shard in one line, the error budget, and credentials refused mid-run as fatal."""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvtec_ray.config import ExtractConfig
from mvtec_ray.errors import StorageAccessDenied, StorageError, UserError
from mvtec_ray.features.plan import (
    expected_row_ids,
    expected_rows,
    known_splits_of,
    plan_work,
    reuse_stored_rows,
)
from mvtec_ray.features.prepare import prepare_batch
from mvtec_ray.features.row_index import (
    ROW_INDEX,
    build_row_index,
    check_error_budget,
    write_row_index,
)
from mvtec_ray.features.store import SUCCESS, FeatureSet, write_parquet
from mvtec_ray.storage import Storage
from tests.helpers.feature_store import SIZES, write_store

CONFIG = ExtractConfig(augment_copies=1, synthetic_per_image=1, holdout_fraction=0.25, min_holdout=1)


def _entries(n_train: int = 8, version: str = "v1", **versions: str) -> pd.DataFrame:
    rows = [{"image_id": f"c/train/good/{i:03d}.png", "split": "train", "label": 0, "defect_type": "good"}
            for i in range(n_train)]
    rows += [{"image_id": f"c/test/crack/{i:03d}.png", "split": "test", "label": 1, "defect_type": "crack"}
             for i in range(2)]
    entries = pd.DataFrame(rows).assign(category="c", uri=lambda d: "/data/" + d["image_id"], mask_uri="",
                                        size_bytes=10)
    entries["version"] = [versions.get(i.replace("/", "_").replace(".png", ""), version) for i in entries["image_id"]]
    return entries


def _stored_from(entries: pd.DataFrame, status: str = "ok", shard: str = "c/x/part-a.parquet") -> pd.DataFrame:
    """What a complete earlier run of ``entries`` left in the shards."""
    expected = expected_rows(plan_work(entries, CONFIG))
    return expected.assign(status=status, shard=shard)[["row_id", "image_id", "split", "source_version",
                                                          "status", "shard"]]


def _rerun_plan(entries: pd.DataFrame, stored: pd.DataFrame):
    known = known_splits_of(stored, entries)
    expected = expected_rows(plan_work(entries, CONFIG, None, known))
    reuse = reuse_stored_rows(expected, stored)
    return plan_work(entries, CONFIG, set(reuse.shards), known), reuse, expected


# -- the reuse rules ---------------------------------------------------------------------------------
def test_same_catalog_reuses_every_row():
    entries = _entries()
    plan, reuse, expected = _rerun_plan(entries, _stored_from(entries))
    assert plan.empty and len(reuse.shards) == len(expected)
    assert (reuse.retried, reuse.changed, reuse.dropped) == (0, 0, 0)


def test_a_changed_file_is_extracted_again_and_nothing_else():
    entries = _entries()
    stored = _stored_from(entries)
    changed = _entries(c_train_good_003="v2")
    plan, reuse, _ = _rerun_plan(changed, stored)
    assert list(plan["image_id"]) == ["c/train/good/003.png"]
    assert reuse.changed == len(plan["variants"].iloc[0].split(",")) and reuse.dropped == 0


def test_another_dataset_with_the_same_names_reuses_nothing():
    """The repro of the issue: same category and file names, other files (other versions): the
    old code planned 0 rows and fitted B's models on A's pixels."""
    stored = _stored_from(_entries(version="A"))
    b = _entries(version="B")
    plan, reuse, expected = _rerun_plan(b, stored)
    assert set(expected_row_ids(plan)) == set(expected["row_id"]) and not reuse.shards
    assert known_splits_of(stored, b) == {}  # nothing of A's, not even its holdout
    # a fresh run of B holds out the same images: the split draw is B's own
    fresh = plan_work(b, CONFIG)
    assert dict(zip(plan["image_id"], plan["split"])) == dict(zip(fresh["image_id"], fresh["split"]))


def test_error_rows_are_retried_on_every_run():
    entries = _entries()
    stored = _stored_from(entries)
    bad = stored["image_id"] == "c/test/crack/001.png"
    stored.loc[bad, "status"] = "error"
    plan, reuse, _ = _rerun_plan(entries, stored)
    assert list(plan["image_id"]) == ["c/test/crack/001.png"] and reuse.retried == 1
    # retried and now ok (a later shard): the ok copy is reused, the error copy is not read
    fixed = pd.concat([stored, stored[bad].assign(status="ok", shard="c/test/part-b.parquet")], ignore_index=True)
    plan, reuse, _ = _rerun_plan(entries, fixed)
    assert plan.empty and reuse.shards["c/test/crack/001.png#orig"] == "c/test/part-b.parquet"


def test_a_deleted_image_is_dropped_and_the_holdout_of_the_rest_stays():
    entries = _entries(n_train=10)
    stored = _stored_from(entries)
    splits = known_splits_of(stored, entries)
    train_only = sorted(i for i, s in splits.items() if s == "train")
    gone = train_only[0]
    plan, reuse, expected = _rerun_plan(entries[entries["image_id"] != gone], stored)
    assert plan.empty and reuse.dropped == 2  # its orig and aug1 rows
    assert not any(r.startswith(gone) for r in expected["row_id"])
    rest = known_splits_of(stored, entries[entries["image_id"] != gone])
    assert rest == {i: s for i, s in splits.items() if i != gone}


def test_a_row_stored_under_another_split_is_not_reused():
    entries = _entries()
    stored = _stored_from(entries)
    first = stored.index[stored["row_id"].str.endswith("#orig")][0]
    stored.loc[first, "split"] = "test" if stored.loc[first, "split"] != "test" else "train"
    expected = expected_rows(plan_work(entries, CONFIG))
    assert stored.loc[first, "row_id"] not in reuse_stored_rows(expected, stored).shards


# -- the row index and the readers ----------------------------------------------------------------
def _shifted_copy(table: pa.Table) -> pa.Table:
    pooled = table.column("pooled").combine_chunks()
    shifted = pa.ExtensionArray.from_storage(pooled.type, pa.FixedSizeListArray.from_arrays(
        pa.array(pooled.storage.values.to_numpy(zero_copy_only=False) + np.float32(100)),
        pooled.type.storage_type.list_size))
    return table.set_column(table.schema.get_field_index("pooled"), "pooled", shifted)


@pytest.fixture
def indexed_store(tmp_path):
    """A store whose folder also holds rows the index leaves out: a newer copy of one train row in a
    shard that sorts first (what the old first-occurrence rule would read), and one image gone."""
    store = write_store(tmp_path / "features", patches=True)
    stored = store.stored_rows()
    first_shard = store.shard_uris("alpha", "train")[0]
    original = pq.read_table(first_shard).slice(0, 1)
    sink = io.BytesIO()
    write_parquet(_shifted_copy(original), sink)
    (tmp_path / "features" / "fp0" / "alpha" / "train" / "part-0000.parquet").write_bytes(sink.getvalue())
    kept = stored[stored["row_id"] != stored.loc[stored["split"] == "test", "row_id"].iloc[0]]
    gone = set(stored["row_id"]) - set(kept["row_id"])
    expected = kept.assign(category=kept["row_id"].str.split("/").str[0])[
        ["row_id", "image_id", "source_version", "category", "split"]]
    index = build_row_index(expected, dict(zip(kept["row_id"], kept["shard"])), pd.DataFrame())
    write_row_index(Storage(), store.root, index, {"root": "data", "images": len(index), "digest": "x"})
    (tmp_path / "features" / "fp0" / SUCCESS).write_text(json.dumps({"rows": len(index)}))
    return FeatureSet.open(store.root), original.column("row_id")[0].as_py(), gone


def test_every_reader_reads_exactly_the_indexed_rows(indexed_store):
    store, duplicated, gone = indexed_store
    index = store.row_index()
    assert store.row_ids() == set(index["row_id"]) and not gone & store.row_ids()
    read = store.read(columns=["row_id", "pooled"])
    assert sorted(read.column("row_id").to_pylist()) == sorted(index["row_id"])
    assert store.categories() == ["alpha", "beta"] and store.catalog()["digest"] == "x"
    pooled = store.load_pooled("alpha")
    assert sorted(np.concatenate([p["row_id"] for p in pooled.values()])) == \
        sorted(index.loc[index["category"] == "alpha", "row_id"])
    i = list(pooled["train"]["row_id"]).index(duplicated)
    assert pooled["train"]["X"][i].max() < 50  # the indexed original, not the shifted copy
    patches = np.concatenate([p["row_id"] for p in store.iter_patches("alpha", "train")])
    assert sorted(patches) == sorted(pooled["train"]["row_id"])
    test_ids = set(np.concatenate([p["row_id"] for c in ("alpha", "beta") for p in store.iter_patches(c, "test")]))
    assert len(test_ids) == 2 * SIZES["test"] - 1 and not gone & test_ids
    assert store.error_rows().num_rows == 0


def test_without_an_index_the_first_occurrence_rule_still_holds(indexed_store):
    store, duplicated, gone = indexed_store
    (__import__("pathlib").Path(store.root) / ROW_INDEX).unlink()
    old = FeatureSet(store.root, Storage())
    assert old.row_index() is None and gone <= old.row_ids()
    i = list(old.load_pooled("alpha")["train"]["row_id"]).index(duplicated)
    assert old.load_pooled("alpha")["train"]["X"][i].min() > 50  # the copy in part-0000 comes first


def test_success_counts_are_checked_at_open(indexed_store):
    store, _, _ = indexed_store
    success = __import__("pathlib").Path(store.root) / SUCCESS
    success.write_text(json.dumps({"rows": len(store.row_index()) + 3}))
    with pytest.raises(UserError, match=r"do not match _SUCCESS.json, which records \d+ rows") as info:
        FeatureSet.open(store.root)
    assert "\n" not in str(info.value)
    success.write_text(json.dumps({"rows": len(store.row_index())}))
    victim = store.shard_uris("beta", "val_good")[0]
    __import__("os").unlink(victim)
    with pytest.raises(UserError, match=f"{victim} is missing"):
        FeatureSet.open(store.root)


def test_success_counts_without_an_index(tmp_path):
    store = write_store(tmp_path / "features")
    (tmp_path / "features" / "fp0" / SUCCESS).write_text(json.dumps({"rows": 5}))
    with pytest.raises(UserError, match="the shards hold 176"):
        FeatureSet.open(store.root)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_shard_is_one_line_naming_it(tmp_path, damage):
    store = write_store(tmp_path / "features")
    victim = store.shard_uris("alpha", "test")[0]
    data = open(victim, "rb").read()
    open(victim, "wb").write(b"not parquet at all" if damage == "garbage" else data[: len(data) // 2])
    fresh = FeatureSet(store.root, Storage())
    for read in (lambda: fresh.read("alpha", "test"), fresh.stored_rows, lambda: fresh.load_pooled("alpha")):
        with pytest.raises(UserError, match=f"{victim}") as info:
            read()
        assert "\n" not in str(info.value)


# -- the error budget --------------------------------------------------------------------------------
def _index(n: int, bad: int, split: str = "test") -> tuple[pd.DataFrame, pd.DataFrame]:
    ids = [f"c/test/good/{i:03d}.png#orig" for i in range(n)]
    index = pd.DataFrame({"row_id": ids, "category": "c", "split": split,
                          "status": ["error"] * bad + ["ok"] * (n - bad)})
    errors = pd.DataFrame({"row_id": ids[:bad], "source_uri": [f"/d/{i}.png" for i in range(bad)],
                           "error": ["not a readable image"] * bad})
    return index, errors


def test_error_budget_stops_with_one_line_naming_the_split():
    index, errors = _index(20, 3)
    with pytest.raises(UserError) as info:
        check_error_budget(index, errors, 0.1)
    message = str(info.value)
    assert "\n" not in message and "c/test: 3 of 20 rows" in message and "15%" in message
    assert "/d/0.png: not a readable image" in message and "max_error_fraction=0.1" in message
    check_error_budget(*_index(20, 2), 0.1)  # exactly at the budget: goes on
    check_error_budget(*_index(20, 20), 1.0)  # 1 = never stop
    assert ExtractConfig().max_error_fraction == 0.1


# -- credentials refused mid-run --------------------------------------------------------------------
@pytest.mark.parametrize("message", ["AWS Error ACCESS_DENIED during GetObject operation: Access Denied",
                                     "AWS Error UNKNOWN (HTTP status 403) during HeadObject operation",
                                     "AWS Error UNKNOWN (HTTP status 400): ExpiredToken: token expired"])
def test_refused_credentials_are_their_own_error(message):
    def fail():
        raise OSError(message)
    with pytest.raises(StorageAccessDenied, match="access denied"):
        Storage().retry("cannot read s3://b/k", fail)


def test_a_local_permission_error_stays_a_per_file_error():
    def fail():
        raise PermissionError("[Errno 13] Failed to open local file '/d/x.png'. Detail: [errno 13] Permission denied")
    with pytest.raises(StorageError) as info:
        Storage().retry("cannot read /d/x.png", fail)
    assert not isinstance(info.value, StorageAccessDenied)


class _RefusingFS:
    """A filesystem whose every read fails with ``message`` (what pyarrow's S3 client raises)."""

    def __init__(self, message: str):
        self.message = message

    def open_input_stream(self, path):
        raise OSError(self.message)


class _RefusingStorage(Storage):
    def __init__(self, message: str):
        super().__init__()
        self.fs = _RefusingFS(message)

    def resolve(self, uri: str):
        return self.fs, uri


def _one_source() -> dict[str, np.ndarray]:
    return {key: np.asarray(value, dtype=object) for key, value in {
        "image_id": ["c/train/good/000.png"], "uri": ["s3://b/c/train/good/000.png"], "version": ["1-2"],
        "category": ["c"], "split": ["train"], "label": [0], "defect_type": ["good"], "mask_uri": [""],
        "variants": ["orig"]}.items()}


def test_refused_credentials_fail_the_batch_instead_of_an_error_row():
    """A 403 or an expired token mid-run: before, one error row per image and a run that "succeeded"."""
    config = ExtractConfig(image_size=32)
    for message in ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied",
                    "AWS Error UNKNOWN (HTTP status 400) during GetObject operation: ExpiredToken"):
        with pytest.raises(StorageAccessDenied, match="access denied"):
            prepare_batch(_one_source(), config, _RefusingStorage(message))
    permission = "[Errno 13] Failed to open local file '/x.png'. Detail: [errno 13] Permission denied"
    rows = prepare_batch(_one_source(), config, _RefusingStorage(permission))
    assert list(rows["status"]) == ["error"]  # a per-file problem stays an error row, retried next run

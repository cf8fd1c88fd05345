"""A row_id written twice (e.g. a shard rewritten under another name) counts once for every reader of
the feature store, and the raw-shard counter the node-loss checks use does see it."""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mvtec_ray.features.store import FeatureSet, write_parquet
from tests.helpers.feature_store import SIZES, write_store
from tests.helpers.multinode_scenarios import shard_counts
from tests.helpers.shards import raw_shard_rows


@pytest.fixture
def store_with_duplicate(tmp_path):
    """A real store; the first train row of 'alpha' written again, with other features, in a shard whose
    name sorts first (so the copy is the first occurrence), and the last one again in one that sorts last."""
    store = write_store(tmp_path / "features", patches=True)
    shards = store.shard_uris("alpha", "train")
    table = pq.read_table(shards[0])
    first = table.slice(0, 1)
    patches = first.column("patches").combine_chunks()
    shifted = pa.ExtensionArray.from_storage(patches.type, pa.FixedSizeListArray.from_arrays(
        pa.array(patches.storage.values.to_numpy(zero_copy_only=False) + np.float16(100)),
        patches.type.storage_type.list_size))
    copy = first.set_column(first.schema.get_field_index("patches"), "patches", shifted)
    sink = io.BytesIO()
    write_parquet(copy, sink)
    (tmp_path / "features" / "fp0" / "alpha" / "train" / "part-0000.parquet").write_bytes(sink.getvalue())
    last = pq.read_table(shards[-1])
    pq.write_table(last.slice(last.num_rows - 1, 1), tmp_path / "features" / "fp0" / "alpha" / "train" / "part-zzzz.parquet")
    duplicated = {first.column("row_id")[0].as_py(), last.column("row_id")[-1].as_py()}
    return FeatureSet.open(str(tmp_path / "features" / "fp0")), duplicated


def test_both_readers_drop_the_same_duplicates(store_with_duplicate):
    store, duplicated = store_with_duplicate
    n = SIZES["train"]
    raw = raw_shard_rows(store.root)
    assert int(raw["row_id"].duplicated().sum()) == 2  # really there, twice over, in the files

    table = store.read("alpha", "train", columns=["row_id", "pooled"])
    read_ids = table.column("row_id").to_pylist()
    assert len(read_ids) == n and set(read_ids) >= duplicated

    parts = list(store.iter_patches("alpha", "train"))
    patch_ids = np.concatenate([p["row_id"] for p in parts]).tolist()
    assert sorted(patch_ids) == sorted(read_ids)  # the same rows, each once
    pooled = store.load_pooled("alpha")["train"]
    assert sorted(pooled["row_id"]) == sorted(read_ids)

    # both keep the same occurrence: the first in shard order, i.e. the shifted copy in part-0000
    first_id = min(duplicated, key=patch_ids.index)
    assert patch_ids[0] == read_ids[0] == first_id
    assert parts[0]["X"][0].min() >= 90
    read_patches = store.read("alpha", "train", columns=["row_id", "patches"]).column("patches")
    assert np.asarray(read_patches[0].as_py(), dtype=np.float32).min() >= 90


def test_raw_shard_counts_see_a_duplicate(store_with_duplicate):
    store, _ = store_with_duplicate
    expected = set(raw_shard_rows(store.root)["row_id"])
    counts = shard_counts(store.root, expected)
    assert counts["duplicates"] == 2 and counts["missing"] == 0 and counts["unexpected"] == 0
    assert counts["rows"] == len(expected) + 2

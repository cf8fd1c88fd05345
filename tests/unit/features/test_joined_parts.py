"""``iter_patches(min_images=...)`` joins consecutive shards into larger parts: the same rows, in the
same order, with every key's values still aligned."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from mvtec_ray.features.store import FeatureSet
from tests.helpers.feature_store import write_store


def test_joined_parts_hold_the_same_rows_in_order(tmp_path):
    store = write_store(tmp_path / "features", patches=True)
    (shard,) = store.shard_uris("alpha", "test")
    table = pq.read_table(shard)
    Path(shard).unlink()
    for k, start in enumerate(range(0, table.num_rows, 5)):  # the test split as five shards of 5, 5, 5, 5, 4
        pq.write_table(table.slice(start, 5), Path(shard).with_name(f"part-{k:04d}.parquet"))
    store = FeatureSet.open(store.root)
    shards = list(store.iter_patches("alpha", "test", with_masks=True))
    assert len(shards) > 2  # several shards to join
    joined = list(store.iter_patches("alpha", "test", with_masks=True, min_images=len(shards[0]["X"]) + 1))
    assert 1 <= len(joined) < len(shards)
    assert all(len(part["X"]) > len(shards[0]["X"]) for part in joined[:-1])
    for key in shards[0]:
        want = [v for part in shards for v in part[key]]
        got = [v for part in joined for v in part[key]]
        assert len(got) == len(want), key
        if isinstance(want[0], np.ndarray):
            np.testing.assert_array_equal(np.stack(got), np.stack(want))
        else:
            assert got == want, key
    assert all(len(part["X"]) == len(part["row_id"]) == len(part["mask_png"]) == len(part["source_hw"])
               for part in joined)

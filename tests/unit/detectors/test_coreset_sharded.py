"""Sharded (composable) coreset and the IVF switch of PatchCore: pure functions, no Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mvtec_ray.detectors.coreset import (
    ShardJob,
    coreset_size,
    covering_radius,
    greedy_kcenter,
    plan_shards,
    run_shard_job,
    select_coreset,
    shard_jobs,
    sharded_kcenter,
    split_count,
)
from mvtec_ray.detectors.patch import PatchCore
from tests.helpers.patch_maps import H, W, data  # noqa: F401 - shared fixture


def clustered(n: int, d: int = 8, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Patch-like points: many tight clusters of different sizes plus a few outliers."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d)) * 3
    which = rng.choice(clusters, size=n, p=rng.dirichlet(np.ones(clusters)))
    Z = centres[which] + rng.normal(size=(n, d)) * rng.uniform(0.05, 0.5, clusters)[which, None]
    Z[rng.choice(n, 5, replace=False)] += rng.normal(size=(5, d)) * 6
    return Z.astype(np.float32)


def test_plan_shards_and_split_count():
    assert plan_shards(10, 0) == [(0, 10)] == plan_shards(10, 10) == plan_shards(10, 99)
    bounds = plan_shards(1000, 300)
    assert len(bounds) == 4 and bounds[0][0] == 0 and bounds[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert max(hi - lo for lo, hi in bounds) <= 300 and min(hi - lo for lo, hi in bounds) >= 249
    counts = split_count(101, [250, 250, 250, 250])
    assert sum(counts) == 101 and max(counts) - min(counts) == 1
    assert split_count(2, [5, 5, 5]) == [1, 1, 1]  # every shard keeps at least one centre
    jobs = shard_jobs(1000, 0.1, 300, 1.0, seed=0)
    assert sum(j.n_centres for j in jobs) == coreset_size(1000, 0.1)
    assert all(0 <= j.start < j.hi - j.lo for j in jobs)


def test_one_shard_is_the_exact_greedy():
    Z = clustered(600)
    Zt = torch.from_numpy(np.ascontiguousarray(Z.T))
    exact = greedy_kcenter(Zt, 60, int(np.random.default_rng(3).integers(600)))
    np.testing.assert_array_equal(sharded_kcenter(Zt, 0.1, 0, seed=3), exact.numpy())
    np.testing.assert_array_equal(sharded_kcenter(Zt, 0.1, 600, seed=3), exact.numpy())


@pytest.mark.parametrize("oversample", [1.0, 2.0])
def test_sharded_coreset_covers_within_twice_the_single_greedy(oversample):
    Z = clustered(3000, seed=1)
    Zt = torch.from_numpy(np.ascontiguousarray(Z.T))
    k = coreset_size(3000, 0.1)
    single = sharded_kcenter(Zt, 0.1, 0, seed=0)
    sharded = sharded_kcenter(Zt, 0.1, 500, seed=0, oversample=oversample)
    assert len(sharded) == k == len(np.unique(sharded))
    r_single, r_sharded = covering_radius(Z, single), covering_radius(Z, sharded)
    assert r_sharded <= 2 * r_single, (r_sharded, r_single)
    if oversample == 1.0:  # each shard contributes its share
        for (lo, hi), job in zip(plan_shards(3000, 500), shard_jobs(3000, 0.1, 500, 1.0, 0)):
            assert ((sharded >= lo) & (sharded < hi)).sum() == job.n_centres


def test_shard_job_on_a_torch_device_matches_numpy_input():
    """The path a GPU node takes (tensor moved to the task's device), run here on CPU torch."""
    Z = clustered(500, seed=2)
    Zt = np.ascontiguousarray(Z.T)
    job = ShardJob(lo=100, hi=400, n_centres=20, start=7)
    on_device = run_shard_job(Zt[:, 100:400], job, torch.device("cpu"))
    plain = run_shard_job(torch.from_numpy(np.ascontiguousarray(Zt[:, 100:400])), job)
    np.testing.assert_array_equal(on_device, plain)
    assert on_device.min() >= 100 and on_device.max() < 400 and on_device[0] == 107
    with pytest.raises(ValueError, match="columns"):
        run_shard_job(Zt[:, :50], job)


def test_select_coreset_sharded_is_deterministic_and_in_stats(data):  # noqa: F811
    train = data[0]
    a = select_coreset(train, 0.1, 8, seed=0, shard_patches=300)
    b = select_coreset(train, 0.1, 8, seed=0, shard_patches=300)
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.stats["n_shards"] == len(plan_shards(len(train) * H * W, 300)) > 1
    flat = train.reshape(-1, train.shape[-1]).astype(np.float32)
    np.testing.assert_array_equal(a.bank, flat[a.indices])


@pytest.mark.parametrize("shard", [0, 256])
def test_patchcore_sharded_detects(data, shard):  # noqa: F811
    train, test, labels, _ = data
    det = PatchCore(projection_dim=8, coreset_shard_patches=shard, coreset_ratio=0.1).fit(train)
    assert roc_auc_score(labels, det.score(test)) > 0.9
    assert det.fit_stats_["n_shards"] == (1 if shard == 0 else len(plan_shards(len(train) * H * W, shard)))


def test_index_switches_to_ivf_above_the_threshold(data, tmp_path):  # noqa: F811
    train, test, labels, _ = data
    exact = PatchCore(projection_dim=8, coreset_ratio=0.5).fit(train)   # bank 960 < ivf_min_bank
    assert exact.fit_stats_["index"] == "flat" and exact.index_kind(exact.params["ivf_min_bank"] - 1) == "flat"
    ivf = PatchCore(projection_dim=8, coreset_ratio=0.5, ivf_min_bank=500, nprobe=4).fit(train)
    assert ivf.fit_stats_["index"] == "ivf" and ivf.index_kind(500) == "ivf"
    np.testing.assert_array_equal(exact.coreset_indices_, ivf.coreset_indices_)
    s_exact, s_ivf = exact.score(test), ivf.score(test)
    assert np.all(s_ivf >= s_exact - 1e-4)  # an approximate neighbour is never nearer
    assert roc_auc_score(labels, s_ivf) > 0.9
    loaded = PatchCore.load(ivf.save(tmp_path / "m"))
    assert loaded.fit_stats_["index"] == "ivf"
    np.testing.assert_allclose(loaded.score(test), s_ivf, rtol=1e-6)
    with pytest.raises(ValueError, match="index"):
        PatchCore(index="hnsw")

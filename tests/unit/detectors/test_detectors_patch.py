"""PatchCore / PaDiM on tiny synthetic patch maps (8x8 grids, C=24), no Ray."""
from __future__ import annotations

import itertools
import math
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from mvtec_ray.detectors.chunks import ArrayChunks
from mvtec_ray.detectors.coreset import (
    coreset_size,
    covering_radius,
    greedy_kcenter,
    select_coreset,
)
from mvtec_ray.detectors.padim import PaDiM
from mvtec_ray.detectors.patch import PatchCore, upsample_smooth
from mvtec_ray.detectors.registry import REGISTRY
from tests.helpers import patch_maps
from tests.helpers.patch_maps import OUT, SCALE, C, H, W

data = patch_maps.data  # the shared module-scoped fixture (also used by test_coreset_sharded)


def _check_detection(det, test, labels, pixel_mask):
    scores, maps = det.score_with_maps(test, OUT)
    assert scores.shape == (len(test),) and scores.dtype == np.float64
    assert maps.shape == (len(test), *OUT) and maps.dtype == np.float32
    assert roc_auc_score(labels, scores) > 0.9
    assert roc_auc_score(pixel_mask.ravel(), maps.ravel()) > 0.9
    # each anomalous map peaks inside its (slightly dilated, for smoothing) region
    for i in np.flatnonzero(labels):
        y, x = np.unravel_index(maps[i].argmax(), OUT)
        ys, xs = np.nonzero(pixel_mask[i])
        assert ys.min() - SCALE <= y <= ys.max() + SCALE and xs.min() - SCALE <= x <= xs.max() + SCALE
    return scores, maps


# -- detection quality -------------------------------------------------------------
@pytest.mark.parametrize("params", [
    {"projection_dim": 8},
    {"projection_dim": 8, "k": 3},
    {"projection_dim": 8, "index": "ivf", "nprobe": 4},
    {"projection_dim": 0, "coreset_ratio": 0.25},
])
def test_patchcore_detects_and_localises(data, params):
    train, test, labels, pixel_mask = data
    det = PatchCore(smoothing_sigma=1.0, **params).fit(train)
    _check_detection(det, test, labels, pixel_mask)
    # the smooth normal pattern is covered: normal maps lie below anomalous peaks
    assert det.bank_size == coreset_size(30 * H * W, det.params["coreset_ratio"])


def test_padim_detects_and_localises(data):
    train, test, labels, pixel_mask = data
    det = PaDiM(n_features=16, smoothing_sigma=1.0).fit(train)
    _check_detection(det, test, labels, pixel_mask)
    assert det.mean_.shape == (H * W, 16) and det.inv_cov_.shape == (H * W, 16, 16)


def test_reweight_keeps_auroc_and_only_shrinks_scores(data):
    train, test, labels, _ = data
    plain = PatchCore(projection_dim=8).fit(train)
    rw = PatchCore(projection_dim=8, reweight=True, reweight_neighbors=5).fit(train)
    s_plain, s_rw = plain.score(test), rw.score(test)
    assert roc_auc_score(labels, s_rw) > 0.9
    assert np.all(s_rw <= s_plain + 1e-9) and np.all(s_rw > 0)
    assert not np.allclose(s_rw, s_plain)
    # the patch-level maps are not reweighted
    np.testing.assert_allclose(rw.anomaly_maps(test, OUT), plain.anomaly_maps(test, OUT))


def test_score_and_maps_agree_with_single_calls(data):
    train, test, *_ = data
    det = PatchCore(projection_dim=8).fit(train)
    scores, maps = det.score_with_maps(test, OUT)
    np.testing.assert_array_equal(det.score(test), scores)
    np.testing.assert_array_equal(det.anomaly_maps(test, OUT), maps)
    # image score is the max patch score
    np.testing.assert_allclose(scores, det.patch_scores(test).reshape(len(test), -1).max(1),
                               rtol=1e-6)


# -- coreset ---------------------------------------------------------------------------
def test_coreset_size_is_exact_ceil():
    assert coreset_size(1920, 0.1) == 192
    assert coreset_size(1000, 0.013) == 13
    assert coreset_size(1001, 0.1) == 101     # ceil, not round
    assert coreset_size(100, 0.07) == 7       # 0.07 * 100 = 7.000000000000001 in floats
    assert coreset_size(10, 0.01) == 1
    assert coreset_size(7, 1.0) == 7
    with pytest.raises(ValueError):
        coreset_size(10, 0.0)


def test_coreset_size_and_seed_determinism(data):
    train = data[0]
    n = 30 * H * W
    a = PatchCore(coreset_ratio=0.033, projection_dim=8, seed=0).fit(train)
    b = PatchCore(coreset_ratio=0.033, projection_dim=8, seed=0).fit(train)
    c = PatchCore(coreset_ratio=0.033, projection_dim=8, seed=1).fit(train)
    assert math.ceil(0.033 * n) == 64  # 63.36 rounded up
    assert len(a.coreset_indices_) == a.bank_size == a.fit_stats_["n_coreset"] == 64
    assert len(np.unique(a.coreset_indices_)) == len(a.coreset_indices_)
    np.testing.assert_array_equal(a.coreset_indices_, b.coreset_indices_)
    assert not np.array_equal(np.sort(a.coreset_indices_), np.sort(c.coreset_indices_))


def _reference_greedy(Z: np.ndarray, k: int, start: int) -> list[int]:
    """Textbook farthest-point greedy in float64 with explicit differences."""
    chosen = [start]
    mind = np.linalg.norm(Z - Z[start], axis=1)
    for _ in range(k - 1):
        nxt = int(np.argmax(mind))
        chosen.append(nxt)
        mind = np.minimum(mind, np.linalg.norm(Z - Z[nxt], axis=1))
    return chosen


def test_greedy_matches_bruteforce_reference_and_2_approximation():
    rng = np.random.default_rng(7)
    Z = rng.normal(size=(60, 2))
    Zt = torch.from_numpy(Z.T.astype(np.float32)).contiguous()
    for k, start in [(1, 0), (6, 3), (20, 59)]:
        got = greedy_kcenter(Zt, k, start).numpy()
        ref = _reference_greedy(Z, k, start)
        np.testing.assert_array_equal(got, ref)
        assert covering_radius(Z, got) == pytest.approx(covering_radius(Z, ref))
    # k-center greedy is a 2-approximation of the optimal covering radius
    small = Z[:12]
    got = greedy_kcenter(torch.from_numpy(small.T.astype(np.float32)).contiguous(), 3, 0).numpy()
    optimum = min(covering_radius(small, list(c)) for c in itertools.combinations(range(12), 3))
    assert covering_radius(small, got) <= 2 * optimum + 1e-9


def test_greedy_never_repeats_with_duplicate_points():
    Z = np.repeat(np.arange(5, dtype=np.float32)[:, None], 4, axis=0)  # each point 4 times
    sel = greedy_kcenter(torch.from_numpy(Z.T).contiguous(), 12, 0).numpy()
    assert len(np.unique(sel)) == 12
    assert set(Z[sel[:5], 0]) == set(range(5))  # all distinct values first


def test_projection_used_only_for_selection(data):
    train = data[0]
    res = select_coreset(train, ratio=0.1, projection_dim=8, seed=0)
    flat = train.reshape(-1, C).astype(np.float32)
    np.testing.assert_array_equal(res.bank, flat[res.indices])  # full-dimension rows
    assert res.stats["projection_dim"] == 8 and res.grid == (H, W, C)


# -- streaming -----------------------------------------------------------------------
class StrictChunks(ArrayChunks):
    """A chunk source that refuses to be turned into one array."""

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole source was requested as one array")

    def __getitem__(self, item):
        raise AssertionError("random access is not part of the chunk protocol")


@pytest.mark.parametrize("hint", [True, False])
def test_streaming_fit_matches_in_memory_fit(data, hint):
    train, test, *_ = data
    full_f32 = train.size * 4
    budget_mb = full_f32 / 4 / 2**20          # a quarter of the full float32 bank
    source = StrictChunks(train, chunk_size=7)
    if not hint:
        del source.n_images  # exercise the concatenating path
    # projection_dim=4 keeps the projected matrix (n x 4 float32) inside the budget too
    ref = PatchCore(projection_dim=4).fit(train)
    tracemalloc.start()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        streamed = PatchCore(projection_dim=4, memory_budget_mb=budget_mb).fit(source)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert source.n_passes == 2               # project, then gather
    assert streamed.fit_stats_["max_chunk_bytes"] <= budget_mb * 2**20
    assert streamed.fit_stats_["full_float32_bytes"] == full_f32
    assert peak < full_f32 / 2, f"traced peak {peak} B vs full float32 {full_f32} B"
    np.testing.assert_array_equal(streamed.coreset_indices_, ref.coreset_indices_)
    test_src = StrictChunks(test, chunk_size=3)
    np.testing.assert_allclose(streamed.score(test_src), ref.score(test), rtol=1e-5)
    np.testing.assert_allclose(streamed.anomaly_maps(test_src, OUT), ref.anomaly_maps(test, OUT),
                               rtol=1e-5, atol=1e-6)


def test_chunk_source_of_varied_chunks_and_list_input(data):
    train = data[0]
    parts = [train[:5], train[5:6], train[6:30]]
    a = select_coreset(ArrayChunks(parts, chunk_size=4), 0.1, 8, 0, memory_budget_mb=0.07)
    b = select_coreset(train, 0.1, 8, 0)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.bank, b.bank)
    with pytest.raises(ValueError):
        select_coreset(ArrayChunks([train[:3], train[:3, :4]]), 0.1, 8, 0)  # grid changes


def test_padim_streaming_matches_in_memory(data):
    train, test, *_ = data
    ref = PaDiM(n_features=16).fit(train)
    src = StrictChunks(train, chunk_size=4)
    streamed = PaDiM(n_features=16, memory_budget_mb=train.size * 4 / 8 / 2**20).fit(src)
    assert src.n_passes == 1
    np.testing.assert_array_equal(streamed.channels_, ref.channels_)
    np.testing.assert_allclose(streamed.mean_, ref.mean_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.inv_cov_, ref.inv_cov_, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(streamed.score(StrictChunks(test, 3)), ref.score(test), rtol=1e-4)


def test_padim_matches_numpy_mahalanobis(data):
    train, test, *_ = data
    det = PaDiM(n_features=10, seed=3, eps=0.01).fit(train)
    ch = det.channels_
    assert len(ch) == 10 and np.all(np.diff(ch) > 0) and ch.max() < C
    x = train.astype(np.float64)[..., ch].reshape(30, H * W, 10)
    pos = 5
    cov = np.cov(x[:, pos].T) + 0.01 * np.eye(10)
    delta = test.astype(np.float64)[..., ch].reshape(len(test), H * W, 10)[:, pos] - x[:, pos].mean(0)
    expected = np.sqrt(np.einsum("nd,de,ne->n", delta, np.linalg.inv(cov), delta))
    got = det.patch_scores(test).reshape(len(test), -1)[:, pos]
    np.testing.assert_allclose(got, expected, rtol=1e-3)
    assert PaDiM(n_features=100).fit(train).channels_.tolist() == list(range(C))  # min(C, d)


# -- persistence, misc ------------------------------------------------------------------
@pytest.mark.parametrize("cls, params", [
    (PatchCore, {"projection_dim": 8, "reweight": True}),
    (PatchCore, {"projection_dim": 8, "index": "ivf"}),
    (PaDiM, {"n_features": 12}),
])
def test_save_load_roundtrip(data, tmp_path, cls, params):
    train, test, *_ = data
    det = cls(**params).fit(train)
    det.save(tmp_path / "det")
    assert not list((tmp_path / "det").glob("*.pkl"))
    loaded = cls.load(tmp_path / "det")
    assert loaded.params == det.params and loaded.grid_ == det.grid_
    s0, m0 = det.score_with_maps(test, OUT)
    s1, m1 = loaded.score_with_maps(test, OUT)
    np.testing.assert_array_equal(s1, s0)
    np.testing.assert_array_equal(m1, m0)
    assert loaded.fit_stats_ == det.fit_stats_


def test_registry_params_and_errors(data):
    assert REGISTRY["patchcore"] is PatchCore and REGISTRY["padim"] is PaDiM
    assert PatchCore.input_kind == PaDiM.input_kind == "patches"
    assert PatchCore.produces_maps and PaDiM.produces_maps
    with pytest.raises(ValueError):
        PatchCore(index="hnsw")
    with pytest.raises(ValueError):
        PatchCore(bogus=1)
    with pytest.raises(RuntimeError):
        PatchCore().score(data[1])
    det = PatchCore(projection_dim=8).fit(data[0])
    with pytest.raises(ValueError):
        det.score(data[1][..., :10])  # wrong channel count


def test_use_gpu_true_falls_back_on_cpu(data):
    train, test, labels, _ = data
    if torch.cuda.is_available():
        pytest.skip("CUDA present: nothing to fall back from")
    with pytest.warns(RuntimeWarning, match="GPU"):
        det = PatchCore(projection_dim=8, use_gpu=True).fit(train)
    assert det.fit_stats_["device"] == "cpu"
    assert roc_auc_score(labels, det.score(test)) > 0.9


def test_upsample_smooth_shape_and_blur():
    patch = np.zeros((2, 4, 4), dtype=np.float32)
    patch[0, 1, 1] = 1.0
    sharp = upsample_smooth(patch, (16, 16), sigma=0)
    blurred = upsample_smooth(patch, (16, 16), sigma=2.0)
    assert sharp.shape == blurred.shape == (2, 16, 16) and blurred.dtype == np.float32
    assert blurred[0].max() < sharp[0].max()
    assert blurred[0].sum() == pytest.approx(sharp[0].sum(), rel=0.05)  # blur preserves mass
    assert np.all(blurred[1] == 0)

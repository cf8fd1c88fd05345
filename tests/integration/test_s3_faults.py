"""S3 faults against a real moto_server: missing bucket, bad credentials (moto's IAM auth mode),
endpoint down, and 503/500 injected by a proxy in the middle of a run."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from mvtec_ray.config import S3Settings, load_config
from mvtec_ray.data.catalog import build_catalog
from mvtec_ray.errors import StorageError, StorageUnavailable, UserError
from mvtec_ray.features.store import SUCCESS, FeatureSet
from mvtec_ray.storage import Storage
from tests.helpers.fault_proxy import FaultProxy
from tests.helpers.s3_upload import upload_tree


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _settings(endpoint: str, key: str = "testing-key", secret: str = "testing-secret-0123456789",
              attempts: int = 2) -> S3Settings:
    return S3Settings(endpoint_url=endpoint, region="us-east-1", access_key=key, secret_key=secret,
                      max_attempts=attempts, connect_timeout_s=2, request_timeout_s=10)


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from mvtec_ray.data.sample_data import SampleSpec, generate_sample_dataset
    root = tmp_path_factory.mktemp("s3data") / "mvtec"
    generate_sample_dataset(root, categories=["washer"], seed=5,
                            spec=SampleSpec(n_train=6, n_test_good=2, n_test_defect_per_type=1, size=64))
    return root


def test_missing_bucket(s3_server):
    storage = Storage(_settings(s3_server["endpoint"]))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        build_catalog("s3://no-such-bucket/mvtec", storage)


def test_missing_bucket_through_the_cli_is_one_line(s3_server, tmp_path):
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing-key", "AWS_SECRET_ACCESS_KEY": "testing-secret-0123456789",
           "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([str(Path(sys.executable).with_name("mvtec-ray")), "run", "--data", "s3://no-such-bucket/x",
                           "--out", str(tmp_path / "out"), "--s3-endpoint", s3_server["endpoint"]],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mvtec-ray run: error: bucket 'no-such-bucket' does not exist (or is not visible with these credentials)"]


def test_endpoint_down():
    storage = Storage(_settings(f"http://127.0.0.1:{_free_port()}"))
    started = time.perf_counter()
    with pytest.raises(StorageError, match="the S3 endpoint cannot be reached"):
        build_catalog("s3://mvtec/anything", storage)
    assert time.perf_counter() - started < 60


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """A second moto_server whose IAM auth is switched on after setup: keys must exist and sign."""
    import boto3
    port = _free_port()
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="admin",
                     aws_secret_access_key="admin")
        s3, iam = boto3.client("s3", **admin), boto3.client("iam", **admin)
        s3.create_bucket(Bucket="locked")
        for key in ("d/widget/train/good/a.png", "d/widget/test/good/b.png"):
            s3.put_object(Bucket="locked", Key=key, Body=b"bytes")
        allow_all = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
        keys = {}
        for user, policy in (("reader", allow_all), ("nobody", None)):
            iam.create_user(UserName=user)
            if policy:
                iam.put_user_policy(UserName=user, PolicyName="all", PolicyDocument=json.dumps(policy))
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
        # from now on every request is authenticated against moto's IAM
        urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset-auth", data=b"0", method="POST",
                                                      headers={"Content-Type": "text/plain"}), timeout=10).read()
        yield endpoint, keys
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("who", ["wrong_secret", "unknown_key", "no_permission"])
def test_bad_credentials_are_access_denied(auth_server, who):
    endpoint, keys = auth_server
    key, secret = {"wrong_secret": (keys["reader"]["AccessKeyId"], "not-the-secret"),
                   "unknown_key": ("AKIAUNKNOWN000000000", "whatever"),
                   "no_permission": (keys["nobody"]["AccessKeyId"], keys["nobody"]["SecretAccessKey"])}[who]
    storage = Storage(_settings(endpoint, key, secret))
    with pytest.raises(StorageError, match="access denied") as info:
        build_catalog("s3://locked/d", storage)
    assert secret not in str(info.value)
    with pytest.raises(StorageError, match="access denied"):
        storage.read_bytes("s3://locked/d/widget/train/good/a.png")
    # the same objects with good credentials: the setup is not the problem
    good = Storage(_settings(endpoint, keys["reader"]["AccessKeyId"], keys["reader"]["SecretAccessKey"]))
    assert good.read_bytes("s3://locked/d/widget/train/good/a.png") == b"bytes"


def test_storage_retries_transient_faults_and_gives_up_on_permanent(s3_server):
    with FaultProxy(s3_server["endpoint"], fail_every=3, statuses=(503, 500)) as proxy:
        storage = Storage(_settings(proxy.endpoint, attempts=5))
        payload = os.urandom(300_000)
        storage.write_bytes("s3://mvtec/faults/unit/blob.bin", payload)
        assert storage.read_bytes("s3://mvtec/faults/unit/blob.bin") == payload
        assert [i.base_name for i in storage.iter_files("s3://mvtec/faults/unit")] == ["blob.bin"]
        assert proxy.injected >= 3
    with FaultProxy(s3_server["endpoint"], statuses=(503, 500)) as proxy:
        proxy.fail_all = True  # every request: 503, 500, 503, ...
        storage = Storage(_settings(proxy.endpoint, attempts=2))
        with pytest.raises(StorageUnavailable, match=r"server errors, HTTP 50[03] \(retries exhausted\)"):
            storage.read_bytes("s3://mvtec/faults/unit/blob.bin")
        with pytest.raises(StorageUnavailable, match="retries exhausted"):
            storage.write_bytes("s3://mvtec/faults/unit/other.bin", b"x")


def test_one_retry_layer(s3_server):
    """A failing read costs exactly ``max_attempts`` requests, not the SDK's retries times the project's."""
    with FaultProxy(s3_server["endpoint"], statuses=(503,)) as proxy:
        proxy.fail_all = True
        storage = Storage(_settings(proxy.endpoint, attempts=3))
        with pytest.raises(StorageUnavailable):
            storage.read_bytes("s3://mvtec/faults/unit/blob.bin")
        assert proxy.requests == 3


@pytest.fixture
def no_progress_timeout(ray_session):
    """A stalled extraction fails within minutes with Ray Data's diagnostics, not at pytest's timeout."""
    from ray.data import DataContext
    ctx = DataContext.get_current()
    before, ctx.execution_no_progress_timeout_s = ctx.execution_no_progress_timeout_s, 240
    yield
    ctx.execution_no_progress_timeout_s = before


def _extract_config(data: str):
    return load_config(None, {"data": data, "out": "unused", "extract.backbone": "efficientnet_lite0",
                              "extract.image_size": 64, "extract.batch_size": 4})


def _shard_rows(features_dir: Path) -> pd.DataFrame:
    return pd.concat([pq.read_table(p, columns=["row_id", "status", "error"]).to_pandas()
                      for p in sorted(features_dir.rglob("part-*.parquet"))], ignore_index=True)


def test_outage_mid_run_is_not_complete_and_resumes(ray_session, s3_server, tiny_dataset, lite0_weights, tmp_path,
                                                    no_progress_timeout):
    """Reads start failing for good after a few images: the run fails (with the storage reason),
    nothing is marked complete, no image is blamed. Then S3 is back but flaky (every 4th request
    a 503 SlowDown or 500 InternalError): the re-run retries through it and completes."""
    from mvtec_ray.cli import find_user_error
    from mvtec_ray.distributed.extraction import run_extraction
    from mvtec_ray.features.plan import expected_row_ids, plan_work
    upload_tree(s3_server["client"], "mvtec", tiny_dataset, "faults/outage")
    config = _extract_config("s3://mvtec/faults/outage")
    features = tmp_path / "features"
    with FaultProxy(s3_server["endpoint"], methods={"GET", "HEAD"}, fail_after=12, statuses=(503,)) as proxy:
        storage = Storage(_settings(proxy.endpoint, attempts=2))
        catalog = build_catalog(config.data, Storage(_settings(s3_server["endpoint"])))
        with pytest.raises(Exception) as info:
            run_extraction(catalog, str(features), config.extract, storage, lite0_weights)
        assert proxy.injected > 0
    cause = find_user_error(info.value)
    assert "ExecutionTimeoutError" not in repr(info.value), repr(info.value)[:3000]
    assert isinstance(cause, StorageUnavailable), repr(info.value)[:2000]
    assert "HTTP 503" in str(cause) and "retries exhausted" in str(cause)
    [fingerprint_dir] = list(features.iterdir())
    assert not (fingerprint_dir / SUCCESS).exists()
    with pytest.raises(UserError, match="incomplete"):
        FeatureSet.open(str(fingerprint_dir))
    partial = _shard_rows(fingerprint_dir) if list(fingerprint_dir.rglob("part-*.parquet")) else pd.DataFrame(
        columns=["row_id", "status", "error"])
    assert (partial["status"] == "ok").all(), partial[partial["status"] != "ok"].to_string()

    # S3 is back, flaky: the same extraction resumes and completes, each row exactly once
    with FaultProxy(s3_server["endpoint"], fail_every=4, statuses=(503, 500)) as proxy:
        storage = Storage(_settings(proxy.endpoint, attempts=5))
        result = run_extraction(catalog, str(features), config.extract, storage, lite0_weights)
        assert proxy.injected >= 3, (proxy.requests, proxy.injected)
    assert result.skipped_existing == len(partial) and result.errors.empty
    rows = _shard_rows(Path(result.features_dir))
    assert rows["row_id"].is_unique and (rows["status"] == "ok").all()
    assert set(rows["row_id"]) == set(expected_row_ids(plan_work(catalog.entries, config.extract)))
    assert FeatureSet.open(result.features_dir).complete

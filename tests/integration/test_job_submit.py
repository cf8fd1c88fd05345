"""How drivers find a cluster: `ray job submit` for real, and the address rules of connect/job_main.

The job test starts a local head with the job server (cluster/local.sh), submits the sample pipeline
with `--working-dir .`, checks the job's results and stops only that head. Everything runs out of
process (CLI), so the session's embedded Ray in this pytest process is not involved; ports are free
ones, not Ray's defaults, and HOME is a temp dir (no ~/.ray/auth_token).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest

from mvtec_ray.evaluation.selection import BEST_ON_VALIDATION

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
DETECTORS = ["knn", "patchcore"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # ephemeral range: clear of Ray's worker ports 10002-19999


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline_on_a_local_head(small_dataset, tmp_path):
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("ray CLI not next to the test interpreter")
    port, dash, client = _free_port(), _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths live below it
    home = tempfile.mkdtemp(prefix="rjhome")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MVTEC_RAY_LOCAL"))}
    env.update(HOME=home, RAY_AUTH_MODE="disabled", RAY_BIN=str(ray_bin), RAY_USAGE_STATS_ENABLED="0")
    cluster_args = ["--port", str(port), "--temp-dir", temp_dir]
    address = f"http://127.0.0.1:{dash}"
    out = tmp_path / "out"
    job_id = f"mvtec-test-{uuid.uuid4().hex[:8]}"
    timings = {}

    def run(cmd, timeout):
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    try:
        started = time.perf_counter()
        up = run(["bash", str(LOCAL_SH), "start", "--num-cpus", "2", "--dashboard-port", str(dash),
                  "--client-port", str(client), *cluster_args], timeout=180)
        assert up.returncode == 0, up.stdout + up.stderr
        timings["start"] = time.perf_counter() - started

        started = time.perf_counter()
        job = run([str(ray_bin), "job", "submit", "--address", address, "--submission-id", job_id,
                   "--working-dir", ".", "--",
                   "python", "pipelines/run.py", "--data", str(small_dataset), "--out", str(out),
                   "--backbone", "efficientnet_lite0", "--detectors", ",".join(DETECTORS)], timeout=420)
        timings["job"] = time.perf_counter() - started
        from ray.job_submission import (  # HTTP only: no ray.init here
            JobStatus,
            JobSubmissionClient,
        )
        info = JobSubmissionClient(address).get_job_info(job_id)
        assert info.status == JobStatus.SUCCEEDED, \
            f"{info.status}: {info.message}\n--- job output ---\n{job.stdout[-6000:]}{job.stderr[-3000:]}"
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert f"Job '{job_id}' succeeded" in job.stdout + job.stderr

        # the uploaded working dir: the project's code, not the venv, runs/ or .git
        unpacked = [p for p in Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]
        assert unpacked, "no unpacked working_dir on the head"
        for wd in unpacked:
            assert (wd / "pipelines" / "run.py").is_file() and (wd / "mvtec_ray" / "distributed" / "pipeline.py").is_file()
            assert not any((wd / name).exists() for name in (".venv", "runs", ".git")), sorted(os.listdir(wd))
    finally:
        stop = run(["bash", str(LOCAL_SH), "stop", *cluster_args], timeout=120)
        shutil.rmtree(home, ignore_errors=True)
    assert stop.returncode == 0 and "stopped" in stop.stdout, stop.stdout + stop.stderr
    shutil.rmtree(temp_dir, ignore_errors=True)
    print(f"local head start {timings['start']:.1f}s, job {timings['job']:.1f}s")  # shown with -s

    results = pd.read_parquet(out / "results.parquet")
    per_cat = results[results["category"] != "mean"]
    assert sorted(zip(per_cat["category"], per_cat["detector"])) == sorted(
        (c, d) for c in ("grid_gray", "washer") for d in [*DETECTORS, BEST_ON_VALIDATION])
    assert (per_cat["status"] == "ok").all(), per_cat[["category", "detector", "error"]].to_string()
    assert (per_cat["backbone"] == "efficientnet_lite0").all()
    assert sorted(results.loc[results["category"] == "mean", "detector"]) == sorted([*DETECTORS, BEST_ON_VALIDATION])
    assert (out / "report.html").is_file()


@pytest.mark.parametrize("config_address, env_address, joins", [
    (None, None, None),                          # embedded
    (None, "http://127.0.0.1:8265", None),       # the job server's URL: still embedded
    (None, "10.0.0.5:6379", "10.0.0.5:6379"),    # set by `ray job submit` or exported
    ("auto", "10.0.0.5:6379", "auto"),
])
def test_connect_picks_the_cluster(monkeypatch, config_address, env_address, joins):
    """An embedded Ray is started with address="local": a plain ray.init() would join any cluster
    a `ray start` recorded in /tmp/ray/ray_current_cluster, and reject num_cpus (checked by hand)."""
    import ray

    from mvtec_ray.config import RayConfig
    from mvtec_ray.distributed.cluster import connect
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    if env_address:
        monkeypatch.setenv("RAY_ADDRESS", env_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if joins:
        monkeypatch.setattr(ray, "get_runtime_context", lambda: type("C", (), {"gcs_address": joins})())
    connect(RayConfig(address=config_address, num_cpus=2))
    (kwargs,) = calls
    if joins:
        assert kwargs["address"] == joins and "num_cpus" not in kwargs
    else:
        assert kwargs["address"] == "local" and kwargs["num_cpus"] == 2


def test_job_entry_points_join_ray_address_but_not_the_job_server(monkeypatch):
    from mvtec_ray import cli
    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    for env, joins in (("10.0.0.5:6379", True), ("http://127.0.0.1:8265", False), ("", False)):
        monkeypatch.setenv("RAY_ADDRESS", env)
        assert cli.job_main("run", ["--data", "d"]) == 0
        assert (seen[-1][-2:] == ["--address", "auto"]) == joins, (env, seen[-1])
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    cli.job_main("fit", ["--address", "10.0.0.9:6379"])  # an explicit address wins
    assert seen[-1] == ["fit", "--address", "10.0.0.9:6379"]

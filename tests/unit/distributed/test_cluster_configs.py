"""Static checks of cluster/ (launcher YAML, KubeRay CRs, local.sh) and one real local.sh run."""
from __future__ import annotations

import copy
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[3]
CLUSTER = ROOT / "cluster"
LOCAL_SH = CLUSTER / "local.sh"
AWS = CLUSTER / "aws.yaml"
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
AWS_SECRET_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _walk(node):
    """Every dict, list and scalar inside a parsed YAML document."""
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _strings(node) -> list[str]:
    return [n for n in _walk(node) if isinstance(n, str)]


def _pinned_ray_version() -> str:
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(r'"ray\[[^\]]*\]==([0-9][^"]*)"', text)
    assert match, "pyproject.toml must pin ray[...]==X"
    return match.group(1)


def _pod_specs(cluster_spec: dict) -> dict[str, dict]:
    """Group name ("head" or groupName) -> group spec (rayStartParams, template, ...)."""
    groups = {"head": cluster_spec["headGroupSpec"]}
    for group in cluster_spec.get("workerGroupSpecs", []):
        groups[group["groupName"]] = group
    return groups


def _kuberay_cluster_specs() -> list[dict]:
    return [_load(RAYCLUSTER)["spec"], _load(RAYJOB)["spec"]["rayClusterSpec"]]


def test_expected_files_exist_and_every_yaml_parses():
    for path in (LOCAL_SH, AWS, RAYCLUSTER, RAYJOB, CLUSTER / "README.md"):
        assert path.is_file(), path
    assert {AWS, RAYCLUSTER, RAYJOB} <= set(YAMLS)
    for path in YAMLS:
        assert isinstance(_load(path), dict), path


def test_ray_versions_match_installed_and_pinned():
    pinned = _pinned_ray_version()
    assert pinned == ray.__version__
    images = []
    for path in YAMLS:
        doc = _load(path)
        for s in _strings(doc):
            images += [(path.name, m) for m in re.findall(r"rayproject/ray(?:-ml)?:(\S+)", s)]
        for node in _walk(doc):
            if isinstance(node, dict) and "rayVersion" in node:
                assert node["rayVersion"] == pinned, (path.name, node["rayVersion"])
    assert len(images) >= 5, images
    for name, tag in images:
        assert tag.split("-")[0] == pinned, (name, tag)
        assert "py311" in tag, (name, tag)  # the project's Python


def test_entry_points_named_in_configs_exist():
    named = set()
    for path in [*YAMLS, LOCAL_SH, CLUSTER / "README.md"]:
        text = path.read_text()
        named |= set(re.findall(r"\bpipelines/([A-Za-z0-9_]+\.py)\b", text))
        if path.suffix == ".yaml":  # multi-line entrypoints folded by YAML
            for s in _strings(_load(path)):
                named |= set(re.findall(r"\bpipelines/([A-Za-z0-9_]+\.py)\b", s))
    assert "run.py" in named
    missing = sorted(n for n in named if not (ROOT / "pipelines" / n).is_file())
    assert not missing, f"entry points named in cluster/ but missing in pipelines/: {missing}"
    entry = _load(RAYJOB)["spec"]["entrypoint"].split()
    assert entry[:2] == ["python", "pipelines/run.py"]
    assert {"--data", "--out"} <= set(entry)


def test_aws_launcher_config_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = _load(AWS)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # jsonschema of the installed Ray + cross-field checks
    assert raw["provider"]["type"] == "aws"
    assert raw["idle_timeout_minutes"] > 0
    assert any("pip install" in c for c in raw["setup_commands"])
    assert "." in raw["file_mounts"].values()


def test_aws_head_schedules_no_work_and_gpu_workers_request_gpus():
    cfg = _load(AWS)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu = {k: v for k, v in types.items() if "gpu" in k}
    cpu = {k: v for k, v in types.items() if k != cfg["head_node_type"] and "gpu" not in k}
    assert gpu and cpu
    for name, t in gpu.items():
        assert t["resources"]["GPU"] >= 1, name
        assert t["resources"]["CPU"] >= 4 * t["resources"]["GPU"], name  # CPU:GPU >= 4
        assert t["docker"]["worker_image"].endswith("-gpu"), name
        assert t["node_config"]["InstanceType"][0] in "gp", name
        assert t["min_workers"] == 0 and t["max_workers"] >= 1
    for name, t in cpu.items():
        assert not t["resources"].get("GPU"), name
    assert not cfg["docker"]["image"].endswith("-gpu")  # head/CPU nodes: CPU image
    assert cfg["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items()
                                     if n != cfg["head_node_type"])
    for name, t in types.items():  # S3 through instance profiles
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name


def test_kuberay_head_schedules_no_work_and_gpu_groups_request_gpus():
    for spec in _kuberay_cluster_specs():
        groups = _pod_specs(spec)
        assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
        gpu_groups = [g for n, g in groups.items() if "gpu" in n]
        assert gpu_groups and len(groups) >= 3
        for group in gpu_groups:
            assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1
            for c in group["template"]["spec"]["containers"]:
                limits = c["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert int(limits["cpu"]) >= 4 * int(limits["nvidia.com/gpu"])
                assert c["image"].endswith("-gpu")
        for name, group in groups.items():
            if "gpu" not in name:
                for c in group["template"]["spec"]["containers"]:
                    assert "nvidia.com/gpu" not in c.get("resources", {}).get("limits", {})
                    assert not c["image"].endswith("-gpu")


def test_rayjob_matches_raycluster_and_cleans_up():
    cluster, job = _load(RAYCLUSTER), _load(RAYJOB)
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert (cluster["kind"], job["kind"]) == ("RayCluster", "RayJob")
    assert job["spec"]["rayClusterSpec"] == cluster["spec"]
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"].endswith(".zip")
    assert any(p.startswith("mvtec-ray @ ") for p in runtime_env["pip"])


def test_no_inline_secrets():
    for path in YAMLS:
        text = path.read_text()
        assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), path
        assert not re.search(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+]{8,}", text), path
        docs = [_load(path)]
        for s in _strings(docs[0]):
            if "\n" in s and ":" in s:  # embedded YAML such as runtimeEnvYAML
                try:
                    docs.append(yaml.safe_load(s))
                except yaml.YAMLError:
                    pass
        for doc in docs:
            for node in _walk(doc):
                if not isinstance(node, dict):
                    continue
                assert not (AWS_SECRET_NAMES | {"aws_secret_access_key"}) & set(node), (path, node)
                if node.get("name") in AWS_SECRET_NAMES:  # a container env entry
                    assert "value" not in node, (path, node["name"])
                    assert "secretKeyRef" in node.get("valueFrom", {}), (path, node["name"])
    # KubeRay: every Ray container gets credentials from a Secret (or IRSA), never inline.
    for spec in _kuberay_cluster_specs():
        for name, group in _pod_specs(spec).items():
            for c in group["template"]["spec"]["containers"]:
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
                assert refs == ["mvtec-ray-s3"], (name, c["name"])
    # local.sh forwards AWS_* by inheritance and may print names, never values.
    script = LOCAL_SH.read_text()
    assert not re.search(r"\$\{?AWS_", script)
    assert "set -x" not in script


def test_local_sh_is_valid_bash():
    assert os.access(LOCAL_SH, os.X_OK)
    text = LOCAL_SH.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    subprocess.run(["bash", "-n", str(LOCAL_SH)], check=True)
    out = subprocess.run(["bash", str(LOCAL_SH), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "start" in out.stdout and "stop" in out.stdout


def _free_port(preferred: int) -> int:
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


@pytest.mark.slow
def test_local_sh_start_status_stop(ray_session):
    """Starts a real head on non-default ports, checks it, stops only it.

    The session's embedded Ray (ray_session) must survive the stop.
    """
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        pytest.skip("ray CLI not next to the test interpreter")
    # Non-default ports (6379/8265/10001 may belong to another cluster); the client port
    # must lie outside Ray's default worker port range 10002-19999.
    port, dash, client = _free_port(6390), _free_port(8270), _free_port(26390)
    temp_dir = tempfile.mkdtemp(prefix="rl", dir="/tmp")  # short: Unix socket paths live below it
    home = tempfile.mkdtemp(prefix="rlhome")                # no ~/.ray/auth_token in here
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MVTEC_RAY_LOCAL"))}
    env.update(HOME=home, RAY_AUTH_MODE="disabled", RAY_BIN=str(ray_bin),
               RAY_USAGE_STATS_ENABLED="0")
    args = ["--port", str(port), "--temp-dir", temp_dir]

    def sh(*cmd, timeout=120):
        return subprocess.run(["bash", str(LOCAL_SH), *cmd], env=env, capture_output=True,
                              text=True, timeout=timeout)

    try:
        out = sh("start", "--num-cpus", "1", "--dashboard-port", str(dash),
                 "--client-port", str(client), *args)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "RAY_ADDRESS=" in out.stdout and f"http://127.0.0.1:{dash}" in out.stdout
        deadline, status = time.time() + 60, None
        while time.time() < deadline:  # the autoscaler's report lags the start by seconds
            status = sh("status", *args)
            if status.returncode == 0 and re.search(r"node_[0-9a-f]+", status.stdout) \
                    and "/1.0 CPU" in status.stdout:
                break
            time.sleep(2)
        assert status is not None and status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"node_[0-9a-f]+", status.stdout) and "/1.0 CPU" in status.stdout, status.stdout
    finally:
        stop = sh("stop", *args)
        shutil.rmtree(home, ignore_errors=True)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert "stopped" in stop.stdout
    after = sh("status", *args)
    assert after.returncode != 0 and "no local cluster" in after.stdout
    shutil.rmtree(temp_dir, ignore_errors=True)
    # The other (embedded) cluster of this session is untouched.
    assert ray_session.get(ray_session.remote(lambda: 41 + 1).remote(), timeout=60) == 42

"""User errors through the real console script: one line naming the problem, exit 2, no
traceback (a traceback with --debug), and all of it before any Ray process is started."""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).with_name("mvtec-ray"))

# Loaded by every Python started with this PYTHONPATH: records any attempt to launch Ray's
# gcs_server or raylet (how ray.init starts a local cluster), so "failed before Ray" is checked.
SITECUSTOMIZE = '''
import os, sys
def _ray_guard(event, args):
    if event == "subprocess.Popen":
        command = " ".join(str(a) for a in (args[1] or [args[0]]))
        if "gcs_server" in command or "raylet" in command:
            with open(os.environ["RAY_START_MARKER"], "a") as handle:
                handle.write(command[:200] + "\\n")
sys.addaudithook(_ray_guard)
'''


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    base = tmp_path_factory.mktemp("cli")
    (base / "hook").mkdir()
    (base / "hook" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    # the catalog only lists files, so placeholder bytes are enough to pass it
    for rel in ("ok/widget/train/good/a.png", "ok/widget/train/good/b.png", "ok/widget/test/good/c.png",
                "notest/widget/train/good/a.png"):
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(b"placeholder")
    (base / "bad.yaml").write_text("extract:\n  backbone: [unclosed\n")
    (base / "range.yaml").write_text("extract:\n  batch_size: 0\n")
    (base / "torch_home").mkdir()  # empty: torchvision's cache has no resnet50 weights
    return base


def _run(base: Path, name: str, args: list[str]) -> dict:
    marker = base / f"ray-started-{name}"
    env = {**os.environ, "PYTHONPATH": f"{base / 'hook'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "RAY_START_MARKER": str(marker), "TORCH_HOME": str(base / "torch_home"), "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=240, cwd=base)
    return {"rc": proc.returncode, "stderr": proc.stderr, "stdout": proc.stdout,
            "ray_started": marker.read_text() if marker.exists() else ""}


# name -> (argv, words the message must contain)
CASES = {
    "wrong_root": (["run", "--data", "{base}/nowhere", "--out", "{base}/o1"], ["not found", "nowhere"]),
    "missing_split": (["run", "--data", "{base}/notest", "--out", "{base}/o2"], ["widget", "no images in test/"]),
    "unknown_category": (["run", "--data", "{base}/ok", "--out", "{base}/o3", "--categories", "gizmo"],
                         ["categories not found", "gizmo", "widget"]),
    "unknown_detector": (["run", "--data", "{base}/ok", "--out", "{base}/o4", "--detectors", "knn,nope"],
                         ["unknown detector", "nope", "patchcore"]),
    "unknown_backbone": (["extract", "--data", "{base}/ok", "--out", "{base}/o5", "--backbone", "resnet5"],
                         ["unknown backbone", "resnet5", "resnet50"]),
    "invalid_yaml": (["run", "--config", "{base}/bad.yaml", "--data", "{base}/ok", "--out", "{base}/o6"],
                     ["invalid YAML", "bad.yaml", "line"]),
    "out_of_range_flag": (["run", "--data", "{base}/ok", "--out", "{base}/o7", "--image-size", "5"],
                          ["image_size", "greater than or equal to 32"]),
    "out_of_range_yaml": (["extract", "--config", "{base}/range.yaml", "--data", "{base}/ok", "--out", "{base}/o8"],
                          ["batch_size", "greater than or equal to 1"]),
    "zero_cpus": (["run", "--data", "{base}/ok", "--out", "{base}/o9", "--num-cpus", "0"], ["num_cpus"]),
    "missing_out": (["run", "--data", "{base}/ok"], ["--out is required"]),
    "missing_weights": (["run", "--data", "{base}/ok", "--out", "{base}/o10", "--backbone", "resnet50"],
                        ["resnet50", "could not be downloaded", "efficientnet_lite0"]),
    "weights_file": (["extract", "--data", "{base}/ok", "--out", "{base}/o11", "--backbone", "efficientnet_lite0",
                      "--weights", "{base}/none.pth"], ["weights file not found", "none.pth"]),
    "no_features": (["fit", "--features", "{base}/nofeatures", "--out", "{base}/o12"], ["features not found"]),
    "debug_wrong_root": (["run", "--data", "{base}/nowhere", "--out", "{base}/o13", "--debug"], []),
}


@pytest.fixture(scope="module")
def results(sandbox):
    """Every case at once, three processes at a time (each is mostly interpreter start-up)."""
    def one(item):
        name, (argv, _) = item
        return name, _run(sandbox, name, [a.format(base=sandbox) for a in argv])
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, CASES.items()))


def test_guard_sees_a_ray_start(sandbox):
    """The sitecustomize guard is live in a child interpreter (else the next checks prove nothing)."""
    env = {**os.environ, "PYTHONPATH": str(sandbox / "hook"), "RAY_START_MARKER": str(sandbox / "control")}
    subprocess.run([sys.executable, "-c", "import subprocess; subprocess.Popen(['true', 'raylet']).wait()"],
                   env=env, check=True, timeout=60)
    assert "raylet" in (sandbox / "control").read_text()


@pytest.mark.parametrize("name", [n for n in CASES if not n.startswith("debug")])
def test_user_error_is_one_line_before_ray(results, name):
    result, words = results[name], CASES[name][1]
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["rc"] == 2, result
    assert len(lines) == 1, result["stderr"]
    assert lines[0].startswith(f"mvtec-ray {CASES[name][0][0]}: error: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result["stderr"] + result["stdout"]
    assert result["ray_started"] == "", f"Ray was started before the error: {result['ray_started']}"


def test_debug_shows_the_traceback(results):
    result = results["debug_wrong_root"]
    assert result["rc"] != 0
    assert "Traceback (most recent call last)" in result["stderr"]
    assert "StorageError" in result["stderr"] and "nowhere" in result["stderr"]
    assert result["ray_started"] == ""


def test_user_error_found_behind_ray_wrappers():
    """Ray Data hands a UDF's exception to the driver only as traceback text; chains are followed."""
    from mvtec_ray.cli import find_user_error
    from mvtec_ray.errors import CatalogError, StorageUnavailable
    remote = RuntimeError("ray::MapBatches(prepare_batch)()\n  File \"extract.py\", line 1\n"
                          "mvtec_ray.errors.StorageUnavailable: cannot read s3://b/k: throttled by S3 (retries exhausted)\n"
                          "\nThe above exception was the direct cause of the following exception:\n"
                          "ray.exceptions.UserCodeException: UDF failed to process a data block.")
    found = find_user_error(remote)
    assert isinstance(found, StorageUnavailable) and str(found) == "cannot read s3://b/k: throttled by S3 (retries exhausted)"
    try:
        try:
            raise CatalogError("category 'x' has no images in train/good")
        except CatalogError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert isinstance(find_user_error(outer), CatalogError)
    assert find_user_error(ValueError("a bug, not a user error")) is None
    assert find_user_error(RuntimeError("mvtec_ray.errors.NotAClass: x")) is None


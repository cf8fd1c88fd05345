"""Ray's C++ notices that a user cannot act on stay out of the command line's default output;
everything else written to stderr (native or Python) still arrives, in full."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTICE = ("[2026-11-29 21:47:02,833 E 1 1] core_worker.cc:2465: Actor with class name: 'MapWorker(X)' and ID: "
          "'18' has constructor arguments in the object store and max_restarts > 0. If the arguments ...")


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def test_only_the_known_native_notice_is_dropped():
    out = _python(f"""
        import logging, os, sys
        from mvtec_ray.distributed import native_stderr
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        native_stderr.request(True)
        native_stderr.start_if_requested()
        os.write(2, {NOTICE!r}.encode() + b"\\n")
        os.write(2, b"native line kept\\n")
        os.write(2, b"a partial native line")
        print("python line kept", file=sys.stderr)
        logging.warning("logged line kept")
        native_stderr.stop()
        os.write(2, b"\\nafter stop\\n")
        print("stdout untouched")
    """)
    assert out.returncode == 0, out.stderr
    assert "core_worker.cc" not in out.stderr
    for kept in ("native line kept", "a partial native line", "python line kept", "logged line kept", "after stop"):
        assert kept in out.stderr, (kept, out.stderr)
    assert out.stdout == "stdout untouched\n"


def test_without_a_request_nothing_is_filtered():
    out = _python(f"""
        import os
        from mvtec_ray.distributed import native_stderr
        native_stderr.start_if_requested()
        os.write(2, {NOTICE!r}.encode() + b"\\n")
        native_stderr.stop()
    """)
    assert out.returncode == 0 and "core_worker.cc" in out.stderr


@pytest.mark.parametrize("debug", [False, True])
def test_extract_command_output(small_dataset, tmp_path, debug):
    """A real extraction through the CLI on its own embedded Ray: Ray Data's actor pool makes the
    core worker print its restart notice; by default it is gone and the progress line is there,
    with --debug it is shown."""
    args = [sys.executable, "-m", "mvtec_ray", "extract", "--data", str(small_dataset), "--out", str(tmp_path / "o"),
            "--backbone", "efficientnet_lite0", "--categories", "washer", "--num-cpus", "2"] + (["--debug"] if debug else [])
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("has constructor arguments in the object store" in out.stderr) == debug, out.stderr[-3000:]
    assert ("streaming_executor" in out.stderr) == debug, out.stderr[-3000:]  # Ray Data's INFO lines
    assert "extract: " in out.stderr and " rows" in out.stderr

"""Running a multi-node scenario script (multinode_scenarios.py, coreset_split_scenario.py, both in
this folder) in its own process and reading its verdict; whatever it leaves running is ended afterwards."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HELPERS = Path(__file__).resolve().parent      # the scenario scripts live here
ROOT = HELPERS.parents[1]                      # the repository root: the scripts' working directory
MARKER = "MVTEC_RAY_MULTINODE_TEST"


def _kill_marked(value: str) -> None:
    """Kill leftover processes of this run only (they inherit the marker); normally there are none."""
    for _ in range(3):
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if f"{MARKER}={value}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(1)


def run_scenario(script: Path, args: list[str], work: Path, timeout: int, show: tuple[str, ...] = ()) -> dict:
    """Run a multi-node scenario script in its own process; its last ``VERDICT {json}`` line, with wall_s.

    Processes carrying the scenario's marker are ended afterwards, whatever happened."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
               **{MARKER: str(work)})
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script), *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        _kill_marked(str(work))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("VERDICT ")]
    assert lines, f"no verdict (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    result = json.loads(lines[-1][len("VERDICT "):])
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if show:
        print(json.dumps({k: result.get(k) for k in show}, indent=1))  # shown with -s
    assert not result.get("error"), f"{result['error']}\n{proc.stderr[-4000:]}"
    return result

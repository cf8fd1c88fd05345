"""Shared measurement helper for the benchmarks: cold processes, process-tree CPU and memory.

Every ratio a benchmark prints compares the same work on the same CPUs, each side started as a
fresh Python process (:func:`run_cold`), so imports, Ray start and model loading are paid on both
sides. Memory is the peak, over the run, of the summed PSS (proportional set size: shared pages
split between the processes sharing them) of the whole process tree: Ray's GCS, raylet, workers
and the driver, or the single bare process.

Figures are printed as ``name=value`` lines (:func:`emit`); :func:`parse_figures` reads them back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FIGURE = re.compile(r"^([A-Za-z0-9_./\-]+)=([-+0-9.eE]+|nan|inf)\s*$", re.MULTILINE)


@dataclass
class Measured:
    wall_s: float
    cpu_s: float  # CPU seconds of every process in the tree (exited ones included, as far as seen)
    peak_pss_mb: float
    peak_processes: int
    returncode: int
    output: str
    figures: dict = field(default_factory=dict)
    #: (process title, PSS MB) of every process at the moment of the peak, largest first
    peak_breakdown: list = field(default_factory=list)
    #: process title -> CPU seconds (all processes of that title together), largest first
    cpu_by_title: dict = field(default_factory=dict)

    def describe_peak(self, top: int = 8) -> str:
        return ", ".join(f"{name} {mb:.0f}" for name, mb in self.peak_breakdown[:top])

    def describe_cpu(self, top: int = 10) -> str:
        return ", ".join(f"{name} {sec:.1f}" for name, sec in list(self.cpu_by_title.items())[:top])


def emit(**figures: float | int | str) -> None:
    """Print each figure as ``name=value`` on its own line (the benchmarks' headline format)."""
    for name, value in figures.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
        print(f"{name}={value}", flush=True)


def parse_figures(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in _FIGURE.findall(text)}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def process_tree(root: psutil.Process) -> list[psutil.Process]:
    """``root`` and its descendants, plus Ray processes whose parent chain was cut (daemonised)."""
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _pss_mb(process: psutil.Process) -> float:
    try:
        return process.memory_full_info().pss / 2 ** 20
    except (psutil.NoSuchProcess, psutil.AccessDenied, AttributeError):
        try:
            return process.memory_info().rss / 2 ** 20
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0.0


def _cpu_s(process: psutil.Process) -> float:
    try:
        t = process.cpu_times()
        return t.user + t.system
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0.0


#: PSS sampling interval of a run measured for its wall time. Reading PSS walks every page table
#: of every process (/proc/PID/smaps): ~50 ms of CPU per sample of a 10-process Ray tree, which at
#: the memory runs' 0.5 s would take ~5% of two cores from the side with more processes
TIMING_PSS_EVERY_S = 5.0


def run_cold(argv: list[str], env: dict | None = None, poll_s: float = 0.5, timeout_s: float = 3600,
             echo: bool = True, pss_every_s: float = 0.5) -> Measured:
    """Run ``argv`` as a fresh process; sample its whole tree's CPU (every ``poll_s``) and PSS
    (every ``pss_every_s``: 0.5 for memory figures, :data:`TIMING_PSS_EVERY_S` when the wall time
    is the figure) until it exits.

    The child's output is echoed (``echo``) and parsed for ``name=value`` figures.
    """
    full_env = {**os.environ, **(env or {})}
    full_env.setdefault("PYTHONPATH", ROOT)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=ROOT)
    lines: list[str] = []

    def pump() -> None:
        for line in proc.stdout:
            lines.append(line)
            if echo:
                sys.stdout.write("    | " + line)
                sys.stdout.flush()
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    peak_pss, peak_n, cpu_seen, breakdown, titles = 0.0, 0, {}, [], {}
    next_pss = started
    while proc.poll() is None:
        if time.perf_counter() - started > timeout_s:
            for p in process_tree(root)[::-1]:
                p.kill()
            break
        members = process_tree(root)
        if time.perf_counter() >= next_pss:
            next_pss = time.perf_counter() + pss_every_s
            sizes = [(_title(p), _pss_mb(p)) for p in members]
            if sum(mb for _, mb in sizes) > peak_pss:
                peak_pss = sum(mb for _, mb in sizes)
                breakdown = sorted(sizes, key=lambda item: -item[1])
        else:
            sizes = [(_title(p), 0.0) for p in members]
        peak_n = max(peak_n, len(members))
        for (title, _), p in zip(sizes, members):
            cpu_seen[p.pid] = max(cpu_seen.get(p.pid, 0.0), _cpu_s(p))
            # a Ray worker starts as default_worker.py, idles as ray::IDLE, then takes its task's title
            if not str(titles.get(p.pid, "?")).startswith("ray::") or titles[p.pid] == "ray::IDLE":
                titles[p.pid] = title
        time.sleep(poll_s)
    proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - started
    output = "".join(lines)
    by_title: dict[str, float] = {}
    for pid, seconds in cpu_seen.items():
        by_title[titles.get(pid, "?")] = by_title.get(titles.get(pid, "?"), 0.0) + seconds
    by_title = dict(sorted(by_title.items(), key=lambda item: -item[1]))
    return Measured(wall, sum(cpu_seen.values()), peak_pss, peak_n, proc.returncode, output, parse_figures(output),
                    breakdown, by_title)


def _title(process: psutil.Process) -> str:
    """Ray sets worker titles to ``ray::<task or actor>``; other processes by their program."""
    try:
        words = process.cmdline()
    except psutil.Error:
        return "?"
    if words and words[0].startswith("ray::"):
        return words[0].split(" ")[0]
    names = [os.path.basename(w) for w in words[:3] if w]
    return next((n for n in names if n.endswith(".py") or n in ("raylet", "gcs_server")), names[0] if names else "?")


def python(script: str, *args: str) -> list[str]:
    """argv running ``script`` (a path relative to the repository) with this interpreter."""
    return [sys.executable, os.path.join(ROOT, script), *args]


def require_ok(measured: Measured, what: str) -> Measured:
    if measured.returncode != 0:
        raise SystemExit(f"{what} failed (exit {measured.returncode}):\n{measured.output[-3000:]}")
    return measured

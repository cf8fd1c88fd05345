"""Shared measurement helper for the benchmarks: cold processes, process-tree CPU and memory.

Every ratio a benchmark prints compares the same work on the same CPUs, each side started as a
fresh Python process (:func:`run_cold`), so imports, Ray start and model loading are paid on both
sides. Memory is the peak, over the run, of the summed PSS (proportional set size: shared pages
split between the processes sharing them) of the whole process tree: Ray's GCS, raylet, workers
and the driver, or the single bare process.

:class:`TreeMonitor` is the one process-tree sampler: :func:`run_cold` drives it for a child
process, and a benchmark's own process watches its Ray workers with it (``with
TreeMonitor(...).watching():``).

Figures are printed as ``name=value`` lines (:func:`emit`); :func:`parse_figures` reads them back.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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


def emit(*, digits: int | None = None, **figures: float | str) -> None:
    """Print each figure as ``name=value`` on its own line (the benchmarks' headline format).

    Floats get 4 significant digits, or ``digits`` decimals when given.
    """
    for name, value in figures.items():
        if isinstance(value, float):
            if digits is not None:
                value = f"{value:.{digits}f}"
            else:
                value = f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
        print(f"{name}={value}", flush=True)


def parse_figures(text: str) -> dict[str, float]:
    return {name: float(value) for name, value in _FIGURE.findall(text)}


def load_average() -> str:
    """The load average line: ``1.23 0.98 0.75 (1/5/15 min, 2 CPUs)``."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


def process_tree(root: psutil.Process, include_root: bool = True) -> list[psutil.Process]:
    """``root`` (unless ``include_root`` is false) and its descendants."""
    try:
        return ([root] if include_root else []) + root.children(recursive=True)
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


def proc_status_kib(pid: int, *keys: str) -> tuple[int, ...] | None:
    """``/proc/<pid>/status`` fields in KiB (Linux), e.g. VmHWM (the kernel's own peak RSS) and
    RssAnon (private memory); None if the process is gone."""
    try:
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                      if ":" in line)
        return tuple(int(status[key].split()[0]) for key in keys)
    except (OSError, KeyError, ValueError):
        return None


def is_ray_worker(title: str) -> bool:
    """A Ray worker process: ``ray::<task or actor>`` once it runs, ``default_worker.py`` at start."""
    return title.startswith("ray::") or title == "default_worker.py"


#: PSS sampling interval of a run measured for its wall time. Reading PSS walks every page table
#: of every process (/proc/PID/smaps): ~50 ms of CPU per sample of a 10-process Ray tree, which at
#: the memory runs' 0.5 s would take ~5% of two cores from the side with more processes
TIMING_PSS_EVERY_S = 5.0


class TreeMonitor:
    """The benchmarks' one sampler of a process tree (``root`` and its descendants).

    Each :meth:`sample` records every process's CPU seconds (the most seen: exited processes keep
    their last value) and title; every ``pss_every_s`` (None: never) the summed PSS, keeping its
    peak and the per-process breakdown at the peak. With ``worker_memory``, also per ``ray::``
    worker the kernel's peak RSS (VmHWM, which counts the object store's shared pages the worker
    touched) and the sampled peak and time series of its private memory (RssAnon), and the most
    private memory all workers held at one moment.
    """

    def __init__(self, root: psutil.Process | None = None, *, include_root: bool = True,
                 pss_every_s: float | None = 0.5, worker_memory: bool = False):
        self.root = root or psutil.Process()
        self.include_root = include_root
        self.pss_every_s = pss_every_s
        self.worker_memory = worker_memory
        self.cpu: dict[int, float] = {}
        self.titles: dict[int, str] = {}
        self.peak_pss_mb, self.peak_processes = 0.0, 0
        self.peak_breakdown: list[tuple[str, float]] = []
        self.hwm_kib: dict[int, int] = {}
        self.anon_kib: dict[int, int] = {}
        self.anon_series: dict[int, list[tuple[float, int]]] = {}
        self.total_anon_kib = 0
        self._next_pss = time.perf_counter()
        self._stop = threading.Event()

    def members(self) -> list[psutil.Process]:
        return process_tree(self.root, self.include_root)

    def sample(self) -> None:
        members = self.members()
        titles = [_title(p) for p in members]
        if self.pss_every_s is not None and time.perf_counter() >= self._next_pss:
            self._next_pss = time.perf_counter() + self.pss_every_s
            sizes = [(title, _pss_mb(p)) for title, p in zip(titles, members)]
            if sum(mb for _, mb in sizes) > self.peak_pss_mb:
                self.peak_pss_mb = sum(mb for _, mb in sizes)
                self.peak_breakdown = sorted(sizes, key=lambda item: -item[1])
        self.peak_processes = max(self.peak_processes, len(members))
        total_anon = 0
        for title, p in zip(titles, members):
            self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), _cpu_s(p))
            # a Ray worker starts as default_worker.py, idles as ray::IDLE, then takes its task's title
            if not self.titles.get(p.pid, "?").startswith("ray::") or self.titles[p.pid] == "ray::IDLE":
                self.titles[p.pid] = title
            if self.worker_memory and title.startswith("ray::"):
                memory = proc_status_kib(p.pid, "VmHWM", "RssAnon")
                if memory is None:
                    continue
                hwm, anon = memory
                self.hwm_kib[p.pid] = max(self.hwm_kib.get(p.pid, 0), hwm)
                self.anon_kib[p.pid] = max(self.anon_kib.get(p.pid, 0), anon)
                self.anon_series.setdefault(p.pid, []).append((time.monotonic(), anon))
                total_anon += anon
        self.total_anon_kib = max(self.total_anon_kib, total_anon)

    def cpu_seconds(self, since: dict[int, float] | None = None) -> float:
        """CPU seconds of every process seen, less what each had used in ``since`` (a copy of
        :attr:`cpu` taken earlier)."""
        since = since or {}
        return sum(seconds - since.get(pid, 0.0) for pid, seconds in self.cpu.items())

    def worker_cpu(self) -> dict[int, float]:
        """pid -> CPU seconds of every Ray worker process seen."""
        return {pid: s for pid, s in self.cpu.items() if is_ray_worker(self.titles.get(pid, "?"))}

    def cpu_by_title(self) -> dict[str, float]:
        by_title: dict[str, float] = {}
        for pid, seconds in self.cpu.items():
            by_title[self.titles.get(pid, "?")] = by_title.get(self.titles.get(pid, "?"), 0.0) + seconds
        return dict(sorted(by_title.items(), key=lambda item: -item[1]))

    @contextmanager
    def watching(self, interval_s: float = 0.25):
        """Sample now, every ``interval_s`` in a background thread while the block runs, and at its
        end. Yields the CPU seconds already used (pid -> seconds) for :meth:`cpu_seconds`."""
        self.sample()
        before = dict(self.cpu)
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval_s):
                self.sample()
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            yield before
        finally:
            self._stop.set()
            thread.join()
            self.sample()


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
    monitor = TreeMonitor(psutil.Process(proc.pid), pss_every_s=pss_every_s)
    while proc.poll() is None:
        if time.perf_counter() - started > timeout_s:
            for p in monitor.members()[::-1]:
                p.kill()
            break
        monitor.sample()
        time.sleep(poll_s)
    proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - started
    output = "".join(lines)
    return Measured(wall, monitor.cpu_seconds(), monitor.peak_pss_mb, monitor.peak_processes, proc.returncode,
                    output, parse_figures(output), monitor.peak_breakdown, monitor.cpu_by_title())


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

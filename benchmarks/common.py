"""The benchmarks' shared start: import this first in every script (``import common``).

On import: the repository goes on ``sys.path`` (a script also runs from a checkout without the
package installed), and Ray's token authentication and usage statistics are switched off for the
embedded Ray every benchmark starts (children inherit both through the environment). Then:

* :func:`parser`: the argument parser every script builds, described by its docstring's first
  line, with :func:`hidden` for the flags a script passes only to its own cold child processes;
* :func:`mvtec_ray_cli`: ``python -m mvtec_ray ...`` as a child process, failing with its output;
* :func:`print_load`: the ``load_average=`` figure line (1-minute load average);
* :func:`noisy_copies`: distinct PNGs from a few generated ones (each copy gets its own noise), so
  no decode or file cache is shared between images.

Measurement itself (cold processes, the process-tree monitor, ``name=value`` figures and the load
average line) is in :mod:`measure`; the bare single-process baselines in :mod:`baselines`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def parser(doc: str) -> argparse.ArgumentParser:
    """The script's argument parser, described by the first line of its docstring ``doc``."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def hidden(parser: argparse.ArgumentParser, *flags: str, **kwargs) -> None:
    """Flags a benchmark passes to its own child processes only (not shown by ``--help``)."""
    for flag in flags:
        parser.add_argument(flag, help=argparse.SUPPRESS, **kwargs)


def mvtec_ray_cli(*args: str, cwd: str | None = None) -> str:
    """Run ``python -m mvtec_ray ARGS`` in a child process; its stdout, or SystemExit with the
    tail of its output when it fails."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "mvtec_ray", *args], check=False, capture_output=True,
                          text=True, env=env, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"mvtec-ray {' '.join(args)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def print_load(name: str = "load_average") -> None:
    """Print ``NAME=<1-minute load average>`` (one decimal): how busy the shared machine was."""
    print(f"{name}={load_1min():.1f}", flush=True)


def load_1min() -> float:
    return os.getloadavg()[0]


def noisy_copies(sources: list[Path], target: Path, n: int, amplitude: int, per_pixel: bool,
                 name: str = "{:04d}.png", seed: int = 0) -> None:
    """Write ``n`` distinct PNGs to ``target``: copy ``i`` is ``sources[i % len(sources)]`` plus
    uniform integer noise in [-amplitude, amplitude], drawn per pixel (``per_pixel``) or as one
    colour shift per image (keeps the PNGs as compressible as their sources)."""
    import numpy as np
    from PIL import Image
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"), dtype=np.int16)
        shape = pixels.shape if per_pixel else (1, 1, 3)
        noise = rng.integers(-amplitude, amplitude + 1, size=shape, dtype=np.int16 if per_pixel else np.int64)
        pixels = np.clip(pixels + noise, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(target / name.format(i), compress_level=1)

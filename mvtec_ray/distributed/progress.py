"""Progress a person can follow: one live line on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("mvtec_ray")


class Progress:
    """``what: done/total unit, rate/s, ETA`` — redrawn in place on a terminal (at most 5 times a
    second), logged every ``interval_s`` seconds when the output is a file or a pipe (job logs)."""

    def __init__(self, what: str, total: int, unit: str, stream=None, interval_s: float = 10.0):
        self.what, self.total, self.unit = what, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.live else interval_s
        self.done = 0
        self.started = time.perf_counter()
        self._shown = self.started

    def line(self) -> str:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = f"ETA {left:.0f}s" if left == left else "ETA --"
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f}%), "
                f"{rate:.1f} {self.unit}/s, {eta}")

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = time.perf_counter()
        if now - self._shown >= self.interval_s or self.done >= self.total:
            self._shown = now
            self._show()

    def _show(self) -> None:
        if self.live:
            self.stream.write("\r\033[K" + self.line())
            self.stream.flush()
        else:
            log.info(self.line())

    def close(self) -> None:
        """Finish the line (a terminal keeps the last state on its own line)."""
        elapsed = time.perf_counter() - self.started
        if self.live:
            self.stream.write("\r\033[K" + f"{self.what}: {self.done}/{self.total} {self.unit} in {elapsed:.1f}s\n")
            self.stream.flush()
        elif self.done < self.total or elapsed >= self.interval_s:
            log.info("%s: %d/%d %s in %.1fs", self.what, self.done, self.total, self.unit, elapsed)

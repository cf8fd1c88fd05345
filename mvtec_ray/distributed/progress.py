"""Progress a person can follow: one live line on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable

log = logging.getLogger("mvtec_ray")


class Progress:
    """``what: done/total unit (pct%), rate unit/s, ETA`` — redrawn in place on a terminal (at most
    5 times a second), logged every ``interval_s`` seconds when the output is a file or a pipe (job logs).

    The rate is the recent one: work done over the last ``window_s`` seconds of updates, measured
    from the first update on, so the warm-up before the first result (actors starting, models
    loading) never counts as slow work. The first update alone gives no rate (``-- unit/s``);
    the ETA (remaining work / that rate) shows once the rate spans ``min_updates`` intervals
    between updates or ``min_fraction`` of the work is done, ``ETA --`` before. ``clock``: the
    time source (seconds), for tests.
    """

    def __init__(self, what: str, total: int, unit: str, stream=None, interval_s: float = 10.0, *,
                 window_s: float = 30.0, min_updates: int = 2, min_fraction: float = 0.05,
                 clock: Callable[[], float] = time.perf_counter):
        self.what, self.total, self.unit = what, int(total), unit
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = 0.2 if self.live else interval_s
        self.window_s, self.min_updates, self.min_fraction = float(window_s), int(min_updates), float(min_fraction)
        self.clock = clock
        self.done = 0
        self.updates = 0
        self.started = clock()
        self._shown = self.started
        # (time, done) at each update; the oldest is the newest one at or before the window's start
        self._samples: deque[tuple[float, int]] = deque()

    def rate(self) -> float | None:
        """Units per second over the recent window; None before two updates."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def eta(self) -> float | None:
        """Seconds left at the recent rate; None until enough updates (see the class)."""
        rate = self.rate()
        enough = self.updates > self.min_updates or self.done >= self.min_fraction * self.total
        if rate is None or not enough:
            return None
        left = max(0, self.total - self.done)
        if left == 0:
            return 0.0
        return left / rate if rate > 0 else None

    def line(self) -> str:
        rate, eta = self.rate(), self.eta()
        shown_rate = f"{rate:.1f}" if rate is not None else "--"
        shown_eta = f"ETA {eta:.0f}s" if eta is not None else "ETA --"
        return (f"{self.what}: {self.done}/{self.total} {self.unit} ({100 * self.done / max(1, self.total):.0f}%), "
                f"{shown_rate} {self.unit}/s, {shown_eta}")

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        self.updates += 1
        now = self.clock()
        self._samples.append((now, self.done))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()
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
        elapsed = self.clock() - self.started
        if self.live:
            self.stream.write("\r\033[K" + f"{self.what}: {self.done}/{self.total} {self.unit} in {elapsed:.1f}s\n")
            self.stream.flush()
        elif self.done < self.total or elapsed >= self.interval_s:
            log.info("%s: %d/%d %s in %.1fs", self.what, self.done, self.total, self.unit, elapsed)

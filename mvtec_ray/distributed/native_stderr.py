"""Ray-internal lines that Ray's C++ core worker writes straight to the driver's stderr (file
descriptor 2), that a user cannot act on, dropped from the command line's default output.

Ray Data always passes its map actors' constructor arguments through the object store and
gives them ``max_restarts=-1`` (for fault tolerance), so every actor pool makes the core worker
print an error-level notice about restarts; no option of ours removes the cause. Python-level
output (logging, the progress line) is not touched: ``sys.stderr`` keeps writing to the
terminal directly, and only the native descriptor goes through a filter thread. Started after
``ray.init()`` so that Ray's daemons never inherit the pipe; ``--debug`` leaves it off.
"""
from __future__ import annotations

import io
import logging
import os
import re
import sys
import threading

#: native lines dropped (bytes patterns, searched in each line)
NOISE = (
    re.compile(rb"core_worker\.cc:\d+: Actor with class name: .* has constructor arguments in the object store "
               rb"and max_restarts > 0"),
)

_requested = False
_active: NativeStderrFilter | None = None


class NativeStderrFilter:
    """Routes file descriptor 2 through a pipe and forwards every line not matching ``patterns``."""

    def __init__(self, patterns=NOISE):
        self.patterns = tuple(patterns)
        self.dropped = 0
        self._terminal: int | None = None
        self._thread: threading.Thread | None = None
        self._saved_stderr = None
        self._new_stderr = None

    def start(self) -> None:
        sys.stderr.flush()
        self._terminal = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        # Python's own writers go to the terminal directly (a live progress line needs isatty)
        self._saved_stderr = sys.stderr
        self._new_stderr = io.TextIOWrapper(io.FileIO(os.dup(self._terminal), "w"), encoding="utf-8",
                                            errors="backslashreplace", line_buffering=True)
        sys.stderr = self._new_stderr
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._saved_stderr:
                handler.setStream(self._new_stderr)
        self._thread = threading.Thread(target=self._pump, args=(read_end,), name="native-stderr", daemon=True)
        self._thread.start()

    def _pump(self, read_end: int) -> None:
        pending = b""
        try:
            while True:
                chunk = os.read(read_end, 65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._forward(line + b"\n")
            if pending:
                self._forward(pending)
        finally:
            os.close(read_end)

    def _forward(self, line: bytes) -> None:
        if any(p.search(line) for p in self.patterns):
            self.dropped += 1
            return
        try:
            os.write(self._terminal, line)
        except OSError:
            pass  # the terminal went away: nothing to show it on

    def stop(self) -> None:
        """Put file descriptor 2 and ``sys.stderr`` back; forward what is still in the pipe."""
        if self._thread is None:
            return
        self._new_stderr.flush()
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is self._new_stderr:
                handler.setStream(self._saved_stderr)
        sys.stderr = self._saved_stderr
        os.dup2(self._terminal, 2)  # closes this process's write end of the pipe
        self._thread.join(timeout=2.0)
        if not self._thread.is_alive():
            os.close(self._terminal)
        self._new_stderr.close()
        self._thread = None


def request(enabled: bool = True) -> None:
    """Ask for the filter (the command line does, unless --debug); it starts after ``ray.init()``."""
    global _requested
    _requested = enabled


def start_if_requested() -> None:
    global _active
    if _requested and _active is None:
        candidate = NativeStderrFilter()
        try:
            candidate.start()
        except OSError:  # no usable stderr (closed by a daemon manager): nothing to filter
            return
        _active = candidate


def stop() -> None:
    global _active
    if _active is not None:
        _active.stop()
        _active = None

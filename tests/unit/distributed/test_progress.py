"""The progress line: live on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import io
import logging

from mvtec_ray.distributed.progress import Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_gets_one_redrawn_line_with_rate_and_eta():
    stream = FakeTerminal()
    progress = Progress("extract", 10, "rows", stream=stream)
    progress.interval_s = 0.0
    for _ in range(4):
        progress.update(2)
    text = stream.getvalue()
    assert text.count("\r") == 4 and "\n" not in text  # redrawn in place
    assert "extract: 8/10 rows (80%)" in text and "rows/s" in text and "ETA" in text
    progress.update(2)
    progress.close()
    last = stream.getvalue().rsplit("\r", 1)[1]
    assert last.startswith("\033[Kextract: 10/10 rows in ") and last.endswith("\n")


def test_pipes_get_periodic_log_lines(caplog):
    stream = io.StringIO()
    progress = Progress("fit", 3, "tasks", stream=stream, interval_s=3600)
    with caplog.at_level(logging.INFO, logger="mvtec_ray"):
        progress.update(1)  # before the interval: nothing
        assert not caplog.records
        progress.update(2)  # the last one is always shown
    assert stream.getvalue() == ""
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["fit: 3/3 tasks (100%)"]

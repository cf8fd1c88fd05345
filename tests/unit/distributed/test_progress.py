"""The progress line: live on a terminal, periodic log lines otherwise."""
from __future__ import annotations

import io
import logging

import pytest

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


# -- the rate and ETA from recent updates (a fake clock, no sleeping) --------------------------------
class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _live(total, clock, **kwargs):
    progress = Progress("extract", total, "rows", stream=FakeTerminal(), clock=clock, **kwargs)
    progress.interval_s = 0.0
    return progress


def test_the_warm_up_before_the_first_result_is_not_the_rate():
    """The issue's case: 4 rows after a 10 s warm-up, then 25 rows/s. Before: ``0.4 rows/s, ETA 4449s``."""
    clock = FakeClock()
    progress = _live(1648, clock)
    clock.now += 10.0  # actors start, models load
    progress.update(4)
    assert progress.line() == "extract: 4/1648 rows (0%), -- rows/s, ETA --"
    clock.now += 0.2
    progress.update(5)  # one interval: a rate, no ETA yet
    assert progress.line() == "extract: 9/1648 rows (1%), 25.0 rows/s, ETA --"
    clock.now += 0.2
    progress.update(5)
    assert progress.rate() == pytest.approx(25.0)
    assert progress.line() == f"extract: 14/1648 rows (1%), 25.0 rows/s, ETA {(1648 - 14) / 25:.0f}s"


def test_the_rate_follows_the_last_30_seconds():
    clock = FakeClock()
    progress = _live(100_000, clock)
    for _ in range(300):  # 60 s at 25 rows/s
        clock.now += 0.2
        progress.update(5)
    assert progress.rate() == pytest.approx(25.0)
    for _ in range(20):  # slower: 5 rows/s for 20 s -> the window still holds 10 s of the old rate
        clock.now += 1.0
        progress.update(5)
    assert progress.rate() == pytest.approx((20 * 5 + 10 * 25) / 30, rel=0.02)  # anchor: at most one update early
    for _ in range(15):  # 35 s at the new rate: only it is left in the window
        clock.now += 1.0
        progress.update(5)
    assert progress.rate() == pytest.approx(5.0)
    assert progress.eta() == pytest.approx((100_000 - progress.done) / 5.0)
    assert len(progress._samples) <= 32  # the window, not the whole history


def test_eta_after_five_percent_of_the_work_even_with_few_updates():
    clock = FakeClock()
    progress = _live(100, clock)
    clock.now += 30.0
    progress.update(10)
    assert progress.eta() is None
    clock.now += 2.0
    progress.update(10)  # 2 updates, 20% done: 5 rows/s, 16 s left
    assert progress.eta() == pytest.approx(16.0)
    clock.now += 1.0
    progress.update(80)
    assert progress.line().endswith("ETA 0s")


def test_updates_at_the_same_instant_give_no_rate_yet():
    clock = FakeClock()
    progress = _live(10, clock)
    progress.update(2)
    progress.update(2)
    progress.update(2)  # a burst: no time has passed
    assert progress.rate() is None and progress.eta() is None
    assert "-- rows/s, ETA --" in progress.line()


def test_pipes_log_on_the_injected_clock(caplog):
    clock = FakeClock()
    progress = Progress("fit", 4, "tasks", stream=io.StringIO(), interval_s=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="mvtec_ray"):
        clock.now += 5.0
        progress.update(1)
        assert not caplog.records
        clock.now += 6.0
        progress.update(1)
        clock.now += 100.0
        progress.close()
    assert [r.getMessage() for r in caplog.records] == ["fit: 2/4 tasks (50%), 0.2 tasks/s, ETA 12s",
                                                        "fit: 2/4 tasks in 111.0s"]

"""LogLimit: one line per interval, with the count of the lines held back."""

from __future__ import annotations

from session_authority.server._log_limit import LogLimit


class SteppedClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_first_line_passes_with_nothing_held() -> None:
    limit = LogLimit(clock=SteppedClock())

    assert limit.allow() == 0
    assert limit.note(0) == ""


def test_lines_within_interval_held_and_counted() -> None:
    clock = SteppedClock()
    limit = LogLimit(interval_seconds=1.0, clock=clock)
    limit.allow()

    clock.now += 0.4
    within_interval = [limit.allow(), limit.allow()]
    clock.now += 0.6
    passed = limit.allow()

    assert within_interval == [None, None]
    assert passed == 2
    assert limit.note(passed) == " (2 more like it in the previous 1 s not logged)"


def test_count_restarts_after_each_line() -> None:
    clock = SteppedClock()
    limit = LogLimit(interval_seconds=1.0, clock=clock)
    limit.allow()
    clock.now += 0.5
    limit.allow()
    clock.now += 0.5
    limit.allow()

    clock.now += 1.0

    assert limit.allow() == 0

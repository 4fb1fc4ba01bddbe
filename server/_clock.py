"""Clocks for the lease table: a real one, and a manual one that tests advance."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    """Time source of the lease table.

    ``monotonic()`` decides every deadline and never goes backwards. ``wall()``
    (seconds since the Unix epoch) is only reported: a step of the wall clock
    neither ends nor extends a lease. Both may be called from any thread.
    """

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        ...

    def wall(self) -> float:
        """Return seconds since the Unix epoch, for reporting only."""
        ...


class SystemClock:
    """The process clocks: ``time.monotonic`` and ``time.time``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told, so lease tests never sleep.

    Args:
        monotonic_start: First monotonic reading.
        wall_start: First wall reading, seconds since the Unix epoch.
    """

    def __init__(self, monotonic_start: float = 1000.0, wall_start: float = 1_767_225_600.0) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic_start
        self._wall = wall_start

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def advance(self, seconds: float) -> None:
        """Move both clocks forward by ``seconds`` (must not be negative)."""
        if seconds < 0:
            raise ValueError(f"advance() takes a non-negative number of seconds, got {seconds}")
        with self._lock:
            self._monotonic += seconds
            self._wall += seconds

    def step_wall(self, seconds: float) -> None:
        """Step only the wall clock, forwards or backwards, as an NTP correction would."""
        with self._lock:
            self._wall += seconds

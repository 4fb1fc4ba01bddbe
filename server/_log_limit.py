"""Rate limit for log lines that a fault repeats once per request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class LogLimit:
    """Lets one log line through per interval and counts the lines held back.

    During an outage or an attack every request fails the same way. One line
    a second, with a count of the lines held back, keeps the fault visible
    without filling the log. Thread-safe.

    Args:
        interval_seconds: Shortest time between two lines let through.
        clock: Monotonic time source; tests pass their own.
    """

    def __init__(self, interval_seconds: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_at: float | None = None
        self._held_back = 0

    def allow(self) -> int | None:
        """Return the count of lines held back since the last one let through, or None to hold this one back."""
        now = self._clock()
        with self._lock:
            if self._last_at is not None and now - self._last_at < self._interval_seconds:
                self._held_back += 1
                return None
            held_back, self._held_back, self._last_at = self._held_back, 0, now
            return held_back

    def note(self, held_back: int) -> str:
        """Return the suffix that names how many lines were held back, or an empty string for none."""
        if held_back == 0:
            return ""
        return f" ({held_back} more like it in the previous {self._interval_seconds:g} s not logged)"

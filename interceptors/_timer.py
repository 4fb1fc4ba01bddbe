"""A single background thread that runs callbacks at monotonic times."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable

logger = logging.getLogger(__name__)


class Timer:
    """Runs each scheduled callback once, on one thread, at or soon after its time.

    Callbacks run on the ``session-lease-timer`` thread one after another, so
    they must not block. :meth:`schedule` may be called from any thread,
    including from a callback.

    Args:
        clock: Monotonic clock in seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="session-lease-timer", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def schedule(self, when: float, callback: Callable[[], None]) -> None:
        """Run ``callback`` at monotonic time ``when`` (at once if it has passed)."""
        with self._condition:
            if self._closed:
                return
            heapq.heappush(self._heap, (when, next(self._counter), callback))
            if self._heap[0][2] is callback:
                self._condition.notify()

    def close(self) -> None:
        """Drop every pending callback and join the thread; idempotent."""
        with self._condition:
            self._closed = True
            self._heap.clear()
            self._condition.notify()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._condition:
                while True:
                    if self._closed:
                        return
                    now = self._clock()
                    if self._heap and self._heap[0][0] <= now:
                        _, _, callback = heapq.heappop(self._heap)
                        break
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._condition.wait(timeout)
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing check must not stop the others
                logger.exception("timer callback %r failed", callback)

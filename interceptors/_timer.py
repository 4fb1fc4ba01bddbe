"""A single background thread that runs callbacks at monotonic times."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

TimerHandle = list[Optional[Callable[[], None]]]
"""The handle :meth:`Timer.schedule` returns: a one-item list holding the callback, or None once it ran or was cancelled."""

_COMPACT_MIN_CANCELLED = 64
"""Cancelled callbacks stay in the heap until this many have piled up and they make up half of it."""


class Timer:
    """Runs each scheduled callback once, on one thread, at or soon after its time.

    Callbacks run on the ``session-lease-timer`` thread one after another, so
    they must not block. :meth:`schedule` and :meth:`cancel` may be called
    from any thread, including from a callback.

    Args:
        clock: Monotonic clock in seconds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._condition = threading.Condition()
        # The unique counter keeps tuple comparison away from the handle.
        self._heap: list[tuple[float, int, TimerHandle]] = []
        self._cancelled = 0
        self._counter = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="session-lease-timer", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def schedule(self, when: float, callback: Callable[[], None]) -> TimerHandle:
        """Run ``callback`` at monotonic time ``when`` (at once if it has passed); return a handle for :meth:`cancel`."""
        handle: TimerHandle = [callback]
        with self._condition:
            if self._closed:
                handle[0] = None
                return handle
            heapq.heappush(self._heap, (when, next(self._counter), handle))
            if self._heap[0][2] is handle:
                self._condition.notify()
        return handle

    def cancel(self, handle: TimerHandle) -> None:
        """Drop a scheduled callback and the references it holds; nothing happens if it ran or was cancelled."""
        with self._condition:
            if handle[0] is None:
                return
            handle[0] = None
            self._cancelled += 1
            # Without this, the heap would keep one item per cancelled callback
            # until its time came, which for a long idle timeout is hours.
            if self._cancelled >= _COMPACT_MIN_CANCELLED and 2 * self._cancelled >= len(self._heap):
                self._heap = [item for item in self._heap if item[2][0] is not None]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def __len__(self) -> int:
        """Return how many callbacks wait to run."""
        with self._condition:
            return len(self._heap) - self._cancelled

    def close(self) -> None:
        """Drop every pending callback and join the thread; idempotent."""
        with self._condition:
            self._closed = True
            for _, _, handle in self._heap:
                handle[0] = None
            self._heap.clear()
            self._cancelled = 0
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
                        _, _, handle = heapq.heappop(self._heap)
                        callback, handle[0] = handle[0], None
                        if callback is None:
                            self._cancelled -= 1
                            continue
                        break
                    timeout = self._heap[0][0] - now if self._heap else None
                    self._condition.wait(timeout)
            try:
                callback()
            except Exception:  # noqa: BLE001 - one failing check must not stop the others
                logger.exception("timer callback %r failed", callback)

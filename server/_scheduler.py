"""The expiry scheduler: one thread that sleeps until the earliest lease deadline."""

from __future__ import annotations

import logging
import math
import threading

from ._table import LeaseTable

logger = logging.getLogger(__name__)

IDLE_WAIT_SECONDS = 1.0
"""How long the thread sleeps when no lease lives; new grants wake it early."""


class ExpiryScheduler:
    """Ends each lease when its deadline passes on the table's monotonic clock.

    The thread waits on a condition until the earliest heap entry is due, so
    its cost is proportional to the number of leases that end, not to the
    number that live. A grant with an earlier deadline than the one being
    waited for wakes it. Leases never end early: the table checks
    ``deadline <= now`` itself.

    Args:
        table: The lease table to expire.
    """

    def __init__(self, table: LeaseTable) -> None:
        self._table = table
        self._condition = threading.Condition()
        self._target = math.inf
        self._stopping = False
        self._thread: threading.Thread | None = None
        table.on_earlier_deadline(self.wake)

    def start(self) -> None:
        """Start the scheduler thread (daemon)."""
        self._thread = threading.Thread(target=self._run, name="lease-expiry", daemon=True)
        self._thread.start()
        logger.info("expiry scheduler started")

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout_seconds`` for it to exit."""
        with self._condition:
            self._stopping = True
            self._condition.notify()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
        logger.info("expiry scheduler stopped")

    def wake(self, deadline: float) -> None:
        """Wake the thread if ``deadline`` is earlier than the one it waits for."""
        if deadline >= self._target:
            return
        with self._condition:
            if deadline < self._target:
                self._target = deadline
                self._condition.notify()

    def _run(self) -> None:
        clock = self._table.clock
        while True:
            try:
                self._table.expire_due()
            except Exception:  # noqa: BLE001 - the scheduler must outlive one bad pass
                logger.exception("expiry pass failed; retrying at the next deadline")
            with self._condition:
                if self._stopping:
                    return
                upcoming = self._table.next_deadline()
                self._target = upcoming if upcoming is not None else math.inf
                if upcoming is None:
                    wait = IDLE_WAIT_SECONDS
                else:
                    wait = max(0.0, upcoming - clock.monotonic())
                if wait > 0:
                    self._condition.wait(min(wait, IDLE_WAIT_SECONDS))
                if self._stopping:
                    return

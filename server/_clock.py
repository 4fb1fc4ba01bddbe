"""Clocks for the lease table: a real one, and a manual one that tests advance."""

from __future__ import annotations

import logging
import pathlib
import threading
import time
from typing import Protocol

logger = logging.getLogger(__name__)

BOOT_ID_PATH = pathlib.Path("/proc/sys/kernel/random/boot_id")
"""Linux file with a random UUID that the kernel picks anew at every boot."""


class Clock(Protocol):
    """Time source of the lease table.

    ``monotonic()`` decides every deadline and never goes backwards. ``wall()``
    (seconds since the Unix epoch) is only reported: a step of the wall clock
    neither ends nor extends a lease. ``boot_id()`` names the monotonic scale,
    so that an authority restarted on the same scale can go on counting on it
    instead of the wall clock. All three may be called from any thread.
    """

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        ...

    def wall(self) -> float:
        """Return seconds since the Unix epoch, for reporting only."""
        ...

    def boot_id(self) -> str | None:
        """Return the ID of the scale of ``monotonic()``, or None if unknown.

        The ID changes whenever that scale starts again. Readings with the
        same boot ID are comparable, even from different processes. None means
        that no reading of an earlier process can be compared with this clock's.
        """
        ...


class SystemClock:
    """The process clocks: ``time.monotonic`` and ``time.time``.

    On Linux ``time.monotonic`` reads ``CLOCK_MONOTONIC``, which every process
    shares and which restarts from zero only at boot, so the kernel's boot ID
    names its scale. Other platforms report no boot ID.

    NOTE: a Linux time namespace shifts ``CLOCK_MONOTONIC`` but keeps the boot
    ID, so a restart on the same data directory in another namespace can
    lengthen leases by up to the difference between the two shifts.
    """

    def __init__(self) -> None:
        self._boot_id = _read_boot_id()

    def monotonic(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()

    def boot_id(self) -> str | None:
        return self._boot_id


def _read_boot_id() -> str | None:
    try:
        text = BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        logger.debug("no boot ID in %s (%s), so restarts anchor on the wall clock", BOOT_ID_PATH, exc)
        return None
    return text or None


class ManualClock:
    """A clock that moves only when told, so lease tests never sleep.

    Args:
        monotonic_start: First monotonic reading.
        wall_start: First wall reading, seconds since the Unix epoch.
        boot_id: What ``boot_id()`` returns. None (the default) makes every
            restart of an authority on this clock anchor on the wall clock,
            as after a reboot. ``reboot()`` changes it.
    """

    def __init__(
        self,
        monotonic_start: float = 1000.0,
        wall_start: float = 1_767_225_600.0,
        boot_id: str | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._monotonic = monotonic_start
        self._wall = wall_start
        self._boot_id = boot_id

    def monotonic(self) -> float:
        with self._lock:
            return self._monotonic

    def wall(self) -> float:
        with self._lock:
            return self._wall

    def boot_id(self) -> str | None:
        with self._lock:
            return self._boot_id

    def reboot(self, boot_id: str | None, monotonic_start: float = 1000.0) -> None:
        """Start a new monotonic scale at ``monotonic_start``, as a reboot does. The wall clock goes on."""
        with self._lock:
            self._boot_id = boot_id
            self._monotonic = monotonic_start

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

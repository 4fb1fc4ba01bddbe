"""Helpers shared by the audit log tests: a stepping wall clock and the fields of a plain end record."""

from __future__ import annotations

import threading

from session_authority.server._audit import utc_isoformat

WALL_START = 1_796_418_597.123456  # 2026-12-04T21:09:57.123456+00:00


class SteppingWallClock:
    """Wall clock that moves one millisecond per reading, so every record has its own time."""

    def __init__(self, start: float = WALL_START) -> None:
        self._now = start
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            self._now += 0.001
            return self._now


def released_end_fields(index: int) -> dict[str, object]:
    """Return the fields of the end record of lease number ``index``, released at ``WALL_START + index``."""
    return {
        "fingerprint": f"{index:012x}",
        "principal": "spiffe://example.org/billing",
        "tier": "standard",
        "reason": "released",
        "ended_at": utc_isoformat(WALL_START + index),
    }

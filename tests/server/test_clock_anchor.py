"""Authority time across restarts: the clock anchor saved in the SQLite store."""

from __future__ import annotations

import pathlib

import pytest

from session_authority.server._authority import Persistence
from session_authority.server._clock import ManualClock
from session_authority.server._store import ClockAnchor, ClockAnchorStore, SqliteLeaseStore
from session_authority.server._table import LeaseState, LeaseTable

IDLE_TIMEOUT_SECONDS = 10.0
MAX_DURATION_SECONDS = 100.0


class AuthorityRun:
    """One authority run on a data directory: a table, its store and its persistence."""

    def __init__(self, data_dir: pathlib.Path, clock: ManualClock) -> None:
        self.store = SqliteLeaseStore(data_dir)
        state = self.store.load()
        self.table = LeaseTable(clock)
        self.persistence = Persistence(self.table, self.store, state.high_water)
        self.persistence.restore_into_table(state.leases)

    def grant(self) -> str:
        lease_id, lease = self.table.grant("svc-a", "standard", IDLE_TIMEOUT_SECONDS, MAX_DURATION_SECONDS)
        self.persistence.save_grant(lease).result(timeout=10)
        return lease_id

    def ttl_seconds(self, lease_id: str) -> float:
        lease = self.table.lookup(lease_id)
        assert lease.state is LeaseState.ALIVE
        return lease.ttl

    def crash(self) -> None:
        """Stop without the final high-water write that a clean stop makes."""
        self.store.close()


@pytest.mark.parametrize("wall_step_seconds", [-1.0, 1.0, -3600.0])
def test_same_boot_restart_ignores_wall_step(tmp_path: pathlib.Path, wall_step_seconds: float) -> None:
    clock = ManualClock(boot_id="boot-a")
    first = AuthorityRun(tmp_path, clock)
    lease_id = first.grant()
    clock.advance(2)
    first.crash()

    clock.advance(3)
    clock.step_wall(wall_step_seconds)
    second = AuthorityRun(tmp_path, clock)
    ttl = second.ttl_seconds(lease_id)
    second.crash()

    assert ttl == pytest.approx(IDLE_TIMEOUT_SECONDS - 5)


def test_other_boot_restart_counts_downtime_by_wall_clock(tmp_path: pathlib.Path) -> None:
    clock = ManualClock(boot_id="boot-a")
    first = AuthorityRun(tmp_path, clock)
    lease_id = first.grant()
    clock.advance(2)
    first.crash()

    clock.reboot("boot-b", monotonic_start=50.0)
    clock.advance(3)
    second = AuthorityRun(tmp_path, clock)
    ttl = second.ttl_seconds(lease_id)
    second.crash()

    assert ttl == pytest.approx(IDLE_TIMEOUT_SECONDS - 5)


def test_anchor_behind_high_water_not_reused(tmp_path: pathlib.Path) -> None:
    clock = ManualClock(boot_id="boot-a")
    first = AuthorityRun(tmp_path, clock)
    lease_id = first.grant()
    clock.advance(2)
    first.persistence.housekeeping()
    first.crash()

    # The same boot ID with a monotonic clock that restarted lower: the saved
    # offset would put authority time behind the high-water mark.
    clock.reboot("boot-a", monotonic_start=50.0)
    clock.advance(3)
    second = AuthorityRun(tmp_path, clock)
    ttl = second.ttl_seconds(lease_id)
    second.crash()

    assert ttl == pytest.approx(IDLE_TIMEOUT_SECONDS - 5)


def test_unknown_boot_saves_no_anchor(tmp_path: pathlib.Path) -> None:
    clock = ManualClock(boot_id=None)
    AuthorityRun(tmp_path, clock).crash()

    store = SqliteLeaseStore(tmp_path)
    anchor = store.load_clock_anchor()
    store.close()

    assert anchor is None


def test_store_keeps_clock_anchor(tmp_path: pathlib.Path) -> None:
    anchor = ClockAnchor(boot_id="boot-a", offset=1_767_224_600.123456789)
    store = SqliteLeaseStore(tmp_path)
    store.save_clock_anchor(anchor)
    store.close()

    reopened = SqliteLeaseStore(tmp_path)
    loaded = reopened.load_clock_anchor()
    reopened.close()

    assert loaded == anchor


def test_sqlite_store_is_clock_anchor_store(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    store.close()

    assert isinstance(store, ClockAnchorStore)

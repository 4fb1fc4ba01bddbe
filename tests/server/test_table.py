"""Lease table behaviour on a manual clock: nothing here sleeps."""

from __future__ import annotations

import re
import threading

import pytest

from session_authority.server import EndReason, LeaseState, LeaseTable, ManualClock
from session_authority.server._table import SessionEnd, lease_digest


class Recorder:
    """Table listener that keeps every end it hears of."""

    def __init__(self) -> None:
        self.ends: list[SessionEnd] = []
        self._lock = threading.Lock()

    def on_grant(self, lease: object) -> None:
        pass

    def on_end(self, end: SessionEnd) -> None:
        with self._lock:
            self.ends.append(end)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def table(clock: ManualClock, recorder: Recorder) -> LeaseTable:
    table = LeaseTable(clock, ended_retention_seconds=600)
    table.add_listener(recorder)
    return table


def test_grant_reports_ttl_of_idle_timeout(table: LeaseTable) -> None:
    lease_id, lease = table.grant("svc-a", "standard", idle_timeout=10, max_duration=100)

    assert lease.state is LeaseState.ALIVE
    assert lease.ttl == 10
    assert lease.max_remaining == 100
    assert len(lease_id) == 22


def test_grant_never_reuses_an_id(table: LeaseTable) -> None:
    ids = {table.grant("svc-a", "standard", 10, 100)[0] for _ in range(1000)}

    assert len(ids) == 1000


def test_lease_id_is_url_safe_base64(table: LeaseTable) -> None:
    lease_ids = [table.grant("svc-a", "standard", 10, 100)[0] for _ in range(300)]

    for lease_id in lease_ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", lease_id), lease_id


def test_idle_lease_ends_at_idle_timeout(table: LeaseTable, clock: ManualClock, recorder: Recorder) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)

    clock.advance(9.999)
    table.expire_due()
    assert table.lookup(lease_id).state is LeaseState.ALIVE

    clock.advance(0.001)
    table.expire_due()
    lease = table.lookup(lease_id)
    assert lease.state is LeaseState.ENDED
    assert lease.end_reason is EndReason.IDLE_TIMEOUT
    assert [end.lease.end_reason for end in recorder.ends] == [EndReason.IDLE_TIMEOUT]


def test_renewal_moves_idle_deadline(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)

    clock.advance(8)
    renewed = table.renew(lease_id, idle_for=0)
    clock.advance(8)
    table.expire_due()

    assert renewed.ttl == 10
    assert table.lookup(lease_id).state is LeaseState.ALIVE
    assert table.lookup(lease_id).ttl == pytest.approx(2)


def test_renewal_idle_for_counts_from_activity(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)

    clock.advance(8)
    renewed = table.renew(lease_id, idle_for=3)

    # Activity seen 3 s ago: the idle deadline is now - 3 + 10.
    assert renewed.ttl == pytest.approx(7)
    assert renewed.idle_for == pytest.approx(3)


def test_stale_renewal_never_moves_deadline_back(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    clock.advance(5)
    table.renew(lease_id, idle_for=0)

    late = table.renew(lease_id, idle_for=4)

    assert late.ttl == pytest.approx(10)


def test_renewal_older_than_idle_timeout_does_not_revive(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    clock.advance(9)

    answer = table.renew(lease_id, idle_for=11)

    assert answer.state is LeaseState.ALIVE
    assert answer.ttl == pytest.approx(1)


def test_max_duration_caps_renewals(table: LeaseTable, clock: ManualClock, recorder: Recorder) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 25)

    for _ in range(4):
        clock.advance(6)
        answer = table.renew(lease_id, idle_for=0)
        table.expire_due()
    assert answer.ttl == pytest.approx(1)
    assert answer.max_remaining == pytest.approx(1)

    clock.advance(1)
    table.expire_due()
    lease = table.lookup(lease_id)
    assert lease.end_reason is EndReason.MAX_DURATION
    assert recorder.ends[0].ended_at == pytest.approx(1000 + 25)


def test_renew_after_deadline_answers_ended_before_scheduler(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    clock.advance(10.5)

    answer = table.renew(lease_id, idle_for=0)

    assert answer.state is LeaseState.ENDED
    assert answer.end_reason is EndReason.IDLE_TIMEOUT
    assert answer.ttl == 0


def test_expired_end_time_is_the_deadline(table: LeaseTable, clock: ManualClock, recorder: Recorder) -> None:
    table.grant("svc-a", "standard", 10, 100)

    clock.advance(30)
    table.expire_due()

    assert recorder.ends[0].ended_at == pytest.approx(1010)
    assert recorder.ends[0].lease.age == pytest.approx(10)


def test_unknown_lease_is_not_found(table: LeaseTable) -> None:
    assert table.lookup("no-such-lease").state is LeaseState.NOT_FOUND
    assert table.renew("no-such-lease", 0).state is LeaseState.NOT_FOUND
    assert table.end(lease_digest("no-such-lease"), EndReason.REVOKED)[0].state is LeaseState.NOT_FOUND


def test_revoke_ends_once_with_first_reason(table: LeaseTable, recorder: Recorder) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    digest = lease_digest(lease_id)

    first, first_already = table.end(digest, EndReason.REVOKED, revoked_by="ops")
    second, second_already = table.end(digest, EndReason.RELEASED)

    assert first.end_reason is EndReason.REVOKED
    assert first_already is False
    assert second.end_reason is EndReason.REVOKED
    assert second_already is True
    assert len(recorder.ends) == 1
    assert recorder.ends[0].lease.revoked_by == "ops"


def test_renew_after_revoke_answers_ended(table: LeaseTable) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    table.end(lease_digest(lease_id), EndReason.REVOKED)

    answer = table.renew(lease_id, idle_for=0)

    assert answer.state is LeaseState.ENDED
    assert answer.end_reason is EndReason.REVOKED
    assert answer.ttl == 0


def test_revoke_renew_race_ends_exactly_once(table: LeaseTable, recorder: Recorder) -> None:
    """Once revoke returns, no renewal succeeds; each lease ends once."""
    violations: list[str] = []
    for _ in range(1000):
        lease_id, _ = table.grant("svc-a", "standard", 10, 100)
        digest = lease_digest(lease_id)
        revoked = threading.Event()
        start = threading.Barrier(2)

        def renew_loop() -> None:
            start.wait()
            for _ in range(50):
                was_revoked = revoked.is_set()
                answer = table.renew(lease_id, idle_for=0)
                if was_revoked and answer.state is LeaseState.ALIVE:
                    violations.append("renewal succeeded after revoke returned")

        renewer = threading.Thread(target=renew_loop)
        renewer.start()
        start.wait()
        table.end(digest, EndReason.REVOKED)
        revoked.set()
        renewer.join()

    assert violations == []
    assert len(recorder.ends) == 1000
    assert {end.lease.end_reason for end in recorder.ends} == {EndReason.REVOKED}
    assert len({end.sequence for end in recorder.ends}) == 1000


def test_expiry_and_revoke_race_ends_once(clock: ManualClock, recorder: Recorder) -> None:
    table = LeaseTable(clock)
    table.add_listener(recorder)
    digests = [lease_digest(table.grant("svc-a", "standard", 10, 100)[0]) for _ in range(500)]
    clock.advance(10)

    revoker = threading.Thread(target=lambda: [table.end(d, EndReason.REVOKED) for d in digests])
    revoker.start()
    table.expire_due()
    revoker.join()

    assert len(recorder.ends) == 500
    assert len({end.lease.digest for end in recorder.ends}) == 500


@pytest.mark.parametrize("step_seconds", [3600.0, -3600.0])
def test_wall_clock_step_neither_ends_nor_extends(
    table: LeaseTable, clock: ManualClock, step_seconds: float
) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)

    clock.advance(5)
    clock.step_wall(step_seconds)
    table.expire_due()
    during = table.lookup(lease_id)
    clock.advance(5)
    table.expire_due()
    after = table.lookup(lease_id)

    assert during.state is LeaseState.ALIVE
    assert during.ttl == pytest.approx(5)
    assert after.state is LeaseState.ENDED
    assert after.end_reason is EndReason.IDLE_TIMEOUT


def test_remaining_time_never_negative(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 1, 2)

    for _ in range(30):
        clock.advance(0.1)
        lease = table.lookup(lease_id)
        assert lease.ttl >= 0
        assert lease.max_remaining >= 0


def test_ended_lease_reads_not_found_after_retention(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 100)
    table.end(lease_digest(lease_id), EndReason.RELEASED)

    clock.advance(599)
    table.expire_due()
    kept = table.lookup(lease_id)
    clock.advance(2)
    table.expire_due()
    dropped = table.lookup(lease_id)

    assert kept.end_reason is EndReason.RELEASED
    assert dropped.state is LeaseState.NOT_FOUND


def test_heap_holds_one_entry_per_lease_under_renewals(table: LeaseTable, clock: ManualClock) -> None:
    lease_id, _ = table.grant("svc-a", "standard", 10, 1000)

    for _ in range(100):
        clock.advance(1)
        table.renew(lease_id, idle_for=0)
        table.expire_due()

    assert len(table._heap) == 1


def test_many_deadlines_expire_in_order(table: LeaseTable, clock: ManualClock, recorder: Recorder) -> None:
    for index in range(100):
        table.grant("svc-a", "standard", 1 + index / 100, 1000)

    clock.advance(3)
    table.expire_due()

    ended_at = [end.ended_at for end in recorder.ends]
    assert len(ended_at) == 100
    assert ended_at == sorted(ended_at)


def test_list_live_pages_cover_every_lease(table: LeaseTable) -> None:
    granted = {lease_digest(table.grant(f"svc-{i % 3}", "standard", 10, 100)[0]) for i in range(250)}

    seen: list[bytes] = []
    after = b""
    while True:
        page, after = table.list_live(after_digest=after, limit=40)
        seen.extend(lease.digest for lease in page)
        if not after:
            break

    assert sorted(seen) == sorted(granted)


def test_list_live_filters_principal_and_tier(table: LeaseTable) -> None:
    table.grant("svc-a", "standard", 10, 100)
    table.grant("svc-a", "short", 10, 100)
    table.grant("svc-b", "short", 10, 100)

    page, _ = table.list_live(principal="svc-a", tier="short")

    assert [(lease.principal, lease.tier) for lease in page] == [("svc-a", "short")]

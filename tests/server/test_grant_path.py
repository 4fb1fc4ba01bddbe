"""Grant hot path: reply templates, duration rounding and grouped store inserts."""

from __future__ import annotations

import pathlib

import pytest

from session_authority.server import LeaseTable, ManualClock
from session_authority.server._servicer import GrantReplies, lease_to_proto, seconds_to_duration
from session_authority.server._store import SqliteLeaseStore, StoredLease
from session_authority.v1 import session_authority_pb2 as pb


@pytest.mark.parametrize(
    ("idle_timeout", "max_duration"),
    [(300.0, 28800.0), (0.5, 0.75), (1.25, 3600.0), (40000.0, 28800.0), (123.456789123, 28800.0)],
)
def test_grant_reply_matches_lease_to_proto(idle_timeout: float, max_duration: float) -> None:
    table = LeaseTable(ManualClock(monotonic_start=12345.678, wall_start=1_767_225_600.123456789))
    replies = GrantReplies()

    for principal in ("holder-a", "holder-b"):
        lease_id, lease = table.grant(principal, "standard", idle_timeout, max_duration)
        reply = replies.build(lease_id, lease)

        assert reply == pb.GrantResponse(lease_id=lease_id, lease=lease_to_proto(lease))


def test_grant_reply_template_cache_bounded() -> None:
    table = LeaseTable(ManualClock())
    replies = GrantReplies()

    for index in range(GrantReplies.MAX_TEMPLATES + 10):
        lease_id, lease = table.grant("holder", "standard", 1.0 + index, 28800.0)
        reply = replies.build(lease_id, lease)
        assert reply.lease.idle_timeout.seconds == 1 + index

    assert len(replies._templates) <= GrantReplies.MAX_TEMPLATES


def test_seconds_to_duration_carries_rounded_nanos() -> None:
    duration = seconds_to_duration(28799.999999999996)

    assert duration.seconds == 28800
    assert duration.nanos == 0


def test_seconds_to_duration_negative_same_sign() -> None:
    duration = seconds_to_duration(-1.5)

    assert duration.seconds == -1
    assert duration.nanos == -500_000_000


def _row(index: int) -> StoredLease:
    return StoredLease(
        digest=bytes([index]) * 32,
        principal=f"holder-{index}",
        tier="standard",
        idle_timeout=60.0,
        max_duration=3600.0,
        granted_at=1000.0 + index,
        granted_wall=1_767_225_600.0 + index,
        last_activity=1000.0 + index,
    )


def test_store_grants_and_end_in_one_batch(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    try:
        # Queued back to back, so the writer thread is likely to commit them together.
        futures = [store.save_grant(_row(index)) for index in range(20)]
        futures.append(store.save_end(bytes([3]) * 32, 1010.0, 1_767_225_610.0, 3, "admin"))
        futures += [store.save_grant(_row(index)) for index in range(20, 30)]
        for future in futures:
            future.result(timeout=10)
    finally:
        store.close()

    reopened = SqliteLeaseStore(tmp_path)
    try:
        rows = {row.digest: row for row in reopened.load().leases}
    finally:
        reopened.close()
    assert len(rows) == 30
    assert rows[bytes([3]) * 32].end_reason == 3
    assert rows[bytes([3]) * 32].revoked_by == "admin"
    assert rows[bytes([25]) * 32].principal == "holder-25"
    assert rows[bytes([25]) * 32].ended_at is None

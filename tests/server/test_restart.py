"""Durability: leases survive restarts and crashes with no more time than they had."""

from __future__ import annotations

import pathlib
import sqlite3
import threading

import grpc
import pytest
from google.protobuf import duration_pb2

from session_authority.server import (
    AuthorityConfig,
    AuthorityThread,
    InsecureDevAuthenticator,
    ManualClock,
    SqliteLeaseStore,
    parse_policy,
)
from session_authority.server._store import StoredLease
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from policies import ONE_TIER_POLICY, TEST_POLICY

POLICY = parse_policy(ONE_TIER_POLICY)


def start(data_dir: pathlib.Path, clock: ManualClock, *, restart_grace_seconds: float = 2.0) -> AuthorityThread:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=data_dir,
        clock=clock,
        admin_everyone=True,
        restart_grace_seconds=restart_grace_seconds,
    )
    return AuthorityThread(config).start()


def stub_for(target: str) -> tuple[grpc.Channel, pb_grpc.SessionAuthorityStub]:
    channel = grpc.insecure_channel(target)
    return channel, pb_grpc.SessionAuthorityStub(channel)


def lease_after_start(data_dir: pathlib.Path, clock: ManualClock, lease_id: str) -> pb.Lease:
    """Start an authority on ``data_dir``, read one lease with TimeToLive, and stop it."""
    authority = start(data_dir, clock)
    channel, stub = stub_for(authority.target)
    lease = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease
    channel.close()
    authority.stop()
    return lease


def duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def ttl_seconds(lease: pb.Lease) -> float:
    return lease.ttl.seconds + lease.ttl.nanos / 1e9


def test_restart_keeps_lease_without_extra_time(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    clock.advance(3)
    before = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=granted.lease_id)).lease
    channel.close()
    first.stop()

    after = lease_after_start(tmp_path, clock, granted.lease_id)

    assert after.state == pb.LEASE_STATE_ALIVE
    assert ttl_seconds(after) <= ttl_seconds(before)
    assert ttl_seconds(after) == pytest.approx(7, abs=0.01)


def test_wall_clock_stepped_back_while_down_adds_no_time(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    clock.advance(2)
    channel.close()
    first.stop()

    clock.step_wall(-3600)
    after = lease_after_start(tmp_path, clock, granted.lease_id)

    assert after.state == pb.LEASE_STATE_ALIVE
    assert ttl_seconds(after) <= 8.0


def test_lease_past_deadline_ends_once_at_startup(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    granted_at = granted.lease.granted_at.ToNanoseconds() / 1e9
    channel.close()
    first.stop()

    # The authority is down for a minute, by the wall clock only. Without a
    # restart grace nothing waits for enforcers to report activity.
    clock.step_wall(60)
    second = start(tmp_path, clock, restart_grace_seconds=0)
    channel, stub = stub_for(second.target)
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=granted.lease_id)).lease
    renewed = stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)])).leases[0]
    channel.close()
    second.stop()

    assert after.state == pb.LEASE_STATE_ENDED
    assert after.end_reason == pb.END_REASON_IDLE_TIMEOUT
    assert after.ended_at.ToNanoseconds() / 1e9 == pytest.approx(granted_at + 10, abs=0.01)
    assert renewed.state == pb.LEASE_STATE_ENDED
    assert ttl_seconds(renewed) == 0


def test_revoked_lease_stays_revoked_after_restart(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id))
    channel.close()
    first.stop()

    after = lease_after_start(tmp_path, clock, granted.lease_id)

    assert after.state == pb.LEASE_STATE_ENDED
    assert after.end_reason == pb.END_REASON_REVOKED


def test_store_keeps_no_lease_id(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    authority = start(tmp_path, clock)
    channel, stub = stub_for(authority.target)
    lease_id = stub.Grant(pb.GrantRequest(principal="svc-a")).lease_id
    channel.close()
    authority.stop()

    raw = b"".join(path.read_bytes() for path in tmp_path.glob("leases.db*"))

    assert lease_id.encode() not in raw


def test_store_groups_burst_into_few_commits(tmp_path: pathlib.Path) -> None:
    store = SqliteLeaseStore(tmp_path)
    rows = [
        StoredLease(
            digest=index.to_bytes(32, "big"),
            principal="svc-a",
            tier="standard",
            idle_timeout=10,
            max_duration=100,
            granted_at=1.0,
            granted_wall=1.0,
            last_activity=1.0,
        )
        for index in range(2000)
    ]
    futures = []
    threads = [
        threading.Thread(target=lambda part=part: futures.extend(store.save_grant(r) for r in part))
        for part in (rows[:1000], rows[1000:])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for future in futures:
        future.result(timeout=30)
    commits = store.commits
    store.close()

    assert len(SqliteLeaseStore(tmp_path).load().leases) == 2000
    assert commits < 2000


def test_store_refuses_newer_format(tmp_path: pathlib.Path) -> None:
    SqliteLeaseStore(tmp_path).close()
    with sqlite3.connect(tmp_path / "leases.db") as connection:
        connection.execute("UPDATE meta SET value = '99' WHERE key = 'version'")

    with pytest.raises(Exception, match=r"format version 99, this authority reads version 1"):
        SqliteLeaseStore(tmp_path)


def test_dropped_tier_warns_keeps_leases(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Dropping a tier from the policy ends none of its leases, and a warning gives how many remain."""
    clock = ManualClock()
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=tmp_path,
        clock=clock,
        admin_everyone=True,
    )
    first = AuthorityThread(config).start()
    channel, stub = stub_for(first.target)
    surviving_ids = [stub.Grant(pb.GrantRequest(principal="svc-a", tier="short")).lease_id for _ in range(2)]
    ended = stub.Grant(pb.GrantRequest(principal="svc-a", tier="short")).lease_id
    stub.Revoke(pb.RevokeRequest(lease_id=ended))
    stub.Grant(pb.GrantRequest(principal="svc-a", tier="standard"))
    channel.close()
    first.stop()

    with caplog.at_level("WARNING", logger="session_authority.server._authority"):
        second = start(tmp_path, clock)
    channel, stub = stub_for(second.target)
    states = [stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease.state for lease_id in surviving_ids]
    channel.close()
    second.stop()

    assert states == [pb.LEASE_STATE_ALIVE, pb.LEASE_STATE_ALIVE]
    warnings = [r.getMessage() for r in caplog.records if "tiers the policy no longer has" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("2 restored live leases are in tiers the policy no longer has: 'short' (2).")


def restart_after_idle_deadline(tmp_path: pathlib.Path) -> tuple[ManualClock, str, float, AuthorityThread]:
    """Grant a lease (10 s idle), stop at 8 s, start again at 12 s: past its stored idle deadline."""
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    granted_at = granted.lease.granted_at.ToNanoseconds() / 1e9
    clock.advance(8)
    channel.close()
    first.stop()
    clock.advance(4)
    return clock, granted.lease_id, granted_at, start(tmp_path, clock)


def test_restart_grace_keeps_late_activity(tmp_path: pathlib.Path) -> None:
    """Activity an enforcer saw while the authority was away, reported after the restart, keeps the lease."""
    clock, lease_id, _, second = restart_after_idle_deadline(tmp_path)
    channel, stub = stub_for(second.target)
    during_grace = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease
    # Seen 3 s ago, at 9 s: before the stored deadline of 10 s.
    renewed = stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=lease_id, idle_for=duration(3))])).leases[0]
    clock.advance(2.5)
    second.authority.table.expire_due()
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease
    channel.close()
    second.stop()

    assert during_grace.state == pb.LEASE_STATE_ALIVE
    assert 0 < ttl_seconds(during_grace) <= 2.0
    assert renewed.state == pb.LEASE_STATE_ALIVE
    assert ttl_seconds(renewed) == pytest.approx(7, abs=0.01)
    assert after.state == pb.LEASE_STATE_ALIVE
    assert ttl_seconds(after) == pytest.approx(4.5, abs=0.01)


def test_restart_grace_ends_idle_lease(tmp_path: pathlib.Path) -> None:
    """Without activity from before its deadline, a held lease ends when the grace ends, dated at the deadline."""
    clock, lease_id, granted_at, second = restart_after_idle_deadline(tmp_path)
    channel, stub = stub_for(second.target)
    # Activity after the deadline cannot bring the lease back.
    late = stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=lease_id)])).leases[0]
    clock.advance(2.5)
    second.authority.table.expire_due()
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease
    channel.close()
    second.stop()

    assert late.state == pb.LEASE_STATE_ALIVE
    assert ttl_seconds(late) <= 2.0
    assert after.state == pb.LEASE_STATE_ENDED
    assert after.end_reason == pb.END_REASON_IDLE_TIMEOUT
    assert after.ended_at.ToNanoseconds() / 1e9 == pytest.approx(granted_at + 10, abs=0.01)


def test_restart_grace_skips_max_duration(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = start(tmp_path, clock)
    channel, stub = stub_for(first.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    for _ in range(11):
        clock.advance(9)
        stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)]))
    channel.close()
    first.stop()
    clock.advance(2)

    after = lease_after_start(tmp_path, clock, granted.lease_id)

    assert after.state == pb.LEASE_STATE_ENDED
    assert after.end_reason == pb.END_REASON_MAX_DURATION


def test_restart_grace_skips_new_leases(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    authority = start(tmp_path, clock)
    channel, stub = stub_for(authority.target)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    clock.advance(10.5)
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=granted.lease_id)).lease
    channel.close()
    authority.stop()

    assert after.state == pb.LEASE_STATE_ENDED
    assert after.end_reason == pb.END_REASON_IDLE_TIMEOUT

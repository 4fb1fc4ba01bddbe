"""The authority's audit log: one record per grant, revoke and end, across restarts and write failures."""

from __future__ import annotations

import asyncio
import datetime
import errno
import json
import pathlib
import threading
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from session_authority.server import (
    AuditLog,
    AuditWriteError,
    Authority,
    AuthorityConfig,
    AuthorityThread,
    InsecureDevAuthenticator,
    ManualClock,
    parse_policy,
    verify_audit_log,
)
from session_authority.server._audit import audit_main
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

POLICY = parse_policy(
    """
version = 1
default_tier = "standard"
admins = ["ops"]

[tiers.standard]
idle_timeout = "10s"
max_duration = "100s"
"""
)


class FaultyDisk:
    """A ``before_write`` hook that fails every audit write while ``failing`` is set."""

    def __init__(self) -> None:
        self.failing = threading.Event()
        self.failures = 0

    def __call__(self) -> None:
        if self.failing.is_set():
            self.failures += 1
            raise OSError(errno.EIO, "injected audit write failure")


def start(
    data_dir: pathlib.Path,
    clock: ManualClock,
    *,
    disk: FaultyDisk | None = None,
    audit: bool = True,
    fail_closed: bool = False,
) -> AuthorityThread:
    factory: Callable[[pathlib.Path], AuditLog] | None = None
    if disk is not None:

        def factory(directory: pathlib.Path) -> AuditLog:
            return AuditLog(directory, fsync=False, wall_clock=clock.wall, before_write=disk)

    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=data_dir,
        clock=clock,
        admin_everyone=True,
        audit=audit,
        audit_fail_closed=fail_closed,
        audit_log_factory=factory,
        audit_max_backoff_seconds=0.1,
    )
    return AuthorityThread(config).start()


@pytest.fixture
def channels() -> Iterator[Callable[[AuthorityThread], pb_grpc.SessionAuthorityStub]]:
    opened: list[grpc.Channel] = []

    def stub_for(running: AuthorityThread) -> pb_grpc.SessionAuthorityStub:
        channel = grpc.insecure_channel(running.target)
        opened.append(channel)
        return pb_grpc.SessionAuthorityStub(channel)

    yield stub_for
    for channel in opened:
        channel.close()


def records(data_dir: pathlib.Path) -> list[dict[str, object]]:
    path = data_dir / "audit" / "audit.jsonl"
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def records_of(data_dir: pathlib.Path, type: str) -> list[dict[str, object]]:
    return [record for record in records(data_dir) if record["type"] == type]


def wait_until(condition: Callable[[], bool], timeout_seconds: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the timeout")
        time.sleep(0.01)


def test_end_record_fields(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    running = start(tmp_path, clock)
    stub = channels(running)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    clock.advance(4)
    # The table measures end times from the grant on the monotonic clock, so
    # a wall-clock step changes neither the end time nor the duration.
    clock.step_wall(-3600)
    stub.Revoke(pb.RevokeRequest(fingerprint=granted.lease.fingerprint), metadata=[("x-session-principal", "ops")])
    running.stop()

    digest = granted.lease.digest
    grant, revoke, end = records(tmp_path)
    assert (grant["type"], grant["event_id"]) == ("grant", f"grant:{digest}")
    assert (revoke["type"], revoke["event_id"]) == ("revoke", f"revoke:{digest}")
    assert (end["type"], end["event_id"]) == ("end", f"end:{digest}")
    assert grant["idle_timeout_seconds"] == 10.0
    assert grant["max_duration_seconds"] == 100.0
    assert revoke["revoked_by"] == "ops"
    assert end["reason"] == "revoked"
    assert end["revoked_by"] == "ops"
    assert end["principal"] == "svc-a"
    assert end["tier"] == "standard"
    assert end["fingerprint"] == granted.lease.fingerprint
    assert end["duration_seconds"] == pytest.approx(4.0)
    granted_at = datetime.datetime.fromisoformat(str(end["granted_at"]))
    ended_at = datetime.datetime.fromisoformat(str(end["ended_at"]))
    assert granted_at.utcoffset() == datetime.timedelta(0)
    assert ended_at == granted_at + datetime.timedelta(seconds=4)


def test_audit_log_holds_no_lease_id(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    running = start(tmp_path, clock)
    stub = channels(running)
    lease_id = stub.Grant(pb.GrantRequest(principal="svc-a")).lease_id
    stub.Revoke(pb.RevokeRequest(lease_id=lease_id, release=True))
    running.stop()

    raw = b"".join(path.read_bytes() for path in (tmp_path / "audit").iterdir())

    assert len(records(tmp_path)) == 2
    assert lease_id.encode() not in raw


def test_every_end_one_record_across_restart(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    first = start(tmp_path, clock)
    stub = channels(first)
    granted = [stub.Grant(pb.GrantRequest(principal=f"svc-{index}")) for index in range(6)]
    stub.Revoke(pb.RevokeRequest(lease_id=granted[0].lease_id))
    clock.advance(5)
    stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=g.lease_id) for g in granted[3:]]))
    first.stop()

    # Down for 12 s: leases 1 and 2 passed their idle deadline (10 s), 3 to 5 did not (15 s).
    clock.advance(12)
    second = start(tmp_path, clock)
    second.stop()
    clock.advance(10)
    third = start(tmp_path, clock)
    third.stop()

    ends = records_of(tmp_path, "end")
    assert sorted(str(end["event_id"]) for end in ends) == sorted(f"end:{g.lease.digest}" for g in granted)
    assert [end["reason"] for end in ends] == ["revoked"] + ["idle_timeout"] * 5
    assert [end["duration_seconds"] for end in ends] == [0.0, 10.0, 10.0, 15.0, 15.0, 15.0]
    assert len(records_of(tmp_path, "grant")) == 6
    assert verify_audit_log(tmp_path / "audit").ok


def test_stored_ends_missing_from_log_written_at_start(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    first = start(tmp_path, clock, audit=False)
    stub = channels(first)
    revoked = stub.Grant(pb.GrantRequest(principal="svc-a"))
    expired = stub.Grant(pb.GrantRequest(principal="svc-b"))
    stub.Revoke(pb.RevokeRequest(lease_id=revoked.lease_id), metadata=[("x-session-principal", "ops")])
    clock.advance(11)
    first.authority.table.expire_due()
    first.stop()

    second = start(tmp_path, clock)
    second.stop()
    third = start(tmp_path, clock)
    third.stop()

    types = [(record["type"], record["fingerprint"]) for record in records(tmp_path)]
    assert sorted(types) == sorted(
        [
            ("grant", revoked.lease.fingerprint),
            ("revoke", revoked.lease.fingerprint),
            ("end", revoked.lease.fingerprint),
            ("grant", expired.lease.fingerprint),
            ("end", expired.lease.fingerprint),
        ]
    )
    assert verify_audit_log(tmp_path / "audit").ok


def test_failing_sink_loses_no_end(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    disk = FaultyDisk()
    running = start(tmp_path, clock, disk=disk)
    stub = channels(running)
    sink = running.authority.audit_sink
    disk.failing.set()
    granted = []
    for index in range(5):
        granted.append(stub.Grant(pb.GrantRequest(principal=f"svc-{index}")))
        clock.advance(1)
    clock.advance(10)
    running.authority.table.expire_due()
    wait_until(lambda: disk.failures >= 3)
    states = [stub.TimeToLive(pb.TimeToLiveRequest(lease_id=g.lease_id)).lease.state for g in granted]
    healthy_while_failing = sink.healthy

    disk.failing.clear()
    assert sink.flush(10)
    running.stop()

    assert states == [pb.LEASE_STATE_ENDED] * 5
    assert not healthy_while_failing
    assert [r["event_id"] for r in records_of(tmp_path, "end")] == [f"end:{g.lease.digest}" for g in granted]
    assert [r["event_id"] for r in records_of(tmp_path, "grant")] == [f"grant:{g.lease.digest}" for g in granted]
    assert verify_audit_log(tmp_path / "audit").ok


def test_fail_closed_rejects_grants_while_failing(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    disk = FaultyDisk()
    running = start(tmp_path, clock, disk=disk, fail_closed=True)
    stub = channels(running)
    sink = running.authority.audit_sink
    disk.failing.set()
    stub.Grant(pb.GrantRequest(principal="svc-a"))
    wait_until(lambda: not sink.healthy)

    with pytest.raises(grpc.RpcError) as refused:
        stub.Grant(pb.GrantRequest(principal="svc-b"))
    disk.failing.clear()
    assert sink.flush(10)
    after = stub.Grant(pb.GrantRequest(principal="svc-c"))
    running.stop()

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert str(tmp_path / "audit") in refused.value.details()
    assert "fail-closed" in refused.value.details()
    assert after.lease.state == pb.LEASE_STATE_ALIVE
    assert [r["principal"] for r in records_of(tmp_path, "grant")] == ["svc-a", "svc-c"]


def test_fail_open_grants_while_failing(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    disk = FaultyDisk()
    running = start(tmp_path, clock, disk=disk)
    stub = channels(running)
    sink = running.authority.audit_sink
    disk.failing.set()
    stub.Grant(pb.GrantRequest(principal="svc-a"))
    wait_until(lambda: not sink.healthy)

    second = stub.Grant(pb.GrantRequest(principal="svc-b"))
    disk.failing.clear()
    assert sink.flush(10)
    running.stop()

    assert second.lease.state == pb.LEASE_STATE_ALIVE
    assert [r["principal"] for r in records_of(tmp_path, "grant")] == ["svc-a", "svc-b"]


def cut_last_audit_record(data_dir: pathlib.Path) -> None:
    path = data_dir / "audit" / "audit.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))


def test_records_cut_after_stop_detected_by_verify(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock()
    running = start(tmp_path, clock)
    stub = channels(running)
    for index in range(3):
        stub.Grant(pb.GrantRequest(principal=f"svc-{index}"))
    running.stop()
    cut_last_audit_record(tmp_path)

    code = audit_main(["verify", str(tmp_path / "audit")])

    assert code == 1
    assert capsys.readouterr().out == (
        f"FAIL: {tmp_path / 'audit' / 'audit.jsonl'}: records were removed from the end: the log ends at seq 2,"
        " but last-hash.json records seq 3 as written\n"
    )


def test_authority_start_rejected_after_records_cut(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels
) -> None:
    clock = ManualClock()
    running = start(tmp_path, clock)
    channels(running).Grant(pb.GrantRequest(principal="svc-a"))
    running.stop()
    cut_last_audit_record(tmp_path)

    config = AuthorityConfig(authenticator=InsecureDevAuthenticator(), policy=POLICY, data_dir=tmp_path, clock=clock)

    with pytest.raises(AuditWriteError, match=r"records were removed from the end of the audit log: it ends at seq 0"):
        asyncio.run(Authority(config).start())

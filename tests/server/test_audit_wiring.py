"""The authority's audit log: one record per grant, revoke and end, across restarts and write failures."""

from __future__ import annotations

import asyncio
import collections
import datetime
import errno
import json
import logging
import pathlib
import socket
import subprocess
import sys
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
from session_authority.server._audit import AuditSink, audit_main, list_audit_files
from session_authority.server._audit_events import SessionRecorder, end_event, grant_event, snapshot_of_stored
from session_authority.server._main import build_parser
from session_authority.server._store import StoredLease
from session_authority.server._table import EndReason, lease_digest
from session_authority.server._telemetry import SessionTelemetry
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

POLICY_TEXT = """
version = 1
default_tier = "standard"
admins = ["ops"]

[tiers.standard]
idle_timeout = "10s"
max_duration = "100s"
"""

POLICY = parse_policy(POLICY_TEXT)


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
    # They end when the restart grace (2 s) has passed, dated at that deadline.
    clock.advance(12)
    second = start(tmp_path, clock)
    clock.advance(2.5)
    second.authority.table.expire_due()
    second.stop()
    clock.advance(10)
    third = start(tmp_path, clock)
    third.stop()

    ends = records_of(tmp_path, "end")
    assert sorted(str(end["event_id"]) for end in ends) == sorted(f"end:{g.lease.digest}" for g in granted)
    # Ends are recorded in the order they happened, and the held leases
    # ended after others had reached their deadlines.
    assert sorted(str(end["reason"]) for end in ends) == ["idle_timeout"] * 5 + ["revoked"]
    assert sorted(float(end["duration_seconds"]) for end in ends) == [0.0, 10.0, 10.0, 15.0, 15.0, 15.0]
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

    # The leases were granted before the chain started, so their grant
    # records are not written. Their ends are owed and written once.
    types = [(record["type"], record["fingerprint"]) for record in records(tmp_path)]
    assert sorted(types) == sorted(
        [
            ("revoke", revoked.lease.fingerprint),
            ("end", revoked.lease.fingerprint),
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

    with pytest.raises(
        AuditWriteError, match=r"^records were removed from the end of the audit log in .*audit: it ends at seq 0"
    ):
        asyncio.run(Authority(config).start())


# --------------------------------------------------------------------------
# A new chain in an empty audit directory, with leases from an earlier chain in the store


def run_first_chain(data_dir: pathlib.Path, clock: ManualClock, channels) -> tuple[pb.GrantResponse, pb.GrantResponse]:  # type: ignore[no-untyped-def]
    """Grant two leases, revoke the first, stop, and move the audit directory aside to ``audit-old``."""
    running = start(data_dir, clock)
    stub = channels(running)
    revoked = stub.Grant(pb.GrantRequest(principal="svc-a"))
    alive = stub.Grant(pb.GrantRequest(principal="svc-b"))
    stub.Revoke(pb.RevokeRequest(lease_id=revoked.lease_id), metadata=[("x-session-principal", "ops")])
    running.stop()
    (data_dir / "audit").rename(data_dir / "audit-old")
    # Down for a second, so the new chain starts after these grants.
    clock.advance(1)
    return revoked, alive


def test_new_chain_writes_no_earlier_grants(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    run_first_chain(tmp_path, clock, channels)

    second = start(tmp_path, clock)
    granted_here = channels(second).Grant(pb.GrantRequest(principal="svc-c"))
    second.stop()
    # A later start of the same chain must not write the earlier grants either.
    third = start(tmp_path, clock)
    third.stop()

    assert [record["event_id"] for record in records_of(tmp_path, "grant")] == [f"grant:{granted_here.lease.digest}"]
    assert verify_audit_log(tmp_path / "audit").ok


def test_new_chain_warns_of_earlier_grants(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    run_first_chain(tmp_path, clock, channels)

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit_events"):
        second = start(tmp_path, clock)
        second.stop()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"2 stored leases were granted before the audit chain in {tmp_path / 'audit'} started"
    )
    assert "1 of them ended before this chain started" in warnings[0]


def test_new_chain_writes_owed_end_once(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    revoked, _ = run_first_chain(tmp_path, clock, channels)

    for _ in range(2):
        start(tmp_path, clock).stop()

    # The store cannot show whether the earlier chain got the end, so the new chain records it, once.
    digest = revoked.lease.digest
    assert [record["event_id"] for record in records(tmp_path)] == [f"revoke:{digest}", f"end:{digest}"]


def test_verify_old_new_lists_end(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock()
    revoked, _ = run_first_chain(tmp_path, clock, channels)
    start(tmp_path, clock).stop()

    code = audit_main(["verify", str(tmp_path / "audit-old"), str(tmp_path / "audit")])
    lines = capsys.readouterr().out.splitlines()

    digest = revoked.lease.digest
    assert code == 1
    assert [line.split(" is recorded twice")[0] for line in lines if line.startswith("DUPLICATE:")] == [
        f"DUPLICATE: revoke event revoke:{digest}",
        f"DUPLICATE: end event end:{digest}",
    ]
    assert lines[-1] == "FAIL: 0 of 2 chains broken, 2 events recorded in more than one directory"


def stored_row(digest: bytes, granted_at: float, *, ended_at: float | None = None) -> StoredLease:
    return StoredLease(
        digest=digest,
        principal="svc-a",
        tier="standard",
        idle_timeout=10.0,
        max_duration=100.0,
        granted_at=granted_at,
        granted_wall=1_800_000_000.0 + granted_at,
        last_activity=granted_at,
        ended_at=ended_at,
        ended_wall=None if ended_at is None else 1_800_000_000.0 + ended_at,
        end_reason=None if ended_at is None else int(EndReason.IDLE_TIMEOUT),
    )


def test_resubmit_writes_grants_from_chain_start(tmp_path: pathlib.Path) -> None:
    log = AuditLog(tmp_path, fsync=False)
    sink = AuditSink(log)
    recorder = SessionRecorder(sink, SessionTelemetry(), first_sequence=1)
    earlier, at_start, later = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    rows = [
        stored_row(earlier, 90.0, ended_at=95.0),
        stored_row(at_start, 100.0),
        stored_row(later, 110.0, ended_at=120.0),
    ]

    # A crash kept these records from the chain that started at 100.0.
    recorder.resubmit_stored(rows, chain_start_time=100.0)
    assert sink.flush(10)
    sink.close()
    log.close()

    written = [json.loads(line)["event_id"] for line in (tmp_path / "audit.jsonl").read_bytes().splitlines()]
    assert written == [
        f"end:{earlier.hex()}",
        f"grant:{at_start.hex()}",
        f"grant:{later.hex()}",
        f"end:{later.hex()}",
    ]


def test_start_warns_missing_last_hash(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    running = start(tmp_path, clock)
    channels(running).Grant(pb.GrantRequest(principal="svc-a"))
    running.stop()
    (tmp_path / "audit" / "last-hash.json").unlink()

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        start(tmp_path, clock).stop()

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"audit log {tmp_path / 'audit'} has records up to seq 1 but no last-hash.json, so records cut from its end"
        " before this start cannot be detected"
    )


def test_start_last_hash_directory_rejected(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    clock = ManualClock()
    running = start(tmp_path, clock)
    channels(running).Grant(pb.GrantRequest(principal="svc-a"))
    running.stop()
    last_hash = tmp_path / "audit" / "last-hash.json"
    last_hash.unlink()
    last_hash.mkdir()
    config = AuthorityConfig(authenticator=InsecureDevAuthenticator(), policy=POLICY, data_dir=tmp_path, clock=clock)

    with pytest.raises(AuditWriteError) as caught:
        asyncio.run(Authority(config).start())

    assert str(caught.value) == (
        f"cannot check the end of the audit log in {tmp_path / 'audit'}: {last_hash} is a directory, but it must be"
        f" the file that stores the seq and hash of the last record. Move that directory out of {tmp_path / 'audit'},"
        f" run 'session-authority audit verify {tmp_path / 'audit'}', and start again"
    )


FAILED_START_SCRIPT = """
import asyncio, pathlib, sys
from session_authority.server import Authority, AuthorityConfig, InsecureDevAuthenticator, parse_policy

config = AuthorityConfig(
    authenticator=InsecureDevAuthenticator(),
    policy=parse_policy(sys.argv[1]),
    data_dir=pathlib.Path(sys.argv[2]),
    listen=sys.argv[3],
)
try:
    asyncio.run(Authority(config).start())
except RuntimeError as exc:
    print(exc)
    sys.exit(3)
"""


def start_on_port_in_use(data_dir: pathlib.Path) -> None:
    """Start an authority process on a port that a listening socket holds, and expect it to exit on the bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        listen = f"127.0.0.1:{holder.getsockname()[1]}"
        # A separate process, as `serve` runs: a grpc.aio server whose start
        # failed in this process, beside the other authorities of the test,
        # crashed the test process (grpcio in this venv).
        completed = subprocess.run(
            [sys.executable, "-c", FAILED_START_SCRIPT, POLICY_TEXT, str(data_dir), listen],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert completed.returncode == 3, completed.stderr
    assert completed.stdout.startswith(f"cannot listen on {listen}: the address is in use")


def run_revoked_lease(data_dir: pathlib.Path, clock: ManualClock, channels) -> None:  # type: ignore[no-untyped-def]
    """Grant a lease and revoke it, so that a later start owes no audit record."""
    running = start(data_dir, clock)
    stub = channels(running)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
    stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id), metadata=[("x-session-principal", "ops")])
    running.stop()


def test_failed_start_keeps_last_hash_missing(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = ManualClock()
    run_revoked_lease(tmp_path, clock, channels)
    last_hash = tmp_path / "audit" / "last-hash.json"
    last_hash.unlink()

    start_on_port_in_use(tmp_path)
    code = audit_main(["verify", "--strict", str(tmp_path / "audit")])

    assert not last_hash.exists()
    assert not (tmp_path / "audit" / "last-hash.json.tmp").exists()
    assert code == 1
    assert capsys.readouterr().out.startswith(f"FAIL: {last_hash}: missing, although the log has 3 records")


def test_start_after_failed_start_warns(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    run_revoked_lease(tmp_path, clock, channels)
    (tmp_path / "audit" / "last-hash.json").unlink()
    start_on_port_in_use(tmp_path)
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        start(tmp_path, clock).stop()

    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name == "session_authority.server._audit"
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith(
        f"audit log {tmp_path / 'audit'} has records up to seq 3 but no last-hash.json, so records cut from its end"
    )


def test_invalid_chain_start_keeps_last_hash_missing(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels
) -> None:
    clock = ManualClock()
    running = start(tmp_path, clock)
    channels(running).Grant(pb.GrantRequest(principal="svc-a"))
    running.stop()
    last_hash = tmp_path / "audit" / "last-hash.json"
    last_hash.unlink()
    (tmp_path / "audit" / "chain-start.json").write_bytes(b"garbage\n")
    config = AuthorityConfig(authenticator=InsecureDevAuthenticator(), policy=POLICY, data_dir=tmp_path, clock=clock)

    with pytest.raises(AuditWriteError, match=r"^cannot tell when the audit chain in .* started"):
        asyncio.run(Authority(config).start())

    assert not last_hash.exists()
    assert not verify_audit_log(tmp_path / "audit", require_last_hash_file=True).ok


def test_deleted_chain_start_writes_no_earlier_grants(  # type: ignore[no-untyped-def]
    tmp_path: pathlib.Path, channels, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    run_first_chain(tmp_path, clock, channels)
    second = start(tmp_path, clock)
    granted_here = channels(second).Grant(pb.GrantRequest(principal="svc-c"))
    second.stop()
    (tmp_path / "audit" / "chain-start.json").unlink()
    caplog.clear()

    with caplog.at_level(logging.WARNING, logger="session_authority.server._audit"):
        start(tmp_path, clock).stop()

    assert [record["event_id"] for record in records_of(tmp_path, "grant")] == [f"grant:{granted_here.lease.digest}"]
    warnings = [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.name == "session_authority.server._audit"
    ]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"{tmp_path / 'audit' / 'chain-start.json'} is missing, but last-hash.json records")


def test_audit_max_bytes_rotates_live_log(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=tmp_path,
        admin_everyone=True,
        audit_max_bytes=4096,
    )
    running = AuthorityThread(config).start()
    try:
        stub = channels(running)
        for _ in range(30):
            granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
            stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id, release=True))
        wait_until(lambda: len(list((tmp_path / "audit").glob("audit-*.jsonl"))) >= 2)
    finally:
        running.stop()

    audit_dir = tmp_path / "audit"
    assert all(path.stat().st_size <= 4096 for path in audit_dir.glob("audit*.jsonl"))
    result = verify_audit_log(audit_dir)
    assert result.ok, result
    assert result.records >= 60


def test_audit_max_bytes_below_minimum_rejected() -> None:
    with pytest.raises(ValueError, match=r"^audit_max_bytes must be an integer of at least 1024, got 1000$"):
        AuthorityConfig(authenticator=InsecureDevAuthenticator(), audit_max_bytes=1000)


def all_records(audit_dir: pathlib.Path) -> list[dict[str, object]]:
    lines = [line for path in list_audit_files(audit_dir) for line in path.read_bytes().splitlines()]
    return [json.loads(line) for line in lines]


def test_restart_writes_no_record_twice_with_small_files(tmp_path: pathlib.Path, channels) -> None:  # type: ignore[no-untyped-def]
    # 30 leases and their ends fill many 1,024-byte files, so most records
    # are older than the previous file by the time the authority restarts.
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=tmp_path,
        admin_everyone=True,
        audit_max_bytes=1024,
    )
    running = AuthorityThread(config).start()
    try:
        stub = channels(running)
        live = stub.Grant(pb.GrantRequest(principal="svc-a"))
        for _ in range(30):
            granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
            stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id, release=True))
    finally:
        running.stop()
    before = collections.Counter(record["event_id"] for record in all_records(tmp_path / "audit"))

    for _ in range(2):
        AuthorityThread(config).start().stop()

    after = collections.Counter(record["event_id"] for record in all_records(tmp_path / "audit"))
    assert f"grant:{lease_digest(live.lease_id).hex()}" in after
    assert after == before, {event: count for event, count in after.items() if count != before[event]}
    assert verify_audit_log(tmp_path / "audit").ok


def test_audit_max_bytes_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_AUTHORITY_AUDIT_MAX_BYTES", "4096")
    monkeypatch.setenv("SESSION_AUTHORITY_WATCH_REPLAY_SIZE", "12")

    args = build_parser().parse_args(["--insecure-dev"])

    assert args.audit_max_bytes == 4096
    assert args.watch_replay_size == 12


@pytest.mark.parametrize("value", ["4_096", "4096.0", "-5", "1e4"])
def test_audit_max_bytes_flag_needs_digits(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--insecure-dev", "--audit-max-bytes", value])

    assert f"'{value}' is not a whole number of decimal digits" in capsys.readouterr().err


def test_resubmit_rotation_repeats_nothing(tmp_path: pathlib.Path) -> None:
    # The first rows' records are missing and fill more than one 1,024-byte
    # file, so writing them rotates the log twice. The last rows' records are
    # in the files indexed when the resubmission starts.
    written_rows = [stored_row(bytes([number]) * 32, 100.0 + number, ended_at=101.0 + number) for number in range(1, 4)]
    # The rows' events happened at wall time 1,800,000,100 and later, so the records come after.
    def wall_clock() -> float:
        return 1_800_000_500.0

    with AuditLog(tmp_path, max_bytes=1024, fsync=False, wall_clock=wall_clock) as log:
        for row in written_rows:
            for event in (grant_event(snapshot_of_stored(row)), end_event(snapshot_of_stored(row))):
                log.append(*event)
    missing_rows = [stored_row(bytes([number]) * 32, 200.0 + number, ended_at=201.0 + number) for number in range(10, 20)]

    log = AuditLog(tmp_path, max_bytes=1024, fsync=False, wall_clock=wall_clock)
    sink = AuditSink(log)
    recorder = SessionRecorder(sink, SessionTelemetry(), first_sequence=1)
    recorder.resubmit_stored([*missing_rows, *written_rows])
    assert sink.flush(10)
    sink.close()
    log.close()

    counts = collections.Counter(record["event_id"] for record in all_records(tmp_path))
    assert len(list_audit_files(tmp_path)) > 3
    assert {event: count for event, count in counts.items() if count > 1} == {}
    assert len(counts) == 2 * (len(written_rows) + len(missing_rows)) + len(list_audit_files(tmp_path)) - 1

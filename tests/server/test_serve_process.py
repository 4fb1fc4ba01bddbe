"""``session-authority serve`` as a real subprocess: life cycle, restarts and crashes."""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


def seconds(duration: object) -> float:
    return duration.seconds + duration.nanos / 1e9  # type: ignore[attr-defined]


@pytest.fixture
def stub(authority_process):  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(authority_process.target)
    yield pb_grpc.SessionAuthorityStub(channel)
    channel.close()


def test_serve_logs_address_store_and_policy(authority_process) -> None:  # type: ignore[no-untyped-def]
    log = authority_process.log()

    assert f"serving on {authority_process.target}" in log
    assert "store: sqlite:" in log
    assert "policy tiers: brief, short, standard" in log
    assert "insecure development mode" in log


def test_health_and_reflection_registered(authority_process) -> None:  # type: ignore[no-untyped-def]
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(authority_process.target) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="session_authority.v1.SessionAuthority"), timeout=5
        )
        listing = next(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
            )
        )

    assert health.status == health_pb2.HealthCheckResponse.SERVING
    names = [service.name for service in listing.list_services_response.service]
    assert "session_authority.v1.SessionAuthority" in names


def test_full_life_cycle(stub: pb_grpc.SessionAuthorityStub) -> None:
    granted = stub.Grant(pb.GrantRequest(principal="svc-a", tier="short"), timeout=5)
    renewed = stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)]), timeout=5)
    listed = stub.ListLeases(pb.ListLeasesRequest(principal="svc-a"), timeout=5)
    revoked = stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id), timeout=5)
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=granted.lease_id), timeout=5)

    assert granted.lease.state == pb.LEASE_STATE_ALIVE
    assert renewed.leases[0].state == pb.LEASE_STATE_ALIVE
    assert [lease.fingerprint for lease in listed.leases] == [granted.lease.fingerprint]
    assert revoked.lease.end_reason == pb.END_REASON_REVOKED
    assert after.lease.state == pb.LEASE_STATE_ENDED
    assert seconds(after.lease.ttl) == 0


def test_idle_lease_expires_and_watch_reports_it(stub: pb_grpc.SessionAuthorityStub) -> None:
    watch = stub.WatchSessionEnds(pb.WatchSessionEndsRequest(), timeout=10)
    first = next(watch)
    granted = stub.Grant(pb.GrantRequest(principal="svc-a", tier="short"), timeout=5)

    end = next(event for event in watch if event.HasField("end"))
    watch.cancel()

    assert first.HasField("heartbeat")
    assert end.end.lease.fingerprint == granted.lease.fingerprint
    assert end.end.lease.end_reason == pb.END_REASON_IDLE_TIMEOUT


def test_restart_keeps_leases_without_extra_time(authority_process) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(authority_process.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        lease_ids = [stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=5).lease_id for _ in range(20)]
        before = {
            lease_id: seconds(stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id), timeout=5).lease.ttl)
            for lease_id in lease_ids
        }

    assert authority_process.stop() == 0
    authority_process.restart()

    with grpc.insecure_channel(authority_process.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        after = {
            lease_id: stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id), timeout=5).lease
            for lease_id in lease_ids
        }

    for lease_id in lease_ids:
        assert after[lease_id].state == pb.LEASE_STATE_ALIVE
        assert seconds(after[lease_id].ttl) <= before[lease_id]


def test_kill_9_loses_no_granted_lease(authority_process) -> None:  # type: ignore[no-untyped-def]
    granted: list[str] = []
    deadline = time.monotonic() + 1.0
    with grpc.insecure_channel(authority_process.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        futures = []
        while time.monotonic() < deadline:
            futures.append(stub.Grant.future(pb.GrantRequest(principal="svc-a"), timeout=5))
            if len(futures) >= 32:
                granted.extend(f.result().lease_id for f in futures)
                futures = []
        for future in futures:
            granted.extend([future.result().lease_id])
        # Grants still in flight when the process dies are not counted: only a
        # grant whose reply arrived must survive.
        in_flight = [stub.Grant.future(pb.GrantRequest(principal="svc-a"), timeout=5) for _ in range(16)]
        authority_process.kill()
        for future in in_flight:
            try:
                granted.append(future.result().lease_id)
            except grpc.RpcError:
                pass

    authority_process.restart()

    with grpc.insecure_channel(authority_process.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        states = [
            stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id), timeout=5).lease.state for lease_id in granted
        ]
    assert len(granted) > 50
    assert states.count(pb.LEASE_STATE_ALIVE) == len(granted)


def test_sigterm_stops_cleanly(authority_process) -> None:  # type: ignore[no-untyped-def]
    code = authority_process.stop()

    assert code == 0
    assert "lease store closed" in authority_process.log()


def test_insecure_dev_refuses_public_address(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--insecure-dev", "--listen", "0.0.0.0:0",
         "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "--insecure-dev refuses to listen on 0.0.0.0:0" in result.stderr


def test_bad_policy_fails_start_with_each_problem(tmp_path) -> None:  # type: ignore[no-untyped-def]
    policy = tmp_path / "bad.toml"
    policy.write_text('version = 1\ndefault_tier = "x"\n[tiers.x]\nidle_timeout = "0.2s"\nmax_duration = -1\n')

    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--insecure-dev", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path), "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "tiers.x.idle_timeout" in result.stderr
    assert "tiers.x.max_duration" in result.stderr


def test_serve_without_authentication_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert "no authentication configured; pass --api-keys FILE" in result.stderr


def test_second_authority_on_same_port_fails(authority_process, tmp_path) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--insecure-dev", "--listen",
         authority_process.target, "--data-dir", str(tmp_path / "second")],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    assert f"cannot listen on {authority_process.target}" in result.stderr


def test_unwritable_port_file_stops_cleanly(tmp_path) -> None:  # type: ignore[no-untyped-def]
    port_file = tmp_path / "missing-dir" / "port"

    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--insecure-dev", "--listen", "127.0.0.1:0",
         "--data-dir", str(tmp_path / "data"), "--port-file", str(port_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 1
    assert f"cannot write --port-file {port_file}: No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr
    assert "lease store closed" in result.stderr


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--heartbeat-interval", "0", "0 s is outside the allowed range 0.05 s to 3600 s"),
        ("--heartbeat-interval", "nan", "nan s is outside the allowed range"),
        ("--ended-retention", "-1", "-1 s is outside the allowed range"),
        ("--prometheus-port", "99999", "port 99999 is outside 0 to 65535"),
        ("--listen", "127.0.0.1:99999", "port 99999 is outside 0 to 65535"),
        ("--listen", "50051", "'50051' is not HOST:PORT"),
    ],
)
def test_serve_flag_out_of_range_rejected(tmp_path, flag: str, value: str, message: str) -> None:  # type: ignore[no-untyped-def]
    result = subprocess.run(
        [sys.executable, "-m", "session_authority.server._main", "--insecure-dev", "--data-dir", str(tmp_path), flag, value],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert result.returncode == 2
    assert message in result.stderr

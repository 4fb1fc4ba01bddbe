"""One lease table on etcd served by several replicas: every replica grants, renews, revokes and ends any lease.

Enforcers attached to different replicas all learn of an end, whichever
replica decided it, and exactly one replica writes the ``end`` audit
record. Delays are printed for the record; the asserts use bounds well
above the design's figures so that a busy machine does not fail them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from client_support import HANG, UNARY, AioProtectedServer, SyncProtectedServer, start_protected_server
from replication._replicas import EndWatcher, ReplicaFactory, ReplicaProcess, verify_audit_logs, wait_for_end_records
from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY, EndReason
from session_authority.clients._types import LeaseState

CUT_OFF_BOUND_SECONDS = 2.0
"""Generous bound on the delay from a revoke's reply to every enforcer rejecting the lease. The p99 budget is 50 ms."""

END_BOUND_SECONDS = 1.0
"""Generous bound on how late after its deadline an idle end may reach a watcher. The p99 budget is 20 ms."""

EARLY_END_ALLOWANCE_SECONDS = 0.5
"""How much earlier than the last renewal's idle deadline an end may come.

A renewal on one replica reaches the others after the 50 ms write-behind
batch and the watch, so another replica may end the lease that much early.
"""


@pytest.fixture
def clients() -> Iterator[dict[str, AuthorityClient]]:
    """Authority clients by replica target, created on first use and closed after the test."""
    opened: dict[str, AuthorityClient] = {}
    yield opened
    for client in opened.values():
        client.close()


def client_for(clients: dict[str, AuthorityClient], replica: ReplicaProcess) -> AuthorityClient:
    if replica.target not in clients:
        clients[replica.target] = AuthorityClient(replica.target, principal="svc-holder", timeout_seconds=5)
    return clients[replica.target]


def call_unary(channel: grpc.Channel, lease_id: str) -> tuple[grpc.StatusCode, str | None]:
    """Call the protected unary method; return the status code and the end-reason trailer."""
    try:
        _, call = channel.unary_unary(UNARY).with_call(b"ping", metadata=((LEASE_METADATA_KEY, lease_id),), timeout=5)
    except grpc.RpcError as exc:
        trailers = {item.key: item.value for item in exc.trailing_metadata() or ()}
        return exc.code(), trailers.get(END_REASON_TRAILER_KEY)
    return call.code(), None


class HangingCall:
    """A ``Hang`` call in flight on a thread; records its status code and when it ended."""

    def __init__(self, channel: grpc.Channel, lease_id: str) -> None:
        self.code: grpc.StatusCode | None = None
        self.reason: str | None = None
        self.ended_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(channel, lease_id), daemon=True)
        self._thread.start()

    def _run(self, channel: grpc.Channel, lease_id: str) -> None:
        try:
            channel.unary_unary(HANG)(b"hang", metadata=((LEASE_METADATA_KEY, lease_id),), timeout=15)
            self.code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            self.code = exc.code()
            self.reason = {item.key: item.value for item in exc.trailing_metadata() or ()}.get(END_REASON_TRAILER_KEY)
        self.ended_at = time.monotonic()

    def join(self, timeout_seconds: float) -> None:
        self._thread.join(timeout_seconds)


def wait_until_rejected(channel: grpc.Channel, lease_id: str, timeout_seconds: float) -> float | None:
    """Call every 5 ms until the enforcer rejects the lease; return the time of the rejection, or None if none came."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        code, _ = call_unary(channel, lease_id)
        if code is grpc.StatusCode.UNAUTHENTICATED:
            return time.monotonic()
        time.sleep(0.005)
    return None


def test_grant_renew_revoke_across_replicas(start_replicas: ReplicaFactory, clients: dict[str, AuthorityClient]) -> None:
    replicas = start_replicas(3)
    grant_replica, renew_replica, revoke_replica = replicas
    watchers = [EndWatcher(replica).start() for replica in replicas]
    servers: list[SyncProtectedServer | AioProtectedServer] = [
        start_protected_server(kind, replica.target) for kind, replica in zip(("sync", "aio", "sync"), replicas)
    ]
    channels = [grpc.insecure_channel(server.target) for server in servers]
    try:
        granted = client_for(clients, grant_replica).grant("standard")
        lease_id, digest = granted.lease_id, granted.lease.digest
        renewed = client_for(clients, renew_replica).renew([(lease_id, 0.0)])
        admitted = [call_unary(channel, lease_id)[0] for channel in channels]
        for server in servers:
            server.hang_started.clear()
        hanging = [HangingCall(channel, lease_id) for channel in channels]
        for server in servers:
            assert server.hang_started.wait(5.0), f"the Hang call did not reach the server on {server.target}"

        revoked = client_for(clients, revoke_replica).revoke(lease_id)
        revoked_at = time.monotonic()
        rejected_at = [wait_until_rejected(channel, lease_id, CUT_OFF_BOUND_SECONDS) for channel in channels]
        for call in hanging:
            call.join(CUT_OFF_BOUND_SECONDS + 5.0)
        missing_ends = {watcher.replica_id: watcher.wait_for({digest}, 5.0) for watcher in watchers}
        records = wait_for_end_records(replicas, {digest})
    finally:
        for channel in channels:
            channel.close()
        for server in servers:
            server.stop()
        for watcher in watchers:
            watcher.stop()

    for replica, when in zip(replicas, rejected_at):
        delay = "never" if when is None else f"{(when - revoked_at) * 1e3:.1f} ms"
        print(f"enforcer on {replica.replica_id}: first rejected call {delay} after the revoke returned")
    for replica, call in zip(replicas, hanging):
        print(f"enforcer on {replica.replica_id}: Hang call cut off {(call.ended_at - revoked_at) * 1e3:.1f} ms after the revoke returned")

    assert renewed.leases[0].state is LeaseState.ALIVE
    assert admitted == [grpc.StatusCode.OK] * 3
    assert not revoked.already_ended
    assert None not in rejected_at, f"enforcers rejecting the revoked lease within {CUT_OFF_BOUND_SECONDS} s: {rejected_at}"
    assert [call.code for call in hanging] == [grpc.StatusCode.UNAUTHENTICATED] * 3
    assert [call.reason for call in hanging] == [EndReason.REVOKED.value] * 3
    assert all(call.ended_at - revoked_at < CUT_OFF_BOUND_SECONDS for call in hanging)
    assert missing_ends == {watcher.replica_id: set() for watcher in watchers}
    assert [watcher.ends[digest].reason for watcher in watchers] == [EndReason.REVOKED] * 3
    assert [watcher.repeated for watcher in watchers] == [[]] * 3
    assert len(records.get(digest, [])) == 1, f"end records of the lease: {records.get(digest)}"
    assert records[digest][0][0] == revoke_replica.replica_id
    assert records[digest][0][1]["reason"] == "revoked"
    assert verify_audit_logs(replicas) == {}


def test_idle_end_after_remote_renewals(start_replicas: ReplicaFactory, clients: dict[str, AuthorityClient]) -> None:
    replicas = start_replicas(2)
    grant_replica, renew_replica = replicas
    watchers = [EndWatcher(replica).start() for replica in replicas]
    try:
        # Tier "short": 1 s idle timeout, 4 s max duration. Renewals through
        # the other replica for 2 s keep it alive past its first idle deadline.
        granted = client_for(clients, grant_replica).grant("short")
        lease_id, digest = granted.lease_id, granted.lease.digest
        renew_until = time.monotonic() + 2.0
        while time.monotonic() < renew_until:
            last_renewal_sent = time.monotonic()
            client_for(clients, renew_replica).renew([(lease_id, 0.0)])
            last_renewal_replied = time.monotonic()
            time.sleep(0.25)
        on_grant_replica = client_for(clients, grant_replica).time_to_live(lease_id)
        ended_while_renewed = {watcher.replica_id: digest in watcher.ends for watcher in watchers}
        missing_ends = {watcher.replica_id: watcher.wait_for({digest}, 5.0) for watcher in watchers}
        records = wait_for_end_records(replicas, {digest})
    finally:
        for watcher in watchers:
            watcher.stop()

    idle_deadline = last_renewal_replied + granted.lease.idle_timeout_seconds
    for watcher in watchers:
        end = watcher.ends.get(digest)
        if end is not None:
            print(f"idle end on {watcher.replica_id}: {(end.arrived_at - idle_deadline) * 1e3:+.1f} ms from the deadline")

    assert on_grant_replica.state is LeaseState.ALIVE, "the granting replica ended a lease renewed on the other one"
    assert ended_while_renewed == {watcher.replica_id: False for watcher in watchers}
    assert missing_ends == {watcher.replica_id: set() for watcher in watchers}
    for watcher in watchers:
        end = watcher.ends[digest]
        assert end.reason is EndReason.IDLE_TIMEOUT
        assert end.arrived_at < idle_deadline + END_BOUND_SECONDS
        earliest = last_renewal_sent + granted.lease.idle_timeout_seconds - EARLY_END_ALLOWANCE_SECONDS
        assert end.arrived_at > earliest, f"{watcher.replica_id} ended the lease early"
    assert len(records.get(digest, [])) == 1, f"end records of the lease: {records.get(digest)}"
    assert records[digest][0][1]["reason"] == "idle_timeout"
    assert verify_audit_logs(replicas) == {}

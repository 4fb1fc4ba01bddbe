"""A replica killed mid-stream: holders and enforcers move to the next replica and keep their lease.

The holder and the enforcer both reach the replicas through one target that
lists every replica (``ipv4:127.0.0.1:PA,127.0.0.1:PB``), so gRPC's
``pick_first`` connects them to the first replica and moves to the second
when the first is killed with SIGKILL. Meanwhile the holder makes a call
every 50 ms and keeps a bidirectional stream open through the enforcer.
"""

from __future__ import annotations

import queue
import threading
import time

import grpc
import pytest

from client_support import BIDI, UNARY, start_protected_server
from replication._replicas import (
    FAST_RECONNECT,
    ReplicaFactory,
    ReplicaProcess,
    failover_target,
    read_records,
    verify_audit_logs,
    wait_for_end_records,
)
from session_authority.clients._client import AuthorityClient
from session_authority.clients._keeper import LeaseKeeper
from session_authority.clients._metadata import EndReason
from session_authority.clients._session import Session, SessionState
from session_authority.clients._types import LeaseState

IDLE_TIMEOUT_SECONDS = 2.0
"""The holder renews every third of this, so its lease ends unless renewals resume on the other replica in time."""

RUN_AFTER_KILL_SECONDS = 4.0
"""Longer than the idle timeout and than the enforcer's 2 s staleness bound, so a failover that did not happen shows."""


class CallLoop:
    """Unary calls every 50 ms on a thread, plus one bidirectional stream that sends a message every 100 ms."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.codes: list[grpc.StatusCode] = []
        self.stream_replies = 0
        self.stream_sent = 0
        self.stream_error: grpc.RpcError | None = None
        self._stop = threading.Event()
        self._stop_calls = threading.Event()
        self._outbox: queue.Queue[bytes | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._call, name="failover-calls", daemon=True),
            threading.Thread(target=self._stream, name="failover-stream", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _call(self) -> None:
        method = self.channel.unary_unary(UNARY)
        while not self._stop_calls.is_set():
            try:
                method(b"ping", timeout=5)
                self.codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                self.codes.append(exc.code())
            self._stop_calls.wait(0.05)

    def _stream(self) -> None:
        replies = self.channel.stream_stream(BIDI)(iter(self._outbox.get, None), timeout=60)
        sender = threading.Thread(target=self._send, name="failover-stream-send", daemon=True)
        sender.start()
        try:
            for _ in replies:
                self.stream_replies += 1
        except grpc.RpcError as exc:
            self.stream_error = exc
        sender.join(5.0)

    def _send(self) -> None:
        while not self._stop.is_set():
            self._outbox.put(b"message")
            self.stream_sent += 1
            self._stop.wait(0.1)
        self._outbox.put(None)

    def stop_calls(self) -> None:
        """Stop the unary calls and wait for the one in flight. The stream stays open."""
        self._stop_calls.set()
        self._threads[0].join(10.0)

    def stop(self) -> None:
        self._stop_calls.set()
        self._stop.set()
        for thread in self._threads:
            thread.join(10.0)


def granted_by(replicas: list[ReplicaProcess], digest: str) -> list[str]:
    """Return the IDs of the replicas whose audit log has the lease's ``grant`` record."""
    event_id = f"grant:{digest}"
    return [
        replica.replica_id
        for replica in replicas
        if any(record.get("event_id") == event_id for record in read_records(replica.audit_dir))
    ]


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_replica_killed_lease_survives_failover(start_replicas: ReplicaFactory, kind: str) -> None:
    replicas = start_replicas(2)
    first, second = replicas
    target = failover_target(replicas)
    server = start_protected_server(kind, target)
    client = AuthorityClient(target, principal="svc-holder", timeout_seconds=2, options=FAST_RECONNECT)
    keeper = LeaseKeeper(renewal_timeout_seconds=0.5)
    ends: list[EndReason] = []
    session = Session(
        client, tier="standard", idle_timeout_seconds=IDLE_TIMEOUT_SECONDS, keeper=keeper, on_end=ends.append
    ).open()
    lease_id, fingerprint = session.lease_id, session.fingerprint
    assert lease_id is not None
    channel = grpc.intercept_channel(grpc.insecure_channel(server.target), session.interceptor())
    calls = CallLoop(channel)
    direct = AuthorityClient(second.target, principal="svc-holder", timeout_seconds=5)
    try:
        time.sleep(1.0)
        calls_before_kill = len(calls.codes)
        batches_before_kill = keeper.stats.batches_sent
        first.kill()
        killed_at = time.monotonic()
        states = []
        while time.monotonic() < killed_at + RUN_AFTER_KILL_SECONDS:
            states.append(session.state)
            time.sleep(0.05)
        calls.stop_calls()
        batches_after_kill = keeper.stats.batches_sent - batches_before_kill
        fingerprint_after_kill = session.fingerprint
        on_second = direct.time_to_live(lease_id)
        stream_open = calls.stream_error is None
        replies_before_revoke = calls.stream_replies

        # The enforcer's watch must now be on the second replica, so a revoke there cuts the stream off.
        revoked = direct.revoke(lease_id)
        revoked_at = time.monotonic()
        while calls.stream_error is None and time.monotonic() < revoked_at + 5.0:
            time.sleep(0.01)
        cut_off_after = time.monotonic() - revoked_at
        while not ends and time.monotonic() < revoked_at + 5.0:
            time.sleep(0.01)
        records = wait_for_end_records(replicas, {on_second.digest})
    finally:
        calls.stop()
        channel.close()
        session.close()
        keeper.close()
        client.close()
        direct.close()
        server.stop()

    print(
        f"{kind} enforcer: {len(calls.codes) - calls_before_kill} calls after the kill; holder:"
        f" {batches_after_kill} renewal batches after the kill, {keeper.stats.renewals_failed} failed;"
        f" stream cut off {cut_off_after * 1e3:.1f} ms after the revoke returned"
    )
    assert granted_by(replicas, on_second.digest) == [first.replica_id], "the holder did not start on the first replica"
    assert calls_before_kill > 0
    assert set(calls.codes) == {grpc.StatusCode.OK}, f"call outcomes: {calls.codes}"
    assert stream_open, f"the stream through the enforcer broke at the failover: {calls.stream_error}"
    assert replies_before_revoke > 0
    assert set(states) == {SessionState.ALIVE}
    assert batches_after_kill > 0, "the holder sent no renewal after the kill"
    assert fingerprint_after_kill == fingerprint
    assert on_second.state is LeaseState.ALIVE
    assert on_second.idle_for_seconds < IDLE_TIMEOUT_SECONDS / 2
    assert not revoked.already_ended
    assert calls.stream_error is not None and calls.stream_error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert ends == [EndReason.REVOKED]
    assert [replica_id for replica_id, _ in records.get(on_second.digest, [])] == [second.replica_id]
    assert verify_audit_logs(replicas) == {}

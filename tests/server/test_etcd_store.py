"""The etcd lease store and two authority replicas sharing it, against a real single-member etcd."""

from __future__ import annotations

import asyncio
import dataclasses
import concurrent.futures
import json
import logging
import os
import pathlib
import queue
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import grpc
import pytest
from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

from session_authority.server import (
    AuthorityConfig,
    AuthorityThread,
    EndReason,
    InsecureDevAuthenticator,
    LeaseTable,
    ManualClock,
    Policy,
    StoreError,
    parse_policy,
)
from session_authority.server._etcd_store import DEFAULT_PREFIX as DEFAULT_ETCD_PREFIX
from session_authority.server._etcd_store import EndClaim, EtcdLeaseStore, MirroredLease, encode_lease, redact_userinfo
from session_authority.server._main import build_config, build_parser
from session_authority.server._store import StoredLease
from session_authority.server._table import LeaseRecord, SessionEnd
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

ETCD = shutil.which("etcd")
if ETCD is None and not os.environ.get("CI"):
    pytest.skip("etcd is not on PATH; install it (Debian package etcd-server) to run these tests", allow_module_level=True)

START_TIMEOUT_SECONDS = 30.0
EVENT_TIMEOUT_SECONDS = 10.0
REVOKED = 3
IDLE_TIMEOUT = 1

POLICY = parse_policy(
    """
version = 1
default_tier = "standard"
[tiers.standard]
idle_timeout = "30s"
max_duration = "300s"
"""
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EtcdMember:
    """One etcd on 127.0.0.1 with free ports and a data directory under ``work_dir``; restartable."""

    def __init__(self, work_dir: pathlib.Path) -> None:
        assert ETCD is not None, "etcd is not on PATH; install it (Debian package etcd-server)"
        self.work_dir = work_dir
        self.client_port = free_port()
        self.peer_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def start(self) -> EtcdMember:
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        command = [
            ETCD,
            "--name", "test",
            "--data-dir", str(self.work_dir / "etcd-data"),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
        ]  # fmt: skip
        with open(self.work_dir / "etcd.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with grpc.insecure_channel(f"127.0.0.1:{self.client_port}") as channel:
            kv = rpc_pb2_grpc.KVStub(channel)
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.process.returncode}; see {self.work_dir / 'etcd.log'}")
                try:
                    kv.Put(rpc_pb2.PutRequest(key=b"/ready", value=b"1"), timeout=1.0)
                    return
                except grpc.RpcError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def get(self, key: str) -> bytes | None:
        with grpc.insecure_channel(f"127.0.0.1:{self.client_port}") as channel:
            response = rpc_pb2_grpc.KVStub(channel).Range(rpc_pb2.RangeRequest(key=key.encode()), timeout=5.0)
        return response.kvs[0].value if response.kvs else None


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    member = EtcdMember(tmp_path_factory.mktemp("etcd")).start()
    yield member
    member.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A key prefix of the test's own, so tests sharing one etcd do not see each other's keys."""
    return f"/test/{request.node.name}/{time.monotonic_ns()}/"


class Changes:
    """A ReplicaListener that queues what the watch delivers."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, object]] = queue.Queue()

    def lease_stored(self, lease: MirroredLease) -> None:
        self.events.put(("stored", lease))

    def lease_ended(self, lease: MirroredLease) -> None:
        self.events.put(("ended", lease))

    def lease_deleted(self, digest: bytes) -> None:
        self.events.put(("deleted", digest))

    def next(self, kind: str, digest: bytes) -> object:
        deadline = time.monotonic() + EVENT_TIMEOUT_SECONDS
        while True:
            got_kind, value = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            value_digest = value if isinstance(value, bytes) else value.lease.digest  # type: ignore[attr-defined]
            if got_kind == kind and value_digest == digest:
                return value


def make_lease(number: int, *, granted_at: float = 1_000.0) -> StoredLease:
    return StoredLease(
        # The number leads, so that each lease has its own fingerprint.
        digest=number.to_bytes(6, "big") + bytes(26),
        principal="svc-a",
        tier="standard",
        idle_timeout=30.0,
        max_duration=300.0,
        granted_at=granted_at,
        granted_wall=1_767_225_600.0,
        last_activity=granted_at,
    )


def open_store(etcd: EtcdMember, prefix: str, replica_id: str, **kwargs: object) -> EtcdLeaseStore:
    return EtcdLeaseStore([etcd.endpoint], replica_id=replica_id, prefix=prefix, **kwargs)  # type: ignore[arg-type]


# -- the store ----------------------------------------------------------------


def test_grant_survives_reload(etcd: EtcdMember, prefix: str) -> None:
    lease = make_lease(1)
    first = open_store(etcd, prefix, "replica-a")
    first.save_grant(lease).result(10)
    first.set_high_water(2_000.0)
    first.flush(10)
    first.close()

    second = open_store(etcd, prefix, "replica-a")
    state = second.load_replica()
    second.close()

    assert [m.lease for m in state.leases] == [lease]
    assert state.leases[0].granted_by == "replica-a"
    assert state.high_water == 2_000.0


def test_grant_record_carries_version(etcd: EtcdMember, prefix: str) -> None:
    lease = make_lease(2)
    store = open_store(etcd, prefix, "replica-a")
    store.save_grant(lease).result(10)
    store.close()

    value = etcd.get(f"{prefix}leases/{lease.digest.hex()}")

    assert value is not None
    assert json.loads(value)["version"] == 1


def test_other_replica_sees_grant(etcd: EtcdMember, prefix: str) -> None:
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    changes = Changes()
    b.load_replica()
    b.start_watch(changes)
    lease = make_lease(3)

    a.save_grant(lease).result(10)
    seen = changes.next("stored", lease.digest)

    assert isinstance(seen, MirroredLease)
    assert seen.lease == lease
    assert seen.granted_by == "replica-a"
    a.close()
    b.close()


def test_exactly_one_replica_wins_end_claim(etcd: EtcdMember, prefix: str) -> None:
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    changes = Changes()
    b.load_replica()
    b.start_watch(changes)
    lease = make_lease(4)
    a.save_grant(lease).result(10)
    changes.next("stored", lease.digest)

    claim_a = a.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)
    claim_b = b.save_end(lease.digest, 1_011.0, 1_767_225_611.0, IDLE_TIMEOUT, "").result(10)
    seen = changes.next("ended", lease.digest)

    assert claim_a == EndClaim(won=True)
    assert claim_b.won is False
    assert claim_b.stored_end is not None
    assert claim_b.stored_end.claimed_by == "replica-a"
    assert claim_b.stored_end.lease.end_reason == REVOKED
    assert isinstance(seen, MirroredLease)
    assert seen.lease.revoked_by == "admin"
    a.close()
    b.close()


def test_claim_retried_after_commit_still_won(etcd: EtcdMember, prefix: str) -> None:
    # Two stores of one replica ID stand for one claim sent twice: the first
    # attempt commits, and the retry finds the end already claimed by itself.
    first = open_store(etcd, prefix, "replica-a")
    retry = open_store(etcd, prefix, "replica-a")
    changes = Changes()
    retry.load_replica()
    retry.start_watch(changes)
    lease = make_lease(14)
    first.save_grant(lease).result(10)
    changes.next("stored", lease.digest)

    committed = first.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)
    retried = retry.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)
    first.close()
    retry.close()

    assert committed == EndClaim(won=True)
    assert retried.won is True


def test_claim_leaves_pending_key_until_cleared(etcd: EtcdMember, prefix: str) -> None:
    store = open_store(etcd, prefix, "replica-a")
    lease = make_lease(5)
    store.save_grant(lease).result(10)
    store.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)
    pending_before = store.load_replica().audit_pending

    store.clear_audit_pending(lease.digest)
    store.flush(10)
    pending_after = store.load_replica().audit_pending
    store.close()

    assert pending_before == {lease.digest}
    assert pending_after == set()


def end_revisions(etcd: EtcdMember, prefix: str) -> list[int]:
    """Return the mod revision of every ``ends/`` key under ``prefix``, which is one revision per transaction."""
    start = f"{prefix}ends/".encode()
    with grpc.insecure_channel(f"127.0.0.1:{etcd.client_port}") as channel:
        response = rpc_pb2_grpc.KVStub(channel).Range(
            rpc_pb2.RangeRequest(key=start, range_end=start[:-1] + b"0"), timeout=5.0
        )
    return [kv.mod_revision for kv in response.kvs]


def claim_together(store: EtcdLeaseStore, leases: list[StoredLease]) -> list[EndClaim]:
    """Queue the end claims of ``leases`` in one callback on the store's loop, so none is sent before the last is queued."""

    async def queue_claims() -> list[concurrent.futures.Future[EndClaim]]:
        return [store.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin") for lease in leases]

    futures = asyncio.run_coroutine_threadsafe(queue_claims(), store._loop).result(10)
    return [future.result(10) for future in futures]


def grant_all(store: EtcdLeaseStore, leases: list[StoredLease]) -> None:
    for future in [store.save_grant(lease) for lease in leases]:
        future.result(10)


# etcd rejects one transaction of 130 claims (its limit is 128 operations,
# nested ones included), so those must go in two.
@pytest.mark.parametrize(
    ("count", "transactions"), [(5, 1), (130, 2)], ids=["together", "split-at-etcd-limit"]
)
def test_claims_queued_together_share_transactions(
    etcd: EtcdMember, prefix: str, count: int, transactions: int
) -> None:
    store = open_store(etcd, prefix, "replica-a")
    leases = [make_lease(number) for number in range(100, 100 + count)]
    grant_all(store, leases)

    claims = claim_together(store, leases)
    store.close()

    assert claims == [EndClaim(won=True)] * len(leases)
    revisions = end_revisions(etcd, prefix)
    assert len(revisions) == len(leases)
    assert len(set(revisions)) == transactions


def test_claims_retried_on_new_end_lease(etcd: EtcdMember, prefix: str) -> None:
    # The ends/ keys hang on a cached etcd lease. Once etcd has dropped it,
    # the batch fails with "requested lease not found" and goes again on a
    # new etcd lease.
    store = open_store(etcd, prefix, "replica-a")
    first, second = make_lease(50), make_lease(51)
    grant_all(store, [first, second])
    assert claim_together(store, [first]) == [EndClaim(won=True)]
    assert store._end_lease is not None
    with grpc.insecure_channel(f"127.0.0.1:{etcd.client_port}") as channel:
        rpc_pb2_grpc.LeaseStub(channel).LeaseRevoke(rpc_pb2.LeaseRevokeRequest(ID=store._end_lease[0]), timeout=5.0)

    claims = claim_together(store, [second])
    store.close()

    assert claims == [EndClaim(won=True)]
    assert etcd.get(f"{prefix}ends/{second.digest.hex()}") is not None


def grant_with_activity(store: EtcdLeaseStore, numbers: range, last_activity: float) -> list[StoredLease]:
    """Grant a lease per number and queue one activity time for each."""
    leases = [make_lease(number) for number in numbers]
    grant_all(store, leases)
    for lease in leases:
        store.save_activity(lease.digest, last_activity)
    return leases


def test_activity_of_many_leases_written(etcd: EtcdMember, prefix: str) -> None:
    # More renewals than etcd accepts in one transaction (128 operations,
    # nested ones included) must be split, or none of them lands.
    store = open_store(etcd, prefix, "replica-a")
    leases = grant_with_activity(store, range(300, 600), 1_005.0)

    store.flush(10)
    store.close()

    for lease in (leases[0], leases[127], leases[-1]):
        value = etcd.get(f"{prefix}leases/{lease.digest.hex()}")
        assert value is not None
        assert json.loads(value)["last_activity"] == 1_005.0


def test_flush_waits_for_write_behind_in_flight(etcd: EtcdMember, prefix: str) -> None:
    store = open_store(etcd, prefix, "replica-a")
    leases = grant_with_activity(store, range(700, 1000), 1_005.0)
    # Wait until the write-behind loop has taken the queue, so its writes are in flight.
    deadline = time.monotonic() + 5
    while store._pending_activity and time.monotonic() < deadline:
        time.sleep(0.0005)

    store.flush(10)
    values = [etcd.get(f"{prefix}leases/{lease.digest.hex()}") for lease in (leases[0], leases[-1])]
    store.close()

    assert [json.loads(value)["last_activity"] for value in values if value is not None] == [1_005.0, 1_005.0]


def test_grant_span_kept_in_etcd(etcd: EtcdMember, prefix: str) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    lease = dataclasses.replace(make_lease(8), grant_span=traceparent)
    a.save_grant(lease).result(10)
    a.save_activity(lease.digest, 1_005.0)
    a.flush(10)

    fetched = b.fetch(lease.digest).result(10)
    a.close()
    b.close()

    assert fetched is not None
    assert fetched.lease.grant_span == traceparent
    assert fetched.lease.last_activity == 1_005.0


def test_activity_never_recreates_ended_lease(etcd: EtcdMember, prefix: str) -> None:
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    lease = make_lease(6)
    a.save_grant(lease).result(10)
    # b learns the lease (and its create revision) by a read, and has no
    # watch, so it still holds the lease when a's claim deletes it.
    assert b.fetch(lease.digest).result(10) is not None
    a.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)

    b.save_activity(lease.digest, 1_020.0)
    b.flush(10)

    assert etcd.get(f"{prefix}leases/{lease.digest.hex()}") is None
    assert etcd.get(f"{prefix}ends/{lease.digest.hex()}") is not None
    a.close()
    b.close()


def test_activity_is_written_with_later_time(etcd: EtcdMember, prefix: str) -> None:
    store = open_store(etcd, prefix, "replica-a")
    lease = make_lease(7)
    store.save_grant(lease).result(10)

    store.save_activity(lease.digest, 1_005.0)
    store.save_activity(lease.digest, 1_003.0)
    store.flush(10)
    value = etcd.get(f"{prefix}leases/{lease.digest.hex()}")
    store.close()

    assert value is not None
    assert json.loads(value)["last_activity"] == 1_005.0


def test_fetch_returns_end_of_ended_lease(etcd: EtcdMember, prefix: str) -> None:
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    lease = make_lease(8)
    a.save_grant(lease).result(10)
    a.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10)

    fetched = b.fetch(lease.digest).result(10)
    missing = b.fetch(make_lease(9).digest).result(10)

    assert fetched is not None
    assert fetched.lease.ended_at == 1_010.0
    assert missing is None
    a.close()
    b.close()


def test_store_rides_out_etcd_restart(tmp_path: pathlib.Path) -> None:
    member = EtcdMember(tmp_path).start()
    try:
        store = EtcdLeaseStore([member.endpoint], replica_id="replica-a", request_timeout_seconds=2.0)
        lease = make_lease(10)
        store.save_grant(lease).result(10)
        member.stop()

        with pytest.raises(StoreError, match=rf"^etcd at {re.escape(member.endpoint)} did not store the grant of lease"):
            store.save_grant(make_lease(11)).result(10)
        store.save_activity(lease.digest, 1_050.0)
        member.start()
        store.flush(20)
        value = member.get(f"/session-authority/v1/leases/{lease.digest.hex()}")
        store.close()
    finally:
        member.stop()

    assert value is not None
    assert json.loads(value)["last_activity"] == 1_050.0


def test_grant_retry_accepts_own_committed_record(etcd: EtcdMember, prefix: str) -> None:
    # The record an earlier attempt committed before its reply was lost.
    lease = make_lease(13)
    key = f"{prefix}leases/{lease.digest.hex()}".encode()
    with grpc.insecure_channel(etcd.endpoint.removeprefix("http://")) as channel:
        rpc_pb2_grpc.KVStub(channel).Put(rpc_pb2.PutRequest(key=key, value=encode_lease(lease, "replica-a")), timeout=5.0)
    store = open_store(etcd, prefix, "replica-a")

    store.save_grant(lease).result(10)
    store.save_activity(lease.digest, 1_007.0)
    store.flush(10)
    value = etcd.get(key.decode())
    store.close()

    assert value is not None
    assert json.loads(value)["last_activity"] == 1_007.0


def test_grant_rejects_other_replicas_record(etcd: EtcdMember, prefix: str) -> None:
    lease = make_lease(14)
    other = open_store(etcd, prefix, "replica-b")
    other.save_grant(lease).result(10)
    other.close()
    store = open_store(etcd, prefix, "replica-a")

    with pytest.raises(StoreError, match=rf"^lease {lease.digest[:6].hex()} already exists in etcd"):
        store.save_grant(lease).result(10)
    store.close()


def test_close_logs_no_traceback(etcd: EtcdMember, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    store = open_store(etcd, prefix, "replica-a")
    changes = Changes()
    store.load_replica()
    store.start_watch(changes)
    lease = make_lease(15)
    store.save_grant(lease).result(10)
    changes.next("stored", lease.digest)
    caplog.clear()

    with caplog.at_level(logging.DEBUG):
        store.close()

    assert [record.getMessage() for record in caplog.records if "Traceback" in record.getMessage()] == []
    assert [record.getMessage() for record in caplog.records if record.exc_info] == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_store_rejects_endpoint_with_password() -> None:
    with pytest.raises(ValueError, match=r"^etcd endpoint 'http://\*\*\*@127\.0\.0\.1:2379' contains a user name") as raised:
        EtcdLeaseStore(["http://admin:s3cret@127.0.0.1:2379"], replica_id="replica-a")

    assert "s3cret" not in str(raised.value)


def test_closed_store_rejects_grant(etcd: EtcdMember, prefix: str) -> None:
    store = open_store(etcd, prefix, "replica-a")
    store.close()

    with pytest.raises(StoreError, match="is closed"):
        store.save_grant(make_lease(12)).result(10)


# -- two authority replicas ------------------------------------------------------


def start_replica(
    etcd: EtcdMember, prefix: str, replica_id: str, data_dir: pathlib.Path, *, policy: Policy = POLICY
) -> AuthorityThread:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=policy,
        data_dir=data_dir,
        admin_everyone=True,
        store="etcd",
        etcd_endpoints=(etcd.endpoint,),
        replica_id=replica_id,
        etcd_prefix=prefix,
        heartbeat_interval_seconds=0.2,
    )
    return AuthorityThread(config).start()


def audit_records(directory: pathlib.Path, type: str, fingerprint: str) -> list[dict[str, object]]:
    records = []
    for path in sorted(directory.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == type and record.get("fingerprint") == fingerprint:
                records.append(record)
    return records


def test_revoke_reaches_other_replica_watch(etcd: EtcdMember, prefix: str, tmp_path: pathlib.Path) -> None:
    a = start_replica(etcd, prefix, "replica-a", tmp_path / "a")
    b = start_replica(etcd, prefix, "replica-b", tmp_path / "b")
    channel_a, channel_b = grpc.insecure_channel(a.target), grpc.insecure_channel(b.target)
    stub_a, stub_b = pb_grpc.SessionAuthorityStub(channel_a), pb_grpc.SessionAuthorityStub(channel_b)
    try:
        granted = stub_a.Grant(pb.GrantRequest(principal="svc-a"), timeout=10)
        watch = stub_a.WatchSessionEnds(pb.WatchSessionEndsRequest(), timeout=30)
        assert next(watch).HasField("heartbeat")

        renewed = stub_b.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)]), timeout=10)
        revoked = stub_b.Revoke(pb.RevokeRequest(lease_id=granted.lease_id), timeout=10)
        end = next(message.end for message in watch if message.HasField("end"))
        watch.cancel()
        checked_on_a = stub_a.TimeToLive(pb.TimeToLiveRequest(lease_id=granted.lease_id), timeout=10)
    finally:
        channel_a.close()
        channel_b.close()
        a.stop()
        b.stop()

    fingerprint = granted.lease.fingerprint
    assert renewed.leases[0].state == pb.LEASE_STATE_ALIVE
    assert revoked.already_ended is False
    assert end.lease.fingerprint == fingerprint
    assert end.lease.end_reason == pb.END_REASON_REVOKED
    assert checked_on_a.lease.state == pb.LEASE_STATE_ENDED
    ends = audit_records(tmp_path / "a" / "audit", "end", fingerprint) + audit_records(
        tmp_path / "b" / "audit", "end", fingerprint
    )
    assert len(ends) == 1
    assert len(audit_records(tmp_path / "b" / "audit", "end", fingerprint)) == 1
    assert len(audit_records(tmp_path / "a" / "audit", "grant", fingerprint)) == 1
    assert audit_records(tmp_path / "b" / "audit", "grant", fingerprint) == []


def test_revoke_clears_pending_audit_key(etcd: EtcdMember, prefix: str, tmp_path: pathlib.Path) -> None:
    a = start_replica(etcd, prefix, "replica-a", tmp_path / "a")
    with grpc.insecure_channel(a.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=10)
        stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id), timeout=10)
    a.stop()

    digest_hex = granted.lease.digest
    pending = etcd.get(f"{prefix}audit-pending/replica-a/{digest_hex}")

    assert pending is None
    assert len(audit_records(tmp_path / "a" / "audit", "end", granted.lease.fingerprint)) == 1


def test_restart_writes_own_pending_ends(
    etcd: EtcdMember, prefix: str, tmp_path: pathlib.Path
) -> None:
    own, other = make_lease(20), make_lease(21)
    for replica_id, lease in (("replica-a", own), ("replica-b", other)):
        store = open_store(etcd, prefix, replica_id)
        store.save_grant(lease).result(10)
        # The claim lands, but this replica stops before any audit record is written.
        assert store.save_end(lease.digest, 1_010.0, 1_767_225_610.0, REVOKED, "admin").result(10).won
        store.close()

    a = start_replica(etcd, prefix, "replica-a", tmp_path / "a")
    a.authority.flush(10)
    a.stop()

    own_fingerprint, other_fingerprint = own.digest[:6].hex(), other.digest[:6].hex()
    assert len(audit_records(tmp_path / "a" / "audit", "end", own_fingerprint)) == 1
    # The audit directory is new and the lease was granted before its chain
    # began, so its grant record belongs to an earlier chain.
    assert audit_records(tmp_path / "a" / "audit", "grant", own_fingerprint) == []
    assert audit_records(tmp_path / "a" / "audit", "end", other_fingerprint) == []
    assert audit_records(tmp_path / "a" / "audit", "grant", other_fingerprint) == []
    assert etcd.get(f"{prefix}audit-pending/replica-a/{own.digest.hex()}") is None
    assert etcd.get(f"{prefix}audit-pending/replica-b/{other.digest.hex()}") == b""


def test_idle_end_audited_once_across_replicas(etcd: EtcdMember, prefix: str, tmp_path: pathlib.Path) -> None:
    short = parse_policy(
        """
version = 1
default_tier = "short"
[tiers.short]
idle_timeout = "1s"
max_duration = "60s"
"""
    )
    a = start_replica(etcd, prefix, "replica-a", tmp_path / "a", policy=short)
    b = start_replica(etcd, prefix, "replica-b", tmp_path / "b", policy=short)
    channel_a, channel_b = grpc.insecure_channel(a.target), grpc.insecure_channel(b.target)
    try:
        granted = pb_grpc.SessionAuthorityStub(channel_a).Grant(pb.GrantRequest(principal="svc-a"), timeout=10)
        watch = pb_grpc.SessionAuthorityStub(channel_b).WatchSessionEnds(pb.WatchSessionEndsRequest(), timeout=30)
        end = next(message.end for message in watch if message.HasField("end"))
        watch.cancel()
    finally:
        channel_a.close()
        channel_b.close()
        a.stop()
        b.stop()

    fingerprint = granted.lease.fingerprint
    assert end.lease.fingerprint == fingerprint
    assert end.lease.end_reason == pb.END_REASON_IDLE_TIMEOUT
    ends = audit_records(tmp_path / "a" / "audit", "end", fingerprint) + audit_records(
        tmp_path / "b" / "audit", "end", fingerprint
    )
    assert len(ends) == 1
    assert etcd.get(f"{prefix}audit-pending/replica-a/{granted.lease.digest}") is None
    assert etcd.get(f"{prefix}audit-pending/replica-b/{granted.lease.digest}") is None


# -- the mirror's time rule -------------------------------------------------------


def mirrored_record(digest: bytes, granted_at: float, last_activity: float) -> LeaseRecord:
    return LeaseRecord(
        digest=digest,
        principal="svc-a",
        tier="standard",
        idle_timeout=30.0,
        max_duration=300.0,
        granted_at=granted_at,
        granted_wall=1_767_225_600.0,
        last_activity=last_activity,
    )


def test_mirror_caps_stored_times_at_arrival() -> None:
    clock = ManualClock(monotonic_start=1_000.0)
    table = LeaseTable(clock)
    digest = make_lease(30).digest

    # A replica whose clock runs 5 s ahead stored these times.
    table.mirror_stored(mirrored_record(digest, 1_005.0, 1_005.0), arrived_at=1_000.0)
    lease = table.lookup_digest(digest)

    assert lease.granted_at == 1_000.0
    assert lease.last_activity == 1_000.0
    assert lease.ttl == 30.0


def test_mirror_moves_last_activity_forward_only() -> None:
    clock = ManualClock(monotonic_start=1_000.0)
    table = LeaseTable(clock)
    digest = make_lease(31).digest
    table.mirror_stored(mirrored_record(digest, 1_000.0, 1_000.0), arrived_at=1_000.0)
    clock.advance(10)
    table.mirror_stored(mirrored_record(digest, 1_000.0, 1_008.0), arrived_at=1_010.0)

    table.mirror_stored(mirrored_record(digest, 1_000.0, 1_004.0), arrived_at=1_010.0)
    lease = table.lookup_digest(digest)

    assert lease.last_activity == 1_008.0


def test_mirror_end_reports_decided_elsewhere() -> None:
    clock = ManualClock(monotonic_start=1_000.0)
    table = LeaseTable(clock)
    ends: list[SessionEnd] = []

    class Listener:
        def on_grant(self, lease: object) -> None:
            raise AssertionError("a mirrored lease is not a grant of this replica")

        def on_end(self, end: SessionEnd) -> None:
            ends.append(end)

    table.add_listener(Listener())
    digest = make_lease(32).digest
    record = mirrored_record(digest, 1_000.0, 1_000.0)
    record.granted_here = False
    table.mirror_stored(record, arrived_at=1_000.0)
    ended = mirrored_record(digest, 1_000.0, 1_000.0)
    ended.end_reason = EndReason.REVOKED
    ended.ended_at = 1_002.0
    ended.ended_wall = 1_767_225_602.0
    ended.revoked_by = "admin"

    table.mirror_ended(ended, arrived_at=1_001.0)

    assert len(ends) == 1
    assert ends[0].decided_elsewhere is True
    assert ends[0].granted_here is False
    assert ends[0].ended_at == 1_001.0
    assert ends[0].lease.end_reason is EndReason.REVOKED
    assert ends[0].lease.revoked_by == "admin"
    assert ends[0].lease.ended_wall == 1_767_225_602.0


# -- the watch -------------------------------------------------------------------


def test_watch_reloads_after_compaction(etcd: EtcdMember, prefix: str) -> None:
    a = open_store(etcd, prefix, "replica-a")
    b = open_store(etcd, prefix, "replica-b")
    changes = Changes()
    b.load_replica()
    lease = make_lease(40)
    a.save_grant(lease).result(10)
    with grpc.insecure_channel(etcd.endpoint.removeprefix("http://")) as channel:
        kv = rpc_pb2_grpc.KVStub(channel)
        # A write after the grant, so the compaction removes the grant's revision too.
        revision = kv.Put(rpc_pb2.PutRequest(key=b"/ready", value=b"1"), timeout=5.0).header.revision
        kv.Compact(rpc_pb2.CompactionRequest(revision=revision, physical=True), timeout=5.0)

    # b's watch starts after its start-up read, a revision etcd has compacted away.
    b.start_watch(changes)
    seen = changes.next("stored", lease.digest)

    assert isinstance(seen, MirroredLease)
    assert seen.lease == lease
    a.close()
    b.close()


def test_watch_reports_lease_deleted_by_hand(etcd: EtcdMember, prefix: str) -> None:
    store = open_store(etcd, prefix, "replica-a")
    changes = Changes()
    store.load_replica()
    store.start_watch(changes)
    lease = make_lease(41)
    store.save_grant(lease).result(10)
    changes.next("stored", lease.digest)

    with grpc.insecure_channel(etcd.endpoint.removeprefix("http://")) as channel:
        rpc_pb2_grpc.KVStub(channel).DeleteRange(
            rpc_pb2.DeleteRangeRequest(key=f"{prefix}leases/{lease.digest.hex()}".encode()), timeout=5.0
        )
    deleted = changes.next("deleted", lease.digest)
    store.close()

    assert deleted == lease.digest


# -- a replica while etcd is down ---------------------------------------------------


def test_replica_without_etcd_renews_but_rejects_grants(tmp_path: pathlib.Path) -> None:
    member = EtcdMember(tmp_path).start()
    replica = start_replica(member, DEFAULT_ETCD_PREFIX, "replica-a", tmp_path / "a")
    channel = grpc.insecure_channel(replica.target)
    stub = pb_grpc.SessionAuthorityStub(channel)
    try:
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=10)
        member.stop()

        with pytest.raises(grpc.RpcError) as rejected:
            stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=10)
        renewed = stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)]), timeout=10)
        member.start()
        replica.authority.flush(20)
        value = member.get(f"{DEFAULT_ETCD_PREFIX}leases/{granted.lease.digest}")
    finally:
        channel.close()
        replica.stop()
        member.stop()

    assert rejected.value.code() == grpc.StatusCode.UNAVAILABLE
    assert member.endpoint in (rejected.value.details() or "")
    assert renewed.leases[0].state == pb.LEASE_STATE_ALIVE
    assert value is not None
    assert json.loads(value)["last_activity"] > json.loads(value)["granted_at"]


# -- serve flags --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--store", "etcd"], "--store etcd needs --etcd-endpoints"),
        (["--etcd-endpoints", "http://127.0.0.1:2379"], "--etcd-endpoints applies only to --store etcd"),
        (["--store", "sqlite", "--replica-id", "a"], "--replica-id applies only to --store etcd"),
    ],
)
def test_serve_rejects_inconsistent_store_flags(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = build_parser()
    args = parser.parse_args(["--insecure-dev", *flags])

    with pytest.raises(SystemExit) as exited:
        build_config(args, parser)

    assert exited.value.code == 2
    assert f"session-authority serve: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--etcd-endpoints", "127.0.0.1:2379"], "is not http://HOST:PORT or https://HOST:PORT"),
        (["--etcd-endpoints", "ftp://127.0.0.1:2379"], "is not http://HOST:PORT or https://HOST:PORT"),
        (["--etcd-endpoints", "https://127.0.0.1:2379,http://127.0.0.1:22379"], "mix http and https"),
        (
            ["--etcd-endpoints", "http://localhost:2379,http://localhost:22379"],
            "contain DNS names (localhost), which this store supports only as a single endpoint",
        ),
        (
            ["--etcd-endpoints", "http://etcd.example:2379,http://127.0.0.1:22379"],
            "contain DNS names (etcd.example), which this store supports only as a single endpoint",
        ),
        (["--etcd-endpoints", "http://127.0.0.1:2379,http://[::1]:22379"], "mix IPv4 and IPv6 addresses"),
        (["--etcd-endpoints", "http://127.0.0.1:99999"], "has port 99999, which is out of range 1-65535"),
        (["--etcd-endpoints", "http://127.0.0.1:0"], "has port 0, which is out of range 1-65535"),
        (["--etcd-endpoints", "http://admin:s3cret@127.0.0.1:2379"], "'http://***@127.0.0.1:2379' contains a user name"),
        (["--etcd-endpoints", "http://admin@127.0.0.1:2379"], "'http://***@127.0.0.1:2379' contains a user name"),
        (["--replica-id", "a/b"], "replica ID 'a/b' is invalid"),
        (["--etcd-prefix", "sessions"], "must start and end with '/'"),
        (["--etcd-prefix", "/"], "etcd prefix '/' covers every key that starts with '/'"),
    ],
)
def test_serve_names_bad_store_flag(flags: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--insecure-dev", "--store", "etcd", *flags])

    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert f"argument {flags[0]}" in error
    assert message in error
    assert "s3cret" not in error


def test_serve_builds_etcd_config() -> None:
    args = build_parser().parse_args(
        [
            "--insecure-dev",
            "--store", "etcd",
            "--etcd-endpoints", "http://127.0.0.1:2379, http://127.0.0.1:22379",
            "--replica-id", "replica-a",
            "--etcd-prefix", "/sessions/",
        ]
    )  # fmt: skip

    config = build_config(args)

    assert config.store == "etcd"
    assert config.etcd_endpoints == ("http://127.0.0.1:2379", "http://127.0.0.1:22379")
    assert config.replica_id == "replica-a"
    assert config.etcd_prefix == "/sessions/"


@pytest.mark.parametrize("endpoint", ["http://admin:s3cret@127.0.0.1:2379", "http://admin:s3/cret@127.0.0.1:2379"])
def test_redact_userinfo_hides_password(endpoint: str) -> None:
    assert redact_userinfo(endpoint) == "http://***@127.0.0.1:2379"


def test_failed_grant_record_withdrawn(etcd: EtcdMember, prefix: str) -> None:
    # A grant that failed for its caller but that etcd committed after all,
    # and one that was renewed meanwhile: only the untouched record goes.
    store = open_store(etcd, prefix, "replica-a")
    untouched, renewed = make_lease(30), make_lease(31)
    for lease in (untouched, renewed):
        store.save_grant(lease).result(10)
    etcd_values = {
        lease.digest: etcd.get(f"{prefix}leases/{lease.digest.hex()}") for lease in (untouched, renewed)
    }
    store.save_activity(renewed.digest, 1_005.0)
    store.flush(10)

    for lease in (untouched, renewed):
        key = f"{prefix}leases/{lease.digest.hex()}".encode()
        store._loop.call_soon_threadsafe(store._start_withdrawal, key, etcd_values[lease.digest], lease.digest)
    store.flush(10)
    store.close()

    assert etcd.get(f"{prefix}leases/{untouched.digest.hex()}") is None
    assert etcd.get(f"{prefix}leases/{renewed.digest.hex()}") is not None


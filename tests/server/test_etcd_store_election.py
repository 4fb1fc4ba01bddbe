"""The etcd lease store on a three-member etcd cluster while the leader dies or the quorum is lost."""

from __future__ import annotations

import logging
import pathlib
import re
from collections.abc import Iterator

import pytest

from etcd_cluster import EtcdCluster, etcd_binary
from session_authority.clients._client import AuthorityClient
from session_authority.clients._common import DEFAULT_TIMEOUT_SECONDS
from session_authority.clients._errors import AuthorityUnavailable
from session_authority.server import AuthorityConfig, AuthorityThread, InsecureDevAuthenticator, StoreError, parse_policy
from session_authority.server._etcd_store import REQUEST_TIMEOUT_SECONDS, EtcdLeaseStore
from session_authority.server._store import StoredLease

PREFIX = "/election-test/"

POLICY = parse_policy(
    """
version = 1
default_tier = "standard"
[tiers.standard]
idle_timeout = "30s"
max_duration = "300s"
"""
)


@pytest.fixture
def cluster(tmp_path: pathlib.Path) -> Iterator[EtcdCluster]:
    if etcd_binary() is None:
        pytest.skip("etcd is not on PATH; install it (Debian package etcd-server) to run these tests")
    running = EtcdCluster(3, tmp_path / "etcd").start()
    yield running
    running.stop()


def make_lease(number: int) -> StoredLease:
    return StoredLease(
        digest=number.to_bytes(6, "big") + bytes(26),
        principal="svc-a",
        tier="standard",
        idle_timeout=30.0,
        max_duration=300.0,
        granted_at=1_000.0,
        granted_wall=1_767_225_600.0,
        last_activity=1_000.0,
    )


def test_load_retries_through_leader_election(cluster: EtcdCluster, caplog: pytest.LogCaptureFixture) -> None:
    lease = make_lease(1)
    writer = EtcdLeaseStore(cluster.endpoints, replica_id="replica-a", prefix=PREFIX)
    writer.save_grant(lease).result(10)
    writer.close()
    cluster.kill(cluster.leader())

    # Started at once, so the read meets the election: etcd returns "leader changed" until it ends.
    store = EtcdLeaseStore(cluster.endpoints, replica_id="replica-b", prefix=PREFIX)
    try:
        state = store.load_replica()
    finally:
        store.close()

    assert [mirrored.lease for mirrored in state.leases] == [lease]
    retries = [record for record in caplog.records if "retrying" in record.getMessage()]
    for record in retries:
        assert record.levelno == logging.WARNING
        assert ",".join(cluster.endpoints) in record.getMessage()


def test_load_without_quorum_names_errors_seen(cluster: EtcdCluster) -> None:
    cluster.kill(cluster.members[0])
    cluster.kill(cluster.members[1])
    store = EtcdLeaseStore(
        cluster.endpoints,
        replica_id="replica-a",
        prefix=PREFIX,
        request_timeout_seconds=0.5,
        load_timeout_seconds=2.0,
    )

    try:
        with pytest.raises(StoreError) as raised:
            store.load_replica()
    finally:
        store.close()

    message = str(raised.value)
    assert message.startswith(f"etcd at {','.join(cluster.endpoints)} did not return the lease table within 2 s;")
    assert re.search(r"; \d+ attempts failed: \d+ with [A-Z_]+: ", message)
    assert "quorum" not in message


def test_grant_without_quorum_returns_unavailable(cluster: EtcdCluster, tmp_path: pathlib.Path) -> None:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=tmp_path / "replica-a",
        admin_everyone=True,
        store="etcd",
        etcd_endpoints=tuple(cluster.endpoints),
        replica_id="replica-a",
        etcd_prefix=PREFIX,
    )
    replica = AuthorityThread(config).start()
    client = AuthorityClient(replica.target, principal="svc-a")
    try:
        client.grant()
        cluster.kill(cluster.members[0])
        cluster.kill(cluster.members[1])

        with pytest.raises(AuthorityUnavailable) as raised:
            client.grant()
    finally:
        client.close()
        replica.stop()

    assert raised.value.code.name == "UNAVAILABLE"
    assert cluster.members[2].endpoint in raised.value.details


def test_request_timeout_below_client_default() -> None:
    assert REQUEST_TIMEOUT_SECONDS < DEFAULT_TIMEOUT_SECONDS


def test_repeated_revoke_without_quorum_not_confirmed(cluster: EtcdCluster, tmp_path: pathlib.Path) -> None:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=POLICY,
        data_dir=tmp_path / "replica-a",
        admin_everyone=True,
        store="etcd",
        etcd_endpoints=tuple(cluster.endpoints),
        replica_id="replica-a",
        etcd_prefix=PREFIX,
    )
    replica = AuthorityThread(config).start()
    client = AuthorityClient(replica.target, principal="svc-a")
    try:
        lease_id = client.grant().lease_id
        cluster.kill(cluster.members[0])
        cluster.kill(cluster.members[1])

        with pytest.raises(AuthorityUnavailable) as first:
            client.revoke(lease_id)
        # The lease already ended on this replica, but etcd has not committed
        # the end, so a repeat must not report success either.
        with pytest.raises(AuthorityUnavailable) as repeated:
            client.revoke(lease_id)

        cluster.restart(cluster.members[0])
        confirmed = client.revoke(lease_id)
    finally:
        client.close()
        replica.stop()

    assert "send it again" in first.value.details
    assert "send it again" in repeated.value.details
    assert confirmed.lease.state.name == "ENDED"

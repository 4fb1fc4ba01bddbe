"""The live-lease limit of a principal counts the leases of every replica, not only the replica's own."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Callable, Iterator

import pytest

from etcd_cluster import EtcdCluster
from policies import TEST_POLICY
from replication._replicas import ETCD_PREFIX, ReplicaProcess
from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import ResourceExhausted

MAX_LIVE = 2
PROPAGATION_BOUND_SECONDS = 5.0
"""Generous bound on the time a grant or an end on one replica takes to reach another's mirror."""


@pytest.fixture
def limited_replicas(tmp_path: pathlib.Path, etcd_cluster: EtcdCluster) -> Iterator[list[ReplicaProcess]]:
    """Two replicas whose policy allows each principal two live leases."""
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY.replace("max_live_leases_per_principal = 0", f"max_live_leases_per_principal = {MAX_LIVE}"))
    replicas = [
        ReplicaProcess(name, tmp_path, policy, etcd_cluster.endpoints_flag, ETCD_PREFIX) for name in ("replica-a", "replica-b")
    ]
    for replica in replicas:
        replica.launch()
    yield [replica.wait_until_serving() for replica in replicas]
    for replica in replicas:
        replica.kill()


def _eventually(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + PROPAGATION_BOUND_SECONDS
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def test_limit_counts_leases_of_other_replicas(limited_replicas: list[ReplicaProcess]) -> None:
    replica_a, replica_b = limited_replicas
    with (
        AuthorityClient(replica_a.target, principal="svc-a", timeout_seconds=5) as on_a,
        AuthorityClient(replica_b.target, principal="svc-a", timeout_seconds=5) as on_b,
        AuthorityClient(replica_b.target, principal="svc-other", timeout_seconds=5) as other_on_b,
    ):
        granted = [on_a.grant() for _ in range(MAX_LIVE)]

        def b_rejects() -> bool:
            # Each probe that gets through holds a slot too, so it is released at once.
            try:
                probe = on_b.grant()
            except ResourceExhausted:
                return True
            on_b.revoke(probe.lease_id, release=True)
            return False

        rejected_on_b = _eventually(b_rejects)
        with pytest.raises(ResourceExhausted) as caught:
            on_b.grant()
        other_principal = other_on_b.grant()
        on_a.revoke(granted[0].lease_id, release=True)
        freed_on_b = _eventually(lambda: not b_rejects())

    assert rejected_on_b
    assert f'principal "svc-a" has {MAX_LIVE} live leases, the maximum' in caught.value.details
    assert other_principal.lease.principal == "svc-other"
    assert freed_on_b

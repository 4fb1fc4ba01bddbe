"""The etcd leader killed while leases end: no lease outlives its max deadline, and each end is audited once.

Two replicas share a three-member etcd cluster. Leases of tier ``brief``
(1 s idle timeout, 2 s max duration) are granted through both. Half of
them are renewed through the other replica until their max duration, and
the rest end idle. The etcd leader is killed with SIGKILL shortly after the
grants, so the ends fall into the election or just after it.

While etcd takes no writes, the renewing replica cannot pass the activity
on, so the granting replica may end a renewed lease at its idle deadline.
That end is early, which the design accepts, so only a late end fails this test.

A replica ends a lease in its own table first and claims it in etcd after,
so every end must reach the watchers by its deadline plus a generous bound
even while etcd has no leader. The claim waits for the new leader, and then
exactly one replica writes the ``end`` audit record.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time

from etcd_cluster import EtcdCluster, EtcdMember
from replication._replicas import ETCD_PREFIX, EndWatcher, ReplicaFactory, verify_audit_logs, wait_for_end_records
from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import AuthorityUnavailable
from session_authority.clients._metadata import EndReason
from session_authority.clients._types import GrantedLease, LeaseState

LEASES = 20
END_BOUND_SECONDS = 1.0
"""Generous bound on how late after a lease's max deadline its end may reach a watcher. The p99 budget is 20 ms."""

GRANT_RETRY_SECONDS = 15.0
"""Maximum wait for a grant to succeed once the leader is gone, far above the election of about 1 s seen here."""

PENDING_TIMEOUT_SECONDS = 15.0


@dataclasses.dataclass
class Timed:
    """One lease and the local monotonic time by which its max deadline has passed."""

    lease_id: str
    digest: str
    cap_bound: float
    renewed: bool


def test_etcd_leader_loss_ends_audited_once(etcd_cluster: EtcdCluster, start_replicas: ReplicaFactory) -> None:
    replicas = start_replicas(2)
    clients = [AuthorityClient(replica.target, principal="svc-holder", timeout_seconds=5) for replica in replicas]
    watchers = [EndWatcher(replica).start() for replica in replicas]
    leases: list[Timed] = []
    renewal_failures = 0
    try:
        for index in range(LEASES):
            granted = clients[index % 2].grant("brief")
            leases.append(
                Timed(
                    lease_id=granted.lease_id,
                    digest=granted.lease.digest,
                    # The reply left the replica after it fixed the cap, so this is at or after the cap.
                    cap_bound=time.monotonic() + granted.lease.max_remaining_seconds,
                    renewed=index % 4 < 2,
                )
            )
        leader = etcd_cluster.leader()
        time.sleep(0.3)
        etcd_cluster.kill(leader)
        killed_at = time.monotonic()
        # Both waits run beside the renewals, so they time the election rather than the renewal loop.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2) as background:
            election = background.submit(wait_for_new_leader, etcd_cluster, killed_at)
            first_grant = background.submit(grant_when_available, clients[0], killed_at)

            # Renew half of the leases through the replica that did not grant them, until their max duration.
            renewed = [(index, lease) for index, lease in enumerate(leases) if lease.renewed]
            while time.monotonic() < max(lease.cap_bound for _, lease in renewed):
                for index, lease in renewed:
                    try:
                        clients[(index + 1) % 2].renew([(lease.lease_id, 0.0)])
                    except AuthorityUnavailable:
                        renewal_failures += 1
                time.sleep(0.25)

            new_leader, elected_after = election.result()
            grant_after, failed_grants, granted_after_kill = first_grant.result()
        revoked = clients[1].revoke(granted_after_kill.lease_id)

        digests = {lease.digest for lease in leases} | {granted_after_kill.lease.digest}
        missing_ends = {watcher.replica_id: watcher.wait_for(digests, 5.0) for watcher in watchers}
        etcd_cluster.restart(leader)
        records = wait_for_end_records(replicas, digests)
        pending = wait_for_no_pending_claims(etcd_cluster)
        states = {clients[0].time_to_live(lease.lease_id).state for lease in leases}
    finally:
        for watcher in watchers:
            watcher.stop()
        for client in clients:
            client.close()

    print(
        f"etcd leader {leader.name} killed: {new_leader.name} elected {elected_after:.2f} s later;"
        f" the first grant succeeded {grant_after:.2f} s after the kill, after {failed_grants} failed;"
        f" {renewal_failures} renewals failed"
    )
    for watcher in watchers:
        seen = [lease for lease in leases if lease.digest in watcher.ends]
        lateness = [watcher.ends[lease.digest].arrived_at - lease.cap_bound for lease in seen]
        renewed_reasons = collections.Counter(reason_name(watcher.ends[lease.digest].reason) for lease in seen if lease.renewed)
        print(
            f"ends seen on {watcher.replica_id}: latest {max(lateness, default=0.0) * 1e3:+.1f} ms from the max deadline;"
            f" renewed leases ended for {dict(renewed_reasons)}"
        )

    assert new_leader is not leader
    assert grant_after < GRANT_RETRY_SECONDS
    assert not revoked.already_ended
    assert missing_ends == {watcher.replica_id: set() for watcher in watchers}
    for watcher in watchers:
        late_ends = [
            lease.digest[:12] for lease in leases if watcher.ends[lease.digest].arrived_at > lease.cap_bound + END_BOUND_SECONDS
        ]
        assert late_ends == [], f"leases that outlived their max deadline by over {END_BOUND_SECONDS} s on {watcher.replica_id}"
        reasons = {watcher.ends[lease.digest].reason for lease in leases}
        assert reasons <= {EndReason.IDLE_TIMEOUT, EndReason.MAX_DURATION}
        assert watcher.repeated == []
    assert states == {LeaseState.ENDED}
    counts = {digest: len(records.get(digest, [])) for digest in digests}
    assert sorted(set(counts.values())) == [1], f"end records per lease: {counts}"
    assert verify_audit_logs(replicas) == {}
    assert pending == []


def reason_name(reason: EndReason | None) -> str:
    return reason.value if reason is not None else "unknown"


def wait_for_new_leader(etcd_cluster: EtcdCluster, since: float) -> tuple[EtcdMember, float]:
    """Wait until the running members agree on a leader, and return it with the time since ``since``."""
    leader = etcd_cluster.leader()
    return leader, time.monotonic() - since


def grant_when_available(client: AuthorityClient, since: float) -> tuple[float, int, GrantedLease]:
    """Grant until the replica can write to etcd again.

    Returns:
        The time from ``since`` to the successful grant, the number of
        grants that failed before it, and the lease.
    """
    deadline = since + GRANT_RETRY_SECONDS
    failed = 0
    while True:
        try:
            granted = client.grant("standard", timeout_seconds=2)
            return time.monotonic() - since, failed, granted
        except AuthorityUnavailable:
            failed += 1
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def wait_for_no_pending_claims(etcd_cluster: EtcdCluster) -> list[bytes]:
    """Wait until no ``audit-pending/`` key is left under the test prefix, and return the keys left at the timeout."""
    deadline = time.monotonic() + PENDING_TIMEOUT_SECONDS
    while True:
        pending = etcd_cluster.keys(f"{ETCD_PREFIX}audit-pending/".encode())
        if not pending or time.monotonic() > deadline:
            return pending
        time.sleep(0.1)


"""The etcd cluster harness itself: three members elect a leader, survive its death and take it back."""

from __future__ import annotations

from etcd_cluster import EtcdCluster


def test_cluster_elects_new_leader_after_kill(etcd_cluster: EtcdCluster) -> None:
    leader = etcd_cluster.leader()

    etcd_cluster.kill(leader)
    successor = etcd_cluster.leader()

    assert successor is not leader
    assert successor.running
    assert not leader.running


def test_cluster_restarted_member_rejoins(etcd_cluster: EtcdCluster) -> None:
    member = etcd_cluster.members[0]
    etcd_cluster.kill(member)

    etcd_cluster.restart(member)
    revision = etcd_cluster.put(member, b"/harness-test/key", b"value")

    assert member.running
    assert revision > 0
    assert etcd_cluster.keys(b"/harness-test/") == [b"/harness-test/key"]

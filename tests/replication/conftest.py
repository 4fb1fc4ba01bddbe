"""Fixtures of the replication tests: a three-member etcd cluster and authority replicas on it.

Without the ``etcd`` executable the tests skip, unless the environment
variable ``CI`` is set: CI installs etcd, so there a missing one fails them.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterator

import pytest

from etcd_cluster import EtcdCluster, etcd_binary
from policies import TEST_POLICY
from replication._replicas import ETCD_PREFIX, ReplicaFactory, ReplicaProcess


@pytest.fixture
def etcd_cluster(tmp_path: pathlib.Path) -> Iterator[EtcdCluster]:
    """A three-member etcd cluster on loopback, stopped after the test."""
    if etcd_binary() is None:
        reason = "etcd is not on PATH; install it (Debian: apt-get install etcd-server) to run the replication tests"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    cluster = EtcdCluster(3, tmp_path / "etcd").start()
    yield cluster
    cluster.stop()


@pytest.fixture
def start_replicas(tmp_path: pathlib.Path, etcd_cluster: EtcdCluster) -> Iterator[ReplicaFactory]:
    """Return a function that starts replicas ``replica-a``, ``replica-b``, ... on the cluster under one key prefix.

    Replicas started in one call start side by side. All are killed after the test.
    """
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    started: list[ReplicaProcess] = []

    def start(count: int) -> list[ReplicaProcess]:
        replicas = []
        for _ in range(count):
            replica_id = f"replica-{chr(ord('a') + len(started))}"
            replica = ReplicaProcess(replica_id, tmp_path, policy, etcd_cluster.endpoints_flag, ETCD_PREFIX)
            started.append(replica)
            replica.launch()
            replicas.append(replica)
        return [replica.wait_until_serving() for replica in replicas]

    yield start
    for replica in started:
        replica.kill()

"""A one- or three-member etcd cluster on loopback for tests, started from the ``etcd`` executable.

Each member listens on 127.0.0.1 only, on ports picked free a moment before
it starts, with its data directory and log under the caller's work directory.
The cluster bootstraps statically (``--initial-cluster``) with a 50 ms
heartbeat and a 500 ms election timeout, half of etcd's defaults (100 ms
and 1000 ms), so that a new leader is elected within about a second of a
leader's death.

Every member is a child of the test process, found and stopped by its PID
only. A finalizer kills any member still running when the cluster object is
collected or the interpreter exits, so a failed test leaves no etcd behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import secrets
import shutil
import signal
import socket
import subprocess
import time
import weakref
from types import ModuleType, TracebackType
from typing import Any

import grpc

from tls_support import Identity

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_MILLISECONDS = 50
ELECTION_TIMEOUT_MILLISECONDS = 500
START_TIMEOUT_SECONDS = 30.0
"""Maximum wait for a started or restarted member to serve and for the cluster to accept a write."""

START_ATTEMPTS = 3
"""Start attempts, each on fresh ports, before giving up; a new attempt helps when another process took a picked port."""

HEALTH_KEY = b"/etcd-cluster-health"
"""Key written to check that the cluster commits writes; outside any prefix that the tests use."""

ADDRESS_IN_USE = "address already in use"


def etcd_binary() -> str | None:
    """Return the path of the ``etcd`` executable on PATH, or None."""
    return shutil.which("etcd")


def load_etcd_stubs() -> tuple[ModuleType, ModuleType]:
    """Return etcd's generated ``(rpc_pb2, rpc_pb2_grpc)`` modules, the ones the etcd store uses."""
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

    return rpc_pb2, rpc_pb2_grpc


@dataclasses.dataclass(frozen=True)
class EtcdTls:
    """Certificates of a cluster whose members serve https and require client certificates.

    Attributes:
        ca: CA bundle that signed the server and client certificates.
        server: Every member's certificate, which must contain 127.0.0.1.
        client: The certificate the cluster's own queries present.
    """

    ca: pathlib.Path
    server: Identity
    client: Identity


class EtcdClusterError(RuntimeError):
    """A member failed to start, or the cluster did not become healthy in time. The message contains the log tails."""


@dataclasses.dataclass
class EtcdMember:
    """One etcd member: its ports, files and process.

    Attributes:
        name: Member name, unique in the cluster (``member-0``, ...).
        client_port: Port of the client URL, where gRPC clients connect.
        peer_port: Port of the peer URL, for Raft traffic between members.
        data_dir: The member's data directory; kept across :meth:`EtcdCluster.restart`.
        log_path: File that receives the member's stdout and stderr.
        process: The running process, or None before the start and after a stop.
    """

    name: str
    client_port: int
    peer_port: int
    data_dir: pathlib.Path
    log_path: pathlib.Path
    process: subprocess.Popen[bytes] | None = None
    scheme: str = "http"

    @property
    def endpoint(self) -> str:
        """Client URL, as given to ``serve --etcd-endpoints``."""
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def target(self) -> str:
        """``host:port`` for a gRPC channel."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, characters: int = 3000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-characters:]


def _kill_processes(members: list[EtcdMember]) -> None:
    """Kill every member still running, by PID. It is the finalizer of :class:`EtcdCluster`."""
    for member in members:
        if member.running:
            assert member.process is not None
            os.kill(member.process.pid, signal.SIGKILL)
            member.process.wait()


def _pick_free_ports(count: int) -> list[int]:
    """Return ``count`` distinct loopback ports that were free a moment ago.

    etcd takes no port 0, so each port is bound here and released just before
    etcd binds it. The probe sockets stay open until all are picked, so no
    port is returned twice.
    """
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            probes.append(probe)
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class EtcdCluster:
    """A cluster of 1 or 3 etcd members on 127.0.0.1 with free ports, under ``work_dir``.

    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    Methods are meant for the test's own thread, and they block for as long as
    etcd takes, at most :data:`START_TIMEOUT_SECONDS` per wait.

    Args:
        members: Number of members, 1 or 3.
        work_dir: Directory for the members' data directories and logs; the
            caller removes it (pytest's ``tmp_path``).
        binary: Path of the ``etcd`` executable; None looks it up on PATH.
        tls: Serve clients over https and require client certificates;
            None serves plain http. Peers always talk plain http on loopback.

    Raises:
        ValueError: ``members`` is not 1 or 3.
        FileNotFoundError: ``etcd`` is not on PATH and no binary was given.
    """

    def __init__(
        self, members: int, work_dir: pathlib.Path, *, binary: str | None = None, tls: EtcdTls | None = None
    ) -> None:
        if members not in (1, 3):
            raise ValueError(f"members must be 1 or 3 (a quorum that survives one death needs 3), got {members!r}")
        found = binary or etcd_binary()
        if found is None:
            raise FileNotFoundError("etcd is not on PATH. Install it (Debian: apt-get install etcd-server)")
        self.binary = found
        self.size = members
        self.work_dir = work_dir
        self.tls = tls
        self.members: list[EtcdMember] = []
        self._token = f"test-{secrets.token_hex(4)}"
        self._pb, self._pb_grpc = load_etcd_stubs()
        self._finalizer = weakref.finalize(self, _kill_processes, self.members)

    # -- addresses -----------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """Client URLs of all members, in member order, running or not."""
        return [member.endpoint for member in self.members]

    @property
    def endpoints_flag(self) -> str:
        """The value of ``serve --etcd-endpoints``: every client URL, comma-separated."""
        return ",".join(self.endpoints)

    # -- life cycle ----------------------------------------------------------

    def start(self) -> EtcdCluster:
        """Start every member and wait until the cluster has a leader and commits a write.

        A member that fails to bind its picked port (another process took it
        in between) makes the whole cluster start again on fresh ports, up to
        :data:`START_ATTEMPTS` times.

        Raises:
            EtcdClusterError: A member exited or the cluster stayed unhealthy;
                the message contains the members' log tails.
        """
        self.work_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, START_ATTEMPTS + 1):
            self._create_members(attempt)
            for member in self.members:
                self._launch(member)
            try:
                self._wait_healthy(self.members)
                return self
            except EtcdClusterError as exc:
                clash = any(ADDRESS_IN_USE in member.log_tail() for member in self.members)
                self.stop()
                if not clash or attempt == START_ATTEMPTS:
                    raise
                logger.info("etcd port clash on start attempt %d, retrying on fresh ports: %s", attempt, exc)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _create_members(self, attempt: int) -> None:
        ports = _pick_free_ports(2 * self.size)
        self.members.clear()
        for index in range(self.size):
            name = f"member-{index}"
            self.members.append(
                EtcdMember(
                    name=name,
                    client_port=ports[2 * index],
                    peer_port=ports[2 * index + 1],
                    data_dir=self.work_dir / f"etcd-{attempt}-{name}",
                    log_path=self.work_dir / f"etcd-{attempt}-{name}.log",
                    scheme="https" if self.tls is not None else "http",
                )
            )

    def _launch(self, member: EtcdMember) -> None:
        initial_cluster = ",".join(f"{other.name}={other.peer_url}" for other in self.members)
        command = [
            self.binary,
            "--name", member.name,
            "--data-dir", str(member.data_dir),
            "--listen-client-urls", member.endpoint,
            "--advertise-client-urls", member.endpoint,
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial_cluster,
            "--initial-cluster-token", self._token,
            # etcd ignores the state once the data directory contains a member, so a restart rejoins.
            "--initial-cluster-state", "new",
            "--heartbeat-interval", str(HEARTBEAT_INTERVAL_MILLISECONDS),
            "--election-timeout", str(ELECTION_TIMEOUT_MILLISECONDS),
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self.tls is not None:
            command += [
                "--cert-file", str(self.tls.server.cert),
                "--key-file", str(self.tls.server.key),
                "--trusted-ca-file", str(self.tls.ca),
                "--client-cert-auth",
            ]  # fmt: skip
        with open(member.log_path, "ab") as log:
            member.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        logger.info("started etcd %s (pid %d) on %s", member.name, member.process.pid, member.endpoint)

    def kill(self, member: EtcdMember) -> None:
        """Kill one member with SIGKILL, as a crash would, and wait for it to exit."""
        if member.process is None or member.process.poll() is not None:
            raise EtcdClusterError(f"etcd {member.name} is not running, so it cannot be killed")
        os.kill(member.process.pid, signal.SIGKILL)
        member.process.wait()
        logger.info("killed etcd %s (pid %d)", member.name, member.process.pid)

    def restart(self, member: EtcdMember) -> None:
        """Start a stopped or killed member again on its ports and data directory, and wait until it serves.

        Raises:
            EtcdClusterError: The member is still running, exited again, or
                the cluster did not accept a write through it in time.
        """
        if member.running:
            raise EtcdClusterError(f"etcd {member.name} is still running. Kill it before restarting it")
        self._launch(member)
        self._wait_healthy([member])

    def stop(self) -> None:
        """Kill every running member with SIGKILL and wait for it to exit.

        The data is thrown away with the work directory, so nothing is gained
        by a graceful stop. SIGTERM would take seconds here: the last members
        to stop lose their quorum and wait for it before they exit.
        """
        _kill_processes(self.members)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    # -- queries -------------------------------------------------------------

    def status(self, member: EtcdMember, timeout_seconds: float = 1.0) -> Any:
        """Return the member's ``Maintenance.Status`` reply.

        Raises:
            grpc.RpcError: The member did not reply within ``timeout_seconds``.
        """
        with self._channel(member) as channel:
            stub = self._pb_grpc.MaintenanceStub(channel)
            return stub.Status(self._pb.StatusRequest(), timeout=timeout_seconds)

    def leader(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> EtcdMember:
        """Return the member that is leader now, waiting through an election.

        The leader is the running member whose own ID is the leader ID that
        a running member reports.

        Raises:
            EtcdClusterError: No running member reported a leader within ``timeout_seconds``.
        """
        deadline = time.monotonic() + timeout_seconds
        while True:
            ids: dict[int, EtcdMember] = {}
            leader_ids: set[int] = set()
            for member in self.members:
                if not member.running:
                    continue
                try:
                    reply = self.status(member)
                except grpc.RpcError:
                    continue
                ids[reply.header.member_id] = member
                if reply.leader:
                    leader_ids.add(reply.leader)
            # During an election two members may still name different leaders, so wait until they agree.
            if len(leader_ids) == 1:
                leader_id = leader_ids.pop()
                if leader_id in ids:
                    return ids[leader_id]
            if time.monotonic() > deadline:
                raise EtcdClusterError(
                    f"no etcd leader agreed on within {timeout_seconds:g} s (leader IDs reported: {sorted(leader_ids)})"
                    f"\n{self._log_tails()}"
                )
            time.sleep(0.05)

    def put(self, member: EtcdMember, key: bytes, value: bytes, timeout_seconds: float = 1.0) -> int:
        """Write one key through ``member`` and return the revision of the write."""
        with self._channel(member) as channel:
            stub = self._pb_grpc.KVStub(channel)
            reply = stub.Put(self._pb.PutRequest(key=key, value=value), timeout=timeout_seconds)
        return int(reply.header.revision)

    def keys(self, prefix: bytes, timeout_seconds: float = 2.0) -> list[bytes]:
        """Return every key under ``prefix``, read linearizably through the first running member."""
        member = next((member for member in self.members if member.running), None)
        if member is None:
            raise EtcdClusterError("no etcd member is running, so no key can be read")
        range_end = prefix[:-1] + bytes([prefix[-1] + 1])
        with self._channel(member) as channel:
            stub = self._pb_grpc.KVStub(channel)
            reply = stub.Range(
                self._pb.RangeRequest(key=prefix, range_end=range_end, keys_only=True), timeout=timeout_seconds
            )
        return [kv.key for kv in reply.kvs]

    def _channel(self, member: EtcdMember) -> grpc.Channel:
        if self.tls is None:
            return grpc.insecure_channel(member.target)
        return grpc.secure_channel(member.target, self.tls.client.channel_credentials(self.tls.ca))

    # -- waiting -------------------------------------------------------------

    def _wait_healthy(self, members: list[EtcdMember]) -> None:
        """Wait until the cluster commits a write through each member."""
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for member in members:
            while True:
                assert member.process is not None
                if member.process.poll() is not None:
                    raise EtcdClusterError(
                        f"etcd {member.name} exited with {member.process.returncode}:\n{member.log_tail()}"
                    )
                try:
                    # A short timeout, because etcd keeps a write pending until it has a leader, and the put is retried.
                    self.put(member, HEALTH_KEY, member.name.encode(), timeout_seconds=0.25)
                    break
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise EtcdClusterError(
                            f"etcd {member.name} on {member.target} committed no write within"
                            f" {START_TIMEOUT_SECONDS:g} s ({exc.code().name}):\n{self._log_tails()}"
                        ) from exc
                time.sleep(0.05)

    def _log_tails(self) -> str:
        return "\n".join(f"--- {member.name}:\n{member.log_tail(1500)}" for member in self.members)

"""Authority replicas on one etcd cluster for the replication tests: processes, end watchers and audit reading."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import AuthorityError
from session_authority.clients._metadata import EndReason
from session_authority.clients._types import SessionEndEvent
from session_authority.server._audit import verify

ETCD_PREFIX = "/replication-test/"
"""``--etcd-prefix`` of the replicas of one test; each test has its own etcd cluster."""

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
AUDIT_TIMEOUT_SECONDS = 15.0
"""Maximum wait for every ``end`` record to reach the audit logs; claims wait for etcd, so this covers an election."""

FAST_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)
"""Channel options so that a holder's channel tries the next replica within a fraction of a 1 s idle timeout."""


ReplicaFactory = Callable[[int], "list[ReplicaProcess]"]
"""The ``start_replicas`` fixture: starts that many replicas on the test's etcd cluster and returns them."""


def failover_target(replicas: list[ReplicaProcess]) -> str:
    """Return one gRPC target naming every replica, for ``pick_first`` failover."""
    return "ipv4:" + ",".join(replica.target for replica in replicas)


class ReplicaProcess:
    """``session-authority serve --store etcd`` as a subprocess on a free loopback port.

    Args:
        replica_id: ``--replica-id``, unique among the replicas of one test.
        work_dir: Parent of the replica's data directory, port file and log.
        policy: The policy file.
        etcd_endpoints: ``--etcd-endpoints``: comma-separated client URLs.
        etcd_prefix: ``--etcd-prefix``, shared by the replicas of one fleet.
        extra_args: More flags of ``serve``, such as the TLS flags towards etcd.
    """

    def __init__(
        self,
        replica_id: str,
        work_dir: pathlib.Path,
        policy: pathlib.Path,
        etcd_endpoints: str,
        etcd_prefix: str,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.replica_id = replica_id
        self.data_dir = work_dir / replica_id
        self.policy = policy
        self.etcd_endpoints = etcd_endpoints
        self.etcd_prefix = etcd_prefix
        self.extra_args = tuple(extra_args)
        self.port_file = work_dir / f"{replica_id}.port"
        self.log_path = work_dir / f"{replica_id}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def audit_dir(self) -> pathlib.Path:
        return self.data_dir / "audit"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, port: int = 0) -> ReplicaProcess:
        """Start the replica and wait until it serves; see :meth:`launch` and :meth:`wait_until_serving`."""
        self.launch(port)
        return self.wait_until_serving()

    def launch(self, port: int = 0) -> None:
        """Start the process without waiting, so that several replicas can start side by side."""
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable, "-m", "session_authority.server._main",
            "--insecure-dev",
            "--listen", f"127.0.0.1:{port}",
            "--data-dir", str(self.data_dir),
            "--policy", str(self.policy),
            "--port-file", str(self.port_file),
            "--heartbeat-interval", "0.2",
            "--log-level", "DEBUG",
            "--store", "etcd",
            "--etcd-endpoints", self.etcd_endpoints,
            "--replica-id", self.replica_id,
            "--etcd-prefix", self.etcd_prefix,
            *self.extra_args,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_until_serving(self) -> ReplicaProcess:
        """Wait until the replica has written its port file, which it does once it serves.

        Raises:
            RuntimeError: The replica exited or wrote no port within
                :data:`START_TIMEOUT_SECONDS`. The message contains its log.
        """
        assert self.process is not None, "launch() first"
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"replica {self.replica_id} exited with {self.process.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"replica {self.replica_id} did not start within {START_TIMEOUT_SECONDS:g} s:\n{self.log_tail()}"
                )
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    def log_tail(self, characters: int = 4000) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-characters:]

    def stop(self) -> int:
        """Stop with SIGTERM (SIGKILL after :data:`STOP_TIMEOUT_SECONDS`) and return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash would."""
        if self.running:
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> ReplicaProcess:
        """Stop (if running) and start again on the same port, data directory and replica ID."""
        if self.running:
            self.stop()
        return self.start(self.port)


@dataclasses.dataclass(frozen=True)
class SeenEnd:
    """One end as a watcher received it."""

    digest: str
    fingerprint: str
    reason: EndReason | None
    arrived_at: float
    """``time.monotonic()`` when the event arrived."""


class EndWatcher:
    """Reads one replica's ``WatchSessionEnds`` stream on a thread and records each end's arrival.

    The stream is open once :meth:`start` returns (the replica sends a
    heartbeat first), so no end after that moment is missed while the
    replica lives. A replica's death ends the stream and the watcher stops.
    """

    def __init__(self, replica: ReplicaProcess) -> None:
        self.replica_id = replica.replica_id
        self._client = AuthorityClient(replica.target, principal="ops", timeout_seconds=5)
        self._stream = self._client.watch_session_ends()
        self._lock = threading.Condition()
        self.ends: dict[str, SeenEnd] = {}
        self.repeated: list[str] = []
        self.error: AuthorityError | None = None
        self._opened = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"end-watcher-{replica.replica_id}", daemon=True)

    def start(self) -> EndWatcher:
        self._thread.start()
        if not self._opened.wait(10.0):
            raise RuntimeError(f"replica {self.replica_id} sent no heartbeat on WatchSessionEnds within 10 s")
        return self

    def _read(self) -> None:
        try:
            for event in self._stream:
                arrived_at = time.monotonic()
                self._opened.set()
                if not isinstance(event, SessionEndEvent):
                    continue
                lease = event.lease
                with self._lock:
                    if lease.digest in self.ends:
                        self.repeated.append(lease.digest)
                    else:
                        self.ends[lease.digest] = SeenEnd(lease.digest, lease.fingerprint, lease.end_reason, arrived_at)
                    self._lock.notify_all()
        except AuthorityError as exc:
            self.error = exc

    def wait_for(self, digests: set[str], timeout_seconds: float) -> set[str]:
        """Wait until every digest has an end here, and return the digests still missing."""
        deadline = time.monotonic() + timeout_seconds
        with self._lock:
            while True:
                missing = digests - self.ends.keys()
                remaining = deadline - time.monotonic()
                if not missing or remaining <= 0:
                    return missing
                self._lock.wait(remaining)

    def stop(self) -> None:
        self._stream.cancel()
        self._thread.join(timeout=5.0)
        self._client.close()


def read_records(audit_dir: pathlib.Path) -> list[dict[str, object]]:
    """Return every record of one replica's audit directory, in file order."""
    records: list[dict[str, object]] = []
    for path in sorted(audit_dir.glob("audit*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                records.append(json.loads(line))
    return records


def end_records(replicas: list[ReplicaProcess]) -> dict[str, list[tuple[str, dict[str, object]]]]:
    """Return, per lease digest, every ``end`` record across the replicas' audit logs with the replica that wrote it."""
    found: dict[str, list[tuple[str, dict[str, object]]]] = {}
    for replica in replicas:
        for record in read_records(replica.audit_dir):
            if record.get("type") == "end":
                digest = str(record["event_id"]).removeprefix("end:")
                found.setdefault(digest, []).append((replica.replica_id, record))
    return found


def wait_for_end_records(
    replicas: list[ReplicaProcess], digests: set[str], timeout_seconds: float = AUDIT_TIMEOUT_SECONDS
) -> dict[str, list[tuple[str, dict[str, object]]]]:
    """Poll the audit logs until every digest has at least one ``end`` record, and return all ``end`` records.

    It returns when the time is up too, so the caller's asserts name what is missing.
    """
    deadline = time.monotonic() + timeout_seconds
    while True:
        found = end_records(replicas)
        if digests <= found.keys() or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def verify_audit_logs(replicas: list[ReplicaProcess]) -> dict[str, str]:
    """Verify each replica's audit chain, and return the IDs of the replicas whose chain fails, each with its first break."""
    failures = {}
    for replica in replicas:
        if not replica.audit_dir.is_dir():
            continue
        result = verify(replica.audit_dir)
        if not result.ok:
            failures[replica.replica_id] = str(result.error)
    return failures

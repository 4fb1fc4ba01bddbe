"""An etcd server on loopback for the baselines.

The etcd API comes from the generated modules of ``aetcd``, the package the
etcd lease store uses. A second copy of etcd's messages cannot be loaded
beside them: protobuf rejects the duplicate ``etcdserverpb`` symbols.
"""

from __future__ import annotations

import logging
import pathlib
import shutil
import subprocess
import time
from types import ModuleType

import grpc

from ._common import REPO_ROOT, child_environment, free_port, process_cpu_seconds, program_command, stop_process

logger = logging.getLogger(__name__)

START_TIMEOUT_SECONDS = 30.0


def etcd_binary() -> str | None:
    """Return the path of the ``etcd`` executable, or None when it is not installed."""
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    """Return the first line of ``etcd --version``."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return output.stdout.splitlines()[0] if output.stdout else "unknown"


def load_stubs() -> tuple[ModuleType, ModuleType]:
    """Return etcd's generated ``(rpc_pb2, rpc_pb2_grpc)`` modules, the ones the etcd store uses."""
    from aetcd.rpc import rpc_pb2, rpc_pb2_grpc

    return rpc_pb2, rpc_pb2_grpc


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with free ports and its own data directory.

    Args:
        binary: Path of the ``etcd`` executable.
        work_dir: Directory for the data directory and the log; the caller removes it.
    """

    def __init__(self, binary: str, work_dir: pathlib.Path) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.client_port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "etcd.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self) -> EtcdServer:
        """Start etcd and wait until it grants a lease.

        Raises:
            RuntimeError: etcd exited or granted no lease within the start timeout.
                The message contains the end of its log.
        """
        self.client_port = free_port()
        peer_url = f"http://127.0.0.1:{free_port()}"
        client_url = f"http://{self.target}"
        command = program_command(
            self.binary,
            "--name", "bench",
            "--data-dir", str(self.work_dir / "etcd-data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"bench={peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
        )  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(), cwd=REPO_ROOT
            )
        try:
            self._wait_ready()
        except BaseException:
            # Any failure while waiting, not only the timeout, must not leave etcd running.
            self.stop()
            raise
        logger.info("etcd serving on %s", self.target)
        return self

    def _wait_ready(self) -> None:
        pb, pb_grpc = load_stubs()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with grpc.insecure_channel(self.target) as channel:
            stub = pb_grpc.LeaseStub(channel)
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    raise RuntimeError(f"etcd exited with {self.process.returncode}:\n{self._log_tail()}")
                try:
                    stub.LeaseGrant(pb.LeaseGrantRequest(TTL=5), timeout=1.0)
                    return
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(
                            f"etcd on {self.target} did not grant a lease within {START_TIMEOUT_SECONDS:g} s"
                            f" ({exc.code().name}):\n{self._log_tail()}"
                        ) from exc
                time.sleep(0.1)

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def cpu_seconds(self) -> float:
        """Return the CPU time (user + system, all threads) etcd has used so far."""
        return process_cpu_seconds(self.process.pid if self.process else 0)

    def stop(self) -> None:
        """Stop etcd (SIGTERM, then SIGKILL after 15 s)."""
        stop_process(self.process)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

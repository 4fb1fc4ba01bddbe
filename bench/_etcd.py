"""An etcd server on loopback for the baselines, and Python stubs for its Lease service.

The stubs are generated at run time from ``_etcd_pb/etcd_lease.proto`` (a
subset of etcd's ``rpc.proto``) into a temporary directory, with the
grpcio-tools that the project already pins for its own code. Generating them
keeps a second set of generated files and its regeneration check out of the
repository. The ``etcd3`` package on PyPI (0.12.0) was tried instead: its
generated code predates protobuf 4 and fails to import under protobuf 6
("Descriptors cannot be created directly").
"""

from __future__ import annotations

import importlib
import logging
import pathlib
import shutil
import subprocess
import sys
import time
from types import ModuleType

import grpc

from ._common import free_port, process_cpu_seconds, stop_process

logger = logging.getLogger(__name__)

PROTO_DIR = pathlib.Path(__file__).resolve().parent / "_etcd_pb"
PROTO_NAME = "etcd_lease.proto"
START_TIMEOUT_SECONDS = 30.0


def etcd_binary() -> str | None:
    """Return the path of the ``etcd`` executable, or None when it is not installed."""
    return shutil.which("etcd")


def etcd_version(binary: str) -> str:
    """Return the first line of ``etcd --version``."""
    output = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return output.stdout.splitlines()[0] if output.stdout else "unknown"


def generate_stubs(out_dir: pathlib.Path) -> pathlib.Path:
    """Generate ``etcd_lease_pb2`` and ``etcd_lease_pb2_grpc`` into ``out_dir``.

    Raises:
        RuntimeError: protoc failed; the message names the proto file.
    """
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"--proto_path={PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_DIR / PROTO_NAME),
        ]
    )
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} on {PROTO_DIR / PROTO_NAME}")
    return out_dir


def load_stubs(stubs_dir: pathlib.Path) -> tuple[ModuleType, ModuleType]:
    """Import the generated modules from ``stubs_dir`` and return ``(pb2, pb2_grpc)``."""
    if str(stubs_dir) not in sys.path:
        sys.path.insert(0, str(stubs_dir))
    return importlib.import_module("etcd_lease_pb2"), importlib.import_module("etcd_lease_pb2_grpc")


class EtcdServer:
    """A single-member etcd on 127.0.0.1 with free ports and its own data directory.

    Args:
        binary: Path of the ``etcd`` executable.
        work_dir: Directory for the data directory and the log; the caller removes it.
        stubs_dir: Directory of the generated stubs, used to wait for readiness.
    """

    def __init__(self, binary: str, work_dir: pathlib.Path, stubs_dir: pathlib.Path) -> None:
        self.binary = binary
        self.work_dir = work_dir
        self.stubs_dir = stubs_dir
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
        command = [
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
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        logger.info("etcd serving on %s", self.target)
        return self

    def _wait_ready(self) -> None:
        pb, pb_grpc = load_stubs(self.stubs_dir)
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

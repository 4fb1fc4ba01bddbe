"""Shared fixtures: real authorities on loopback, in process and as subprocesses."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from session_authority.clients._client import AuthorityClient
from session_authority.clients._keeper import LeaseKeeper
from session_authority.server import AuthorityConfig, AuthorityThread, InsecureDevAuthenticator, parse_policy

from policies import TEST_POLICY


@pytest.fixture
def policy_file(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "policy.toml"
    path.write_text(TEST_POLICY)
    return path


@pytest.fixture
def authority(tmp_path: pathlib.Path) -> Iterator[AuthorityThread]:
    """An in-process authority in insecure development mode on a free loopback port."""
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=tmp_path / "authority-data",
        admin_everyone=True,
        heartbeat_interval_seconds=0.2,
    )
    running = AuthorityThread(config).start()
    yield running
    running.stop()


@pytest.fixture
def keeper() -> Iterator[LeaseKeeper]:
    """A lease keeper of the test's own, closed at the end."""
    running = LeaseKeeper()
    yield running
    running.close()


@pytest.fixture
def admin(authority: AuthorityThread) -> Iterator[AuthorityClient]:
    """A client of ``authority`` as the principal ``ops``, for admin calls (that authority admits every caller as admin)."""
    with AuthorityClient(authority.target, principal="ops") as opened:
        yield opened


class AuthorityProcess:
    """``session-authority serve`` in a subprocess on a free loopback port."""

    def __init__(self, data_dir: pathlib.Path, policy: pathlib.Path, extra_args: list[str]) -> None:
        self.data_dir = data_dir
        self.policy = policy
        self.extra_args = extra_args
        self.port_file = data_dir.parent / f"{data_dir.name}.port"
        self.log_path = data_dir.parent / f"{data_dir.name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, port: int = 0) -> AuthorityProcess:
        self.port_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "session_authority.server._main",
            "--listen",
            f"127.0.0.1:{port}",
            "--data-dir",
            str(self.data_dir),
            "--policy",
            str(self.policy),
            "--port-file",
            str(self.port_file),
            "--heartbeat-interval",
            "0.2",
            "--log-level",
            "DEBUG",
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the process owns it until it exits
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + 30
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"authority exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"authority did not start within 30 s:\n{self.log()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """Stop with SIGTERM and return the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """Kill with SIGKILL, as a crash would."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> AuthorityProcess:
        """Stop (if running) and start again on the same port and data directory."""
        if self.process is not None and self.process.poll() is None:
            self.stop()
        return self.start(self.port)


@pytest.fixture
def authority_process(tmp_path: pathlib.Path, policy_file: pathlib.Path) -> Iterator[AuthorityProcess]:
    """``session-authority serve --insecure-dev`` as a subprocess on a free loopback port."""
    running = AuthorityProcess(tmp_path / "authority-data", policy_file, ["--insecure-dev"]).start()
    yield running
    running.kill()

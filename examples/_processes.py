"""Child processes of the demo: start with logs and port files, stop each by its PID."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Sequence
from typing import IO, Any

logger = logging.getLogger(__name__)

STOP_TIMEOUT_SECONDS = 5.0
"""How long a child may take to exit after SIGTERM before it is killed."""


class ChildFailed(RuntimeError):
    """A child process exited early or did not become ready in time."""


@dataclasses.dataclass
class Child:
    """One started process and the file its stderr goes to."""

    name: str
    process: subprocess.Popen[Any]
    log_path: pathlib.Path

    def log_tail(self, lines: int = 15) -> str:
        """Return the last lines of the child's stderr log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class ChildProcesses:
    """The processes one demo run started, stopped in reverse order of start.

    Threading: :meth:`start` and :meth:`stop_all` are called from the demo's
    main thread only.
    """

    def __init__(self, log_dir: pathlib.Path) -> None:
        self._log_dir = log_dir
        self._children: list[Child] = []
        log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def children(self) -> list[Child]:
        return list(self._children)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: IO[Any] | int | None = subprocess.DEVNULL,
    ) -> Child:
        """Start ``argv`` with stdin closed and stderr written to ``<log dir>/<name>.log``."""
        log_path = self._log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=log,
                env=env,
                text=stdout == subprocess.PIPE,
            )
        child = Child(name, process, log_path)
        self._children.append(child)
        logger.debug("started %s as PID %d", name, process.pid)
        return child

    def wait_for_port(self, child: Child, port_file: pathlib.Path, timeout_seconds: float) -> int:
        """Wait for ``child`` to write its port file and return the port.

        Raises:
            ChildFailed: The child exited, or wrote no port within the timeout.
        """
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if port_file.exists():
                return int(port_file.read_text().strip())
            if child.process.poll() is not None:
                raise ChildFailed(
                    f"{child.name} exited with status {child.process.returncode} before serving;"
                    f" its log {child.log_path} ends with:\n{child.log_tail()}"
                )
            time.sleep(0.05)
        raise ChildFailed(
            f"{child.name} wrote no port file within {timeout_seconds:g} s; its log {child.log_path}"
            f" ends with:\n{child.log_tail()}"
        )

    def stop_all(self) -> None:
        """Send SIGTERM to every child still running, newest first; kill those that do not exit in time."""
        running = [child for child in reversed(self._children) if child.process.poll() is None]
        for child in running:
            try:
                os.kill(child.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        for child in running:
            try:
                child.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                logger.warning("%s (PID %d) ignored SIGTERM for %g s; killing it", child.name, child.process.pid, STOP_TIMEOUT_SECONDS)
                child.process.kill()
                child.process.wait()

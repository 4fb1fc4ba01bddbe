"""Figures, their printing, and helpers for the processes a benchmark starts."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from types import TracebackType

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings shared by every benchmark.

    Attributes:
        quick: Run short passes with fewer leases (the smoke test and a first look).
        skip_etcd: Leave out the etcd baselines, for machines without ``etcd``.
        work_dir: A temporary directory that the caller removes afterwards.
        profile: Run the authority under cProfile and print where its time
            goes. Profiling slows the authority down, so the figures of such
            a run are not comparable with those of other runs.
    """

    quick: bool
    skip_etcd: bool
    work_dir: pathlib.Path
    profile: bool = False


@dataclasses.dataclass(frozen=True)
class Figure:
    """One result printed beside its baseline from the same run.

    ``ratio`` is ``value / baseline``, unless ``paired_ratio`` is set: the
    median of ratios measured pair by pair (each pair in the same round,
    seconds apart), which a busy spell on a shared machine disturbs
    less than the ratio of two medians. ``target`` is the bound the ratio should
    meet, compared with ``target_op`` (``">="``, ``">"``, ``"<="`` or ``"<"``); None prints the
    ratio for reference only.
    """

    name: str
    value: float
    unit: str
    baseline_name: str
    baseline: float
    target: float | None = None
    target_op: str = ">="
    note: str = ""
    paired_ratio: float | None = None

    @property
    def ratio(self) -> float:
        if self.paired_ratio is not None:
            return self.paired_ratio
        return self.value / self.baseline if self.baseline else float("inf")

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        compare = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}[self.target_op]
        return bool(compare(float(self.ratio), float(self.target)))

    def line(self) -> str:
        """Format the figure as one line: value, baseline, ratio and target."""
        if self.target is None:
            verdict = "(reference, no target)"
        else:
            verdict = f"(target {self.target_op} {self.target:.2f}: {'met' if self.met else 'MISSED'})"
        ratio = f"{self.ratio:.2f}"
        if self.target is not None and ratio == f"{self.target:.2f}":
            # Two decimals would show a missed target as equal to it.
            ratio = f"{self.ratio:.3f}"
        text = (
            f"{self.name} {format_number(self.value)}{self.unit}"
            f" | {self.baseline_name} {format_number(self.baseline)}{self.unit}"
            f" | ratio {ratio} {verdict}"
        )
        if self.note:
            text += f"  [{self.note}]"
        return text


def format_number(value: float) -> str:
    """Format a figure with thousands separators, and decimals only below 100."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago (for etcd, which takes no port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def python_command(module: str, *args: str) -> list[str]:
    """Return the command that runs ``python -m module args`` with this interpreter, stopping if this process dies.

    The child starts through :mod:`bench._child`, which has Linux send it
    SIGTERM when this process ends, however it ends.
    """
    return _through_child("-m", module, *args)


def program_command(program: str, *args: str) -> list[str]:
    """Return the command that runs a program that is not Python (etcd), stopping if this process dies."""
    return _through_child(program, *args)


def _through_child(*command: str) -> list[str]:
    return [sys.executable, "-m", "bench._child", str(os.getpid()), *command]


def command_name(command: Sequence[str]) -> str:
    """Return what a child command runs: the module of a :func:`python_command`, or the program."""
    parts = list(command)
    if parts[1:3] == ["-m", "bench._child"]:
        return parts[5] if parts[4] == "-m" else parts[4]
    return parts[2] if parts[1:2] == ["-m"] else parts[0]


def child_environment() -> dict[str, str]:
    """Return the environment for benchmark children: the repository root on ``sys.path``."""
    environment = dict(os.environ)
    path = environment.get("PYTHONPATH", "")
    environment["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    return environment


def run_json(command: Sequence[str], timeout_seconds: float) -> dict:
    """Run a child that prints one JSON object as its last stdout line, and return it.

    Raises:
        RuntimeError: The child failed, timed out or printed no JSON; the
            message carries its stderr.
    """
    try:
        finished = subprocess.run(
            list(command),
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            env=child_environment(),
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(command)} timed out after {timeout_seconds:g} s") from exc
    lines = finished.stdout.strip().splitlines()
    if finished.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command)} exited with {finished.returncode}:\n{finished.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


class ChildExited(RuntimeError):
    """A server child exited on its own before its benchmark stopped it."""


def describe_exit(returncode: int) -> str:
    """Describe a child's exit status: the signal that killed it, or its exit code."""
    if returncode >= 0:
        return f"exited with {returncode}"
    try:
        return f"was killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"was killed by signal {-returncode}"


class ServerProcess:
    """A server child that writes its port to a file once it serves, stopped with SIGTERM.

    Used as a context manager, it raises :class:`ChildExited` on exit when the
    child had exited before anything asked it to stop, so a server that dies
    mid-measurement is named in the benchmark's failure, with its log.
    """

    def __init__(self, command: Sequence[str], port_file: pathlib.Path, log_path: pathlib.Path) -> None:
        self.command = list(command)
        self.port_file = port_file
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.stop_requested = False
        self.early_exit: int | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_seconds: float = 30.0) -> ServerProcess:
        """Start the child and wait for its port file.

        Raises:
            RuntimeError: The child exited or wrote no port in time; the
                message carries its log.
        """
        self.port_file.unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=child_environment(), cwd=REPO_ROOT
            )
        try:
            self._wait_for_port(timeout_seconds)
        except BaseException:
            # __exit__ does not run when __enter__ raises, so an interrupt
            # (SIGINT, SIGTERM) during the wait must stop the child here.
            self.stop()
            raise
        return self

    def _wait_for_port(self, timeout_seconds: float) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout_seconds
        while not self.port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(f"{command_name(self.command)} exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command_name(self.command)} wrote no port within {timeout_seconds:g} s:\n{self.log()}")
            time.sleep(0.02)
        self.port = int(self.port_file.read_text())

    def cpu_seconds(self, *, main_thread: bool = False) -> float:
        """Return the CPU time (user + system) the child has used so far: all threads, or its main thread only."""
        return process_cpu_seconds(self.process.pid if self.process else 0, main_thread=main_thread)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Send SIGTERM, wait up to 15 s, then SIGKILL. Note first whether the child had already exited by itself."""
        if self.process is not None and not self.stop_requested and self.process.poll() is not None:
            self.early_exit = self.process.returncode
        self.stop_requested = True
        stop_process(self.process)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
        # An interrupt keeps its own exception. Any other failure most likely
        # follows from this child's death, so the child is named.
        if self.early_exit is not None and (exc_value is None or isinstance(exc_value, Exception)):
            assert self.process is not None
            raise ChildExited(
                f"{command_name(self.command)} (PID {self.process.pid}) {describe_exit(self.early_exit)}"
                f" before the benchmark stopped it. Its log: {self.log_path}"
            ) from exc_value


def process_cpu_seconds(pid: int, *, main_thread: bool = False) -> float:
    """Return the user + system CPU time of a live process from ``/proc``: all threads, or its main thread only."""
    path = f"/proc/{pid}/task/{pid}/stat" if main_thread else f"/proc/{pid}/stat"
    with open(path) as stat:
        # The command name in field 2 may contain spaces; the fields after it do not.
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """Stop a child this benchmark started: SIGTERM, up to 15 s, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

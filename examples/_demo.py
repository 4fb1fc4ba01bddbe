"""``session-authority demo``: the authority, two protected servers and four machines, narrated.

The demo starts separate processes on loopback ports chosen at run time.
The authority keeps its embedded SQLite store in a scratch data directory,
runs the demo policy and writes spans to a file through the console exporter.
A ``grpc.server`` hosts Health and ``demo.v1.Telemetry``, and a
``grpc.aio.server`` hosts ``demo.v1.Payments``. Then come the machines (see
``_machines``), the operator's ``session-authority watch`` and, mid-stream,
``session-authority lease revoke``. The demo narrates each step with a table
of the sessions every second, prints the audit log verification and the
spans, and stops every process it started.

Exit status: 0 when every session ended for the expected reason with the
expected evidence, 1 when a check failed or a process misbehaved, 130 when
interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import os
import pathlib
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from session_authority.clients import AuthorityClient, HeartbeatEvent, LeaseInfo, SessionEndEvent
from session_authority.clients._common import OneLineArgumentParser
from session_authority.examples import _evidence
from session_authority.examples._processes import Child, ChildFailed, ChildProcesses
from session_authority.examples.protos.demo.v1 import demo_pb2, demo_pb2_grpc

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

STARTUP_TIMEOUT_SECONDS = 20.0
SCENARIO_TIMEOUT_SECONDS = 40.0
"""The machines reach every end within about 12 s; this bound stops a broken run."""
HEARTBEAT_INTERVAL_SECONDS = 0.5
TABLE_INTERVAL_SECONDS = 1.0

EXPECTED_ENDS = {
    "busy": "released",
    "idle": "idle_timeout",
    "max": "max_duration",
    "revoked": "revoked",
}
"""The end each machine is built to reach."""

CUT_OFF_MACHINES = ("max", "revoked")
"""Machines whose open stream the server must cut off with UNAUTHENTICATED and the end reason."""


class DemoFailed(Exception):
    """The scenario could not run to its end; the message names the step that failed."""


class Narrator:
    """Prints timestamped lines. Threading: any thread may call :meth:`say`."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def say(self, text: str) -> None:
        elapsed = time.monotonic() - self._started
        with self._lock:
            for number, line in enumerate(text.splitlines() or [""]):
                prefix = f"[{elapsed:5.1f}s] " if number == 0 else " " * 9
                self._out.write(prefix + line + "\n")
            self._out.flush()


@dataclasses.dataclass
class MachineView:
    """The demo's record of one machine's session."""

    name: str
    fingerprint: str = ""
    tier: str = ""
    lease: LeaseInfo | None = None
    authority_end: str | None = None
    result: dict[str, Any] | None = None


def _python_module(module: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", module, *arguments]


def _cli(*arguments: str) -> list[str]:
    return _python_module("session_authority.clients._cli", *arguments)


def _format_seconds(seconds: float) -> str:
    return f"{seconds:4.1f}s"


class Demo:
    """One run of the scenario. Threading: the main thread drives it; reader threads feed queues."""

    def __init__(self, work_dir: pathlib.Path, narrator: Narrator, children: ChildProcesses) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.spans_path = work_dir / "spans.json"
        self.say = narrator.say
        self.children = children
        self.machines = {name: MachineView(name) for name in EXPECTED_ENDS}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.watch_lines: list[dict[str, Any]] = []
        self.watch_child: Child | None = None
        self.revoke_status: int | None = None
        self.revoke_output = ""
        self.authority_target = ""
        self.operator: AuthorityClient | None = None
        self._ends_seen = threading.Condition()
        self._authority_ends: dict[str, str] = {}
        self._last_end_sequence = 0
        self._instance_id = ""
        self._watch_ready = threading.Event()
        self._cancel_watch: Callable[[], object] | None = None

    # -- processes -----------------------------------------------------------

    def start_authority(self) -> None:
        policy_path = self.work_dir / "demo_policy.toml"
        policy_text = importlib.resources.files("session_authority.examples").joinpath("demo_policy.toml").read_text()
        policy_path.write_text(policy_text)
        port_file = self.work_dir / "authority.port"
        env = dict(os.environ)
        env.update(
            {
                "OTEL_TRACES_EXPORTER": "console",
                "OTEL_METRICS_EXPORTER": "none",
                "OTEL_BSP_SCHEDULE_DELAY": "200",
            }
        )
        with self.spans_path.open("wb") as spans:
            child = self.children.start(
                "authority",
                _python_module(
                    "session_authority.server._main",
                    "--listen", "127.0.0.1:0",
                    "--port-file", str(port_file),
                    "--data-dir", str(self.data_dir),
                    "--policy", str(policy_path),
                    "--insecure-dev",
                    "--heartbeat-interval", str(HEARTBEAT_INTERVAL_SECONDS),
                ),
                env=env,
                stdout=spans,
            )
        port = self.children.wait_for_port(child, port_file, STARTUP_TIMEOUT_SECONDS)
        self.authority_target = f"127.0.0.1:{port}"
        self.say(
            f"authority serving on {self.authority_target} (PID {child.process.pid}), store in {self.data_dir},\n"
            "policy: telemetry tier idle 3 s / max 30 s, payments tier idle 2 s / max 10 s,\n"
            "/demo.v1.Payments/Transfer requires a session younger than 5 s"
        )

    def start_servers(self) -> tuple[str, str]:
        started = {}
        for service in ("telemetry", "payments"):
            port_file = self.work_dir / f"{service}.port"
            child = self.children.start(
                f"{service}-server",
                _python_module(
                    "session_authority.examples._servers", service,
                    "--authority", self.authority_target,
                    "--port-file", str(port_file),
                ),
            )
            started[service] = (child, port_file)
        targets = []
        for service, (child, port_file) in started.items():
            port = self.children.wait_for_port(child, port_file, STARTUP_TIMEOUT_SECONDS)
            targets.append(f"127.0.0.1:{port}")
        self.say(
            f"protected grpc.server (Health + demo.v1.Telemetry) on {targets[0]} (PID {started['telemetry'][0].process.pid})\n"
            f"protected grpc.aio.server (demo.v1.Payments) on {targets[1]} (PID {started['payments'][0].process.pid})"
        )
        return targets[0], targets[1]

    def show_unprotected_and_protected(self, telemetry: str, payments: str) -> None:
        with grpc.insecure_channel(telemetry) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="demo.v1.Telemetry"), timeout=5.0
            )
        self.say(f"health check without a lease: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)} (Health is exempt)")
        with grpc.insecure_channel(payments) as channel:
            try:
                demo_pb2_grpc.PaymentsStub(channel).Balance(demo_pb2.BalanceRequest(account="anyone"), timeout=5.0)
                raise DemoFailed("Payments.Balance without a lease succeeded; the interceptor did not enforce leases")
            except grpc.RpcError as error:
                self.say(f"Payments.Balance without a lease: {error.code().name} ({error.details()})")

    # -- the operator's view -----------------------------------------------------

    def watch_in_process(self) -> None:
        """Follow the authority's session ends on a thread, for the table and the checks."""
        assert self.operator is not None
        stream = self.operator.watch_session_ends()

        def follow() -> None:
            try:
                for event in stream:
                    if isinstance(event, HeartbeatEvent):
                        with self._ends_seen:
                            self._instance_id = event.instance_id
                        self._watch_ready.set()
                    elif isinstance(event, SessionEndEvent):
                        reason = event.lease.end_reason.value if event.lease.end_reason else "unknown"
                        with self._ends_seen:
                            self._authority_ends[event.lease.fingerprint] = reason
                            self._last_end_sequence = max(self._last_end_sequence, event.sequence)
                            self._ends_seen.notify_all()
            except grpc.RpcError:
                pass  # cancelled at the end of the run

        threading.Thread(target=follow, name="demo-watch", daemon=True).start()
        self._cancel_watch = stream.cancel
        if not self._watch_ready.wait(STARTUP_TIMEOUT_SECONDS):
            raise DemoFailed("the authority sent no heartbeat on the watch stream")

    def start_operator_watch(self) -> None:
        """Start ``session-authority watch --count 4`` so that it replays every machine's end.

        A watch stream opened with ``after_sequence`` 0 only receives the ends
        after it connects, so the demo first ends a probe lease, then starts
        the CLI after that end's sequence: no machine's end can be missed,
        however long the CLI takes to connect.
        """
        assert self.operator is not None
        probe = self.operator.grant("telemetry", principal="operator-probe")
        self.operator.revoke(probe.lease_id, release=True)
        with self._ends_seen:
            if not self._ends_seen.wait_for(lambda: probe.lease.fingerprint in self._authority_ends, STARTUP_TIMEOUT_SECONDS):
                raise DemoFailed("the probe lease's end never reached the watch stream")
            after_sequence, instance_id = self._last_end_sequence, self._instance_id
        self.say(f"probe lease {probe.lease.fingerprint} granted and released (end sequence {after_sequence})")

        argv = ("watch", "--authority", self.authority_target, "--json", "--count", str(len(EXPECTED_ENDS)),
                "--after-sequence", str(after_sequence), "--instance-id", instance_id)
        self.watch_child = self.children.start("watch", _cli(*argv), stdout=subprocess.PIPE)
        self.say("operator runs: session-authority " + " ".join(argv))
        threading.Thread(target=self._read_watch, args=(self.watch_child,), name="demo-watch-cli", daemon=True).start()

    def _read_watch(self, child: Child) -> None:
        assert child.process.stdout is not None
        for line in child.process.stdout:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.watch_lines.append(record)
            machine = self._machine_of(record.get("fingerprint", ""))
            self.say(
                f"  watch | end #{record.get('sequence')} {record.get('fingerprint')} ({machine})"
                f" reason={record.get('end_reason')} age={record.get('age_seconds', 0):.1f}s"
            )

    def revoke(self, fingerprint: str) -> None:
        """Run the operator's revoke command on a thread and narrate its result."""
        argv = ("lease", "revoke", "--fingerprint", fingerprint, "--authority", self.authority_target)
        self.say("operator runs: session-authority " + " ".join(argv))

        def run() -> None:
            completed = subprocess.run(_cli(*argv), capture_output=True, text=True, timeout=20.0, stdin=subprocess.DEVNULL)
            self.revoke_status = completed.returncode
            self.revoke_output = (completed.stdout + completed.stderr).strip()
            self.say(f"revoke command exited with status {completed.returncode}")

        threading.Thread(target=run, name="demo-revoke", daemon=True).start()

    # -- the machines ----------------------------------------------------------------

    def start_machines(self, telemetry: str, payments: str) -> Child:
        child = self.children.start(
            "machines",
            _python_module(
                "session_authority.examples._machines",
                "--authority", self.authority_target,
                "--telemetry", telemetry,
                "--payments", payments,
            ),
            stdout=subprocess.PIPE,
        )

        def read() -> None:
            assert child.process.stdout is not None
            for line in child.process.stdout:
                try:
                    self.events.put(json.loads(line))
                except json.JSONDecodeError:
                    continue
            self.events.put({"event": "exit", "machine": ""})

        threading.Thread(target=read, name="demo-machines", daemon=True).start()
        self.say("machines started: busy (telemetry), idle (payments), max (payments), revoked (telemetry)")
        return child

    def _machine_of(self, fingerprint: str) -> str:
        for view in self.machines.values():
            if view.fingerprint == fingerprint:
                return view.name
        return "probe" if fingerprint else "?"

    def narrate(self, event: dict[str, Any]) -> None:
        view = self.machines.get(event.get("machine", ""))
        kind = event["event"]
        if view is None:
            return
        if kind == "granted":
            view.fingerprint, view.tier = event["fingerprint"], event["tier"]
            self.say(f"{view.name}: granted lease {view.fingerprint} in tier {view.tier} to {event['principal']}")
        elif kind == "stream_open":
            self.say(f"{view.name}: Telemetry.Stream open and acknowledged; revoking it mid-stream")
            self.revoke(event["fingerprint"])
        elif kind == "call":
            age = f" at session age {event['age_seconds']}s" if "age_seconds" in event else ""
            if event["code"] == "SESSION_ENDED":
                outcome = f"not sent: the holder raised SessionEnded ({event['reason']})"
            elif event.get("trailer"):
                outcome = f"{event['code']}, session-end-reason: {event['trailer']}"
            else:
                outcome = event["code"]
            self.say(f"{view.name}: {event['method']}{age} -> {outcome}")
        elif kind == "session_end":
            self.say(f"{view.name}: the holder learned its session ended: {event['reason']}")
        elif kind == "result":
            view.result = event
            stream = event.get("stream")
            if stream:
                self.say(
                    f"{view.name}: stream in flight ended with {stream['code']},"
                    f" session-end-reason: {stream['trailer']} ({stream['details']})"
                )
            if "error" in event:
                self.say(f"{view.name}: FAILED: {event['error']}")

    def print_table(self) -> None:
        assert self.operator is not None
        try:
            live = {lease.fingerprint: lease for lease in self.operator.list_leases()}
        except Exception as exc:  # the table is narration; a failed refresh is reported, not fatal
            self.say(f"lease table unavailable: {exc}")
            return
        with self._ends_seen:
            ends = dict(self._authority_ends)
        rows = []
        for view in self.machines.values():
            if not view.fingerprint:
                continue
            lease = live.get(view.fingerprint)
            if lease is not None:
                rows.append((view.name, view.fingerprint, view.tier, "alive",
                             _format_seconds(lease.ttl_seconds), _format_seconds(lease.max_remaining_seconds)))
            else:
                rows.append((view.name, view.fingerprint, view.tier, f"ended: {ends.get(view.fingerprint, '?')}", "-", "-"))
        if not rows:
            return
        header = ("machine", "fingerprint", "tier", "state", "ttl", "max left")
        widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
        self.say("sessions\n" + "\n".join("  " + line for line in lines))

    def run_machines(self, telemetry: str, payments: str) -> None:
        child = self.start_machines(telemetry, payments)
        deadline = time.monotonic() + SCENARIO_TIMEOUT_SECONDS
        next_table = time.monotonic()
        while any(view.result is None for view in self.machines.values()):
            now = time.monotonic()
            if now >= deadline:
                missing = ", ".join(view.name for view in self.machines.values() if view.result is None)
                raise DemoFailed(f"machines {missing} reported no result within {SCENARIO_TIMEOUT_SECONDS:g} s")
            if now >= next_table:
                self.print_table()
                next_table = now + TABLE_INTERVAL_SECONDS
            try:
                event = self.events.get(timeout=min(0.1, max(0.0, next_table - now)))
            except queue.Empty:
                continue
            if event["event"] == "exit":
                if any(view.result is None for view in self.machines.values()):
                    raise ChildFailed(f"the machines process exited early; its log ends with:\n{child.log_tail()}")
                break
            self.narrate(event)
        self.print_table()
        child.process.wait(10.0)

        with self._ends_seen:
            self._ends_seen.wait_for(lambda: all(v.fingerprint in self._authority_ends for v in self.machines.values()), 5.0)
            for view in self.machines.values():
                view.authority_end = self._authority_ends.get(view.fingerprint)
        if self.watch_child is not None:
            try:
                self.watch_child.process.wait(5.0)
            except subprocess.TimeoutExpired:
                self.say("operator watch printed fewer ends than expected; stopping it")

    def stop_watching(self) -> None:
        if self._cancel_watch is not None:
            self._cancel_watch()


def _check(failures: list[str], condition: bool, message: str) -> None:
    if not condition:
        failures.append(message)


def check_results(demo: Demo, audit_reasons: dict[str, list[str]], span_reasons: dict[str, list[str]], audit_ok: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Compare every machine's session with its expected end; return per-session summaries and failures."""
    failures: list[str] = []
    watched = {record.get("fingerprint"): record.get("end_reason") for record in demo.watch_lines}
    sessions = []
    for name, expected in EXPECTED_ENDS.items():
        view = demo.machines[name]
        result = view.result or {}
        stream = result.get("stream")
        summary = {
            "machine": name,
            "fingerprint": view.fingerprint,
            "tier": view.tier,
            "expected_end": expected,
            "authority_end": view.authority_end,
            "holder_end": result.get("end_reason"),
            "watch_cli_end": watched.get(view.fingerprint),
            "in_flight": stream,
            "audit_end_records": audit_reasons.get(view.fingerprint, []),
            "end_spans": span_reasons.get(view.fingerprint, []),
            "details": {key: value for key, value in result.items() if key not in ("event", "machine", "t", "stream", "fingerprint", "end_reason")},
        }
        sessions.append(summary)
        _check(failures, "error" not in result, f"{name}: the machine failed: {result.get('error')}")
        _check(failures, view.authority_end == expected, f"{name}: the authority ended it as {view.authority_end}, expected {expected}")
        _check(failures, result.get("end_reason") == expected, f"{name}: the holder saw the end as {result.get('end_reason')}, expected {expected}")
        _check(failures, watched.get(view.fingerprint) == expected, f"{name}: session-authority watch printed {watched.get(view.fingerprint)}, expected {expected}")
        if name in CUT_OFF_MACHINES:
            _check(
                failures,
                bool(stream) and stream["code"] == "UNAUTHENTICATED" and stream["trailer"] == expected,
                f"{name}: the stream in flight ended with {stream}, expected UNAUTHENTICATED and session-end-reason {expected}",
            )
        _check(failures, audit_reasons.get(view.fingerprint) == [expected], f"{name}: audit end records {audit_reasons.get(view.fingerprint, [])}, expected exactly [{expected!r}]")
        _check(failures, span_reasons.get(view.fingerprint) == [expected], f"{name}: session.end spans {span_reasons.get(view.fingerprint, [])}, expected exactly [{expected!r}]")

    idle_next = (demo.machines["idle"].result or {}).get("next_call") or {}
    _check(
        failures,
        (idle_next.get("code") == "SESSION_ENDED" and idle_next.get("reason") == "idle_timeout")
        or (idle_next.get("code") == "UNAUTHENTICATED" and idle_next.get("trailer") == "idle_timeout"),
        f"idle: the call after the end returned {idle_next}, expected a rejection naming idle_timeout",
    )
    transfers = (demo.machines["max"].result or {}).get("transfers") or []
    _check(
        failures,
        len(transfers) == 2 and transfers[0]["code"] == "OK" and transfers[1]["code"] == "PERMISSION_DENIED" and transfers[1]["trailer"] == "policy",
        f"max: transfers {transfers}, expected OK, then PERMISSION_DENIED with session-end-reason policy past 5 s",
    )
    _check(failures, demo.revoke_status == 0, f"the revoke command exited with {demo.revoke_status}: {demo.revoke_output}")
    _check(failures, audit_ok, "the audit log did not verify")
    return sessions, failures


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="session-authority demo",
        description=(
            "Run the authority, a protected grpc.server and grpc.aio.server, and four machine clients on"
            " loopback; narrate each session to its end; verify the audit log and the spans."
        ),
    )
    parser.add_argument(
        "--work-dir",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="keep the data directory, logs and spans in DIR (created; must be empty); default: a temporary directory removed at exit",
    )
    parser.add_argument("--json-summary", type=pathlib.Path, default=None, metavar="FILE", help="also write the per-session results to FILE as JSON")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and return its exit status (0 only when every expected end happened)."""
    args = build_parser().parse_args(argv)
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        if any(args.work_dir.iterdir()):
            print(f"session-authority demo: --work-dir {args.work_dir} is not empty; pass a new or empty directory", file=sys.stderr)
            return 2
        work_dir = args.work_dir
    else:
        work_dir = pathlib.Path(tempfile.mkdtemp(prefix="session-authority-demo-"))
    previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _run(work_dir, args.json_summary, keep=args.work_dir is not None)
    except KeyboardInterrupt:
        # Interrupted after the processes were stopped, while reading the evidence.
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def _run(work_dir: pathlib.Path, summary_path: pathlib.Path | None, *, keep: bool) -> int:
    narrator = Narrator(sys.stdout)
    children = ChildProcesses(work_dir / "logs")
    demo = Demo(work_dir, narrator, children)
    say = narrator.say
    say(f"session-authority demo: every process listens on 127.0.0.1 on a port picked at start; files in {work_dir}")
    try:
        demo.start_authority()
        demo.operator = AuthorityClient(demo.authority_target, principal="operator")
        telemetry, payments = demo.start_servers()
        demo.show_unprotected_and_protected(telemetry, payments)
        demo.watch_in_process()
        demo.start_operator_watch()
        demo.run_machines(telemetry, payments)
    except KeyboardInterrupt:
        say("interrupted; stopping every process the demo started")
        return EXIT_INTERRUPTED
    except (DemoFailed, ChildFailed, grpc.RpcError, subprocess.SubprocessError, OSError) as exc:
        say(f"demo failed: {exc}")
        for child in children.children:
            say(f"log of {child.name} ({child.log_path}):\n{child.log_tail(8) or '(empty)'}")
        return EXIT_FAILED
    finally:
        demo.stop_watching()
        if demo.operator is not None:
            demo.operator.close()
        children.stop_all()
        say("stopped: " + ", ".join(f"{c.name} (PID {c.process.pid}, status {c.process.returncode})" for c in children.children))

    audit_dir = demo.data_dir / "audit"
    result = _evidence.verify_audit(audit_dir)
    if result.ok:
        say(f"audit log {audit_dir}: verified, {result.records} records in {result.files} file(s), chain intact")
    else:
        say(f"audit log {audit_dir}: verification FAILED: {result.error}")
    audit_reasons = _evidence.audit_end_reasons(audit_dir) if audit_dir.is_dir() else {}
    span_reasons = _evidence.end_span_reasons(_evidence.read_console_spans(demo.spans_path))
    span_count = sum(len(reasons) for reasons in span_reasons.values())
    say(
        f"spans: the authority's console exporter wrote {span_count} session.end span(s) to {demo.spans_path}"
        + ("" if keep else " (removed at exit; pass --work-dir DIR to keep it)")
    )

    sessions, failures = check_results(demo, audit_reasons, span_reasons, result.ok)
    header = ("machine", "fingerprint", "expected", "authority", "in-flight call", "audit", "spans")
    rows = [
        (
            s["machine"], s["fingerprint"], s["expected_end"], str(s["authority_end"]),
            f"{s['in_flight']['code']} + {s['in_flight']['trailer']}" if s["in_flight"] else "-",
            str(len(s["audit_end_records"])), str(len(s["end_spans"])),
        )
        for s in sessions
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    say("results\n" + "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]))
    if summary_path is not None:
        summary = {
            "ok": not failures,
            "failures": failures,
            "sessions": sessions,
            "audit": {"ok": result.ok, "records": result.records, "error": str(result.error) if result.error else None},
            "spans_file": str(demo.spans_path),
            "watch_cli": demo.watch_lines,
            "watch_cli_exit_status": demo.watch_child.process.returncode if demo.watch_child else None,
        }
        summary_path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    if failures:
        say("FAILED:\n" + "\n".join(f"- {failure}" for failure in failures))
        return EXIT_FAILED
    say("every session ended as expected")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

"""The demo's machine clients: four lease holders, each calling the protected services its own way.

``python -m session_authority.examples._machines --authority A --telemetry T --payments P``
runs them on threads and prints one JSON object per line on stdout for the
demo to narrate: ``granted``, ``call``, ``stream_open``, ``session_end`` and,
last for each machine, ``result``. The demo revokes the ``revoked`` machine's
session after its ``stream_open`` event.

Machines and the ends they are built to reach:

- ``busy`` (tier telemetry): streams readings until the other three reached
  their ends, then releases its session (``released``).
- ``idle`` (tier payments): makes one call, then goes quiet (``idle_timeout``).
- ``max`` (tier payments): keeps calling and streaming until the tier's max
  duration ends the session; its open stream is cut off (``max_duration``).
- ``revoked`` (tier telemetry): streams readings until an operator revokes
  the session; its open stream is cut off (``revoked``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc

from session_authority.clients import (
    END_REASON_TRAILER_KEY,
    AuthorityClient,
    EndReason,
    Session,
    SessionEnded,
)
from session_authority.examples.protos.demo.v1 import demo_pb2, demo_pb2_grpc

logger = logging.getLogger(__name__)

READING_INTERVAL_SECONDS = 0.5
"""Pause between two stream messages or two unary calls of a busy machine."""

CALL_TIMEOUT_SECONDS = 3.0
END_WAIT_SECONDS = 20.0
"""Maximum time a machine waits for the end it expects before it reports that the end did not happen."""

CHANNEL_OPTIONS = (
    # The payments tier's idle timeout is 2 s, so a reconnect must not wait
    # gRPC's default initial backoff of 1 s.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


class Reporter:
    """Writes events as JSON lines on stdout. Threading: any thread may call :meth:`emit`."""

    def __init__(self, out: Any = None) -> None:
        self._out = out if out is not None else sys.stdout
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def emit(self, event: str, machine: str, **fields: Any) -> None:
        record = {"event": event, "machine": machine, "t": round(time.monotonic() - self._started, 2), **fields}
        with self._lock:
            self._out.write(json.dumps(record) + "\n")
            self._out.flush()


@dataclasses.dataclass
class CallOutcome:
    """The final status of a call or stream, as the demo reports it."""

    code: str
    trailer: str | None
    details: str

    @classmethod
    def of(cls, error: grpc.RpcError) -> CallOutcome:
        trailer = None
        for key, value in error.trailing_metadata() or ():  # type: ignore[attr-defined]
            if key == END_REASON_TRAILER_KEY:
                trailer = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        return cls(code=error.code().name, trailer=trailer, details=error.details() or "")  # type: ignore[attr-defined]


def refused_locally(exc: SessionEnded) -> dict[str, Any]:
    """Describe a call that the holder refused before sending, because it knew the session had ended."""
    return {"code": "SESSION_ENDED", "trailer": None, "reason": exc.reason.value, "details": str(exc)}


class Machine:
    """One machine: its authority client, session, channels and the end it saw."""

    def __init__(self, name: str, tier: str, args: argparse.Namespace, reporter: Reporter) -> None:
        self.name = name
        self.tier = tier
        self.reporter = reporter
        self.ended = threading.Event()
        self.end_reason: EndReason | None = None
        self.client = AuthorityClient(args.authority, principal=f"machine-{name}", options=CHANNEL_OPTIONS)
        self.session = Session(
            self.client, tier=tier, principal=f"machine-{name}", on_end=self._on_end
        )
        interceptor = self.session.interceptor()
        self._channels = [
            grpc.insecure_channel(args.telemetry, options=CHANNEL_OPTIONS),
            grpc.insecure_channel(args.payments, options=CHANNEL_OPTIONS),
        ]
        self.telemetry = demo_pb2_grpc.TelemetryStub(grpc.intercept_channel(self._channels[0], interceptor))
        self.payments = demo_pb2_grpc.PaymentsStub(grpc.intercept_channel(self._channels[1], interceptor))

    def _on_end(self, reason: EndReason) -> None:
        # Runs on whichever thread saw the end first; it must not block.
        self.end_reason = reason
        self.reporter.emit("session_end", self.name, fingerprint=self.session.fingerprint, reason=reason.value)
        self.ended.set()

    def open(self) -> None:
        self.session.open()
        self.reporter.emit(
            "granted", self.name, fingerprint=self.session.fingerprint, tier=self.tier,
            principal=f"machine-{self.name}",
        )

    def close(self) -> None:
        self.session.close()
        for channel in self._channels:
            channel.close()
        self.client.close()


class ReadingStream:
    """A bidi ``Telemetry.Stream`` driven one reading at a time: send, then wait for its ack."""

    def __init__(self, machine: Machine) -> None:
        self._machine = machine
        self._outbox: queue.Queue[demo_pb2.Reading | None] = queue.Queue()
        self._responses = machine.telemetry.Stream(self._requests())
        self.sequence = 0

    def _requests(self) -> Iterator[demo_pb2.Reading]:
        while True:
            reading = self._outbox.get()
            if reading is None:
                return
            yield reading

    def send(self) -> None:
        """Send one reading and wait for its ack.

        Raises:
            grpc.RpcError: The stream ended, for example cut off by the server.
        """
        self.sequence += 1
        self._outbox.put(demo_pb2.Reading(source=self._machine.name, sequence=self.sequence, value=self.sequence * 0.5))
        next(self._responses)

    def finish(self) -> None:
        """Half-close the stream and wait for the server to finish it."""
        self._outbox.put(None)
        for _ in self._responses:
            pass

    def cancel(self) -> None:
        self._outbox.put(None)
        self._responses.cancel()  # type: ignore[attr-defined]


def stream_until(machine: Machine, stop: Callable[[], bool], on_open: Callable[[], None] | None = None) -> CallOutcome | None:
    """Stream readings until ``stop()`` or an error; return the error's outcome, or None when stopped."""
    stream = ReadingStream(machine)
    deadline = time.monotonic() + END_WAIT_SECONDS
    try:
        while time.monotonic() < deadline:
            stream.send()
            if stream.sequence == 3 and on_open is not None:
                on_open()
            if stop():
                stream.finish()
                return None
            time.sleep(READING_INTERVAL_SECONDS)
    except grpc.RpcError as error:
        return CallOutcome.of(error)
    stream.cancel()
    return CallOutcome(code="DEADLINE_EXCEEDED", trailer=None, details=f"no end within {END_WAIT_SECONDS:g} s")


def run_busy(machine: Machine, stop: threading.Event) -> dict[str, Any]:
    outcome = stream_until(machine, stop.is_set)
    machine.close()
    machine.ended.wait(CALL_TIMEOUT_SECONDS)
    return {"stream": dataclasses.asdict(outcome) if outcome else None}


def run_idle(machine: Machine) -> dict[str, Any]:
    reply = machine.payments.Balance(demo_pb2.BalanceRequest(account="idle-ops"), timeout=CALL_TIMEOUT_SECONDS)
    machine.reporter.emit("call", machine.name, method="Balance", code="OK", balance_cents=reply.balance_cents)

    machine.ended.wait(END_WAIT_SECONDS)
    next_call: dict[str, Any]
    try:
        machine.payments.Balance(demo_pb2.BalanceRequest(account="idle-ops"), timeout=CALL_TIMEOUT_SECONDS)
        next_call = {"code": "OK", "trailer": None, "details": "the call after the end succeeded"}
    except SessionEnded as exc:
        next_call = refused_locally(exc)
    except grpc.RpcError as error:
        next_call = dataclasses.asdict(CallOutcome.of(error))
    machine.reporter.emit("call", machine.name, method="Balance", **next_call)
    machine.close()
    return {"next_call": next_call}


def run_max(machine: Machine) -> dict[str, Any]:
    transfers: list[dict[str, Any]] = []
    unary_errors: list[str] = []
    granted_at = time.monotonic()

    def unary(method: str, call: Callable[[], Any]) -> dict[str, Any]:
        try:
            call()
            result: dict[str, Any] = {"code": "OK", "trailer": None, "details": ""}
        except grpc.RpcError as error:
            result = dataclasses.asdict(CallOutcome.of(error))
        except SessionEnded as exc:
            result = refused_locally(exc)
        result["age_seconds"] = round(time.monotonic() - granted_at, 1)
        return result

    def transfer() -> None:
        request = demo_pb2.TransferRequest(from_account="max-ops", to_account="vendor", amount_cents=100)
        result = unary("Transfer", lambda: machine.payments.Transfer(request, timeout=CALL_TIMEOUT_SECONDS))
        transfers.append(result)
        machine.reporter.emit("call", machine.name, method="Transfer", **result)

    def between_readings() -> bool:
        # Unary calls ride on the same session as the stream: a transfer at
        # the start, one past the method's max session age of 5 s, and a
        # balance query per reading until the session ends.
        age = time.monotonic() - granted_at
        if not transfers or (len(transfers) == 1 and age > 6.0):
            transfer()
        if not unary_errors:
            request = demo_pb2.BalanceRequest(account="max-ops")
            result = unary("Balance", lambda: machine.payments.Balance(request, timeout=CALL_TIMEOUT_SECONDS))
            if result["code"] != "OK":
                unary_errors.append(result["code"])
                machine.reporter.emit("call", machine.name, method="Balance", **result)
        return False

    outcome = stream_until(machine, between_readings)
    machine.ended.wait(CALL_TIMEOUT_SECONDS)
    machine.close()
    return {"stream": dataclasses.asdict(outcome) if outcome else None, "transfers": transfers}


def run_revoked(machine: Machine) -> dict[str, Any]:
    def announce() -> None:
        machine.reporter.emit("stream_open", machine.name, fingerprint=machine.session.fingerprint)

    outcome = stream_until(machine, lambda: False, on_open=announce)
    machine.ended.wait(CALL_TIMEOUT_SECONDS)
    machine.close()
    return {"stream": dataclasses.asdict(outcome) if outcome else None}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m session_authority.examples._machines",
        description="Run the demo's four machine clients and report events as JSON lines.",
    )
    parser.add_argument("--authority", required=True, metavar="HOST:PORT")
    parser.add_argument("--telemetry", required=True, metavar="HOST:PORT", help="the protected sync server")
    parser.add_argument("--payments", required=True, metavar="HOST:PORT", help="the protected aio server")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    reporter = Reporter()
    stop_busy = threading.Event()

    machines = {
        "busy": Machine("busy", "telemetry", args, reporter),
        "idle": Machine("idle", "payments", args, reporter),
        "max": Machine("max", "payments", args, reporter),
        "revoked": Machine("revoked", "telemetry", args, reporter),
    }
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        "busy": lambda: run_busy(machines["busy"], stop_busy),
        "idle": lambda: run_idle(machines["idle"]),
        "max": lambda: run_max(machines["max"]),
        "revoked": lambda: run_revoked(machines["revoked"]),
    }
    for machine in machines.values():
        machine.open()

    def run(name: str) -> None:
        machine = machines[name]
        try:
            details = runs[name]()
        except Exception as exc:  # reported, so the demo can name the machine that failed
            logger.exception("machine %s failed", name)
            details = {"error": f"{type(exc).__name__}: {exc}"}
        reason = machine.end_reason.value if machine.end_reason else None
        reporter.emit("result", name, fingerprint=machine.session.fingerprint, end_reason=reason, **details)

    threads = {name: threading.Thread(target=run, args=(name,), name=f"machine-{name}") for name in machines}
    for thread in threads.values():
        thread.start()
    # The busy machine keeps its session in use until the others reached their ends.
    for name, thread in threads.items():
        if name != "busy":
            thread.join()
    stop_busy.set()
    threads["busy"].join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

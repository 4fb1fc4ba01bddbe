"""``session-authority serve`` exports its ``session.end`` spans to a real OTLP gRPC receiver."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with the resource it came from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[trace_pb2.Span] = []
        self.service_names: set[str] = set()

    def Export(  # noqa: N802 - the name is fixed by the OTLP service
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self.lock:
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.service_names.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str) -> list[trace_pb2.Span]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


@pytest.fixture
def receiver() -> Iterator[tuple[TraceReceiver, int]]:
    servicer = TraceReceiver()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


class ServeProcess:
    """``serve --insecure-dev`` in a subprocess with extra environment and flags."""

    def __init__(self, tmp_path: pathlib.Path, policy_file: pathlib.Path) -> None:
        self.tmp_path = tmp_path
        self.policy_file = policy_file
        self.log_path = tmp_path / "authority.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, environment: dict[str, str], extra_args: list[str]) -> str:
        """Start the authority and return its target."""
        port_file = self.tmp_path / "authority.port"
        command = [
            sys.executable,
            "-m",
            "session_authority.server._main",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(self.tmp_path / "data"),
            "--policy",
            str(self.policy_file),
            "--port-file",
            str(port_file),
            "--insecure-dev",
            "--log-level",
            "DEBUG",
            *extra_args,
        ]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **environment}
            )
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"authority did not start:\n{self.log()}")
            time.sleep(0.02)
        return f"127.0.0.1:{int(port_file.read_text())}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def serve_process(tmp_path: pathlib.Path, policy_file: pathlib.Path) -> Iterator[ServeProcess]:
    running = ServeProcess(tmp_path, policy_file)
    yield running
    running.stop()


@pytest.fixture
def exporting_authority(serve_process: ServeProcess, receiver) -> str:  # type: ignore[no-untyped-def]
    """An authority exporting spans to the receiver; returns its target."""
    _, otlp_port = receiver
    return serve_process.start(
        {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_METRICS_EXPORTER": "none",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "authority-under-test",
        },
        [],
    )


def attributes_of(span: trace_pb2.Span) -> dict[str, object]:
    values: dict[str, object] = {}
    for attribute in span.attributes:
        value: common_pb2.AnyValue = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


def wait_for_spans(receiver: TraceReceiver, name: str, count: int, timeout_seconds: float = 15.0) -> list[trace_pb2.Span]:
    deadline = time.monotonic() + timeout_seconds
    while len(receiver.named(name)) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(receiver.named(name))} of {count} {name} spans arrived")
        time.sleep(0.05)
    return receiver.named(name)


def test_end_spans_reach_otlp_receiver(exporting_authority: str, receiver) -> None:  # type: ignore[no-untyped-def]
    servicer, _ = receiver
    with grpc.insecure_channel(exporting_authority) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        expiring = stub.Grant(pb.GrantRequest(principal="svc-a", tier="brief"), timeout=5)
        revoked = stub.Grant(pb.GrantRequest(principal="svc-b"), timeout=5)
        stub.Revoke(
            pb.RevokeRequest(fingerprint=revoked.lease.fingerprint),
            metadata=[("x-session-principal", "ops")],
            timeout=5,
        )

        ends = wait_for_spans(servicer, "session.end", 2)
    grants = wait_for_spans(servicer, "session.grant", 2)

    by_fingerprint = {attributes_of(span)["session.lease.fingerprint"]: span for span in ends}
    expired_span = by_fingerprint[expiring.lease.fingerprint]
    revoked_span = by_fingerprint[revoked.lease.fingerprint]
    assert attributes_of(expired_span)["session.end_reason"] == "idle_timeout"
    assert attributes_of(expired_span)["session.tier"] == "brief"
    assert attributes_of(revoked_span)["session.end_reason"] == "revoked"
    assert attributes_of(revoked_span)["session.revoked_by"] == "ops"
    grant_ids = {(span.trace_id, span.span_id) for span in grants}
    for span in ends:
        assert [(link.trace_id, link.span_id) for link in span.links][0] in grant_ids
        assert [event.name for event in span.events] == ["audit.record"]
    assert servicer.service_names == {"authority-under-test"}
    for span in servicer.spans:
        text = span.SerializeToString()
        assert expiring.lease_id.encode() not in text
        assert revoked.lease_id.encode() not in text


def test_prometheus_endpoint_serves_metrics(serve_process: ServeProcess) -> None:
    target = serve_process.start(
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}, ["--prometheus-port", "0"]
    )
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=5)
        stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id, release=True), timeout=5)

    match = re.search(r"Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)", serve_process.log())
    assert match is not None, serve_process.log()
    with urllib.request.urlopen(match.group(1), timeout=5) as response:
        text = response.read().decode()

    assert re.search(r'^session_authority_grants_total\{.*session_tier="standard".*\} 1\.0$', text, re.M)
    assert re.search(r'^session_authority_ends_total\{.*session_end_reason="released".*\} 1\.0$', text, re.M)
    assert granted.lease_id not in text

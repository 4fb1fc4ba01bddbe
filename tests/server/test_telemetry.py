"""Spans and metrics of the authority: one linked ``session.end`` span per end, pointing at its audit record."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from session_authority.server import (
    AuthorityConfig,
    AuthorityThread,
    InsecureDevAuthenticator,
    ManualClock,
    parse_policy,
)
from session_authority.server._audit import record_hash
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

POLICY = parse_policy(
    """
version = 1
default_tier = "standard"
admins = ["ops"]

[tiers.standard]
idle_timeout = "10s"
max_duration = "100s"

[tiers.capped]
idle_timeout = "10s"
max_duration = "15s"
"""
)

END_REASONS = ["idle_timeout", "max_duration", "revoked", "released"]


class Harness:
    """An in-process authority on a manual clock, with spans and metrics kept in memory."""

    def __init__(self, data_dir: pathlib.Path | None, clock: ManualClock) -> None:
        self.data_dir = data_dir
        self.clock = clock
        self.spans = InMemorySpanExporter()
        tracer_provider = TracerProvider()
        tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.metrics = InMemoryMetricReader()
        config = AuthorityConfig(
            authenticator=InsecureDevAuthenticator(),
            policy=POLICY,
            data_dir=data_dir,
            clock=clock,
            tracer_provider=tracer_provider,
            meter_provider=MeterProvider(metric_readers=[self.metrics]),
        )
        self.thread = AuthorityThread(config).start()
        self.channel = grpc.insecure_channel(self.thread.target)
        self.stub = pb_grpc.SessionAuthorityStub(self.channel)

    @property
    def authority(self):  # type: ignore[no-untyped-def]
        return self.thread.authority

    def expire(self) -> None:
        self.authority.table.expire_due()

    def flush(self) -> None:
        assert self.authority.flush(10)

    def stop(self) -> None:
        self.channel.close()
        self.thread.stop()

    def end_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans() if span.name == "session.end"]

    def grant_spans(self) -> list[ReadableSpan]:
        return [span for span in self.spans.get_finished_spans() if span.name == "session.grant"]


def as_principal(principal: str) -> list[tuple[str, str]]:
    return [("x-session-principal", principal)]


def end_lease(harness: Harness, reason: str) -> pb.GrantResponse:
    """Grant a lease to svc-a and end it for ``reason``."""
    stub, clock = harness.stub, harness.clock
    if reason == "idle_timeout":
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
        clock.advance(11)
        harness.expire()
    elif reason == "max_duration":
        granted = stub.Grant(pb.GrantRequest(principal="svc-a", tier="capped"))
        clock.advance(9)
        stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=granted.lease_id)]))
        clock.advance(9)
        harness.expire()
    elif reason == "revoked":
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
        clock.advance(2)
        stub.Revoke(pb.RevokeRequest(fingerprint=granted.lease.fingerprint), metadata=as_principal("ops"))
    else:
        granted = stub.Grant(pb.GrantRequest(principal="svc-a"))
        clock.advance(2)
        stub.Revoke(pb.RevokeRequest(lease_id=granted.lease_id, release=True), metadata=as_principal("svc-a"))
    harness.flush()
    return granted


def audit_lines(data_dir: pathlib.Path) -> list[bytes]:
    return (data_dir / "audit" / "audit.jsonl").read_bytes().splitlines()


def span_text(span: ReadableSpan) -> str:
    """Return every name, attribute and event of a span as one string, for leak scans."""
    parts = [span.name, json.dumps(dict(span.attributes or {}), default=str)]
    parts += [event.name + json.dumps(dict(event.attributes or {}), default=str) for event in span.events]
    parts += [json.dumps(dict(link.attributes or {}), default=str) for link in span.links]
    return "\n".join(parts)


@pytest.fixture
def harness(tmp_path: pathlib.Path) -> Iterator[Harness]:
    running = Harness(tmp_path / "data", ManualClock())
    yield running
    running.stop()


@pytest.mark.parametrize("reason", END_REASONS)
def test_end_span_per_reason(harness: Harness, reason: str) -> None:
    granted = end_lease(harness, reason)

    ends = harness.end_spans()
    grants = harness.grant_spans()
    assert len(ends) == 1
    assert len(grants) == 1
    span = ends[0]
    attributes = dict(span.attributes or {})
    assert attributes["session.lease.fingerprint"] == granted.lease.fingerprint
    assert attributes["session.principal"] == "svc-a"
    assert attributes["session.tier"] == granted.lease.tier
    assert attributes["session.end_reason"] == reason
    expected_duration = {"idle_timeout": 10.0, "max_duration": 15.0, "revoked": 2.0, "released": 2.0}[reason]
    assert attributes["session.duration_s"] == pytest.approx(expected_duration)
    expected_revoker = {"revoked": "ops", "released": "svc-a"}.get(reason)
    assert attributes.get("session.revoked_by") == expected_revoker
    assert [link.context for link in span.links] == [grants[0].context]


@pytest.mark.parametrize("reason", END_REASONS)
def test_end_span_event_matches_audit_record(harness: Harness, reason: str) -> None:
    granted = end_lease(harness, reason)

    lines = audit_lines(harness.data_dir)  # type: ignore[arg-type]
    end_lines = [line for line in lines if json.loads(line)["type"] == "end"]
    events = [event for event in harness.end_spans()[0].events if event.name == "audit.record"]
    assert len(end_lines) == 1
    assert len(events) == 1
    record = json.loads(end_lines[0])
    assert record["fingerprint"] == granted.lease.fingerprint
    assert events[0].attributes == {"audit.seq": record["seq"], "audit.hash": record_hash(end_lines[0])}


def test_spans_hold_no_lease_id(harness: Harness) -> None:
    lease_ids = [end_lease(harness, reason).lease_id for reason in END_REASONS]

    spans = harness.spans.get_finished_spans()
    assert len(spans) == 2 * len(END_REASONS)
    for span in spans:
        text = span_text(span)
        for lease_id in lease_ids:
            assert lease_id not in text, f"span {span.name} contains a raw lease ID"


def test_end_span_without_audit_log(tmp_path: pathlib.Path) -> None:
    harness = Harness(None, ManualClock())
    try:
        end_lease(harness, "idle_timeout")
    finally:
        harness.stop()

    ends = harness.end_spans()
    assert len(ends) == 1
    assert [event.name for event in ends[0].events] == []
    assert len(ends[0].links) == 1


def test_lease_restored_after_restart_links_grant(tmp_path: pathlib.Path) -> None:
    clock = ManualClock()
    first = Harness(tmp_path, clock)
    granted = first.stub.Grant(pb.GrantRequest(principal="svc-a"))
    first.flush()
    first.stop()
    grant_context = first.grant_spans()[0].get_span_context()

    clock.advance(60)
    second = Harness(tmp_path, clock)
    # The lease ends once the restart grace has passed.
    clock.advance(2.5)
    second.expire()
    second.flush()
    second.stop()

    ends = second.end_spans()
    assert len(ends) == 1
    assert dict(ends[0].attributes or {})["session.lease.fingerprint"] == granted.lease.fingerprint
    assert dict(ends[0].attributes or {})["session.end_reason"] == "idle_timeout"
    assert [(link.context.trace_id, link.context.span_id) for link in ends[0].links] == [
        (grant_context.trace_id, grant_context.span_id)
    ]
    assert [event.name for event in ends[0].events] == ["audit.record"]


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, object], float]]]:
    data = reader.get_metrics_data()
    found: dict[str, list[tuple[dict[str, object], float]]] = {}
    assert data is not None
    for resource_metrics in data.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                found[metric.name] = [(dict(point.attributes or {}), point.value) for point in metric.data.data_points]
    return found


def test_metrics_count_grants_renewals_ends(harness: Harness) -> None:
    stub = harness.stub
    renewed_lease = stub.Grant(pb.GrantRequest(principal="svc-a"))
    stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=renewed_lease.lease_id)] * 3))
    stub.Grant(pb.GrantRequest(principal="svc-b", tier="capped"))
    end_lease(harness, "revoked")
    stub.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id=renewed_lease.lease_id)]))

    points = metric_points(harness.metrics)

    assert sorted(value for _, value in points["session_authority.grants"]) == [1, 2]
    assert points["session_authority.renewals"] == [({}, 4)]
    assert points["session_authority.ends"] == [({"session.end_reason": "revoked", "session.tier": "standard"}, 1)]
    active = {attributes["session.tier"]: value for attributes, value in points["session_authority.leases.active"]}
    assert active == {"standard": 1, "capped": 1}

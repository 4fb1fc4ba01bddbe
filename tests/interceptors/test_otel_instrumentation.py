"""The server interceptors beside opentelemetry-instrumentation-grpc, their metrics, and failing exporters."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc
import pytest
from lease_harness import (
    HOLD,
    QUICK,
    Outcome,
    Recorder,
    TestCall,
    _aio_forms,
    _generic_handler,
    _sync_forms,
    enforcer_config,
    form_shape,
    lease_metadata,
    wait_for,
)
from opentelemetry.instrumentation.grpc import (
    GrpcAioInstrumentorServer,
    GrpcInstrumentorServer,
    aio_server_interceptor,
    server_interceptor,
)
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from session_authority.clients._client import AuthorityClient
from session_authority.interceptors._aio_server import AioLeaseServerInterceptor
from session_authority.interceptors._enforcer import EnforcerConfig
from session_authority.interceptors._server import LeaseServerInterceptor
from session_authority.interceptors._telemetry import (
    CUT_OFF_CALLS_METRIC,
    CUT_OFF_EVENT,
    CUTOFF_DELAY_METRIC,
    REFUSED_CALLS_METRIC,
    REFUSED_EVENT,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED.value[0]
UNKNOWN = grpc.StatusCode.UNKNOWN.value[0]
INTERNAL = grpc.StatusCode.INTERNAL.value[0]

OUTER = "instrumented_before"
"""The instrumentation was installed before the server was built: its interceptor runs first, around ours."""

INNER = "placed_after"
"""The instrumentation's interceptor follows ours in the list: it runs inside ours."""


class _Server:
    """A sync or aio server on loopback with our interceptor and the gRPC instrumentation in a given order."""

    def __init__(self, kind: str, order: str, config: EnforcerConfig, tracer_provider: TracerProvider | None) -> None:
        self.kind = kind
        self.recorder = Recorder()
        if kind == "sync":
            self._start_sync(order, config, tracer_provider)
        else:
            self.loop = asyncio.new_event_loop()
            self.thread = threading.Thread(target=self.loop.run_forever, name="test-otel-aio", daemon=True)
            self.thread.start()
            self._run(self._start_aio(order, config, tracer_provider))

    def _start_sync(self, order: str, config: EnforcerConfig, tracer_provider: TracerProvider | None) -> None:
        self.interceptor: Any = LeaseServerInterceptor(config)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=8)
        if order == OUTER:
            # The instrumentor wraps grpc.server and puts its interceptor first.
            instrumentor = GrpcInstrumentorServer()
            instrumentor.instrument(tracer_provider=tracer_provider)
            try:
                self.server = grpc.server(self.executor, interceptors=[self.interceptor])
            finally:
                instrumentor.uninstrument()
        else:
            interceptors = [self.interceptor, server_interceptor(tracer_provider=tracer_provider)]
            self.server = grpc.server(self.executor, interceptors=interceptors)
        self.server.add_generic_rpc_handlers([_generic_handler(_sync_forms(self.recorder), {})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    async def _start_aio(self, order: str, config: EnforcerConfig, tracer_provider: TracerProvider | None) -> None:
        self.interceptor = AioLeaseServerInterceptor(config)
        if order == OUTER:
            instrumentor = GrpcAioInstrumentorServer()
            instrumentor.instrument(tracer_provider=tracer_provider)
            try:
                self.server = grpc.aio.server(interceptors=[self.interceptor])
            finally:
                instrumentor.uninstrument()
        else:
            interceptors = [self.interceptor, aio_server_interceptor(tracer_provider=tracer_provider)]
            self.server = grpc.aio.server(interceptors=interceptors)
        forms = dict(_aio_forms(self.recorder), **_sync_forms(self.recorder))
        self.server.add_generic_rpc_handlers([_generic_handler(forms, {})])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.kind == "sync":
            self.server.stop(grace=None).wait(10)
            self.executor.shutdown(wait=True)
            self.interceptor.close()
            return
        self._run(self.server.stop(None))
        self._run(self.interceptor.aclose())
        self._run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def _tracing() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _refuse_and_cut_off(
    authority: Any, config: EnforcerConfig, server_factory: Callable[[EnforcerConfig], _Server], form: str
) -> tuple[Outcome, Outcome, Any, Any]:
    """Send one call on a revoked lease and one held call whose lease is then revoked."""
    admin = AuthorityClient(authority.target, principal="svc")
    ended = admin.grant("standard", principal="svc")
    admin.revoke(ended.lease_id)
    live = admin.grant("standard", principal="svc")
    server = server_factory(config)
    channel = grpc.insecure_channel(server.target)
    shape = form_shape(form)
    try:
        refused = TestCall(channel, form, shape, QUICK, lease_metadata(ended.lease_id)).result()
        held = TestCall(channel, form, shape, HOLD, lease_metadata(live.lease_id))
        wait_for(server.recorder.holding.is_set, 10, "handler holding the call")
        admin.revoke(live.lease_id)
        cut = held.result()
    finally:
        channel.close()
        server.stop()
        admin.close()
    return refused, cut, ended, live


def _rpc_spans(exporter: InMemorySpanExporter, form: str) -> list[ReadableSpan]:
    return [
        span
        for span in exporter.get_finished_spans()
        if span.kind is SpanKind.SERVER and span.name == f"/test.Lease/{form}"
    ]


def _event_names(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events if event.name.startswith("session.")]


# -- instrumentation installed before ours: its span wraps our interceptor ----------------------

OUTER_CASES = [
    ("sync", "unary_function"),
    ("sync", "server_stream_generator"),
    ("sync", "client_stream_function"),
    ("aio", "unary_coroutine"),
    ("aio", "server_stream_async_generator"),
    ("aio", "bidi_async_generator"),
    ("aio", "unary_function"),
]


@pytest.mark.parametrize(("kind", "form"), OUTER_CASES)
def test_instrumented_before_spans_unauthenticated(kind: str, form: str, authority: Any) -> None:
    provider, exporter = _tracing()
    config = enforcer_config(authority.target)

    try:
        refused, cut, ended, live = _refuse_and_cut_off(
            authority, config, lambda config: _Server(kind, OUTER, config, provider), form
        )
        wait_for(lambda: len(_rpc_spans(exporter, form)) == 2, 5, "two RPC spans finished")
    finally:
        provider.shutdown()

    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.code is grpc.StatusCode.UNAUTHENTICATED
    refused_span, cut_span = _rpc_spans(exporter, form)
    for span in (refused_span, cut_span):
        assert span.attributes["rpc.grpc.status_code"] == UNAUTHENTICATED, span.name
        # The RPC conventions leave a server span's status unset for UNAUTHENTICATED.
        assert span.status.status_code is not StatusCode.ERROR, span.status
    assert _event_names(refused_span) == [REFUSED_EVENT]
    assert _event_names(cut_span) == [CUT_OFF_EVENT]
    assert refused_span.events[0].attributes["session.lease.fingerprint"] == ended.fingerprint
    assert cut_span.events[0].attributes["session.lease.fingerprint"] == live.fingerprint


# -- instrumentation placed after ours: its span lives inside our interceptor ------------------

# On aio servers the instrumentation (0.66b2, _aio_server.py) awaits or
# async-iterates every handler it wraps, so sync handlers fail under it with
# or without our interceptor. Only async handlers serve the aio cases here.
INNER_CASES = [
    ("sync", "unary_function"),
    ("sync", "client_stream_function"),
    ("aio", "unary_coroutine"),
    ("aio", "server_stream_async_generator"),
]


@pytest.mark.parametrize(("kind", "form"), INNER_CASES)
def test_placed_after_cut_off_never_unknown(kind: str, form: str, authority: Any) -> None:
    provider, exporter = _tracing()
    config = enforcer_config(authority.target)

    try:
        refused, cut, _, _ = _refuse_and_cut_off(
            authority, config, lambda config: _Server(kind, INNER, config, provider), form
        )
        wait_for(lambda: len(_rpc_spans(exporter, form)) == 1, 5, "one RPC span finished")
    finally:
        provider.shutdown()

    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.code is grpc.StatusCode.UNAUTHENTICATED
    # A refused call never reaches the instrumentation, so only the cut-off call has an RPC span.
    (span,) = _rpc_spans(exporter, form)
    assert span.attributes["rpc.grpc.status_code"] not in (UNKNOWN, INTERNAL)
    assert span.status.status_code is not StatusCode.ERROR, span.status


@pytest.mark.parametrize(("kind", "form"), INNER_CASES)
def test_placed_after_cut_off_unauthenticated(kind: str, form: str, authority: Any) -> None:
    provider, exporter = _tracing()
    config = enforcer_config(authority.target)

    try:
        _refuse_and_cut_off(authority, config, lambda config: _Server(kind, INNER, config, provider), form)
        wait_for(lambda: len(_rpc_spans(exporter, form)) == 1, 5, "one RPC span finished")
    finally:
        provider.shutdown()

    (span,) = _rpc_spans(exporter, form)
    assert span.attributes["rpc.grpc.status_code"] == UNAUTHENTICATED
    assert _event_names(span) == [CUT_OFF_EVENT]


# -- metrics -----------------------------------------------------------------------------------


def _metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    points: dict[str, list[Any]] = {}
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_cut_off_delay_and_counters_recorded(kind: str, authority: Any) -> None:
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    form = "unary_function" if kind == "sync" else "unary_coroutine"
    config = enforcer_config(authority.target, meter_provider=meter_provider)

    try:
        _refuse_and_cut_off(authority, config, lambda config: _Server(kind, OUTER, config, None), form)
        points = _metric_points(reader)
    finally:
        meter_provider.shutdown()

    (refused,) = points[REFUSED_CALLS_METRIC]
    assert refused.value == 1
    assert dict(refused.attributes) == {"session.end_reason": "revoked", "rpc.grpc.status_code": UNAUTHENTICATED}
    (cut_off,) = points[CUT_OFF_CALLS_METRIC]
    assert cut_off.value == 1
    assert cut_off.attributes["session.end_reason"] == "revoked"
    (delay,) = points[CUTOFF_DELAY_METRIC]
    assert delay.count == 1
    assert delay.min >= 0.0
    assert delay.attributes["session.end_reason"] == "revoked"


class _BrokenMeterProvider:
    """A meter provider whose every meter fails."""

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("meter provider broken on purpose")


def test_broken_meter_provider_calls_unaffected(authority: Any) -> None:
    config = enforcer_config(authority.target, meter_provider=_BrokenMeterProvider())

    refused, cut, _, _ = _refuse_and_cut_off(
        authority, config, lambda config: _Server("sync", OUTER, config, None), "unary_function"
    )

    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.end_reason == "revoked"


# -- failing exporters ---------------------------------------------------------------------------


class _RaisingExporter(SpanExporter):
    """An exporter that raises on every export, as a broken backend client might."""

    def __init__(self) -> None:
        self.attempts = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.attempts += 1
        raise ConnectionError("span backend unreachable on purpose")

    def shutdown(self) -> None:
        return None


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_raising_exporter_statuses_unchanged(kind: str, authority: Any) -> None:
    exporter = _RaisingExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    form = "unary_function" if kind == "sync" else "unary_coroutine"
    config = enforcer_config(authority.target)
    admin = AuthorityClient(authority.target, principal="svc")
    quick_lease = admin.grant("standard", principal="svc")

    def factory(config: EnforcerConfig) -> _Server:
        return _Server(kind, OUTER, config, provider)

    try:
        refused, cut, _, _ = _refuse_and_cut_off(authority, config, factory, form)
        server = factory(config)
        channel = grpc.insecure_channel(server.target)
        try:
            served = TestCall(channel, form, "unary_unary", QUICK, lease_metadata(quick_lease.lease_id)).result()
        finally:
            channel.close()
            server.stop()
    finally:
        admin.close()
        provider.shutdown()

    assert served.code is grpc.StatusCode.OK
    assert served.responses == [b"done"]
    assert refused.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.code is grpc.StatusCode.UNAUTHENTICATED
    assert cut.end_reason == "revoked"
    assert exporter.attempts == 3

"""Lease IDs are random bearer credentials, and no log line, span, status or CLI error contains one."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import pathlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from session_authority.clients import AuthorityClient, AuthorityError, Session, SessionEnded
from session_authority.clients._cli import main as cli_main
from session_authority.clients._metadata import LEASE_METADATA_KEY, fingerprint
from session_authority.interceptors import AioLeaseServerInterceptor, EnforcerConfig, LeaseServerInterceptor
from session_authority.server import LeaseTable, ManualClock
from session_authority.server import _table

ECHO_METHOD = "/test.Echo/Call"
URL_SAFE = re.compile(r"[A-Za-z0-9_-]{22}")


# --- how lease IDs are made ------------------------------------------------------------------


def test_lease_ids_128_bits_url_safe() -> None:
    table = LeaseTable(ManualClock())

    lease_ids = [table.grant("svc", "standard", 60.0, 3600.0)[0] for _ in range(10_000)]

    assert len(set(lease_ids)) == 10_000
    assert all(URL_SAFE.fullmatch(lease_id) for lease_id in lease_ids)
    assert {len(base64.urlsafe_b64decode(lease_id + "==")) for lease_id in lease_ids} == {16}


def test_lease_ids_come_from_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    requested: list[int] = []
    real_token_urlsafe = _table.secrets.token_urlsafe

    def recording_token_urlsafe(nbytes: int) -> str:
        requested.append(nbytes)
        return real_token_urlsafe(nbytes)

    monkeypatch.setattr(_table.secrets, "token_urlsafe", recording_token_urlsafe)

    LeaseTable(ManualClock()).grant("svc", "standard", 60.0, 3600.0)

    assert requested == [16]


# --- protected servers -----------------------------------------------------------------------


class _SpanPerCall(grpc.ServerInterceptor):
    """Opens a span around each call, so that the lease interceptor's span events land in it."""

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("test-no-secrets")

    def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        method = handler_call_details.method
        tracer = self._tracer
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def traced(request: Any, context: Any) -> Any:
            with tracer.start_as_current_span(method, record_exception=False):
                return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(traced, handler.request_deserializer, handler.response_serializer)


class _AioSpanPerCall(grpc.aio.ServerInterceptor):
    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = provider.get_tracer("test-no-secrets")

    async def intercept_service(self, continuation: Callable[..., Any], handler_call_details: Any) -> Any:
        method = handler_call_details.method
        tracer = self._tracer
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        async def traced(request: Any, context: Any) -> Any:
            with tracer.start_as_current_span(method, record_exception=False):
                return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(traced, handler.request_deserializer, handler.response_serializer)


class _Echo(grpc.GenericRpcHandler):
    def __init__(self, aio: bool) -> None:
        self._aio = aio

    def service(self, handler_call_details: Any) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != ECHO_METHOD:
            return None
        if self._aio:

            async def echo_coroutine(request: bytes, context: Any) -> bytes:
                return request

            return grpc.unary_unary_rpc_method_handler(echo_coroutine)
        return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def _enforcer_config(authority_target: str) -> EnforcerConfig:
    return EnforcerConfig(
        authority_target=authority_target,
        staleness_bound_seconds=2.0,
        activity_batch_interval_seconds=0.05,
    )


class SyncProtectedServer:
    def __init__(self, authority_target: str, provider: TracerProvider) -> None:
        self.interceptor = LeaseServerInterceptor(_enforcer_config(authority_target))
        self.executor = futures.ThreadPoolExecutor(max_workers=4)
        self.server = grpc.server(self.executor, interceptors=[_SpanPerCall(provider), self.interceptor])
        self.server.add_generic_rpc_handlers([_Echo(aio=False)])
        self.target = f"127.0.0.1:{self.server.add_insecure_port('127.0.0.1:0')}"
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)
        self.executor.shutdown(wait=True)
        self.interceptor.close()


class AioProtectedServer:
    def __init__(self, authority_target: str, provider: TracerProvider) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio-protected", daemon=True)
        self.thread.start()
        self.target = asyncio.run_coroutine_threadsafe(self._start(authority_target, provider), self.loop).result(30)

    async def _start(self, authority_target: str, provider: TracerProvider) -> str:
        self.interceptor = AioLeaseServerInterceptor(_enforcer_config(authority_target))
        self.server = grpc.aio.server(interceptors=[_AioSpanPerCall(provider), self.interceptor])
        self.server.add_generic_rpc_handlers([_Echo(aio=True)])
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        return f"127.0.0.1:{port}"

    async def _stop(self) -> None:
        await self.server.stop(grace=None)
        await self.interceptor.aclose()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# --- the end-to-end scan ---------------------------------------------------------------------


class Evidence:
    """Every lease ID issued and every text an attacker-visible or operator-visible channel carried."""

    def __init__(self) -> None:
        self.lease_ids: set[str] = set()
        self.texts: list[tuple[str, str]] = []

    def issued(self, lease_id: str | None) -> str:
        assert lease_id, "a lease ID was expected"
        self.lease_ids.add(lease_id)
        return lease_id

    def seen(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    def call(self, channel: grpc.Channel, lease_value: str | None, where: str) -> grpc.StatusCode:
        metadata = () if lease_value is None else ((LEASE_METADATA_KEY, lease_value),)
        try:
            channel.unary_unary(ECHO_METHOD)(b"ping", metadata=metadata, timeout=10)
        except grpc.RpcError as exc:
            self.seen(f"{where} status", f"{exc.code()} {exc.details()} {exc.trailing_metadata()}")
            return exc.code()
        return grpc.StatusCode.OK

    def call_until_rejected(self, channel: grpc.Channel, lease_value: str, where: str) -> grpc.StatusCode:
        """Call until the enforcer rejects the lease, because revocations reach it over its watch stream."""
        deadline = time.monotonic() + 5.0
        code = self.call(channel, lease_value, where)
        while code is grpc.StatusCode.OK and time.monotonic() < deadline:
            time.sleep(0.05)
            code = self.call(channel, lease_value, where)
        return code

    def leaks(self) -> list[str]:
        found = []
        for where, text in self.texts:
            for lease_id in self.lease_ids:
                # Half of an ID (11 characters, 66 bits) is already too much of the secret to show.
                for part in (lease_id, lease_id[:11], lease_id[11:]):
                    if part in text:
                        found.append(f"{where}: contains {'the lease ID' if part == lease_id else 'half a lease ID'}")
        return found


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def traced_authority(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Any:
    """The authority subprocess at DEBUG level, printing its spans to its log with the console exporter."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
    # The shared fixture starts the process only now, so it inherits the variables set above.
    return request.getfixturevalue("authority_process")


def test_no_lease_id_in_logs_spans_or_errors(
    traced_authority: Any,
    spans: tuple[TracerProvider, InMemorySpanExporter],
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    provider, exporter = spans
    evidence = Evidence()
    target = traced_authority.target
    sync_server = SyncProtectedServer(target, provider)
    aio_server = AioProtectedServer(target, provider)
    client = AuthorityClient(target, principal="svc-a")
    try:
        _run_scenario(evidence, client, sync_server.target, aio_server.target, target)
        _run_cli(evidence, target, capsys)
    finally:
        client.close()
        sync_server.stop()
        aio_server.stop()
    assert traced_authority.stop() == 0

    for record in caplog.records:
        evidence.seen(f"log {record.name}", record.getMessage())
    for span in exporter.get_finished_spans():
        evidence.seen(f"span {span.name}", span.to_json())
    evidence.seen("authority log and spans", traced_authority.log())
    for path in sorted(traced_authority.data_dir.rglob("*")):
        if path.is_file():
            evidence.seen(f"data file {path.name}", path.read_bytes().decode("latin-1"))

    # The scan means something only if these channels did record the leases, by fingerprint.
    authority_log = traced_authority.log()
    interceptor_log = "\n".join(record.getMessage() for record in caplog.records)
    span_text = "\n".join(span.to_json() for span in exporter.get_finished_spans())
    assert len(evidence.lease_ids) == 7
    assert all(fingerprint(lease_id) in authority_log for lease_id in evidence.lease_ids)
    assert '"name": "session.end"' in authority_log
    assert any(fingerprint(lease_id) in interceptor_log for lease_id in evidence.lease_ids)
    assert "session.call_refused" in span_text
    assert evidence.leaks() == []


def _run_scenario(
    evidence: Evidence, client: AuthorityClient, sync_target: str, aio_target: str, authority_target: str
) -> None:
    sync_channel = grpc.insecure_channel(sync_target)
    aio_channel = grpc.insecure_channel(aio_target)
    try:
        # A session that calls both servers, renews by activity and is released at close.
        with Session(client, principal="svc-a") as session:
            session_channel = grpc.intercept_channel(sync_channel, session.interceptor())
            for _ in range(3):
                session_channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10)
            evidence.issued(session.lease_id)
            aio_session_channel = grpc.intercept_channel(aio_channel, session.interceptor())
            aio_session_channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10)

        # Grants, explicit renewals and calls on both servers.
        granted = client.grant(principal="svc-a")
        lease_id = evidence.issued(granted.lease_id)
        client.renew([(lease_id, 0.0)])
        client.time_to_live(lease_id)
        for channel, where in ((sync_channel, "sync"), (aio_channel, "aio")):
            assert evidence.call(channel, lease_id, where) is grpc.StatusCode.OK

        # Revoke, then present the ended lease to both servers and to the authority.
        client.revoke(lease_id)
        for channel, where in ((sync_channel, "sync"), (aio_channel, "aio")):
            assert evidence.call_until_rejected(channel, lease_id, f"{where} revoked") is grpc.StatusCode.UNAUTHENTICATED
        _expect_error(evidence, "renew revoked", lambda: client.renew([(lease_id, 0.0)]))
        _expect_error(evidence, "revoke again", lambda: client.revoke(lease_id))

        # Another principal presents a stolen ID.
        stolen = evidence.issued(client.grant(principal="svc-a").lease_id)
        with AuthorityClient(authority_target, principal="svc-thief") as thief:
            _expect_error(evidence, "renew stolen", lambda: thief.renew([(stolen, 0.0)]))

        # Bad metadata: variants of a real ID, garbage, too long, and none at all.
        live = evidence.issued(client.grant(principal="svc-a").lease_id)
        for channel, where in ((sync_channel, "sync"), (aio_channel, "aio")):
            for bad in (live + "x", live[:-1], live + live, "not-a-lease", "x" * 300):
                evidence.call(channel, bad, f"{where} bad metadata")
            evidence.call(channel, None, f"{where} no lease")
        for bad in (live + "x", "y" * 300):
            _expect_error(evidence, "ttl bad id", lambda bad=bad: client.time_to_live(bad))
            _expect_error(evidence, "revoke bad id", lambda bad=bad: client.revoke(bad))

        # Expiry: a lease in the 1 s idle tier ends while cached by both servers.
        brief = evidence.issued(client.grant("brief", principal="svc-a").lease_id)
        for channel, where in ((sync_channel, "sync"), (aio_channel, "aio")):
            evidence.call(channel, brief, f"{where} brief")
        time.sleep(1.5)
        for channel, where in ((sync_channel, "sync"), (aio_channel, "aio")):
            assert evidence.call_until_rejected(channel, brief, f"{where} expired") is grpc.StatusCode.UNAUTHENTICATED

        # A session whose lease is revoked under it.
        with Session(client, principal="svc-b") as revoked_session:
            revoked_channel = grpc.intercept_channel(sync_channel, revoked_session.interceptor())
            revoked_channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10)
            session_lease = evidence.issued(revoked_session.lease_id)
            client.revoke(session_lease)
            try:
                revoked_channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10)
            except (grpc.RpcError, SessionEnded) as exc:
                evidence.seen("revoked session call", repr(exc) + str(exc))
    finally:
        sync_channel.close()
        aio_channel.close()


def _expect_error(evidence: Evidence, where: str, action: Callable[[], object]) -> None:
    try:
        result = action()
    except AuthorityError as exc:
        evidence.seen(f"{where} error", f"{exc} {exc.details}")
        return
    evidence.seen(f"{where} reply", repr(result))


def _run_cli(evidence: Evidence, authority_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    def run(*argv: str) -> tuple[int, str, str]:
        status = cli_main(["--authority", authority_target, "--principal", "svc-cli", *argv])
        captured = capsys.readouterr()
        evidence.seen(f"cli {argv[:2]} stderr", captured.err)
        return status, captured.out, captured.err

    status, out, _ = run("--json", "lease", "grant")
    assert status == 0
    lease_id = evidence.issued(json.loads(out)["lease_id"])
    for argv in (
        ("lease", "renew", lease_id),
        ("lease", "ttl", lease_id),
        ("lease", "list"),
        ("-v", "lease", "revoke", lease_id),
        ("-v", "lease", "revoke", lease_id),
        ("-v", "lease", "renew", lease_id),
        ("lease", "ttl", lease_id + "x" * 300),
    ):
        status, out, _ = run(*argv)
        if argv[-1] not in (lease_id,):
            evidence.seen(f"cli {argv[:2]} stdout", out)
    status, _, err = run("--timeout", "0.5", "--authority", "127.0.0.1:1", "lease", "ttl", lease_id)
    assert status != 0, err
    evidence.seen("cli unreachable stderr", err)

"""Bad metadata, blocked readers, session-end callbacks and transparency of the server interceptors."""

from __future__ import annotations

import concurrent.futures
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from lease_harness import (
    GUARDED_SERVICE,
    HOLD,
    QUICK,
    AioServer,
    SyncServer,
    TestCall,
    lease_metadata,
    enforcer_config,
    wait_for,
    wait_for_threads,
)

from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY
from session_authority.interceptors._enforcer import EnforcerConfig, SessionEndInfo
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

BAD_METADATA = {
    "missing": ((), "carries no session lease"),
    "empty": (((LEASE_METADATA_KEY, ""),), "is empty"),
    "oversized": (((LEASE_METADATA_KEY, "a" * 257),), "over the maximum 256"),
    "binary": ((("session-lease-bin", b"\x01\x02"),), "binary metadata"),
    "repeated": (((LEASE_METADATA_KEY, "a" * 22), (LEASE_METADATA_KEY, "b" * 22)), "repeated 2 times"),
}


def _make_server(kind: str, config: EnforcerConfig, **kwargs: Any) -> SyncServer | AioServer:
    return SyncServer(config, **kwargs) if kind == "sync" else AioServer(config, **kwargs)


def _quick_form(kind: str) -> str:
    return "unary_function" if kind == "sync" else "unary_coroutine"


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_bad_metadata_unauthenticated(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    server = _make_server(kind, enforcer_config(authority.target))
    validations: list[str] = []
    link = server.interceptor.enforcer._link
    real_validate = link.validate
    link.validate = lambda *args: validations.append(args[1]) or real_validate(*args)  # type: ignore[method-assign]
    channel = grpc.insecure_channel(server.target)
    method = channel.unary_unary(f"/test.Lease/{_quick_form(kind)}")
    try:
        for case, (metadata, expected) in BAD_METADATA.items():
            with pytest.raises(grpc.RpcError) as caught:
                method(QUICK, metadata=metadata, timeout=5)

            error: Any = caught.value
            assert error.code() is grpc.StatusCode.UNAUTHENTICATED, case
            assert expected in error.details(), (case, error.details())
            assert dict(error.trailing_metadata())[END_REASON_TRAILER_KEY] == "unknown", case
        assert validations == []
        assert server.recorder.entered == []

        lease_id = admin.grant("standard", principal="svc").lease_id
        assert method(QUICK, metadata=lease_metadata(lease_id), timeout=5) == b"done"
    finally:
        channel.close()
        server.stop()
        admin.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_non_ascii_lease_never_admitted(kind: str, authority: Any) -> None:
    server = _make_server(kind, enforcer_config(authority.target))
    channel = grpc.insecure_channel(server.target)
    method = channel.unary_unary(f"/test.Lease/{_quick_form(kind)}")
    try:
        with pytest.raises((grpc.RpcError, ValueError)) as caught:
            method(QUICK, metadata=((LEASE_METADATA_KEY, "l\u00e9ase"),), timeout=5)
        if isinstance(caught.value, grpc.RpcError):
            error: Any = caught.value
            assert error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INTERNAL)
        assert server.recorder.entered == []
    finally:
        channel.close()
        server.stop()


def test_eight_blocked_client_streams_end_on_revoke(authority: Any) -> None:
    baseline = threading.active_count()
    admin = AuthorityClient(authority.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    server = SyncServer(enforcer_config(authority.target), max_workers=4)
    channel = grpc.insecure_channel(server.target)
    try:
        calls = [
            TestCall(channel, "client_stream_function", "stream_unary", HOLD, lease_metadata(lease_id))
            for _ in range(8)
        ]
        wait_for(lambda: len(server.recorder.entered) == 4, 10, "four handlers blocked reading")

        admin.revoke(lease_id)
        outcomes = [call.result(timeout_seconds=10) for call in calls]

        for outcome in outcomes:
            assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, outcome
            assert outcome.end_reason == "revoked", outcome
        assert len(server.recorder.entered) == 4
        fresh = admin.grant("standard", principal="svc").lease_id
        started = time.monotonic()
        response = channel.unary_unary("/test.Lease/unary_function")(QUICK, metadata=lease_metadata(fresh), timeout=5)
        assert response == b"done"
        assert time.monotonic() - started < 5
    finally:
        channel.close()
        server.stop()
        admin.close()
    wait_for_threads(baseline)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_session_end_callback_once_per_lease(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease = admin.grant("standard", principal="svc")
    server = _make_server(kind, enforcer_config(authority.target))
    ends: list[SessionEndInfo] = []
    server.interceptor.on_session_end(ends.append)
    channel = grpc.insecure_channel(server.target)
    form = "client_stream_function" if kind == "sync" else "client_stream_iterator"
    try:
        calls = [TestCall(channel, form, "stream_unary", HOLD, lease_metadata(lease.lease_id)) for _ in range(2)]
        wait_for(lambda: len(server.recorder.entered) == 2, 10, "two handlers holding")

        admin.revoke(lease.lease_id)
        for call in calls:
            assert call.result().code is grpc.StatusCode.UNAUTHENTICATED
        wait_for(lambda: len(ends) == 1, 5, "session end callback")
        time.sleep(0.2)

        assert ends == [SessionEndInfo("svc", "standard", lease.fingerprint, ends[0].reason)]
        assert ends[0].reason.value == "revoked"
    finally:
        channel.close()
        server.stop()
        admin.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_revoke_during_validate_not_cached(kind: str, authority: Any) -> None:
    # The authority replies "alive" to the Validate before the revoke, and the
    # watch stream delivers the end before the enforcer applies that reply.
    admin = AuthorityClient(authority.target, principal="svc")
    lease = admin.grant("standard", principal="svc")
    # Activity reports every 30 s, so no renewal reply corrects the cache during the test.
    server = _make_server(kind, enforcer_config(authority.target, activity_batch_interval_seconds=30.0))
    enforcer = server.interceptor.enforcer
    link = enforcer._link
    real_validate = link.validate

    def validate_then_revoke(*args: Any) -> Any:
        reply = real_validate(*args)
        admin.revoke(lease.lease_id)
        wait_for(
            lambda: enforcer._ended.get(lease.lease_id, enforcer._clock()) is not None,
            10,
            "the end from the watch stream",
        )
        return reply

    link.validate = validate_then_revoke  # type: ignore[method-assign]
    channel = grpc.insecure_channel(server.target)
    method = channel.unary_unary(f"/test.Lease/{_quick_form(kind)}")
    outcomes = []
    try:
        for _ in range(2):
            try:
                method(QUICK, metadata=lease_metadata(lease.lease_id), timeout=15)
                outcomes.append(("OK", None))
            except grpc.RpcError as exc:
                trailers = {item.key: item.value for item in exc.trailing_metadata() or ()}
                outcomes.append((exc.code().name, trailers.get(END_REASON_TRAILER_KEY)))
    finally:
        channel.close()
        server.stop()
        admin.close()

    assert outcomes == [("UNAUTHENTICATED", "revoked")] * 2


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_client_cancel_leaves_in_flight_set(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    server = _make_server(kind, enforcer_config(authority.target))
    ends: list[SessionEndInfo] = []
    server.interceptor.on_session_end(ends.append)
    channel = grpc.insecure_channel(server.target)
    form = "bidi_generator" if kind == "sync" else "bidi_async_generator"
    release = threading.Event()

    def requests() -> Any:
        yield HOLD
        release.wait(10)

    try:
        call = channel.stream_stream(f"/test.Lease/{form}")(requests(), metadata=lease_metadata(lease_id))
        assert next(call) == HOLD
        wait_for(lambda: server.interceptor.enforcer.in_flight_count() == 1, 5, "call registered")

        call.cancel()

        wait_for(lambda: server.interceptor.enforcer.in_flight_count() == 0, 5, "call removed")
        assert server.interceptor.enforcer.cached_lease_count() == 1
        assert ends == []
    finally:
        release.set()
        channel.close()
        server.stop()
        admin.close()


def _transparency_handlers(kind: str) -> dict[str, Any]:
    if kind == "sync":

        def set_status(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.set_trailing_metadata((("app-trailer", "kept"),))
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("handler said no")
            return b""

        def abort(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort_with_status(_Status(grpc.StatusCode.NOT_FOUND, "no such thing", (("app-trailer", "abort"),)))
            return b""

        def introspect(request: bytes, context: grpc.ServicerContext) -> bytes:
            keys = sorted(key for key, _ in context.invocation_metadata())
            remaining = context.time_remaining()
            return f"{context.peer().startswith('ipv4:')}|{','.join(keys)}|{0 < remaining <= 30}".encode()

    else:

        async def set_status(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[misc]
            context.set_trailing_metadata((("app-trailer", "kept"),))
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("handler said no")
            return b""

        async def abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[misc]
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing", (("app-trailer", "abort"),))
            return b""

        async def introspect(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[misc]
            keys = sorted(key for key, _ in context.invocation_metadata())
            remaining = context.time_remaining()
            return f"{context.peer().startswith('ipv4:')}|{','.join(keys)}|{0 < remaining <= 30}".encode()

    return {
        "set_status": grpc.unary_unary_rpc_method_handler(set_status),
        "abort": grpc.unary_unary_rpc_method_handler(abort),
        "introspect": grpc.unary_unary_rpc_method_handler(introspect),
    }


class _Status(grpc.Status):
    def __init__(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.code = code
        self.details = details
        self.trailing_metadata = trailing_metadata


@pytest.mark.parametrize("kind", ["sync", "aio", "aio_sync_handlers"])
def test_handler_status_and_context_pass_through(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    server_kind, handler_kind = ("aio", "sync") if kind == "aio_sync_handlers" else (kind, kind)
    server = _make_server(server_kind, enforcer_config(authority.target), extra=_transparency_handlers(handler_kind))
    channel = grpc.insecure_channel(server.target)
    metadata = (*lease_metadata(lease_id), ("x-app", "1"))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Lease/set_status")(QUICK, metadata=metadata, timeout=5)
        error: Any = caught.value
        assert error.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert error.details() == "handler said no"
        assert dict(error.trailing_metadata()) == {"app-trailer": "kept"}

        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/test.Lease/abort")(QUICK, metadata=metadata, timeout=5)
        error = caught.value
        assert error.code() is grpc.StatusCode.NOT_FOUND
        assert error.details() == "no such thing"
        assert dict(error.trailing_metadata()) == {"app-trailer": "abort"}

        answer = channel.unary_unary("/test.Lease/introspect")(QUICK, metadata=metadata, timeout=20)
        peer_ok, keys, remaining_ok = answer.decode().split("|")
        assert peer_ok == "True"
        assert LEASE_METADATA_KEY in keys.split(",")
        assert "x-app" in keys.split(",")
        assert remaining_ok == "True"
    finally:
        channel.close()
        server.stop()
        admin.close()


def _thread_name_handlers() -> dict[str, Any]:
    def unary_thread(request: bytes, context: grpc.ServicerContext) -> bytes:
        return threading.current_thread().name.encode()

    def bidi_thread(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for _ in requests:
            yield threading.current_thread().name.encode()

    return {
        "unary_thread": grpc.unary_unary_rpc_method_handler(unary_thread),
        "bidi_thread": grpc.stream_stream_rpc_method_handler(bidi_thread),
    }


def test_aio_sync_handlers_use_given_executor(authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="given-pool")
    server = AioServer(enforcer_config(authority.target), extra=_thread_name_handlers(), sync_handler_pool=pool)
    channel = grpc.insecure_channel(server.target)
    metadata = lease_metadata(lease_id)
    try:
        unary_thread = channel.unary_unary("/test.Lease/unary_thread")(QUICK, metadata=metadata, timeout=5)
        bidi_threads = list(
            channel.stream_stream("/test.Lease/bidi_thread")(iter((QUICK, QUICK)), metadata=metadata, timeout=5)
        )

        assert unary_thread.startswith(b"given-pool")
        assert len(bidi_threads) == 2
        assert all(name.startswith(b"given-pool") for name in bidi_threads)
    finally:
        channel.close()
        server.stop()
        pool.shutdown()
        admin.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_exempt_health_needs_no_lease(kind: str, authority: Any) -> None:
    def check(request: bytes, context: Any) -> bytes:
        return b"serving"

    async def check_async(request: bytes, context: Any) -> bytes:
        return b"serving"

    health = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health", {"Check": grpc.unary_unary_rpc_method_handler(check if kind == "sync" else check_async)}
    )
    server = _make_server(kind, enforcer_config(authority.target))
    if kind == "sync":
        server.server.add_generic_rpc_handlers([health])  # type: ignore[union-attr]
    channel = grpc.insecure_channel(server.target)
    try:
        if kind == "sync":
            assert channel.unary_unary("/grpc.health.v1.Health/Check")(b"", timeout=5) == b"serving"
        assert server.interceptor.enforcer.is_exempt("/grpc.health.v1.Health/Check")
        assert server.interceptor.enforcer.cached_lease_count() == 0
    finally:
        channel.close()
        server.stop()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("session-lease-bin", "ends in '-bin'"),
        ("grpc-lease", "starts with 'grpc-'"),
        ("lease key", "characters gRPC does not allow"),
        ("", "non-empty string"),
    ],
)
def test_invalid_metadata_key_rejected(key: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        EnforcerConfig(authority_target="127.0.0.1:1", metadata_key=key)


def test_metadata_key_lowercased() -> None:
    config = EnforcerConfig(authority_target="127.0.0.1:1", metadata_key="X-Session-Lease")

    assert config.metadata_key == "x-session-lease"


# -- method policy ----------------------------------------------------------------------


def _guarded_call(server: SyncServer | AioServer, method: str, lease_id: str) -> grpc.RpcError | bytes:
    channel = grpc.insecure_channel(server.target)
    try:
        return channel.unary_unary(f"/{GUARDED_SERVICE}/{method}")(QUICK, metadata=lease_metadata(lease_id), timeout=5)
    except grpc.RpcError as exc:
        return exc
    finally:
        channel.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_tier_rule_permission_denied(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    standard = admin.grant("standard", principal="svc")
    short = admin.grant("short", principal="svc")
    server = _make_server(kind, enforcer_config(authority.target))
    try:
        refused = _guarded_call(server, "ShortOnly", standard.lease_id)
        admitted = _guarded_call(server, "ShortOnly", short.lease_id)

        assert isinstance(refused, grpc.RpcError)
        error: Any = refused
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error.details() == (
            f'the method requires a lease in tier short; session lease {standard.fingerprint} is in tier "standard"'
        )
        assert dict(error.trailing_metadata())[END_REASON_TRAILER_KEY] == "policy"
        assert admitted == b"guarded"
        assert server.recorder.entered == [f"{GUARDED_SERVICE}/ShortOnly"]
    finally:
        server.stop()
        admin.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_session_age_rule_permission_denied(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease = admin.grant("standard", principal="svc")
    granted = time.monotonic()
    server = _make_server(kind, enforcer_config(authority.target))
    try:
        young = _guarded_call(server, "Aged", lease.lease_id)
        # The rule allows sessions up to 2 s old; wait past it on real time.
        time.sleep(max(0.0, granted + 2.3 - time.monotonic()))
        old = _guarded_call(server, "Aged", lease.lease_id)
        other_service = channel_call(server, lease.lease_id)

        assert young == b"guarded"
        assert isinstance(old, grpc.RpcError)
        error: Any = old
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert error.details().startswith("the method requires a session younger than 2 s;")
        assert lease.lease_id not in error.details()
        assert dict(error.trailing_metadata())[END_REASON_TRAILER_KEY] == "policy"
        assert server.recorder.entered.count(f"{GUARDED_SERVICE}/Aged") == 1
        assert other_service == b"done"
    finally:
        server.stop()
        admin.close()


def channel_call(server: SyncServer | AioServer, lease_id: str) -> bytes:
    """One quick call to the unguarded test service."""
    channel = grpc.insecure_channel(server.target)
    try:
        return channel.unary_unary("/test.Lease/unary_function")(QUICK, metadata=lease_metadata(lease_id), timeout=5)
    finally:
        channel.close()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_principal_mismatch_permission_denied(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease = admin.grant("standard", principal="svc")
    server = _make_server(kind, enforcer_config(authority.target, caller_identity=lambda context: "intruder"))
    try:
        refused = channel_call_error(server, lease.lease_id)

        assert refused.code() is grpc.StatusCode.PERMISSION_DENIED
        assert refused.details() == f'session lease {lease.fingerprint} belongs to "svc", not to the caller "intruder"'
        assert dict(refused.trailing_metadata())[END_REASON_TRAILER_KEY] == "policy"
        assert server.recorder.entered == []
    finally:
        server.stop()
        admin.close()


def channel_call_error(server: SyncServer | AioServer, lease_id: str) -> Any:
    with pytest.raises(grpc.RpcError) as caught:
        channel_call(server, lease_id)
    return caught.value


# -- the link to the authority ------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_fail_open_serves_cached_lease(
    kind: str, authority_process: Any, caplog: pytest.LogCaptureFixture
) -> None:
    admin = AuthorityClient(authority_process.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    admin.close()
    with caplog.at_level(logging.WARNING, logger="session_authority.interceptors._enforcer"):
        server = _make_server(kind, enforcer_config(authority_process.target, fail_open=True, staleness_bound_seconds=0.5))
    start_warnings = [record.getMessage() for record in caplog.records]
    try:
        assert channel_call(server, lease_id) == b"done"

        authority_process.kill()
        wait_for(lambda: server.interceptor.enforcer.stale, 10, "enforcer stale")
        answers = [channel_call(server, lease_id) for _ in range(3)]

        assert any(message.startswith("fail-open is on") for message in start_warnings), start_warnings
        assert answers == [b"done"] * 3
        assert server.recorder.entered == ["unary_function"] * 4
    finally:
        server.stop()


def test_fail_closed_logged_at_start(authority: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="session_authority.interceptors._enforcer"):
        server = SyncServer(enforcer_config(authority.target))
    server.stop()

    assert any(record.getMessage().startswith("fail-closed:") for record in caplog.records)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_garbage_lease_flood_validated_once_each(kind: str, authority: Any) -> None:
    garbage = [secrets.token_urlsafe(16) for _ in range(1000)]
    server = _make_server(kind, enforcer_config(authority.target))
    enforcer = server.interceptor.enforcer
    channel = grpc.insecure_channel(server.target)
    method = channel.unary_unary("/test.Lease/unary_function")

    def flood() -> list[grpc.StatusCode]:
        futures = [method.future(QUICK, metadata=lease_metadata(lease_id), timeout=30) for lease_id in garbage]
        return [future.exception().code() for future in futures]  # type: ignore[union-attr]

    try:
        first = flood()
        after_first = enforcer.validate_calls
        second = flood()
        after_second = enforcer.validate_calls
        for _ in range(5):
            with pytest.raises(grpc.RpcError):
                method(QUICK, metadata=lease_metadata(garbage[0]), timeout=5)

        assert set(first) == {grpc.StatusCode.UNAUTHENTICATED}
        assert set(second) == {grpc.StatusCode.UNAUTHENTICATED}
        assert after_first <= len(garbage)
        assert after_second == after_first
        assert enforcer.validate_calls == after_first
        assert server.recorder.entered == []
    finally:
        channel.close()
        server.stop()


def test_repeated_garbage_lease_costs_one_validate(authority: Any) -> None:
    server = SyncServer(enforcer_config(authority.target))
    method = grpc.insecure_channel(server.target).unary_unary("/test.Lease/unary_function")
    try:
        for _ in range(10):
            with pytest.raises(grpc.RpcError):
                method(QUICK, metadata=lease_metadata("g" * 22), timeout=5)

        assert server.interceptor.enforcer.validate_calls == 1
    finally:
        server.stop()


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_restart_resets_cache_revoke_cuts_off(kind: str, authority_process: Any) -> None:
    admin = AuthorityClient(authority_process.target, principal="svc")
    held = admin.grant("standard", principal="svc").lease_id
    idle = admin.grant("standard", principal="svc").lease_id
    admin.revoke(admin.grant("standard", principal="svc").lease_id)  # the authority has ends to resume after
    admin.close()
    server = _make_server(kind, enforcer_config(authority_process.target, staleness_bound_seconds=15.0))
    enforcer = server.interceptor.enforcer
    channel = grpc.insecure_channel(server.target)
    try:
        assert channel_call(server, idle) == b"done"
        call = TestCall(channel, "client_stream_function", "stream_unary", HOLD, lease_metadata(held))
        wait_for(server.recorder.holding.is_set, 10, "handler holding the call")
        assert enforcer.cached_lease_count() == 2

        authority_process.restart()
        wait_for(lambda: enforcer.cached_lease_count() == 1, 15, "cache reset after the restart")
        validations = enforcer.validate_calls
        assert channel_call(server, idle) == b"done"
        assert enforcer.validate_calls == validations + 1
        admin = AuthorityClient(authority_process.target, principal="svc")
        admin.revoke(held)
        admin.close()
        outcome = call.result(timeout_seconds=10)

        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, outcome
        assert outcome.end_reason == "revoked", outcome
    finally:
        channel.close()
        server.stop()


# -- span events ----------------------------------------------------------------------------


class _SpanPerCall(grpc.ServerInterceptor):
    """Starts a span around each unary call, as gRPC instrumentation would."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        behavior = handler.unary_unary

        def traced(request: Any, context: Any) -> Any:
            with self._tracer.start_as_current_span(handler_call_details.method, record_exception=False):
                return behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(traced, handler.request_deserializer, handler.response_serializer)


class _AioSpanPerCall(grpc.aio.ServerInterceptor):
    """The aio twin of :class:`_SpanPerCall`."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.response_streaming:
            return handler
        behavior = handler.unary_unary

        async def traced(request: Any, context: Any) -> Any:
            with self._tracer.start_as_current_span(handler_call_details.method, record_exception=False):
                return await behavior(request, context)

        return grpc.unary_unary_rpc_method_handler(traced, handler.request_deserializer, handler.response_serializer)


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_refusal_and_cut_off_span_events(kind: str, authority: Any) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("test")
    outer: list[Any] = [_SpanPerCall(tracer) if kind == "sync" else _AioSpanPerCall(tracer)]
    admin = AuthorityClient(authority.target, principal="svc")
    ended = admin.grant("standard", principal="svc")
    admin.revoke(ended.lease_id)
    live = admin.grant("standard", principal="svc")
    server = _make_server(kind, enforcer_config(authority.target), outer=outer)
    channel = grpc.insecure_channel(server.target)
    form = "unary_function" if kind == "sync" else "unary_coroutine"
    try:
        refused = TestCall(channel, form, "unary_unary", QUICK, lease_metadata(ended.lease_id)).result()
        held = TestCall(channel, form, "unary_unary", HOLD, lease_metadata(live.lease_id))
        wait_for(server.recorder.holding.is_set, 10, "handler holding the call")
        admin.revoke(live.lease_id)
        cut = held.result()
        wait_for(lambda: len(exporter.get_finished_spans()) == 2, 5, "two spans finished")

        assert refused.code is grpc.StatusCode.UNAUTHENTICATED
        assert cut.code is grpc.StatusCode.UNAUTHENTICATED
        spans = exporter.get_finished_spans()
        assert [len(span.events) for span in spans] == [1, 1]
        events = [span.events[0] for span in spans]
        assert [(event.name, event.attributes["session.lease.fingerprint"]) for event in events] == [
            ("session.call_refused", ended.fingerprint),
            ("session.call_cut_off", live.fingerprint),
        ]
        assert all(event.attributes["session.end_reason"] == "revoked" for event in events)
        flat = repr([dict(event.attributes) for event in events])
        assert ended.lease_id not in flat
        assert live.lease_id not in flat
    finally:
        channel.close()
        server.stop()
        admin.close()
        provider.shutdown()

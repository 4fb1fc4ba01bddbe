"""Bad metadata, blocked readers, session-end callbacks and transparency of the server interceptors."""

from __future__ import annotations

import threading
import time
from typing import Any

import grpc
import pytest
from lease_harness import (
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


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_handler_status_and_context_pass_through(kind: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    lease_id = admin.grant("standard", principal="svc").lease_id
    server = _make_server(kind, enforcer_config(authority.target), extra=_transparency_handlers(kind))
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

"""Handlers that take one more step between the cut-off status start and their task's cancellation.

Each handler waits on a future that the test resolves from a loop callback
queued behind the interceptor's cut-off pass, so the handler's next step runs
after the status task was created and before ``_cancel_handlers`` runs.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from typing import Any

import grpc
import pytest
from lease_harness import GUARD_SECONDS, GatedAioSetup, lease_metadata, wait_for

from session_authority.clients._metadata import END_REASON_TRAILER_KEY
from session_authority.interceptors import _aio_server


class _WindowGate:
    """Blocks the loop, then wakes the waiting handler in the iteration after the queued cut-off pass."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.blocked = threading.Event()
        self.release = threading.Event()
        self.exited = threading.Event()
        self.after: list[str] = []

    async def wait(self) -> None:
        assert self.loop is not None
        waiter = self.loop.create_future()

        def block_then_wake() -> None:
            self.blocked.set()
            self.release.wait(GUARD_SECONDS)
            # The cut-off pass was queued while the loop was blocked, so the
            # handler's wake-up goes after it in the ready queue.
            waiter.set_result(None)

        self.loop.call_soon(block_then_wake)
        await waiter
        self.after.append("step")

    def wait_sync(self) -> None:
        """Block the loop from a sync handler's thread, then let the thread run while the loop is still blocked."""
        assert self.loop is not None
        woken = threading.Event()

        def block_then_wake() -> None:
            self.blocked.set()
            self.release.wait(GUARD_SECONDS)
            woken.set()
            # Gives the thread time to post its next wait or its result, which
            # then lands behind the queued cut-off pass.
            time.sleep(0.2)

        self.loop.call_soon_threadsafe(block_then_wake)
        woken.wait(GUARD_SECONDS)
        self.after.append("step")


def _handlers(gate: _WindowGate) -> dict[str, grpc.RpcMethodHandler]:
    async def window_abort(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
            raise AssertionError("context.abort returned")
        finally:
            gate.exited.set()

    async def window_return(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            return b"late"
        finally:
            gate.exited.set()

    async def window_raise(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            raise ValueError("handler failed")
        finally:
            gate.exited.set()

    async def window_sleep(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            await asyncio.sleep(GUARD_SECONDS)
            gate.after.append("slept")
            return b"late"
        finally:
            gate.exited.set()

    async def window_swallow(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            try:
                await asyncio.sleep(GUARD_SECONDS)
            except asyncio.CancelledError:
                gate.after.append("swallowed")
            await asyncio.sleep(0.2)
            gate.after.append("ran on")
            return b"late"
        finally:
            gate.exited.set()

    async def window_write(request: bytes, context: Any) -> None:
        try:
            await gate.wait()
            await context.write(b"late")
            gate.after.append("wrote")
        finally:
            gate.exited.set()

    async def window_read(requests: Any, context: Any) -> bytes:
        try:
            await gate.wait()
            await context.read()
            gate.after.append("read")
            return b"late"
        finally:
            gate.exited.set()

    async def window_bidi_iter(requests: Any, context: Any) -> Any:
        try:
            await gate.wait()
            async for request in requests:
                gate.after.append("read")
                yield request
        finally:
            gate.exited.set()

    async def window_set_trailers(request: bytes, context: Any) -> bytes:
        try:
            await gate.wait()
            context.set_trailing_metadata((("handler-key", "kept"),))
            context.set_code(grpc.StatusCode.OK)
            return b"late"
        finally:
            gate.exited.set()

    def sync_return(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            gate.wait_sync()
            return b"late"
        finally:
            gate.exited.set()

    def sync_raise(request: bytes, context: grpc.ServicerContext) -> bytes:
        try:
            gate.wait_sync()
            raise ValueError("handler failed")
        finally:
            gate.exited.set()

    def sync_write(request: bytes, context: grpc.ServicerContext) -> Any:
        try:
            gate.wait_sync()
            yield b"late"
            gate.after.append("wrote")
        finally:
            gate.exited.set()

    def sync_read(requests: Any, context: grpc.ServicerContext) -> bytes:
        try:
            gate.wait_sync()
            next(requests)
            gate.after.append("read")
            return b"late"
        finally:
            gate.exited.set()

    def sync_bidi(requests: Any, context: grpc.ServicerContext) -> Any:
        try:
            gate.wait_sync()
            for request in requests:
                gate.after.append("read")
                yield request
        finally:
            gate.exited.set()

    return {
        "sync_return": grpc.unary_unary_rpc_method_handler(sync_return),
        "sync_raise": grpc.unary_unary_rpc_method_handler(sync_raise),
        "sync_write": grpc.unary_stream_rpc_method_handler(sync_write),
        "sync_read": grpc.stream_unary_rpc_method_handler(sync_read),
        "sync_bidi": grpc.stream_stream_rpc_method_handler(sync_bidi),
        "window_abort": grpc.unary_unary_rpc_method_handler(window_abort),
        "window_return": grpc.unary_unary_rpc_method_handler(window_return),
        "window_raise": grpc.unary_unary_rpc_method_handler(window_raise),
        "window_sleep": grpc.unary_unary_rpc_method_handler(window_sleep),
        "window_swallow": grpc.unary_unary_rpc_method_handler(window_swallow),
        "window_write": grpc.unary_stream_rpc_method_handler(window_write),
        "window_read": grpc.stream_unary_rpc_method_handler(window_read),
        "window_bidi_iter": grpc.stream_stream_rpc_method_handler(window_bidi_iter),
        "window_set_trailers": grpc.unary_unary_rpc_method_handler(window_set_trailers),
    }


class _Setup(GatedAioSetup):
    """An authority client, an aio server with the window handlers, and a channel to it."""

    def __init__(self, authority: Any) -> None:
        gate = _WindowGate()
        super().__init__(authority.target, gate, _handlers(gate))


@pytest.fixture
def setup(authority: Any) -> Any:
    running = _Setup(authority)
    yield running
    running.close()


def _start(setup: _Setup, method: str) -> Any:
    metadata = lease_metadata(setup.lease_id)
    path = f"/test.Lease/{method}"
    if method in ("window_write", "sync_write"):
        return setup.channel.unary_stream(path)(b"", metadata=metadata, timeout=20)
    if method in ("window_read", "sync_read"):
        return setup.channel.stream_unary(path).future(iter([b"a", b"b"]), metadata=metadata, timeout=20)
    if method in ("window_bidi_iter", "sync_bidi"):
        return setup.channel.stream_stream(path)(iter([b"a", b"b"]), metadata=metadata, timeout=20)
    return setup.channel.unary_unary(path).future(b"", metadata=metadata, timeout=20)


def _outcome(method: str, call: Any) -> grpc.RpcError:
    if method not in ("window_write", "window_bidi_iter", "sync_write", "sync_bidi"):
        error = call.exception(timeout=15)
        assert error is not None, f"call succeeded with {call.result()!r}"
        return error
    with pytest.raises(grpc.RpcError) as raised:
        for _ in call:
            pass
    return raised.value


def _revoke_while_blocked(setup: _Setup) -> None:
    """Revoke the lease once the handler has blocked the loop, and wait until the cut-off is queued."""
    assert setup.gate.blocked.wait(10), "the handler never reached the gate"
    setup.admin.revoke(setup.lease_id)
    wait_for(setup.cut_off_queued, message="queued cut-off")


def _wait_handler_gone(setup: _Setup) -> None:
    """Wait until the handler has ended and its task is gone, then collect the garbage it left."""
    assert setup.gate.exited.wait(10), "the handler never ended"
    wait_for(lambda: setup.server.rpc_tasks() == [], message="handler task gone")
    gc.collect()


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    "method",
    [
        "window_return",
        "window_raise",
        "window_sleep",
        "window_swallow",
        "window_write",
        "window_read",
        "window_bidi_iter",
        "window_set_trailers",
        "sync_return",
        "sync_raise",
        "sync_write",
        "sync_read",
        "sync_bidi",
    ],
)
def test_window_step_gets_cut_off(
    method: str, setup: _Setup, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _aio_server._cancel_handlers

    def recording(calls: Any) -> None:
        setup.gate.after.append("cancel")
        original(calls)

    monkeypatch.setattr(_aio_server, "_cancel_handlers", recording)
    call = _start(setup, method)
    _revoke_while_blocked(setup)
    setup.gate.release.set()
    error = _outcome(method, call)
    _wait_handler_gone(setup)

    assert error.code() is grpc.StatusCode.UNAUTHENTICATED, error
    assert dict(error.trailing_metadata())[END_REASON_TRAILER_KEY] == "revoked"
    assert setup.gate.after[:2] == ["step", "cancel"]
    assert "slept" not in setup.gate.after
    if method != "window_swallow":
        # A handler that swallows the cancellation runs on until its next read or write, as documented.
        assert "ran on" not in setup.gate.after
    assert "wrote" not in setup.gate.after
    assert "read" not in setup.gate.after
    assert _errors_logged(caplog) == []


def test_window_own_abort_kept(setup: _Setup, caplog: pytest.LogCaptureFixture) -> None:
    call = _start(setup, "window_abort")
    _revoke_while_blocked(setup)
    setup.gate.release.set()
    error = call.exception(timeout=15)
    _wait_handler_gone(setup)

    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "handler's own abort"
    assert _errors_logged(caplog) == []


@pytest.mark.parametrize("method", ["window_sleep", "window_swallow", "window_return", "sync_return"])
def test_window_client_cancel_clean(method: str, setup: _Setup, caplog: pytest.LogCaptureFixture) -> None:
    call = _start(setup, method)
    _revoke_while_blocked(setup)
    call.cancel()
    time.sleep(0.1)
    setup.gate.release.set()
    _wait_handler_gone(setup)

    assert call.cancelled()
    assert _errors_logged(caplog) == []

"""Cut-offs on an aio server that race with what the handler does at that moment.

Some tests block the server's event loop from one of its callbacks, revoke
the lease, and let the loop run once the cut-off waits in the interceptor's
queue, so the cut-off lands at one chosen point of the handler.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import grpc
import pytest
from lease_harness import GUARD_SECONDS, GatedAioSetup, LoopGate, lease_metadata, wait_for

from session_authority.clients._metadata import END_REASON_TRAILER_KEY


class _Probe:
    """What a test handler did after the cut-off."""

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.swallowed = threading.Event()
        self.exited = threading.Event()
        self.late_writes: list[str] = []
        # Set from the test thread to let a handler that swallowed the cancellation go on.
        self.resume: asyncio.Event | None = None


def _handlers(probe: _Probe, gate: LoopGate) -> dict[str, grpc.RpcMethodHandler]:
    async def swallow_then_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
        try:
            for index in range(3):
                try:
                    probe.holding.set()
                    await asyncio.sleep(GUARD_SECONDS)
                except asyncio.CancelledError:
                    probe.swallowed.set()
                try:
                    await context.write(b"late %d" % index)
                    probe.late_writes.append("sent")
                except asyncio.CancelledError:
                    probe.late_writes.append("cancelled")
                    raise
        finally:
            probe.exited.set()

    async def swallow_then_wait(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        probe.resume = asyncio.Event()
        try:
            try:
                probe.holding.set()
                await asyncio.sleep(GUARD_SECONDS)
            except asyncio.CancelledError:
                probe.swallowed.set()
            await asyncio.wait_for(probe.resume.wait(), GUARD_SECONDS)
            return b"late"
        finally:
            probe.exited.set()

    async def second_yield_then_hold(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            yield b"first"
            gate.block_soon()
            yield b"second"
            await asyncio.sleep(GUARD_SECONDS)
        finally:
            probe.exited.set()

    async def own_abort(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        gate.block_soon()
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
        raise AssertionError("context.abort returned")

    def sync_own_abort(request: bytes, context: grpc.ServicerContext) -> bytes:
        gate.block_soon()
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "handler's own abort")
        raise AssertionError("context.abort returned")

    return {
        "swallow_then_write": grpc.unary_stream_rpc_method_handler(swallow_then_write),
        "swallow_then_wait": grpc.unary_unary_rpc_method_handler(swallow_then_wait),
        "second_yield_then_hold": grpc.unary_stream_rpc_method_handler(second_yield_then_hold),
        "own_abort": grpc.unary_unary_rpc_method_handler(own_abort),
        "sync_own_abort": grpc.unary_unary_rpc_method_handler(sync_own_abort),
    }


class _Setup(GatedAioSetup):
    """An authority client, an aio server with the test handlers, and a channel to it."""

    def __init__(self, authority: Any) -> None:
        self.probe = _Probe()
        gate = LoopGate()
        super().__init__(authority.target, gate, _handlers(self.probe, gate))


@pytest.fixture
def setup(authority: Any) -> Any:
    running = _Setup(authority)
    yield running
    running.close()


def test_swallowed_cancel_sends_no_late_message(setup: _Setup) -> None:
    call = setup.channel.unary_stream("/test.Lease/swallow_then_write")(
        b"", metadata=lease_metadata(setup.lease_id), timeout=20
    )
    assert setup.probe.holding.wait(10), "the handler never started"

    setup.admin.revoke(setup.lease_id)
    responses: list[bytes] = []
    with pytest.raises(grpc.RpcError) as raised:
        for response in call:
            responses.append(response)

    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(raised.value.trailing_metadata())[END_REASON_TRAILER_KEY] == "revoked"
    assert responses == []
    assert setup.probe.exited.wait(10), "the handler never ended"
    assert setup.probe.swallowed.is_set()
    assert setup.probe.late_writes == ["cancelled"]
    wait_for(lambda: setup.server.rpc_tasks() == [], message="handler task gone")


def test_swallowed_cancel_status_not_delayed(setup: _Setup) -> None:
    future = setup.channel.unary_unary("/test.Lease/swallow_then_wait").future(
        b"", metadata=lease_metadata(setup.lease_id), timeout=20
    )
    assert setup.probe.holding.wait(10), "the handler never started"

    setup.admin.revoke(setup.lease_id)
    # The handler still waits after swallowing the cancellation.
    error = future.exception(timeout=10)
    exited_before_status = setup.probe.exited.is_set()
    assert setup.probe.resume is not None
    setup.server.loop.call_soon_threadsafe(setup.probe.resume.set)

    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(error.trailing_metadata())[END_REASON_TRAILER_KEY] == "revoked"
    assert not exited_before_status
    assert setup.probe.swallowed.is_set()
    assert setup.probe.exited.wait(10), "the handler never ended"
    wait_for(lambda: setup.server.rpc_tasks() == [], message="handler task gone")


def test_generator_closed_when_cut_off_mid_write(setup: _Setup) -> None:
    call = setup.channel.unary_stream("/test.Lease/second_yield_then_hold")(
        b"", metadata=lease_metadata(setup.lease_id), timeout=20
    )
    assert setup.gate.blocked.wait(10), "the handler never yielded its second message"

    setup.admin.revoke(setup.lease_id)
    wait_for(setup.cut_off_queued, message="queued cut-off")
    setup.gate.release.set()
    responses: list[bytes] = []
    with pytest.raises(grpc.RpcError) as raised:
        for response in call:
            responses.append(response)

    assert raised.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert dict(raised.value.trailing_metadata())[END_REASON_TRAILER_KEY] == "revoked"
    assert responses[0] == b"first"
    # The generator's cleanup runs at the cut-off, not at garbage collection.
    assert setup.probe.exited.wait(10), "the generator was left suspended"
    wait_for(lambda: setup.server.rpc_tasks() == [], message="handler task gone")


@pytest.mark.parametrize("form", ["own_abort", "sync_own_abort"])
def test_own_abort_race_logs_no_error(form: str, setup: _Setup, caplog: pytest.LogCaptureFixture) -> None:
    future = setup.channel.unary_unary(f"/test.Lease/{form}").future(
        b"", metadata=lease_metadata(setup.lease_id), timeout=20
    )
    assert setup.gate.blocked.wait(10), "the handler never started its abort"

    setup.admin.revoke(setup.lease_id)
    wait_for(setup.cut_off_queued, message="queued cut-off")
    setup.gate.release.set()
    error = future.exception(timeout=15)
    wait_for(lambda: setup.server.rpc_tasks() == [], message="handler task gone")

    assert isinstance(error, grpc.Call)
    assert error.code() is grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "handler's own abort"
    grpc_errors = [
        record.getMessage()
        for record in caplog.records
        if record.name.startswith("grpc") and record.levelno >= logging.ERROR
    ]
    assert grpc_errors == []

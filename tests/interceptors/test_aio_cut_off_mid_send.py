"""Cut-offs on an aio server that land while a handler's first send is still in flight.

grpc.aio marks initial metadata as sent only when the task resumes after the
send's batch completes. If a cut-off cancels the task before then, the mark
stays unset and a plain abort requests a second send of the initial
metadata. The core rejects that batch, so no status goes out and the client
waits until its own deadline. Each test blocks the server's event loop right
after the handler starts its first send, revokes the lease, lets the cut-off
queue up behind the block, and then lets the loop run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from lease_harness import GUARD_SECONDS, HOLD, AioServer, LoopGate, TestCall, enforcer_config, lease_metadata, wait_for

from session_authority.clients._client import AuthorityClient


def _handlers(gate: LoopGate) -> dict[str, grpc.RpcMethodHandler]:
    async def metadata_then_hold(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        gate.block_soon()
        await context.send_initial_metadata(())
        await asyncio.sleep(GUARD_SECONDS)
        return b"not cut off"

    async def metadata_then_hold_stream(request: bytes, context: grpc.aio.ServicerContext) -> None:
        gate.block_soon()
        await context.send_initial_metadata(())
        await asyncio.sleep(GUARD_SECONDS)

    async def first_yield_then_hold(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        gate.block_soon()
        yield b"first"
        await asyncio.sleep(GUARD_SECONDS)

    async def first_write_then_hold(request: bytes, context: grpc.aio.ServicerContext) -> None:
        gate.block_soon()
        await context.write(b"first")
        await asyncio.sleep(GUARD_SECONDS)

    def sync_metadata_then_hold(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        gate.block_soon()
        context.send_initial_metadata(())
        deadline = time.monotonic() + GUARD_SECONDS
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return
        yield b""  # unreachable: marks this function as a generator

    def sync_first_yield_then_hold(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        gate.block_soon()
        yield b"first"
        deadline = time.monotonic() + GUARD_SECONDS
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    return {
        "metadata_then_hold": grpc.unary_unary_rpc_method_handler(metadata_then_hold),
        "metadata_then_hold_stream": grpc.unary_stream_rpc_method_handler(metadata_then_hold_stream),
        "first_yield_then_hold": grpc.unary_stream_rpc_method_handler(first_yield_then_hold),
        "first_write_then_hold": grpc.unary_stream_rpc_method_handler(first_write_then_hold),
        "sync_metadata_then_hold": grpc.unary_stream_rpc_method_handler(sync_metadata_then_hold),
        "sync_first_yield_then_hold": grpc.unary_stream_rpc_method_handler(sync_first_yield_then_hold),
    }


@pytest.mark.parametrize(
    ("form", "shape"),
    [
        ("metadata_then_hold", "unary_unary"),
        ("metadata_then_hold_stream", "unary_stream"),
        ("first_yield_then_hold", "unary_stream"),
        ("first_write_then_hold", "unary_stream"),
        ("sync_metadata_then_hold", "unary_stream"),
        ("sync_first_yield_then_hold", "unary_stream"),
    ],
)
def test_cut_off_mid_send_reaches_client(form: str, shape: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    gate = LoopGate()
    server = AioServer(enforcer_config(authority.target), extra=_handlers(gate))
    gate.loop = server.loop
    channel = grpc.insecure_channel(server.target)
    try:
        lease_id = admin.grant("standard", principal="svc").lease_id
        call = TestCall(channel, form, shape, HOLD, lease_metadata(lease_id), timeout_seconds=20.0)
        assert gate.blocked.wait(10), "the handler never started its first send"
        admin.revoke(lease_id)
        # The revoke reaches the enforcer on its own threads; its cut-off then
        # waits in the interceptor's queue for the blocked loop.
        wait_for(lambda: bool(server.interceptor._queue and server.interceptor._queue._pending), message="queued cut-off")
        gate.release.set()
        outcome = call.result(timeout_seconds=15.0)
        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED, (outcome.code, outcome.details)
        assert outcome.end_reason == "revoked"
        wait_for(lambda: server.rpc_tasks() == [], message="handler task gone")
    finally:
        gate.release.set()
        channel.close()
        server.stop()
        admin.close()

"""The aio wrapper's shortcuts on the call path: how it starts handlers and records activity."""

from __future__ import annotations

import functools
import time
from typing import Any

import grpc
from lease_harness import AioServer, enforcer_config, lease_metadata

from session_authority.clients._client import AuthorityClient
from session_authority.interceptors._enforcer import current_lease


class _Servicer:
    def __init__(self) -> None:
        self.leases: list[Any] = []

    async def bound(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.leases.append(current_lease())
        return b"bound"


async def _with_prefix(prefix: bytes, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    assert current_lease() is not None
    return prefix + request


def test_bound_method_and_partial_handlers_enforced(authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    servicer = _Servicer()
    extra = {
        "bound": grpc.unary_unary_rpc_method_handler(servicer.bound),
        "partial": grpc.unary_unary_rpc_method_handler(functools.partial(_with_prefix, b"p:")),
    }
    server = AioServer(enforcer_config(authority.target), extra=extra)
    channel = grpc.insecure_channel(server.target)
    try:
        lease_id = admin.grant("standard", principal="svc").lease_id
        metadata = lease_metadata(lease_id)

        bound = channel.unary_unary("/test.Lease/bound")(b"", metadata=metadata, timeout=10)
        partial = channel.unary_unary("/test.Lease/partial")(b"x", metadata=metadata, timeout=10)
        try:
            channel.unary_unary("/test.Lease/bound")(b"", timeout=10)
        except grpc.RpcError as exc:
            refused = exc.code()
        else:
            refused = grpc.StatusCode.OK

        assert bound == b"bound"
        assert servicer.leases[0] is not None
        assert partial == b"p:x"
        assert refused is grpc.StatusCode.UNAUTHENTICATED
        assert len(servicer.leases) == 1
    finally:
        channel.close()
        server.stop()
        admin.close()


def test_activity_after_collect_goes_in_next_batch(authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    # The reporter thread must not collect between the steps below.
    server = AioServer(enforcer_config(authority.target, activity_batch_interval_seconds=3600.0))
    channel = grpc.insecure_channel(server.target)
    try:
        lease_id = admin.grant("standard", principal="svc").lease_id
        channel.unary_unary("/test.Lease/unary_coroutine")(b"", metadata=lease_metadata(lease_id), timeout=10)
        enforcer = server.interceptor.enforcer
        entry = enforcer._entries[lease_id]

        first = enforcer.collect_renewals(time.monotonic())
        enforcer.touch(entry)
        touched_at = entry.last_activity
        enforcer.touch(entry)
        second = enforcer.collect_renewals(time.monotonic())
        third = enforcer.collect_renewals(time.monotonic())

        assert [token.entry for token, _, _ in first] == [entry]
        assert [token.entry for token, _, _ in second] == [entry]
        assert entry.reported_activity >= touched_at
        assert entry.reported_activity == entry.last_activity
        assert third == []
    finally:
        channel.close()
        server.stop()
        admin.close()

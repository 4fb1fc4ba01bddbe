"""What the enforcer keeps after a lease ends: its tombstone, and no check on the timer."""

from __future__ import annotations

import gc
from typing import Any

import grpc
import pytest
from lease_harness import HOLD, AioServer, SyncServer, TestCall, enforcer_config, lease_metadata, wait_for

from session_authority.clients._client import AuthorityClient
from session_authority.interceptors._enforcer import _Entry


def _entries_of(lease_id: str) -> int:
    gc.collect()
    return sum(1 for item in gc.get_objects() if type(item) is _Entry and item.lease_id == lease_id)


@pytest.mark.parametrize(("kind", "form"), [("sync", "server_stream_generator"), ("aio", "server_stream_async_generator")])
def test_ended_lease_entry_is_freed(kind: str, form: str, authority: Any) -> None:
    admin = AuthorityClient(authority.target, principal="svc")
    config = enforcer_config(authority.target)
    server = SyncServer(config) if kind == "sync" else AioServer(config)
    channel = grpc.insecure_channel(server.target)
    try:
        # The standard tier's idle timeout is far off, so the entry's check is armed for long after the end.
        lease_id = admin.grant("standard", principal="svc").lease_id
        enforcer = server.interceptor.enforcer
        checks_before = len(enforcer._timer)
        call = TestCall(channel, form, "unary_stream", HOLD, lease_metadata(lease_id))
        wait_for(lambda: enforcer.in_flight_count() == 1, message="call admitted")
        entries_while_live = _entries_of(lease_id)
        checks_while_live = len(enforcer._timer)

        admin.revoke(lease_id)
        outcome = call.result()
        # The harness records each call's lease context, which refers to the entry.
        server.recorder.leases.clear()

        assert outcome.code is grpc.StatusCode.UNAUTHENTICATED
        assert entries_while_live == 1
        assert checks_while_live == checks_before + 1
        # The staleness check reschedules itself, so the count can dip for a moment.
        wait_for(lambda: len(enforcer._timer) == checks_before, message="the lease's check cancelled")
        if kind == "sync":
            # grpc.aio keeps a finished call's state, and with it the frames
            # of our wrapper, for a while; the sync server lets go at once.
            wait_for(lambda: _entries_of(lease_id) == 0, message="ended entry freed")
    finally:
        channel.close()
        server.stop()
        admin.close()

"""A slow authority: cache misses must not queue Validate calls without bound on an aio server.

The authority keeps running, but a loopback proxy between it and the
enforcer black-holes traffic, so every ``Validate`` runs into its deadline.
Calls on leases the enforcer has not cached keep arriving meanwhile, as they
do when a fleet of holders re-grants at once.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator

import grpc
import pytest

from faults._proxy import ProxyMode, TcpProxy
from lease_harness import AioServer, TestCall, enforcer_config, lease_metadata, wait_for
from session_authority.clients._client import AuthorityClient

VALIDATE_TIMEOUT_SECONDS = 0.5
MISSES = 60
"""Calls on distinct unknown leases sent while the proxy black-holes the authority."""


@pytest.fixture
def proxy(authority) -> Iterator[TcpProxy]:  # type: ignore[no-untyped-def]
    running = TcpProxy(authority.target)
    yield running
    running.close()


def start_server(proxy: TcpProxy, **overrides: object) -> AioServer:
    # A long staleness bound keeps the black hole from failing every call
    # closed, so the test measures the Validate queue alone.
    settings: dict[str, object] = {"staleness_bound_seconds": 60.0, "validate_timeout_seconds": VALIDATE_TIMEOUT_SECONDS}
    settings.update(overrides)
    config = enforcer_config(proxy.target, **settings)
    return AioServer(config)


def send_misses(channel: grpc.Channel, count: int) -> list[TestCall]:
    return [
        TestCall(channel, "unary_coroutine", "unary_unary", b"quick", lease_metadata(secrets.token_urlsafe(32)), 10.0)
        for _ in range(count)
    ]


def test_abandoned_validate_not_sent(authority, proxy, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING, logger="session_authority.interceptors._enforcer")
    server = start_server(proxy)
    enforcer = server.interceptor.enforcer
    holder = AuthorityClient(authority.target, principal="svc-slow", timeout_seconds=5)
    try:
        with grpc.insecure_channel(server.target) as channel:
            proxy.set_mode(ProxyMode.BLACKHOLE)
            outcomes = [call.result(timeout_seconds=15) for call in send_misses(channel, MISSES)]
            # Each call gives up after twice the Validate timeout. The four
            # workers send a handful of Validates in that time, and the rest
            # are dropped from the queue rather than sent one by one.
            wait_for(lambda: enforcer.pending_validations == 0, 15, "an empty Validate queue")
            sent = enforcer.validate_calls
            proxy.set_mode(ProxyMode.PASS)

            lease_id = holder.grant("standard").lease_id
            admitted = TestCall(channel, "unary_coroutine", "unary_unary", b"quick", lease_metadata(lease_id)).result()
    finally:
        holder.close()
        server.stop()

    assert {outcome.code for outcome in outcomes} == {grpc.StatusCode.UNAUTHENTICATED}
    assert {outcome.end_reason for outcome in outcomes} == {"authority_unreachable"}
    assert all(outcome.details.count("Validate failed") <= 1 for outcome in outcomes), [o.details for o in outcomes]
    assert sent < MISSES // 2, f"{sent} of {MISSES} Validate calls were sent after their callers gave up"
    assert admitted.code is grpc.StatusCode.OK
    # The failures of a few seconds log at most one line per second between them.
    failure_lines = [record for record in caplog.records if "could not validate lease" in record.getMessage()]
    assert 1 <= len(failure_lines) <= 5, [record.getMessage() for record in failure_lines]


def test_misses_beyond_bound_rejected_at_once(authority, proxy) -> None:  # type: ignore[no-untyped-def]
    server = start_server(proxy, max_pending_validations=5, validate_timeout_seconds=5.0)
    enforcer = server.interceptor.enforcer
    try:
        with grpc.insecure_channel(server.target) as channel:
            proxy.set_mode(ProxyMode.BLACKHOLE)
            calls = send_misses(channel, 20)
            wait_for(lambda: enforcer.pending_validations == 5, 10, "five queued Validates")
            # The calls beyond the bound end while the five wait for the authority.
            refused = [call.result(timeout_seconds=15) for call in calls if call.done(2)]
            proxy.set_mode(ProxyMode.PASS)
            waited = [call.result(timeout_seconds=15) for call in calls]
            pending_after = enforcer.pending_validations
    finally:
        server.stop()

    bounded = [outcome for outcome in refused if "max_pending_validations" in outcome.details]
    assert len(bounded) == 15, [outcome.details for outcome in refused]
    assert {outcome.code for outcome in bounded} == {grpc.StatusCode.UNAUTHENTICATED}
    assert {outcome.end_reason for outcome in bounded} == {"authority_unreachable"}
    # The five whose Validate went out learn, once the proxy passes again, that their leases are unknown.
    assert sum("max_pending_validations" not in outcome.details for outcome in waited) == 5
    assert pending_after == 0

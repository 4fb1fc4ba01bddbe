"""The asyncio AioAuthorityClient against a real authority."""

from __future__ import annotations

import asyncio
import datetime
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import pytest

from session_authority.clients._aio_client import AioAuthorityClient, AioWatchStream
from session_authority.clients._aio_session import AioLink
from session_authority.clients._errors import (
    AuthorityError,
    AuthorityUnavailable,
    FailedPrecondition,
    InvalidArgument,
)
from session_authority.clients._metadata import EndReason, fingerprint
from session_authority.clients._types import (
    HeartbeatEvent,
    LeaseState,
    SessionEndEvent,
    Verdict,
)

_T = TypeVar("_T")

TEST_TIMEOUT_SECONDS = 30.0
MAX_WATCH_EVENTS = 100
"""Upper bound on events read while waiting for one; heartbeats come every 0.2 s in the fixtures."""


def closed_port_target() -> str:
    """Return a loopback address on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def run_with_client(
    target: str, body: Callable[[AioAuthorityClient], Awaitable[_T]], **client_options: object
) -> _T:
    """Run ``body`` with a client on a fresh event loop, bounded in time."""

    async def main() -> _T:
        async with AioAuthorityClient(target, **client_options) as client:  # type: ignore[arg-type]
            return await asyncio.wait_for(body(client), TEST_TIMEOUT_SECONDS)

    return asyncio.run(main())


async def next_end(stream: AioWatchStream) -> SessionEndEvent:
    count = 0
    async for event in stream:
        if isinstance(event, SessionEndEvent):
            return event
        count += 1
        if count >= MAX_WATCH_EVENTS:
            break
    raise AssertionError(f"no session end within {MAX_WATCH_EVENTS} watch events")


@pytest.fixture
def target(authority) -> str:  # type: ignore[no-untyped-def]
    return str(authority.target)


def test_aio_grant_returns_alive_lease(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        before = time.monotonic()
        granted = await client.grant("short")

        assert granted.lease.alive
        assert granted.lease.tier == "short"
        assert granted.lease.principal == "svc-a"
        assert granted.fingerprint == fingerprint(granted.lease_id)
        assert granted.lease_id not in repr(granted)
        assert before <= granted.sent_at_monotonic <= time.monotonic()

    run_with_client(target, body, principal="svc-a")


def test_aio_grant_principal_and_idle_timeout(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant(principal="svc-b", idle_timeout_seconds=60.0)

        assert granted.lease.principal == "svc-b"
        assert granted.lease.tier == "standard"
        assert granted.lease.idle_timeout_seconds == 60.0

    run_with_client(target, body)


def test_aio_grant_unknown_tier_invalid_argument(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        with pytest.raises(
            InvalidArgument, match=r'^Grant failed: INVALID_ARGUMENT: tier "gold" .*brief, short, standard'
        ) as caught:
            await client.grant("gold")

        assert isinstance(caught.value.__cause__, grpc.RpcError)

    run_with_client(target, body)


def test_aio_renew_answers_in_order(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")

        result = await client.renew([("no-such-lease", 0.0), (granted.lease_id, 0.0)])

        assert [lease.state for lease in result.leases] == [LeaseState.NOT_FOUND, LeaseState.ALIVE]
        assert result.leases[1].fingerprint == granted.fingerprint

    run_with_client(target, body)


def test_aio_renew_empty_batch_makes_no_call() -> None:
    async def body(client: AioAuthorityClient) -> None:
        result = await client.renew([])

        assert result.leases == []

    run_with_client(closed_port_target(), body)


def test_aio_keep_alive_matches_concurrent_sends(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        leases = [await client.grant("standard") for _ in range(4)]
        batches = [
            [(leases[index % 4].lease_id, 0.0)] * (index % 3 + 1) for index in range(60)
        ]

        async with client.keep_alive() as stream:
            results = await asyncio.gather(*(stream.send(batch) for batch in batches))

        for index, result in enumerate(results):
            assert len(result.leases) == index % 3 + 1
            assert {lease.fingerprint for lease in result.leases} == {leases[index % 4].fingerprint}

    run_with_client(target, body)


def test_aio_keep_alive_cancelled_send_keeps_stream(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")

        async with client.keep_alive() as stream:
            abandoned = asyncio.ensure_future(stream.send([(granted.lease_id, 0.0)]))
            await asyncio.sleep(0)
            abandoned.cancel()
            result = await stream.send([(granted.lease_id, 0.0)])

            assert result.leases[0].alive
            assert not stream.closed
            assert abandoned.cancelled()

    run_with_client(target, body)


def test_aio_keep_alive_unreachable_raises_unavailable() -> None:
    async def body(client: AioAuthorityClient) -> None:
        stream = client.keep_alive()

        with pytest.raises(AuthorityUnavailable, match=r"^KeepAlive failed: UNAVAILABLE: "):
            await stream.send([("some-lease", 0.0)])

        assert stream.closed
        assert isinstance(stream.error, AuthorityUnavailable)
        with pytest.raises(AuthorityUnavailable):
            await stream.send([("some-lease", 0.0)])
        await stream.close()

    run_with_client(closed_port_target(), body)


def test_aio_keep_alive_fails_sends_when_authority_stops(authority) -> None:  # type: ignore[no-untyped-def]
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")
        stream = client.keep_alive()
        await stream.send([(granted.lease_id, 0.0)])

        await asyncio.get_running_loop().run_in_executor(None, authority.stop)

        with pytest.raises(AuthorityError):
            await stream.send([(granted.lease_id, 0.0)])
        assert stream.closed
        await stream.close()

    run_with_client(authority.target, body)


def test_aio_keep_alive_send_after_close_raises(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        stream = client.keep_alive()
        await stream.close()

        with pytest.raises(RuntimeError, match=r"^send\(\) on a closed AioKeepAliveStream"):
            await stream.send([("some-lease", 0.0)])
        assert stream.error is None

    run_with_client(target, body)


def test_aio_revoke_release_and_already_ended(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")

        released = await client.revoke(granted.lease_id, release=True)
        again = await client.revoke(granted.lease_id)

        assert released.lease.end_reason is EndReason.RELEASED
        assert not released.already_ended
        assert again.already_ended
        assert again.lease.end_reason is EndReason.RELEASED

    run_with_client(target, body)


def test_aio_revoke_by_fingerprint(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")

        result = await client.revoke(fingerprint=granted.fingerprint)

        assert result.lease.end_reason is EndReason.REVOKED

    run_with_client(target, body)


def test_aio_revoke_unknown_fingerprint_failed_precondition(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        with pytest.raises(FailedPrecondition, match=r"^Revoke failed: FAILED_PRECONDITION: "):
            await client.revoke(fingerprint="0123456789ab")

    run_with_client(target, body)


def test_aio_time_to_live_after_revoke(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")
        await client.revoke(granted.lease_id)

        lease = await client.time_to_live(granted.lease_id)

        assert lease.state is LeaseState.ENDED
        assert lease.end_reason is EndReason.REVOKED
        assert lease.ttl_seconds == 0.0

    run_with_client(target, body)


def test_aio_list_leases_follows_page_tokens(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = {(await client.grant(principal="aio-lister")).fingerprint for _ in range(5)}

        listed = [lease async for lease in client.list_leases(principal="aio-lister", page_size=2)]
        page, token = await client.list_leases_page(principal="aio-lister", page_size=3)

        assert sorted(lease.fingerprint for lease in listed) == sorted(granted)
        assert len(page) == 3
        assert token

    run_with_client(target, body)


def test_aio_validate_verdicts(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        short = await client.grant("short", principal="svc-a")
        standard = await client.grant("standard", principal="svc-a")

        allowed = await client.validate(short.lease_id, "/test.Guarded/ShortOnly", caller_principal="svc-a")
        denied = await client.validate(standard.lease_id, "/test.Guarded/ShortOnly")
        mismatch = await client.validate(standard.lease_id, "/test.Open/Call", caller_principal="svc-z")
        missing = await client.validate("no-such-lease", "/test.Open/Call")

        assert allowed.verdict is Verdict.ALLOW
        assert allowed.rule.tiers == ("short",)
        assert denied.verdict is Verdict.POLICY_DENIED
        assert mismatch.verdict is Verdict.PRINCIPAL_MISMATCH
        assert missing.verdict is Verdict.NOT_FOUND
        assert missing.lease is None

    run_with_client(target, body)


def test_aio_watch_receives_end_after_revoke(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        granted = await client.grant("standard")

        async with client.watch_session_ends() as stream:
            first = await stream.__anext__()
            await client.revoke(granted.lease_id)
            end = await next_end(stream)

        assert isinstance(first, HeartbeatEvent)
        assert first.instance_id
        assert end.lease.fingerprint == granted.fingerprint
        assert end.lease.end_reason is EndReason.REVOKED
        assert end.revoked_by == "svc-a"

    run_with_client(target, body, principal="svc-a")


def test_aio_watch_heartbeats_repeat(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        async with client.watch_session_ends() as stream:
            first = await stream.__anext__()
            second = await stream.__anext__()

        assert isinstance(first, HeartbeatEvent)
        assert isinstance(second, HeartbeatEvent)
        assert second.instance_id == first.instance_id
        assert second.interval_seconds == pytest.approx(0.2)

    run_with_client(target, body)


def test_aio_watch_cancel_ends_iteration(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        stream = client.watch_session_ends()
        await stream.__anext__()

        stream.cancel()

        assert [event async for event in stream] == []

    run_with_client(target, body)


def test_aio_watch_unreachable_raises_unavailable() -> None:
    async def body(client: AioAuthorityClient) -> None:
        stream = client.watch_session_ends()

        with pytest.raises(AuthorityUnavailable, match=r"^WatchSessionEnds failed: UNAVAILABLE: "):
            await stream.__anext__()

    run_with_client(closed_port_target(), body)


def test_aio_now_and_policy(target: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        now = await client.now()
        policy = await client.get_policy()

        assert now.tzinfo is datetime.timezone.utc
        assert abs(now - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=1)
        assert sorted(tier.name for tier in policy.tiers) == ["brief", "short", "standard"]

    run_with_client(target, body)


def test_aio_unreachable_authority_unavailable() -> None:
    async def body(client: AioAuthorityClient) -> None:
        with pytest.raises(AuthorityUnavailable, match=r"^GetPolicy failed: UNAVAILABLE: ") as caught:
            await client.get_policy()

        assert caught.value.retryable

    run_with_client(closed_port_target(), body)


def test_aio_client_leaves_given_channel_open(target: str) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(target) as channel:
            await AioAuthorityClient(channel=channel).close()

            now = await AioAuthorityClient(channel=channel).now()

        assert now.tzinfo is datetime.timezone.utc

    asyncio.run(main())


def test_aio_client_needs_target_or_channel() -> None:
    with pytest.raises(ValueError, match=r"^AioAuthorityClient needs exactly one of target"):
        AioAuthorityClient()


def test_aio_link_of_closed_client_starts_no_watch(target: str, caplog: pytest.LogCaptureFixture) -> None:
    """A keeper may ask for a watch after the caller closed the client; the link then starts none."""
    ends: list[object] = []

    async def main() -> None:
        client = AioAuthorityClient(target, principal="svc")
        link = AioLink(client, asyncio.get_running_loop())
        await client.close()
        link.start_watch(lambda digest, reason: ends.append(reason))
        # Long enough for a watch task to fail on the closed channel and retry.
        await asyncio.sleep(0.5)
        link.close()
        await asyncio.sleep(0)

    with caplog.at_level("DEBUG", logger="session_authority.clients"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "session watch" in r.getMessage()]
    assert ends == []


@pytest.mark.parametrize(
    ("tier", "message"),
    [
        (b"\xff".decode("utf-8", "surrogateescape"), r"^tier must be UTF-8 text"),
        (5, r"^tier must be a string, got int$"),
    ],
)
def test_aio_grant_bad_tier_names_field(target: str, tier: object, message: str) -> None:
    async def body(client: AioAuthorityClient) -> None:
        with pytest.raises(ValueError, match=message):
            await client.grant(tier)  # type: ignore[arg-type]

    run_with_client(target, body)

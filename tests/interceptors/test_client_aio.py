"""End-to-end tests of the grpc.aio lease interceptors and AioSession: a real authority and a real aio protected server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from client_support import (
    BIDI,
    CLIENT_STREAM,
    FAST_RECONNECT_OPTIONS,
    HANG,
    SERVER_STREAM,
    UNARY,
    AioProtectedServer,
    TcpProxy,
)
from session_authority.clients._aio_client import AioAuthorityClient
from session_authority.clients._aio_session import AioSession
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY, EndReason
from session_authority.clients._session import SessionEnded, SessionState
from session_authority.interceptors._aio_client import (
    AioStreamStreamLeaseInterceptor,
    AioUnaryUnaryLeaseInterceptor,
)


class RecordingInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Records the metadata each unary call reaches it with, and may replace it."""

    def __init__(self, replace_with: Any = "keep") -> None:
        self.seen: list[Any] = []
        self._replace_with = replace_with

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        self.seen.append(client_call_details.metadata)
        if self._replace_with != "keep":
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                client_call_details.timeout,
                self._replace_with,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


@pytest.fixture
def protected(authority) -> Iterator[AioProtectedServer]:  # type: ignore[no-untyped-def]
    server = AioProtectedServer(authority.target)
    yield server
    server.stop()


Scenario = Callable[[AioSession, Callable[..., grpc.aio.Channel]], Awaitable[None]]


@pytest.fixture(params=["interceptor", "channel", "channel-granted"])
def run(authority, protected, keeper, request) -> Callable[..., None]:  # type: ignore[no-untyped-def]
    """Run a scenario on a fresh event loop with an AioSession and a channel factory.

    With the ``channel`` parameters, the factory opens the session's
    ``AioLeaseChannel`` with the other interceptors after the session's.
    Interceptors that must run before the session's keep the interceptor
    path, because a channel cannot put them there. An ``AioLeaseChannel`` hands a call to the session's interceptors
    while the session has no lease, so with ``channel-granted`` a scenario's
    first call on a new channel takes the channel's own path too.
    """

    def runner(scenario: Scenario, *, proxy: TcpProxy | None = None, **session_options: Any) -> None:
        """Run ``scenario``. With ``proxy``, the session reaches the authority through it."""
        target = proxy.target if proxy is not None else authority.target
        options = FAST_RECONNECT_OPTIONS if proxy is not None else ()

        async def main() -> None:
            async with AioAuthorityClient(target, principal="svc", options=options) as client:
                session = AioSession(client, keeper=keeper, **session_options)
                channels: list[grpc.aio.Channel] = []

                def make_channel(*before_and_after: Any, split: int = 0) -> grpc.aio.Channel:
                    if request.param == "interceptor" or split:
                        interceptors = [*before_and_after[:split], *session.aio_interceptors(), *before_and_after[split:]]
                        channel = grpc.aio.insecure_channel(protected.target, interceptors=interceptors)
                    else:
                        channel = session.channel(protected.target, interceptors=before_and_after)
                    channels.append(channel)
                    return channel

                if request.param == "channel-granted" and proxy is None:
                    await session.open()
                try:
                    await scenario(session, make_channel)
                finally:
                    for channel in channels:
                        await channel.close()

        asyncio.run(main())

    return runner


async def wait_for(condition: Callable[[], bool], timeout_seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def lease_values(metadata: Any) -> list[str]:
    return [value for key, value in metadata if key == LEASE_METADATA_KEY]


# -- the four call shapes ------------------------------------------------------------


def test_aio_unary_unary_carries_lease(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().unary_unary(UNARY)(b"ping")

        assert await call == b"ping"
        assert await call.code() is grpc.StatusCode.OK
        assert ("echo-trailer", "unary") in tuple(await call.trailing_metadata())
        assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]

    run(scenario, tier="standard")


def test_aio_unary_stream_carries_lease(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().unary_stream(SERVER_STREAM)(b"3")

        responses = [response async for response in call]

        assert responses == [b"0", b"1", b"2"]
        assert await call.code() is grpc.StatusCode.OK
        assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]

    run(scenario, tier="standard")


def test_aio_unary_stream_read_api(run) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().unary_stream(SERVER_STREAM)(b"2")

        first = await call.read()
        second = await call.read()
        end = await call.read()

        assert (first, second) == (b"0", b"1")
        assert end is grpc.aio.EOF

    run(scenario, tier="standard")


def test_aio_stream_unary_carries_lease(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        async def requests() -> AsyncIterator[bytes]:
            for part in (b"a", b"b", b"c"):
                yield part

        channel = make_channel()
        from_async = await channel.stream_unary(CLIENT_STREAM)(requests())
        from_sync = await channel.stream_unary(CLIENT_STREAM)(iter([b"d", b"e"]))

        assert (from_async, from_sync) == (b"abc", b"de")
        assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]

    run(scenario, tier="standard")


def test_aio_stream_unary_write_api(run) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().stream_unary(CLIENT_STREAM)()

        await call.write(b"w1")
        await call.write(b"w2")
        await call.done_writing()

        assert await call == b"w1w2"

    run(scenario, tier="standard")


def test_aio_stream_stream_carries_lease(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().stream_stream(BIDI)()

        await call.write(b"x")
        echoed = await call.read()
        await call.done_writing()
        rest = [response async for response in call]

        assert echoed == b"x"
        assert rest == []
        assert await call.code() is grpc.StatusCode.OK
        assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]

    run(scenario, tier="standard")


def test_aio_stream_messages_mark_activity(run) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        await session.open()
        holder = session._holder
        assert holder is not None
        marks: list[float] = []
        original = holder.mark_activity

        def counting_mark(now: float | None = None) -> bool:
            marks.append(time.monotonic())
            return original(now)

        holder.mark_activity = counting_mark  # type: ignore[method-assign]

        responses = [response async for response in make_channel().stream_stream(BIDI)(iter([b"x", b"y"]))]

        assert responses == [b"x", b"y"]
        # One mark for the call, one per request sent and one per response received.
        assert len(marks) == 5

    run(scenario, tier="standard")


def test_aio_cancel_reaches_server(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        call = make_channel().unary_unary(HANG)(b"wait")
        started = await asyncio.get_running_loop().run_in_executor(None, protected.hang_started.wait, 5)
        assert started

        call.cancel()

        assert await asyncio.get_running_loop().run_in_executor(None, protected.cancelled.wait, 2)
        assert call.cancelled()
        assert await call.code() is grpc.StatusCode.CANCELLED

    run(scenario, tier="standard")


def test_aio_task_cancel_reaches_server(run, protected) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(HANG)
        task = asyncio.ensure_future(unary(b"wait"))
        started = await asyncio.get_running_loop().run_in_executor(None, protected.hang_started.wait, 5)
        assert started

        task.cancel()

        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.get_running_loop().run_in_executor(None, protected.cancelled.wait, 2)

    run(scenario, tier="standard")


# -- metadata ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [None, [("x-caller", "1")], (("x-caller", "1"),), grpc.aio.Metadata(("x-caller", "1"))],
    ids=["none", "list", "tuple", "aio-metadata"],
)
def test_aio_metadata_containers_kept(run, protected, metadata) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        before = RecordingInterceptor()
        after = RecordingInterceptor()
        channel = make_channel(before, after, split=1)

        await channel.unary_unary(UNARY)(b"ping", metadata=metadata)

        seen = protected.metadata_seen[-1]
        assert lease_values(seen) == [session.lease_id]
        assert (("x-caller", "1") in tuple(seen)) == (metadata is not None)
        assert lease_values(after.seen[0]) == [session.lease_id]
        assert lease_values(before.seen[0]) == []
        if metadata is not None:
            assert lease_values(metadata) == []

    run(scenario, tier="standard")


@pytest.mark.parametrize("replacement", [None, [("x-before", "b")], (("x-before", "b"),)], ids=["none", "list", "tuple"])
def test_aio_interceptor_before_replaces_metadata(run, protected, replacement) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        channel = make_channel(RecordingInterceptor(replace_with=replacement), split=1)

        await channel.unary_unary(UNARY)(b"ping", metadata=(("x-caller", "1"),))

        seen = tuple(protected.metadata_seen[-1])
        assert lease_values(seen) == [session.lease_id]
        assert (("x-before", "b") in seen) == (replacement is not None)

    run(scenario, tier="standard")


def test_aio_interceptor_classes(run) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession, make_channel: Any) -> None:
        interceptors = session.aio_interceptors()

        assert len(interceptors) == 4
        assert isinstance(interceptors[0], AioUnaryUnaryLeaseInterceptor)
        assert isinstance(interceptors[3], AioStreamStreamLeaseInterceptor)

    run(scenario)


# -- lifetimes -----------------------------------------------------------------------


def test_aio_steady_traffic_outlives_idle_timeout(run) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        channel = make_channel()
        bidi = channel.stream_stream(BIDI)()
        first = None

        deadline = time.monotonic() + 3.2
        while time.monotonic() < deadline:
            await bidi.write(b"tick")
            assert await bidi.read() == b"tick"
            first = first or session.fingerprint
            await asyncio.sleep(0.1)
        await bidi.done_writing()

        assert await bidi.code() is grpc.StatusCode.OK
        assert ends == []
        assert session.fingerprint == first
        assert session.state is SessionState.ALIVE

    run(scenario, tier="short", on_end=ends.append)


def test_aio_idle_session_ends_and_raises(run) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(UNARY)
        await unary(b"once")

        assert await wait_for(lambda: bool(ends), 3.0)
        with pytest.raises(SessionEnded) as raised:
            await unary(b"again")

        assert ends == [EndReason.IDLE_TIMEOUT]
        assert raised.value.reason is EndReason.IDLE_TIMEOUT

    run(scenario, tier="short", on_end=ends.append)


def test_aio_async_on_end_awaited(run) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def on_end(reason: EndReason) -> None:
        await asyncio.sleep(0)
        ends.append(reason)

    async def scenario(session: AioSession, make_channel: Any) -> None:
        await session.open()
        await session.close()

        assert await wait_for(lambda: ends == [EndReason.RELEASED])
        assert session.state is SessionState.CLOSED

    run(scenario, tier="standard", on_end=on_end)


def test_aio_reauthenticate_grants_new_lease(run, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(UNARY)
        await unary(b"one")
        first = session.fingerprint
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        # The server admits from its cache until the authority's push arrives.
        assert await wait_for(lambda: [end.fingerprint for end in protected.server_ends] == [first])

        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            await unary(b"two")
        response = await unary(b"three")

        assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert response == b"three"
        assert ends == [EndReason.REVOKED]
        assert session.fingerprint != first

    run(scenario, tier="standard", end_policy="reauthenticate", watch=False, on_end=ends.append)


def test_aio_rejection_ends_each_new_lease(run, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(UNARY)
        fingerprints = []

        for _ in range(2):
            await unary(b"grant")
            fingerprints.append(session.fingerprint)
            assert session.lease_id is not None
            admin.revoke(session.lease_id)
            assert await wait_for(lambda: [end.fingerprint for end in protected.server_ends] == fingerprints)
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(b"rejected")

        assert ends == [EndReason.REVOKED, EndReason.REVOKED]
        assert fingerprints[0] != fingerprints[1]
        assert session.state is SessionState.ENDED

    run(scenario, tier="standard", end_policy="reauthenticate", watch=False, on_end=ends.append)


def test_aio_revoke_observed_by_watch(run, admin) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        await make_channel().unary_unary(UNARY)(b"ping")
        assert session.lease_id is not None
        await asyncio.sleep(0.3)  # the keeper opens the watch stream after the grant

        admin.revoke(session.lease_id)

        assert await wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
        assert session.state is SessionState.ENDED

    run(scenario, tier="standard", on_end=ends.append)


def test_aio_revoke_seen_by_server_and_client(run, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        in_flight = make_channel().unary_unary(HANG)(b"wait")
        started = await asyncio.get_running_loop().run_in_executor(None, protected.hang_started.wait, 5)
        assert started
        lease_id = session.lease_id
        assert lease_id is not None

        revoked_at = time.monotonic()
        admin.revoke(lease_id)
        client_saw = await wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
        server_saw = await wait_for(in_flight.done, 2.0)
        elapsed = time.monotonic() - revoked_at

        assert client_saw
        assert server_saw
        assert elapsed < 2.0
        assert await in_flight.code() is grpc.StatusCode.UNAUTHENTICATED
        assert (END_REASON_TRAILER_KEY, "revoked") in tuple(await in_flight.trailing_metadata())
        assert await asyncio.get_running_loop().run_in_executor(None, protected.cancelled.wait, 2)
        assert session.state is SessionState.ENDED

    run(scenario, tier="standard", on_end=ends.append)


@pytest.mark.parametrize("shape", ["server_stream", "client_stream", "bidi"])
def test_aio_rejection_trailer_ends_session(run, admin, shape) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        channel = make_channel()
        await session.open()
        assert session.lease_id is not None
        admin.revoke(session.lease_id)

        with pytest.raises(grpc.aio.AioRpcError) as rejected:
            if shape == "server_stream":
                [response async for response in channel.unary_stream(SERVER_STREAM)(b"2")]
            elif shape == "client_stream":
                await channel.stream_unary(CLIENT_STREAM)(iter([b"x"]))
            else:
                [response async for response in channel.stream_stream(BIDI)(iter([b"x"]))]

        assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
        assert await wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
        with pytest.raises(SessionEnded):
            await channel.unary_unary(UNARY)(b"after")

    run(scenario, tier="standard", watch=False, on_end=ends.append)


# -- authority unreachable -----------------------------------------------------------


@pytest.fixture
def proxy(authority) -> Iterator[TcpProxy]:  # type: ignore[no-untyped-def]
    """A proxy to the authority that the test can cut. The protected server reaches the authority directly."""
    running = TcpProxy(int(authority.target.rsplit(":", 1)[1]))
    yield running
    running.stop()


async def call_until(unary: Any, condition: Callable[[], bool], timeout_seconds: float) -> bool:
    """Make calls every 20 ms until ``condition`` holds, and return whether it held in time."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        await unary(b"tick")
        if condition():
            return True
        await asyncio.sleep(0.02)
    return condition()


def test_aio_authority_unavailable_twice_lease_kept(run, proxy) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(UNARY)
        await unary(b"first")
        holder = session._holder
        assert holder is not None
        first = session.fingerprint

        proxy.reject_connections()
        failed = await call_until(unary, lambda: holder.renewal_failures >= 2, 0.6)
        proxy.accept_connections()
        recovered = await call_until(unary, lambda: holder.renewal_failures == 0, 0.6)

        assert failed
        assert recovered
        assert await unary(b"after") == b"after"
        assert ends == []
        assert session.fingerprint == first
        assert session.state is SessionState.ALIVE

    run(scenario, proxy=proxy, tier="short", watch=False, on_end=ends.append)


def test_aio_authority_down_ends_session_once(run, proxy) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def scenario(session: AioSession, make_channel: Any) -> None:
        unary = make_channel().unary_unary(UNARY)
        await unary(b"first")

        proxy.reject_connections()
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                await unary(b"tick")
            except SessionEnded:
                break
            await asyncio.sleep(0.05)
        proxy.accept_connections()
        await asyncio.sleep(0.5)

        assert ends == [EndReason.AUTHORITY_UNREACHABLE]
        assert session.state is SessionState.ENDED
        with pytest.raises(SessionEnded) as raised:
            await unary(b"after")
        assert raised.value.reason is EndReason.AUTHORITY_UNREACHABLE

    run(scenario, proxy=proxy, tier="short", watch=False, on_end=ends.append)

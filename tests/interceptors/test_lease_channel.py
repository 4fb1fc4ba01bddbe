"""What LeaseChannel and AioLeaseChannel add to the interceptor suites: their own API, against a real authority and servers.

The suites in test_client_sync.py and test_client_aio.py run every call
shape through these channels as well. The tests here cover what only a
channel has: its type and close, generated stubs, the connection that its
two paths share, and rejections read without awaiting the response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import grpc
import grpc.aio
import pytest

from client_support import UNARY, AioProtectedServer, SyncProtectedServer
from session_authority.clients._aio_client import AioAuthorityClient
from session_authority.clients._aio_session import AioSession
from session_authority.clients._client import AuthorityClient
from session_authority.clients._keeper import LeaseKeeper
from session_authority.clients._metadata import LEASE_METADATA_KEY, EndReason
from session_authority.clients._session import Session, SessionEnded, SessionState
from session_authority.interceptors import AioLeaseChannel, LeaseChannel
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc


@pytest.fixture
def sync_server(authority) -> Iterator[SyncProtectedServer]:  # type: ignore[no-untyped-def]
    server = SyncProtectedServer(authority.target)
    yield server
    server.stop()


@pytest.fixture
def aio_server(authority) -> Iterator[AioProtectedServer]:  # type: ignore[no-untyped-def]
    server = AioProtectedServer(authority.target)
    yield server
    server.stop()


def lease_values(metadata: Any) -> list[str]:
    return [value for key, value in metadata if key == LEASE_METADATA_KEY]


# -- blocking ------------------------------------------------------------------------


def test_channel_type_and_close(authority, keeper, sync_server) -> None:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc") as client:
        session = Session(client, tier="standard", keeper=keeper)
        raw = grpc.insecure_channel(sync_server.target)

        with session.channel(raw) as channel:
            assert isinstance(channel, LeaseChannel)
            assert isinstance(channel, grpc.Channel)
            assert channel.unary_unary(UNARY)(b"ping") == b"ping"

        with pytest.raises(ValueError, match="closed channel"):
            raw.unary_unary(UNARY)(b"after close")


def test_generated_stub_calls_through_channel(authority, keeper) -> None:  # type: ignore[no-untyped-def]
    # Generated stubs pass _registered_method=True, which the channel hands on.
    with AuthorityClient(authority.target, principal="svc") as client:
        session = Session(client, tier="standard", keeper=keeper).open()
        with session.channel(grpc.insecure_channel(authority.target)) as channel:
            reply = pb_grpc.SessionAuthorityStub(channel).Now(pb.NowRequest())

    assert reply.HasField("now")


def test_first_and_later_calls_share_connection(authority, keeper, sync_server) -> None:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc") as client:
        session = Session(client, tier="standard", keeper=keeper)
        with session.channel(grpc.insecure_channel(sync_server.target)) as channel:
            unary = channel.unary_unary(UNARY)
            unary(b"grants first")
            unary(b"lease at hand")

    assert len(set(sync_server.peers_seen)) == 1
    assert [lease_values(seen) for seen in sync_server.metadata_seen] == [[session.lease_id]] * 2


def test_rejected_with_call_ends_lease_before_raising(authority, keeper, admin, sync_server) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    with AuthorityClient(authority.target, principal="svc") as client:
        session = Session(client, tier="standard", keeper=keeper, watch=False, on_end=ends.append).open()
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        with session.channel(grpc.insecure_channel(sync_server.target)) as channel:
            with pytest.raises(grpc.RpcError) as rejected:
                channel.unary_unary(UNARY).with_call(b"x")

            assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert session.state is SessionState.ENDED
            assert ends == [EndReason.REVOKED]
            with pytest.raises(SessionEnded):
                channel.unary_unary(UNARY)(b"after")


# -- grpc.aio ------------------------------------------------------------------------


def run_aio(authority: Any, keeper: LeaseKeeper, scenario: Any, **session_options: Any) -> None:
    async def main() -> None:
        async with AioAuthorityClient(authority.target, principal="svc") as client:
            session = AioSession(client, tier="standard", keeper=keeper, **session_options)
            await scenario(session)

    asyncio.run(main())


def test_aio_channel_type_and_close(authority, keeper, aio_server) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        async with session.channel(aio_server.target) as channel:
            assert isinstance(channel, AioLeaseChannel)
            assert isinstance(channel, grpc.aio.Channel)
            assert await channel.unary_unary(UNARY)(b"grants first") == b"grants first"
            assert await channel.unary_unary(UNARY)(b"lease at hand") == b"lease at hand"
            assert channel.get_state() is grpc.ChannelConnectivity.READY

        assert channel.get_state() is grpc.ChannelConnectivity.SHUTDOWN
        with pytest.raises(grpc.aio.UsageError):
            await channel.unary_unary(UNARY)(b"after close")

    run_aio(authority, keeper, scenario)


def test_aio_generated_stub_calls_through_channel(authority, keeper) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        await session.open()
        async with session.channel(authority.target) as channel:
            reply = await pb_grpc.SessionAuthorityStub(channel).Now(pb.NowRequest())

        assert reply.HasField("now")

    run_aio(authority, keeper, scenario)


def test_aio_first_and_later_calls_share_connection(authority, keeper, aio_server) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        async with session.channel(aio_server.target) as channel:
            unary = channel.unary_unary(UNARY)
            await unary(b"grants first, through the interceptors")
            await unary(b"lease at hand, direct")

        assert len(set(aio_server.peers_seen)) == 1
        assert [lease_values(seen) for seen in aio_server.metadata_seen] == [[session.lease_id]] * 2

    run_aio(authority, keeper, scenario)


def test_aio_rejection_ends_lease_before_caller_sees_it(authority, keeper, admin, aio_server) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        await session.open()
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        async with session.channel(aio_server.target) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as rejected:
                await channel.unary_unary(UNARY)(b"x")

            assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert session.state is SessionState.ENDED
            with pytest.raises(SessionEnded):
                await channel.unary_unary(UNARY)(b"after")

    run_aio(authority, keeper, scenario, watch=False)


def test_aio_rejection_read_from_code_ends_lease(authority, keeper, admin, aio_server) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        await session.open()
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        async with session.channel(aio_server.target) as channel:
            call = channel.unary_unary(UNARY)(b"x")

            assert await call.code() is grpc.StatusCode.UNAUTHENTICATED
            assert session.state is SessionState.ENDED

    run_aio(authority, keeper, scenario, watch=False)


@pytest.mark.parametrize(
    "form", ["details", "trailing_metadata", "initial_metadata", "done", "done_callback", "wait_for_connection"]
)
def test_aio_rejection_read_any_way_ends_lease(authority, keeper, admin, aio_server, form: str) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        await session.open()
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        async with session.channel(aio_server.target) as channel:
            call = channel.unary_unary(UNARY)(b"x")
            if form == "details":
                await call.details()
            elif form == "trailing_metadata":
                await call.trailing_metadata()
            elif form == "initial_metadata":
                await call.initial_metadata()
            elif form == "done":
                while not call.done():
                    await asyncio.sleep(0.01)
            elif form == "wait_for_connection":
                with pytest.raises(grpc.aio.AioRpcError):
                    await call.wait_for_connection()
            else:
                done = asyncio.Event()
                call.add_done_callback(lambda _call: done.set())
                await done.wait()
            for _ in range(200):
                if session.state is SessionState.ENDED:
                    break
                await asyncio.sleep(0.01)

            assert session.state is SessionState.ENDED

    run_aio(authority, keeper, scenario, watch=False)


def test_aio_closed_channel_refuses_calls_on_both_paths(authority, keeper, admin, aio_server) -> None:  # type: ignore[no-untyped-def]
    own = admin.grant("standard")

    async def scenario(session: AioSession) -> None:
        await session.open()
        channel = session.channel(aio_server.target)
        assert await channel.unary_unary(UNARY)(b"direct") == b"direct"
        await channel.close()

        with pytest.raises(grpc.aio.UsageError):
            channel.unary_unary(UNARY)(b"direct after close")
        with pytest.raises(grpc.aio.UsageError):
            channel.unary_unary(UNARY)(b"own lease after close", metadata=((LEASE_METADATA_KEY, own.lease_id),))

    run_aio(authority, keeper, scenario)


def test_aio_done_callback_gets_the_call_returned(authority, keeper, aio_server) -> None:  # type: ignore[no-untyped-def]
    async def scenario(session: AioSession) -> None:
        await session.open()
        async with session.channel(aio_server.target) as channel:
            done: list[Any] = []
            call = channel.unary_unary(UNARY)(b"x")
            call.add_done_callback(done.append)

            assert await call == b"x"
            for _ in range(100):
                if done:
                    break
                await asyncio.sleep(0.01)

            assert done == [call]
            assert call.done()
            assert await call.details() == ""

    run_aio(authority, keeper, scenario)

"""End-to-end tests of LeaseClientInterceptor: a real authority and servers behind the real lease server interceptors."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest

from client_support import (
    BIDI,
    CLIENT_STREAM,
    FAST_RECONNECT_OPTIONS,
    HANG,
    SERVER_STREAM,
    UNARY,
    AioProtectedServer,
    SyncProtectedServer,
    TcpProxy,
    start_protected_server,
)
from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY, EndReason
from session_authority.clients._session import Session, SessionEnded, SessionState
from session_authority.interceptors._client import LeaseClientInterceptor


class RecordingInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Records the metadata each call reaches it with, and may replace it."""

    def __init__(self, replace_with: Any = "keep") -> None:
        self.seen: list[Any] = []
        self._replace_with = replace_with

    def _details(self, details: Any) -> Any:
        self.seen.append(details.metadata)
        if self._replace_with == "keep":
            return details
        from session_authority.interceptors._client import _details_with_metadata

        return _details_with_metadata(details, self._replace_with)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


@pytest.fixture
def protected(authority, request) -> Iterator[SyncProtectedServer | AioProtectedServer]:  # type: ignore[no-untyped-def]
    """A sync protected server, or an aio one for tests parametrized indirectly with ``"aio"``."""
    server = start_protected_server(getattr(request, "param", "sync"), authority.target)
    yield server
    server.stop()


@pytest.fixture
def client(authority) -> Iterator[AuthorityClient]:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc") as opened:
        yield opened


@pytest.fixture(params=["interceptor", "channel", "channel-granted"])
def make_channel(
    protected: SyncProtectedServer | AioProtectedServer, request: pytest.FixtureRequest
) -> Iterator[Callable[..., grpc.Channel]]:
    """Build a channel with these interceptors, in order.

    With the ``channel`` parameters, a session's interceptor among them is
    replaced by its ``LeaseChannel``. The interceptors before it wrap that
    channel, and those after it sit on the channel it wraps. So every test
    runs against both ways of carrying a lease. A ``LeaseChannel`` hands a
    call to the interceptor while the session has no lease, so with
    ``channel-granted`` a pending session is opened first and the test's
    first call takes the channel's own path too.
    """
    opened: list[grpc.Channel] = []

    def make(*interceptors: Any) -> grpc.Channel:
        raw = grpc.insecure_channel(protected.target)
        opened.append(raw)
        lease = [index for index, item in enumerate(interceptors) if isinstance(item, LeaseClientInterceptor)]
        if request.param == "interceptor" or not lease:
            return grpc.intercept_channel(raw, *interceptors)
        index = lease[0]
        inner = grpc.intercept_channel(raw, *interceptors[index + 1 :])
        session = interceptors[index]._session
        if request.param == "channel-granted" and session.state is SessionState.PENDING:
            session.open()
        channel = session.channel(inner)
        return grpc.intercept_channel(channel, *interceptors[:index])

    yield make
    for channel in opened:
        channel.close()


def wait_for(condition: Callable[[], bool], timeout_seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def lease_values(metadata: Any) -> list[str]:
    return [value for key, value in metadata if key == LEASE_METADATA_KEY]


# -- the four call shapes ------------------------------------------------------------


def test_unary_unary_carries_lease(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    response, call = channel.unary_unary(UNARY).with_call(b"ping")

    assert response == b"ping"
    assert call.code() is grpc.StatusCode.OK
    assert ("echo-trailer", "unary") in tuple(call.trailing_metadata())
    assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]


def test_unary_stream_carries_lease(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    call = channel.unary_stream(SERVER_STREAM)(b"4")
    responses = list(call)

    assert responses == [b"0", b"1", b"2", b"3"]
    assert isinstance(call, grpc.Call)
    assert call.code() is grpc.StatusCode.OK
    assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]


def test_stream_unary_carries_lease(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    response = channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"b", b"c"]))

    assert response == b"abc"
    assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]


def test_stream_stream_carries_lease(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    call = channel.stream_stream(BIDI)(iter([b"x", b"y"]))
    responses = [response for response in call]

    assert responses == [b"x", b"y"]
    assert call.code() is grpc.StatusCode.OK
    assert call.details() in (None, "")
    assert lease_values(protected.metadata_seen[-1]) == [session.lease_id]


@pytest.mark.parametrize("protected", ["aio"], indirect=True)
def test_four_shapes_against_aio_server(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    unary, call = channel.unary_unary(UNARY).with_call(b"ping")
    server_stream = list(channel.unary_stream(SERVER_STREAM)(b"2"))
    client_stream = channel.stream_unary(CLIENT_STREAM)(iter([b"a", b"b"]))
    bidi = list(channel.stream_stream(BIDI)(iter([b"x", b"y"])))

    assert unary == b"ping"
    assert ("echo-trailer", "unary") in tuple(call.trailing_metadata())
    assert server_stream == [b"0", b"1"]
    assert client_stream == b"ab"
    assert bidi == [b"x", b"y"]
    assert len(protected.metadata_seen) == 4
    for seen in protected.metadata_seen:
        assert lease_values(seen) == [session.lease_id]


def test_stream_messages_mark_activity(client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper).open()
    holder = session._holder
    assert holder is not None
    channel = make_channel(session.interceptor())
    marks: list[float] = []
    original = holder.mark_activity

    def counting_mark(now: float | None = None) -> bool:
        marks.append(time.monotonic())
        return original(now)

    holder.mark_activity = counting_mark  # type: ignore[method-assign]

    list(channel.stream_stream(BIDI)(iter([b"x", b"y", b"z"])))

    # One mark for the call, one per request sent and one per response received.
    assert len(marks) == 7


def test_future_api_kept(client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())
    done = threading.Event()

    future = channel.unary_unary(UNARY).future(b"later")
    future.add_done_callback(lambda _: done.set())

    assert future.result(timeout=5) == b"later"
    assert done.wait(5)
    assert future.code() is grpc.StatusCode.OK


def test_cancel_reaches_server(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    future = channel.unary_unary(HANG).future(b"wait")
    assert protected.hang_started.wait(5)
    future.cancel()

    assert protected.cancelled.wait(2)
    assert future.cancelled()


def test_stream_cancel_reaches_server(client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())
    stop = threading.Event()

    def requests() -> Iterator[bytes]:
        yield b"first"
        stop.wait(5)

    call = channel.stream_stream(BIDI)(requests())
    assert next(call) == b"first"
    call.cancel()

    with pytest.raises(grpc.RpcError):
        next(call)
    stop.set()
    assert call.code() is grpc.StatusCode.CANCELLED


# -- metadata ------------------------------------------------------------------------


@pytest.mark.parametrize("metadata", [None, [("x-caller", "1")], (("x-caller", "1"),)], ids=["none", "list", "tuple"])
def test_metadata_containers_kept(client, keeper, make_channel, protected, metadata) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    before = RecordingInterceptor()
    after = RecordingInterceptor()
    channel = make_channel(before, session.interceptor(), after)

    channel.unary_unary(UNARY)(b"ping", metadata=metadata)
    list(channel.unary_stream(SERVER_STREAM)(b"1", metadata=metadata))

    for seen in protected.metadata_seen:
        assert lease_values(seen) == [session.lease_id]
        assert (("x-caller", "1") in seen) == (metadata is not None)
    assert lease_values(after.seen[0]) == [session.lease_id]
    assert before.seen[0] == metadata
    if isinstance(metadata, list):
        assert metadata == [("x-caller", "1")]


def test_metadata_generator_kept(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())

    channel.unary_unary(UNARY)(b"ping", metadata=(item for item in [("x-caller", "1")]))

    seen = protected.metadata_seen[-1]
    assert ("x-caller", "1") in seen
    assert lease_values(seen) == [session.lease_id]


def test_interceptor_before_adds_metadata(client, keeper, make_channel, protected) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, tier="standard", keeper=keeper)
    before = RecordingInterceptor(replace_with=(("x-before", "b"),))
    channel = make_channel(before, session.interceptor())

    channel.unary_unary(UNARY)(b"ping", metadata=[("x-caller", "1")])

    seen = protected.metadata_seen[-1]
    assert ("x-before", "b") in seen
    assert lease_values(seen) == [session.lease_id]


def test_caller_lease_is_kept(client, keeper, make_channel, protected, admin) -> None:  # type: ignore[no-untyped-def]
    own = admin.grant("standard")
    session = Session(client, tier="standard", keeper=keeper)
    channel = make_channel(session.interceptor())
    state = session.state

    channel.unary_unary(UNARY)(b"ping", metadata=((LEASE_METADATA_KEY, own.lease_id),))

    assert lease_values(protected.metadata_seen[-1]) == [own.lease_id]
    # The call neither granted the session a lease nor used the one it has.
    assert session.state is state


# -- lifetimes -----------------------------------------------------------------------


def test_steady_traffic_outlives_idle_timeout(client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, on_end=ends.append)
    channel = make_channel(session.interceptor())
    unary = channel.unary_unary(UNARY)
    first = None

    deadline = time.monotonic() + 3.2
    while time.monotonic() < deadline:
        assert unary(b"tick") == b"tick"
        first = first or session.fingerprint
        time.sleep(0.1)

    assert ends == []
    assert session.fingerprint == first
    assert session.state is SessionState.ALIVE


def test_idle_session_ends_and_raises(client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, on_end=ends.append)
    channel = make_channel(session.interceptor())
    unary = channel.unary_unary(UNARY)
    unary(b"once")

    assert wait_for(lambda: bool(ends), 3.0)
    with pytest.raises(SessionEnded) as raised:
        unary(b"again")

    assert ends == [EndReason.IDLE_TIMEOUT]
    assert raised.value.reason is EndReason.IDLE_TIMEOUT
    assert session.state is SessionState.ENDED


def test_reauthenticate_grants_new_lease(client, keeper, make_channel, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, end_policy="reauthenticate", on_end=ends.append, watch=False)
    channel = make_channel(session.interceptor())
    unary = channel.unary_unary(UNARY)
    unary(b"one")
    first = session.fingerprint
    assert session.lease_id is not None
    admin.revoke(session.lease_id)
    # The server admits from its cache until the authority's push arrives.
    assert wait_for(lambda: [end.fingerprint for end in protected.server_ends] == [first])

    with pytest.raises(grpc.RpcError) as rejected:
        unary(b"two")
    response = unary(b"three")

    assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert response == b"three"
    assert ends == [EndReason.REVOKED]
    assert session.fingerprint != first
    assert session.state is SessionState.ALIVE


def test_rejection_ends_each_new_lease(client, keeper, make_channel, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, end_policy="reauthenticate", on_end=ends.append, watch=False)
    unary = make_channel(session.interceptor()).unary_unary(UNARY)
    fingerprints = []

    for _ in range(2):
        unary(b"grant")
        fingerprints.append(session.fingerprint)
        assert session.lease_id is not None
        admin.revoke(session.lease_id)
        assert wait_for(lambda: [end.fingerprint for end in protected.server_ends] == fingerprints)
        with pytest.raises(grpc.RpcError):
            unary(b"rejected")

    assert ends == [EndReason.REVOKED, EndReason.REVOKED]
    assert fingerprints[0] != fingerprints[1]
    assert session.state is SessionState.ENDED


def test_future_rejection_ends_session(client, keeper, make_channel, admin) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append, watch=False).open()
    assert session.lease_id is not None
    admin.revoke(session.lease_id)

    future = make_channel(session.interceptor()).unary_unary(UNARY).future(b"x")

    assert future.exception(timeout=5) is not None
    assert future.code() is grpc.StatusCode.UNAUTHENTICATED
    assert wait_for(lambda: ends == [EndReason.REVOKED], 2.0)


def test_revoke_observed_by_watch(client, keeper, make_channel, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append)
    channel = make_channel(session.interceptor())
    channel.unary_unary(UNARY)(b"ping")
    lease_id = session.lease_id
    assert lease_id is not None
    time.sleep(0.3)  # the keeper opens the watch stream after the grant

    admin.revoke(lease_id)

    assert wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
    raw = grpc.insecure_channel(protected.target)
    with pytest.raises(grpc.RpcError) as rejected:
        raw.unary_unary(UNARY)(b"old lease", metadata=((LEASE_METADATA_KEY, lease_id),))
    raw.close()
    assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (END_REASON_TRAILER_KEY, "revoked") in tuple(rejected.value.trailing_metadata())


@pytest.mark.parametrize("protected", ["sync", "aio"], indirect=True)
def test_revoke_seen_by_server_and_client(client, keeper, make_channel, admin, protected) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append)
    channel = make_channel(session.interceptor())
    in_flight = channel.unary_unary(HANG).future(b"wait")
    assert protected.hang_started.wait(5)
    lease_id = session.lease_id
    assert lease_id is not None

    revoked_at = time.monotonic()
    admin.revoke(lease_id)
    client_saw = wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
    server_saw = wait_for(in_flight.done, 2.0)
    elapsed = time.monotonic() - revoked_at

    assert client_saw
    assert server_saw
    assert elapsed < 2.0
    assert protected.cancelled.wait(2)
    assert in_flight.code() is grpc.StatusCode.UNAUTHENTICATED
    assert (END_REASON_TRAILER_KEY, "revoked") in tuple(in_flight.trailing_metadata())
    assert session.state is SessionState.ENDED


@pytest.mark.parametrize("shape", ["unary", "server_stream", "client_stream", "bidi"])
def test_rejection_trailer_ends_session(client, keeper, make_channel, admin, shape) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append, watch=False)
    channel = make_channel(session.interceptor())
    session.open()
    assert session.lease_id is not None
    admin.revoke(session.lease_id)

    with pytest.raises(grpc.RpcError) as rejected:
        if shape == "unary":
            channel.unary_unary(UNARY)(b"x")
        elif shape == "server_stream":
            list(channel.unary_stream(SERVER_STREAM)(b"2"))
        elif shape == "client_stream":
            channel.stream_unary(CLIENT_STREAM)(iter([b"x"]))
        else:
            list(channel.stream_stream(BIDI)(iter([b"x"])))

    assert rejected.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert wait_for(lambda: ends == [EndReason.REVOKED], 2.0)
    with pytest.raises(SessionEnded):
        channel.unary_unary(UNARY)(b"after")


# -- authority unreachable -----------------------------------------------------------


@pytest.fixture
def proxied_client(authority) -> Iterator[tuple[AuthorityClient, TcpProxy]]:  # type: ignore[no-untyped-def]
    """A client that reaches the authority through a proxy the test can cut. The server reaches the authority directly."""
    proxy = TcpProxy(int(authority.target.rsplit(":", 1)[1]))
    with AuthorityClient(proxy.target, principal="svc", options=FAST_RECONNECT_OPTIONS) as opened:
        yield opened, proxy
    proxy.stop()


def test_authority_unavailable_twice_lease_kept(proxied_client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    client, proxy = proxied_client
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append)
    unary = make_channel(session.interceptor()).unary_unary(UNARY)
    unary(b"first")
    holder = session._holder
    assert holder is not None
    first = session.fingerprint

    proxy.reject_connections()
    failed = wait_for(lambda: (unary(b"tick"), holder.renewal_failures >= 2)[1], 0.6)
    proxy.accept_connections()
    recovered = wait_for(lambda: (unary(b"tick"), holder.renewal_failures == 0)[1], 0.6)

    assert failed
    assert recovered
    assert unary(b"after") == b"after"
    assert ends == []
    assert session.fingerprint == first
    assert session.state is SessionState.ALIVE


def test_authority_down_ends_session_once(proxied_client, keeper, make_channel) -> None:  # type: ignore[no-untyped-def]
    client, proxy = proxied_client
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append)
    unary = make_channel(session.interceptor()).unary_unary(UNARY)
    unary(b"first")

    proxy.reject_connections()
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        try:
            unary(b"tick")
        except SessionEnded:
            break
        time.sleep(0.05)
    proxy.accept_connections()
    time.sleep(0.5)

    assert ends == [EndReason.AUTHORITY_UNREACHABLE]
    assert session.state is SessionState.ENDED
    with pytest.raises(SessionEnded) as raised:
        unary(b"after")
    assert raised.value.reason is EndReason.AUTHORITY_UNREACHABLE


def test_interceptor_type(client, keeper) -> None:  # type: ignore[no-untyped-def]
    session = Session(client, keeper=keeper)

    assert isinstance(session.interceptor(), LeaseClientInterceptor)

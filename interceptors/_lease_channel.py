"""A blocking ``grpc.Channel`` that carries a session's lease without gRPC's interceptor machinery.

``grpc.intercept_channel`` builds a new multicallable and a call-details
object for every call before :class:`LeaseClientInterceptor` runs. That
machinery costs about as much client CPU as the interceptor's own work. While
the session holds an alive lease, :class:`LeaseChannel` adds the lease to the
metadata itself and calls the wrapped channel directly.

Every other call goes through the interceptor on the same channel: a call
before the first grant, after the lease ended, or with ``session-lease`` set
by the caller. So both paths follow one set of rules for metadata, grants,
``SessionEnded``, activity and rejections.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import grpc

from session_authority.clients._session import SessionEnded
from session_authority.interceptors._client import (
    LeaseClientInterceptor,
    _CallObserver,
    _LeaseObservers,
    _requests_marking_activity,
    _ResponseStream,
    has_lease_key,
    metadata_with_lease,
    reusable_metadata,
)

if TYPE_CHECKING:
    from session_authority.clients._session import Session, _SessionBase

logger = logging.getLogger(__name__)


class _Carrier:
    """Decides per call whether the direct path applies, and what metadata and observer it uses.

    The aio channel uses it too, with its own observer class and metadata
    copy. Threading: any thread.
    """

    __slots__ = ("session", "mark", "_with_lease", "_observers")

    def __init__(
        self,
        session: _SessionBase,
        observer_class: type[_CallObserver] = _CallObserver,
        with_lease: Callable[[Any, str], Any] = metadata_with_lease,
    ) -> None:
        self.session = session
        self.mark = session.mark_activity
        self._with_lease = with_lease
        self._observers = _LeaseObservers(session, observer_class)

    def prepare(self, metadata: Any) -> tuple[Any, Any] | None:
        """Return the call's metadata and observer, or None when the interceptor must handle the call."""
        if metadata is not None and has_lease_key(metadata):
            return None
        try:
            snapshot = self.session._lease_for_call_nowait()
        except SessionEnded:
            # The interceptor raises it where each call kind does: at once for
            # blocking calls, and from the result for futures and streams.
            return None
        if snapshot is None:
            return None
        observer = self._observers.for_lease(snapshot.lease_id)
        if metadata is None:
            return snapshot.metadata, observer
        return self._with_lease(metadata, snapshot.lease_id), observer


class _MultiCallable:
    """One method of a :class:`LeaseChannel`: the wrapped channel's multicallable and the intercepted one.

    Subclasses for request streams mark each request sent as activity.
    """

    __slots__ = ("_direct", "_intercepted", "_carrier")

    def __init__(self, direct: Any, intercepted: Any, carrier: _Carrier) -> None:
        self._direct = direct
        self._intercepted = intercepted
        self._carrier = carrier

    def _requests(self, argument: Any) -> Any:
        return argument

    def _blocking(self, name: str, argument: Any, timeout: Any, metadata: Any, *options: Any) -> Any:
        # name is "__call__" or "with_call"; options are credentials,
        # wait_for_ready and compression, in gRPC's order.
        metadata = reusable_metadata(metadata)
        prepared = self._carrier.prepare(metadata)
        if prepared is None:
            return getattr(self._intercepted, name)(argument, timeout, metadata, *options)
        lease_metadata, observer = prepared
        try:
            return getattr(self._direct, name)(self._requests(argument), timeout, lease_metadata, *options)
        except grpc.RpcError as exc:
            observer.observe_error(exc)
            raise

    def _future(self, argument: Any, timeout: Any, metadata: Any, *options: Any) -> Any:
        metadata = reusable_metadata(metadata)
        prepared = self._carrier.prepare(metadata)
        if prepared is None:
            return self._intercepted.future(argument, timeout, metadata, *options)
        lease_metadata, observer = prepared
        future = self._direct.future(self._requests(argument), timeout, lease_metadata, *options)
        future.add_done_callback(observer.observe_call)
        return future

    def _stream(self, argument: Any, timeout: Any, metadata: Any, *options: Any) -> Any:
        metadata = reusable_metadata(metadata)
        prepared = self._carrier.prepare(metadata)
        if prepared is None:
            return self._intercepted(argument, timeout, metadata, *options)
        lease_metadata, observer = prepared
        call = self._direct(self._requests(argument), timeout, lease_metadata, *options)
        call.add_done_callback(observer.observe_call)
        return _ResponseStream(call, self._carrier.mark, observer)


class _RequestStream(_MultiCallable):
    __slots__ = ()

    def _requests(self, argument: Any) -> Any:
        return _requests_marking_activity(argument, self._carrier.mark)


class _UnaryUnary(_MultiCallable, grpc.UnaryUnaryMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._blocking("__call__", request, timeout, metadata, credentials, wait_for_ready, compression)

    def with_call(
        self,
        request: Any,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._blocking("with_call", request, timeout, metadata, credentials, wait_for_ready, compression)

    def future(
        self,
        request: Any,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._future(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MultiCallable, grpc.UnaryStreamMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request: Any,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._stream(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_RequestStream, grpc.StreamUnaryMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._blocking("__call__", request_iterator, timeout, metadata, credentials, wait_for_ready, compression)

    def with_call(
        self,
        request_iterator: Iterator[Any],
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._blocking(
            "with_call", request_iterator, timeout, metadata, credentials, wait_for_ready, compression
        )

    def future(
        self,
        request_iterator: Iterator[Any],
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._future(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_RequestStream, grpc.StreamStreamMultiCallable):
    __slots__ = ()

    def __call__(
        self,
        request_iterator: Iterator[Any],
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._stream(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class LeaseChannel(grpc.Channel):
    """A ``grpc.Channel`` over another one that carries a :class:`Session`'s lease on every call.

    Get one with ``session.channel(channel)``. Calls behave as through
    ``grpc.intercept_channel(channel, session.interceptor())``: the same
    metadata rule, grants, activity, rejection handling and return types.
    What differs is the cost: while the lease is alive, a call skips gRPC's
    interceptor machinery, which saves about 20 µs of client CPU per call.
    To combine the lease with other client interceptors, wrap this channel
    with ``grpc.intercept_channel`` (they then run before the lease is
    added), or pass it a channel that already has them (they run after).

    Threading: as a ``grpc.Channel``; any thread may make calls.
    """

    def __init__(self, channel: grpc.Channel, session: Session) -> None:
        self._channel = channel
        self._carrier = _Carrier(session)
        self._intercepted = grpc.intercept_channel(channel, LeaseClientInterceptor(session))

    def _method(self, wrapper: type[_MultiCallable], kind: str, arguments: tuple[Any, ...]) -> Any:
        direct = getattr(self._channel, kind)(*arguments)
        return wrapper(direct, getattr(self._intercepted, kind)(*arguments), self._carrier)

    def unary_unary(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.UnaryUnaryMultiCallable:
        return self._method(_UnaryUnary, "unary_unary", (method, request_serializer, response_deserializer, _registered_method))

    def unary_stream(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.UnaryStreamMultiCallable:
        return self._method(_UnaryStream, "unary_stream", (method, request_serializer, response_deserializer, _registered_method))

    def stream_unary(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.StreamUnaryMultiCallable:
        return self._method(_StreamUnary, "stream_unary", (method, request_serializer, response_deserializer, _registered_method))

    def stream_stream(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.StreamStreamMultiCallable:
        return self._method(_StreamStream, "stream_stream", (method, request_serializer, response_deserializer, _registered_method))

    def subscribe(self, callback: Callable[[grpc.ChannelConnectivity], None], try_to_connect: bool = False) -> None:
        self._channel.subscribe(callback, try_to_connect=try_to_connect)

    def unsubscribe(self, callback: Callable[[grpc.ChannelConnectivity], None]) -> None:
        self._channel.unsubscribe(callback)

    def close(self) -> None:
        """Close the wrapped channel, as a channel from ``grpc.intercept_channel`` does."""
        self._channel.close()

    def __enter__(self) -> LeaseChannel:
        return self

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        self.close()

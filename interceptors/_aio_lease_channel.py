"""A ``grpc.aio.Channel`` that carries a session's lease without ``grpc.aio``'s interceptor machinery.

A ``grpc.aio`` client interceptor runs each call in a task of its own and
wraps the call it returns in another call object. That costs about 20 µs of
client CPU per call before the interceptor's own work (measured on a 2-core
machine). While the session holds an alive lease, :class:`AioLeaseChannel`
adds the lease to the metadata itself and calls a plain channel directly.

Every other call goes through the session's interceptors on a second channel
to the same target, opened on the first such call. Those are calls before
the first grant (which must be awaited), after the lease ended, or with
``session-lease`` set by the caller. So both paths follow one set of rules
for metadata, grants, ``SessionEnded``, activity and rejections. Without
credentials, gRPC shares one connection between the two channels. With
credentials each channel opens its own, measured with grpcio 1.85.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Optional, Sequence

import grpc
import grpc.aio

from session_authority.interceptors._aio_client import (
    _AioCallObserver,
    _requests_marking_activity,
    _responses_marking_activity,
    aio_metadata_with_lease,
    await_reading_rejection,
)
from session_authority.interceptors._client import reusable_metadata
from session_authority.interceptors._lease_channel import _Carrier

if TYPE_CHECKING:
    from session_authority.clients._aio_session import AioSession

logger = logging.getLogger(__name__)


def _carrier(session: AioSession) -> _Carrier:
    # Threading: the channel's event loop.
    return _Carrier(session, _AioCallObserver, aio_metadata_with_lease)


class _ObservedCall:
    """Delegates the call API to a ``grpc.aio`` call. Subclasses add what marks activity or reads rejections."""

    __slots__ = ("_call", "_carrier", "_observer", "_responses", "_status_task_started")

    def __init__(self, call: Any, carrier: _Carrier, observer: _AioCallObserver) -> None:
        self._call = call
        self._carrier = carrier
        self._observer = observer
        self._responses: AsyncIterator[Any] | None = None
        self._status_task_started = False

    def cancelled(self) -> bool:
        return self._call.cancelled()

    def done(self) -> bool:
        return self._call.done()

    def time_remaining(self) -> Optional[float]:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        return self._call.cancel()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        # The callback gets this object, as it would get the call itself.
        self._call.add_done_callback(lambda _call: callback(self))

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        return await self._call.code()

    async def details(self) -> str:
        return await self._call.details()

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    def __getattr__(self, name: str) -> Any:
        # Methods outside the abstract call API, such as debug_error_string.
        return getattr(self._call, name)


class _UnaryResponse(_ObservedCall):
    """Reads a rejection wherever the caller learns the outcome, before the caller sees it.

    A unary-unary call gets no task that reads its status when it finishes,
    because a task per call would cost what this channel saves. Instead,
    every way of reading the outcome reads the rejection first: awaiting
    the response, the status and metadata getters, ``wait_for_connection``,
    done callbacks and a ``done()`` that returns True. A call whose outcome
    is never read ends the lease only through the watch stream.
    """

    __slots__ = ()

    def __await__(self) -> Any:
        return await_reading_rejection(self._call, self._observer)

    async def _read_rejection(self) -> None:
        code = await self._call.code()
        if code is grpc.StatusCode.UNAUTHENTICATED:
            self._observer.observe_status(code, await self._call.trailing_metadata())

    async def code(self) -> grpc.StatusCode:
        await self._read_rejection()
        return await self._call.code()

    async def details(self) -> str:
        await self._read_rejection()
        return await self._call.details()

    async def trailing_metadata(self) -> Any:
        await self._read_rejection()
        return await self._call.trailing_metadata()

    async def initial_metadata(self) -> Any:
        metadata = await self._call.initial_metadata()
        if self._call.done():
            # A rejected call sends no initial metadata before its status.
            await self._read_rejection()
        return metadata

    async def wait_for_connection(self) -> None:
        try:
            await self._call.wait_for_connection()
        except grpc.aio.AioRpcError as exc:
            self._observer.observe_error(exc)
            raise

    def done(self) -> bool:
        finished = self._call.done()
        if finished and not self._status_task_started:
            # A caller that polls done() reads the outcome next, so the
            # rejection is read in a task, as for a done callback.
            self._status_task_started = True
            self._observer.on_done(self._call)
        return finished

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        # The rejection is read in a task, as the interceptors do, and that
        # task is created before the caller's callback runs.
        if not self._status_task_started:
            self._status_task_started = True
            self._call.add_done_callback(self._observer.on_done)
        super().add_done_callback(callback)


class _Writes(_ObservedCall):
    """Counts every request written with ``write()`` as activity."""

    __slots__ = ()

    async def write(self, request: Any) -> None:
        self._carrier.mark()
        await self._call.write(request)

    async def done_writing(self) -> None:
        await self._call.done_writing()


class _Reads(_ObservedCall):
    """Counts every response read or iterated as activity.

    ``read()`` and iteration share one iterator over the call, so a caller
    may mix them, as it may on a call through the session's interceptors.
    """

    __slots__ = ()

    def _response_iterator(self) -> AsyncIterator[Any]:
        responses = self._responses
        if responses is None:
            responses = _responses_marking_activity(self._call, self._carrier.mark, self._observer)
            self._responses = responses
        return responses

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._response_iterator()

    async def read(self) -> Any:
        try:
            return await self._response_iterator().__anext__()
        except StopAsyncIteration:
            return grpc.aio.EOF


class _UnaryUnaryCall(_UnaryResponse, grpc.aio.UnaryUnaryCall):
    __slots__ = ()


class _UnaryStreamCall(_Reads, grpc.aio.UnaryStreamCall):
    __slots__ = ()


class _StreamUnaryCall(_Writes, _UnaryResponse, grpc.aio.StreamUnaryCall):
    __slots__ = ()


class _StreamStreamCall(_Writes, _Reads, grpc.aio.StreamStreamCall):
    __slots__ = ()


class _MultiCallable:
    """One method of an :class:`AioLeaseChannel`: the plain multicallable and, once needed, the intercepted one.

    Subclasses name the call wrapper they return, whether their calls carry
    a request stream (each request marks activity), and whether a task reads
    the status when the call finishes, as the session's interceptors do for
    every call kind but unary-unary.
    """

    __slots__ = ("_direct", "_channel", "_kind", "_arguments", "_intercepted", "_carrier")

    _call_class: type[_ObservedCall] = _ObservedCall
    _request_stream = False
    _reads_status_when_done = True

    def __init__(self, channel: AioLeaseChannel, kind: str, arguments: tuple[Any, ...]) -> None:
        self._channel = channel
        self._kind = kind
        self._arguments = arguments
        self._direct = getattr(channel._direct, kind)(*arguments)
        self._intercepted: Any = None
        self._carrier = channel._carrier

    def _fallback(self) -> Any:
        intercepted = self._intercepted
        if intercepted is None:
            intercepted = getattr(self._channel._intercepted_channel(), self._kind)(*self._arguments)
            self._intercepted = intercepted
        return intercepted

    def _invoke(
        self,
        argument: Any,
        timeout: Optional[float],
        metadata: Any,
        credentials: Optional[grpc.CallCredentials],
        wait_for_ready: Optional[bool],
        compression: Optional[grpc.Compression],
    ) -> Any:
        metadata = reusable_metadata(metadata)
        prepared = self._carrier.prepare(metadata)
        if prepared is None:
            return self._fallback()(
                argument,
                timeout=timeout,
                metadata=metadata,
                credentials=credentials,
                wait_for_ready=wait_for_ready,
                compression=compression,
            )
        lease_metadata, observer = prepared
        if self._request_stream and argument is not None:
            # Without an iterator the caller writes with call.write(), which marks activity.
            argument = _requests_marking_activity(argument, self._carrier.mark)
        call = self._direct(
            argument,
            timeout=timeout,
            metadata=lease_metadata,
            credentials=credentials,
            wait_for_ready=wait_for_ready,
            compression=compression,
        )
        if self._reads_status_when_done:
            call.add_done_callback(observer.on_done)
        return self._call_class(call, self._carrier, observer)


class _UnaryUnary(_MultiCallable, grpc.aio.UnaryUnaryMultiCallable):
    __slots__ = ()

    _call_class = _UnaryUnaryCall
    _reads_status_when_done = False

    def __call__(
        self,
        request: Any,
        *,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _UnaryStream(_MultiCallable, grpc.aio.UnaryStreamMultiCallable):
    __slots__ = ()

    _call_class = _UnaryStreamCall

    def __call__(
        self,
        request: Any,
        *,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._invoke(request, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamUnary(_MultiCallable, grpc.aio.StreamUnaryMultiCallable):
    __slots__ = ()

    _call_class = _StreamUnaryCall
    _request_stream = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._invoke(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class _StreamStream(_MultiCallable, grpc.aio.StreamStreamMultiCallable):
    __slots__ = ()

    _call_class = _StreamStreamCall
    _request_stream = True

    def __call__(
        self,
        request_iterator: Any = None,
        timeout: Optional[float] = None,
        metadata: Any = None,
        credentials: Optional[grpc.CallCredentials] = None,
        wait_for_ready: Optional[bool] = None,
        compression: Optional[grpc.Compression] = None,
    ) -> Any:
        return self._invoke(request_iterator, timeout, metadata, credentials, wait_for_ready, compression)


class AioLeaseChannel(grpc.aio.Channel):
    """A ``grpc.aio`` channel that carries an :class:`AioSession`'s lease on every call.

    Get one with ``session.channel(target)``. Calls behave as on
    ``grpc.aio.insecure_channel(target, interceptors=session.aio_interceptors())``
    (or ``secure_channel`` with ``credentials``): the same metadata rule,
    grants, activity, rejection handling and call API. While the lease is
    alive, a call skips ``grpc.aio``'s interceptor machinery, which saves
    about 20 µs of client CPU per call. ``interceptors`` run after the lease
    is added, on every call, and bring that machinery back. A session opened
    before the first call (``await session.open()``) sends that call the
    direct way too, so a channel with ``credentials`` then opens its second
    connection only if a lease ends or a caller sends its own lease.

    Threading: as a ``grpc.aio.Channel``; use it on one event loop.

    Args:
        session: The session whose lease the calls carry.
        target: The server address, as for ``grpc.aio.insecure_channel``.
        credentials: Channel credentials; None opens an insecure channel.
        options: gRPC channel options.
        compression: The channel's default compression.
        interceptors: Client interceptors to run after the session's.
    """

    def __init__(
        self,
        session: AioSession,
        target: str,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        options: Optional[Sequence[tuple[str, Any]]] = None,
        compression: Optional[grpc.Compression] = None,
        interceptors: Optional[Sequence[grpc.aio.ClientInterceptor]] = None,
    ) -> None:
        self._session = session
        self._target = target
        self._credentials = credentials
        self._options = options
        self._compression = compression
        self._interceptors = list(interceptors or ())
        self._carrier = _carrier(session)
        self._direct = self._open(self._interceptors)
        self._intercepted: grpc.aio.Channel | None = None
        self._closed = False

    def _open(self, interceptors: list[grpc.aio.ClientInterceptor]) -> grpc.aio.Channel:
        if self._credentials is None:
            return grpc.aio.insecure_channel(
                self._target, options=self._options, compression=self._compression, interceptors=interceptors or None
            )
        return grpc.aio.secure_channel(
            self._target,
            self._credentials,
            options=self._options,
            compression=self._compression,
            interceptors=interceptors or None,
        )

    def _intercepted_channel(self) -> grpc.aio.Channel:
        channel = self._intercepted
        if channel is None:
            if self._closed:
                # What a closed grpc.aio channel raises when a call is made.
                raise grpc.aio.UsageError("Channel is closed.")
            channel = self._open([*self._session.aio_interceptors(), *self._interceptors])
            self._intercepted = channel
        return channel

    def unary_unary(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.aio.UnaryUnaryMultiCallable:
        return _UnaryUnary(self, "unary_unary", (method, request_serializer, response_deserializer, _registered_method))

    def unary_stream(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.aio.UnaryStreamMultiCallable:
        return _UnaryStream(self, "unary_stream", (method, request_serializer, response_deserializer, _registered_method))

    def stream_unary(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.aio.StreamUnaryMultiCallable:
        return _StreamUnary(self, "stream_unary", (method, request_serializer, response_deserializer, _registered_method))

    def stream_stream(
        self,
        method: str,
        request_serializer: Optional[Callable[[Any], bytes]] = None,
        response_deserializer: Optional[Callable[[bytes], Any]] = None,
        _registered_method: Optional[bool] = False,
    ) -> grpc.aio.StreamStreamMultiCallable:
        return _StreamStream(
            self, "stream_stream", (method, request_serializer, response_deserializer, _registered_method)
        )

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._direct.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._direct.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._direct.channel_ready()

    async def close(self, grace: Optional[float] = None) -> None:
        """Close both channels. Calls still in flight end with ``CANCELLED`` after ``grace`` seconds."""
        self._closed = True
        if self._intercepted is None:
            await self._direct.close(grace)
            return
        await asyncio.gather(self._direct.close(grace), self._intercepted.close(grace))

    async def __aenter__(self) -> AioLeaseChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        await self.close(None)

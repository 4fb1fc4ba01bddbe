"""Client interceptors for ``grpc.aio`` channels: the asyncio mirror of :mod:`._client`.

``grpc.aio`` files an interceptor under the first call shape it implements,
so there is one class per shape; :func:`aio_lease_interceptors` builds all four.

Metadata rule, as for the blocking interceptor: ``session-lease`` is added
exactly once and every entry the caller passed is kept. A ``grpc.aio.Metadata``
is copied, never modified in place, because it is the caller's own object.
A caller that already set ``session-lease`` keeps it and the call passes through.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Generator, Iterator, Union

import grpc
import grpc.aio

from session_authority.clients._metadata import LEASE_METADATA_KEY
from session_authority.clients._session import end_reason_of_rejection
from session_authority.interceptors._client import _CallObserver, _LeaseObservers, has_lease_key, reusable_metadata

if TYPE_CHECKING:
    from session_authority.clients._aio_session import AioSession

logger = logging.getLogger(__name__)


def aio_metadata_with_lease(metadata: Any, lease_id: str) -> Any:
    """Return a copy of ``metadata`` with the lease appended.

    None and ``grpc.aio.Metadata`` become a new ``grpc.aio.Metadata``; a list
    stays a list and any other sequence becomes a tuple.
    """
    entry = (LEASE_METADATA_KEY, lease_id)
    if metadata is None:
        return grpc.aio.Metadata(entry)
    if isinstance(metadata, grpc.aio.Metadata):
        return grpc.aio.Metadata(*metadata, entry)
    if isinstance(metadata, list):
        return [*metadata, entry]
    return (*tuple(metadata), entry)


class _AioCallObserver(_CallObserver):
    """Adds the done-callback path for ``grpc.aio`` calls, whose status getters are coroutines."""

    _tasks: set[asyncio.Task[None]] = set()

    def on_done(self, call: Any) -> None:
        # Runs on the event loop when the call finishes; the status is read in
        # a task because code() and trailing_metadata() must be awaited.
        task = asyncio.ensure_future(self._read_status(call))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _read_status(self, call: Any) -> None:
        try:
            code = await call.code()
            trailing = await call.trailing_metadata()
        except (asyncio.CancelledError, Exception):
            logger.debug("could not read the status of a finished aio call", exc_info=True)
            return
        self._report(end_reason_of_rejection(code, trailing))


def _requests_marking_activity(
    requests: Any, mark: Callable[[], None]
) -> Union[AsyncIterator[Any], Iterator[Any]]:
    if hasattr(requests, "__aiter__"):

        async def async_requests() -> AsyncIterator[Any]:
            async for request in requests:
                mark()
                yield request

        return async_requests()

    def sync_requests() -> Iterator[Any]:
        for request in requests:
            mark()
            yield request

    return sync_requests()


async def _responses_marking_activity(
    call: Any, mark: Callable[[], None], observer: _CallObserver
) -> AsyncIterator[Any]:
    try:
        async for response in call:
            mark()
            yield response
    except grpc.aio.AioRpcError as exc:
        observer.observe_error(exc)
        raise


def await_reading_rejection(call: Any, observer: _CallObserver) -> Generator[Any, None, Any]:
    """Await ``call`` and report a rejection it raises to ``observer`` before re-raising it (for ``__await__``)."""
    try:
        return (yield from call.__await__())
    except grpc.aio.AioRpcError as exc:
        observer.observe_error(exc)
        raise


class _RejectionReadingCall:
    """A stream-unary call whose await reads a rejection before the caller sees the error.

    The done-callback task alone reads the status too late when grpc.aio
    replaces it: a request write that fails after the server's status turns
    it into ``INTERNAL`` (grpc/grpc issue 36066). Everything but the await is
    the call's own.
    """

    __slots__ = ("_call", "_observer")

    def __init__(self, call: Any, observer: _CallObserver) -> None:
        self._call = call
        self._observer = observer

    def __await__(self) -> Any:
        return await_reading_rejection(self._call, self._observer)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _AioLeaseInterceptor:
    def __init__(self, session: AioSession) -> None:
        self._session = session
        self._observers = _LeaseObservers(session, _AioCallObserver)

    async def _prepare(
        self, details: grpc.aio.ClientCallDetails
    ) -> tuple[grpc.aio.ClientCallDetails, _AioCallObserver | None]:
        metadata = reusable_metadata(details.metadata)
        if metadata is not details.metadata:
            details = grpc.aio.ClientCallDetails(
                details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
            )
        if has_lease_key(metadata):
            return details, None
        # Await the session only when it must grant first. An alive lease
        # is read without a lock and without creating a coroutine.
        snapshot = self._session._lease_for_call_nowait()
        if snapshot is None:
            snapshot = await self._session._lease_for_call()
        new_details = grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            aio_metadata_with_lease(metadata, snapshot.lease_id),
            details.credentials,
            details.wait_for_ready,
        )
        return new_details, self._observers.for_lease(snapshot.lease_id)


class AioUnaryUnaryLeaseInterceptor(_AioLeaseInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    """Carries an :class:`AioSession`'s lease on unary-unary calls.

    The interceptor waits for the call to finish before handing it on, so a
    rejection that ends the lease is recorded before the caller sees it.
    Cancelling the call, or the task awaiting it, cancels the RPC.
    """

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, observer = await self._prepare(client_call_details)
        call = await continuation(details, request)
        if observer is None:
            return call
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            observer.observe_error(exc)
        return call


class AioUnaryStreamLeaseInterceptor(_AioLeaseInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Carries an :class:`AioSession`'s lease on unary-stream calls; each response marks activity."""

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, observer = await self._prepare(client_call_details)
        call = await continuation(details, request)
        if observer is None:
            return call
        call.add_done_callback(observer.on_done)
        return _responses_marking_activity(call, self._session.mark_activity, observer)


class AioStreamUnaryLeaseInterceptor(_AioLeaseInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    """Carries an :class:`AioSession`'s lease on stream-unary calls; each request marks activity.

    The call cannot be awaited here (requests written with ``call.write()``
    flow only after the interceptor returns), so a rejection is read when
    the caller awaits the response, and in a task once the call finishes.
    """

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        details, observer = await self._prepare(client_call_details)
        if observer is None:
            return await continuation(details, request_iterator)
        requests = _requests_marking_activity(request_iterator, self._session.mark_activity)
        call = await continuation(details, requests)
        call.add_done_callback(observer.on_done)
        return _RejectionReadingCall(call, observer)


class AioStreamStreamLeaseInterceptor(_AioLeaseInterceptor, grpc.aio.StreamStreamClientInterceptor):
    """Carries an :class:`AioSession`'s lease on stream-stream calls; each message marks activity."""

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        details, observer = await self._prepare(client_call_details)
        if observer is None:
            return await continuation(details, request_iterator)
        requests = _requests_marking_activity(request_iterator, self._session.mark_activity)
        call = await continuation(details, requests)
        call.add_done_callback(observer.on_done)
        return _responses_marking_activity(call, self._session.mark_activity, observer)


def aio_lease_interceptors(session: AioSession) -> list[grpc.aio.ClientInterceptor]:
    """Return the four ``grpc.aio`` interceptors that carry ``session``'s lease, one per call shape."""
    return [
        AioUnaryUnaryLeaseInterceptor(session),
        AioUnaryStreamLeaseInterceptor(session),
        AioStreamUnaryLeaseInterceptor(session),
        AioStreamStreamLeaseInterceptor(session),
    ]

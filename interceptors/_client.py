"""Client interceptor for blocking ``grpc`` channels: carries a session's lease on every call.

Metadata rule: the interceptor adds ``session-lease`` exactly once and keeps
every entry the caller passed, in order. A caller that already set
``session-lease`` keeps it: the call then passes through untouched, without
grant, activity or end detection for this session.
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import grpc
import grpc.aio

from session_authority.clients._metadata import LEASE_METADATA_KEY, EndReason
from session_authority.clients._session import end_reason_of_rejection

if TYPE_CHECKING:
    from session_authority.clients._session import Session, _SessionBase

logger = logging.getLogger(__name__)


class _ClientCallDetails(
    collections.namedtuple(
        "_ClientCallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    # grpc.ClientCallDetails has no constructor and no _replace(), and the
    # details an earlier interceptor passes may lack the optional fields.
    pass


def reusable_metadata(metadata: Any) -> Any:
    """Return ``metadata`` in a form that can be read more than once.

    gRPC takes any iterable of pairs. A generator would be used up by the
    check for the caller's own lease, so it becomes a tuple. None, lists,
    tuples and ``grpc.aio.Metadata`` come back unchanged.
    """
    if metadata is None or isinstance(metadata, (tuple, list, grpc.aio.Metadata)):
        return metadata
    return tuple(metadata)


def has_lease_key(metadata: Optional[Sequence[tuple[str, Any]]]) -> bool:
    """Return True when the caller's metadata already carries ``session-lease``."""
    if not metadata:
        return False
    return any(key == LEASE_METADATA_KEY for key, _ in metadata)


def metadata_with_lease(metadata: Any, lease_id: str) -> Any:
    """Return a copy of ``metadata`` with the lease appended, of a type gRPC accepts.

    A list stays a list; anything else (None, a tuple, another sequence)
    becomes a tuple. The caller's object is never modified.
    """
    entry = (LEASE_METADATA_KEY, lease_id)
    if metadata is None:
        return (entry,)
    if isinstance(metadata, list):
        return [*metadata, entry]
    return (*tuple(metadata), entry)


def _details_with_metadata(details: grpc.ClientCallDetails, metadata: Any) -> _ClientCallDetails:
    return _ClientCallDetails(
        details.method,
        getattr(details, "timeout", None),
        metadata,
        getattr(details, "credentials", None),
        getattr(details, "wait_for_ready", None),
        getattr(details, "compression", None),
    )


class _CallObserver:
    """Reads the outcome of calls made under one lease and reports lease ends to the session.

    One observer serves every call made under its lease, from any thread.
    """

    def __init__(self, session: _SessionBase, lease_id: str) -> None:
        self._session = session
        self.lease_id = lease_id

    def observe_call(self, call: Any) -> None:
        """Report the lease end carried by a finished call, if any (a ``grpc.Future`` done callback)."""
        # Done callbacks must not raise: a failure here would hide the call's own result.
        try:
            # exception() is the cheapest test of success. For a blocking
            # unary call, grpcio 1.85 returns None from it without taking the
            # call's lock, while code() takes it.
            if call.exception() is None:
                return
            code = call.code()
            if code != grpc.StatusCode.UNAUTHENTICATED:
                return
            reason = end_reason_of_rejection(code, call.trailing_metadata())
        except grpc.FutureCancelledError:
            return
        except Exception:
            logger.debug("could not read the status of a finished call", exc_info=True)
            return
        self._report(reason)

    def observe_error(self, error: BaseException) -> None:
        code = getattr(error, "code", None)
        trailing = getattr(error, "trailing_metadata", None)
        if not callable(code) or not callable(trailing):
            return
        try:
            reason = end_reason_of_rejection(code(), trailing())
        except Exception:
            logger.debug("could not read the status of a failed call", exc_info=True)
            return
        self._report(reason)

    def observe_status(self, code: grpc.StatusCode, trailing_metadata: Any) -> None:
        """Report the lease end carried by a call's status and trailers, if any."""
        try:
            reason = end_reason_of_rejection(code, trailing_metadata)
        except Exception:
            logger.debug("could not read the status of a finished call", exc_info=True)
            return
        self._report(reason)

    def _report(self, reason: EndReason | None) -> None:
        if reason is not None:
            self._session._report_rejection(self.lease_id, reason)


class _LeaseObservers:
    """The observer of a session's current lease, built once per lease rather than per call.

    Threading: any thread. Threads racing after a new grant may each build
    one, the last assignment wins, and any of them reports to the right lease.
    """

    __slots__ = ("_session", "_observer_class", "_current")

    def __init__(self, session: _SessionBase, observer_class: type[_CallObserver]) -> None:
        self._session = session
        self._observer_class = observer_class
        self._current: Any = None

    def for_lease(self, lease_id: str) -> Any:
        """Return the observer of ``lease_id``, an instance of the observer class."""
        observer = self._current
        if observer is None or observer.lease_id != lease_id:
            observer = self._observer_class(self._session, lease_id)
            self._current = observer
        return observer


def _requests_marking_activity(requests: Iterator[Any], mark: Callable[[], None]) -> Iterator[Any]:
    for request in requests:
        mark()
        yield request


class _ResponseStream(grpc.Call, grpc.Future):
    """A streaming call whose iteration marks activity; the rest of the call API is delegated."""

    def __init__(self, call: Any, mark: Callable[[], None], observer: _CallObserver) -> None:
        self._call = call
        self._mark = mark
        self._observer = observer

    def __iter__(self) -> _ResponseStream:
        return self

    def __next__(self) -> Any:
        try:
            response = next(self._call)
        except grpc.RpcError as exc:
            self._observer.observe_error(exc)
            raise
        self._mark()
        return response

    def __getattr__(self, name: str) -> Any:
        # Methods outside grpc.Call and grpc.Future (such as debug_error_string).
        return getattr(self._call, name)

    # grpc.RpcContext
    def is_active(self) -> bool:
        return self._call.is_active()

    def time_remaining(self) -> Optional[float]:
        return self._call.time_remaining()

    def cancel(self) -> bool:
        return self._call.cancel()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        return self._call.add_callback(callback)

    # grpc.Call
    def initial_metadata(self) -> Any:
        return self._call.initial_metadata()

    def trailing_metadata(self) -> Any:
        return self._call.trailing_metadata()

    def code(self) -> grpc.StatusCode:
        return self._call.code()

    def details(self) -> str:
        return self._call.details()

    # grpc.Future
    def cancelled(self) -> bool:
        return self._call.cancelled()

    def running(self) -> bool:
        return self._call.running()

    def done(self) -> bool:
        return self._call.done()

    def result(self, timeout: Optional[float] = None) -> Any:
        return self._call.result(timeout)

    def exception(self, timeout: Optional[float] = None) -> Optional[Exception]:
        return self._call.exception(timeout)

    def traceback(self, timeout: Optional[float] = None) -> Any:
        return self._call.traceback(timeout)

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._call.add_done_callback(lambda _: fn(self))


class LeaseClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a :class:`Session`'s lease to every call of a ``grpc`` channel.

    Use ``grpc.intercept_channel(channel, session.interceptor())``. Each call
    grants the lease first if the session has none, marks activity, and is
    observed: an UNAUTHENTICATED reply carrying ``session-end-reason`` ends the
    session's lease. Stream messages sent and received mark activity too.
    What the caller gets back keeps the full ``grpc.Call`` and ``grpc.Future``
    API, and stream responses stay iterators.

    Raises (from the intercepted call):
        SessionEnded: The lease ended and the session's policy is ``raise``.
        AuthorityError: A grant was needed and failed.
        ValueError: A grant was needed, and the session's drift margin is at
            least the granted lease's time to live.

    Threading: one interceptor may serve calls from many threads at once.
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._observers = _LeaseObservers(session, _CallObserver)

    def _prepare(self, details: grpc.ClientCallDetails) -> tuple[grpc.ClientCallDetails, _CallObserver | None]:
        caller_metadata = getattr(details, "metadata", None)
        metadata = reusable_metadata(caller_metadata)
        if metadata is not caller_metadata:
            details = _details_with_metadata(details, metadata)
        if metadata is None:
            snapshot = self._session._lease_for_call()
            # The snapshot's tuple is immutable, so every call may share it.
            new_metadata = snapshot.metadata
        elif has_lease_key(metadata):
            return details, None
        else:
            snapshot = self._session._lease_for_call()
            new_metadata = metadata_with_lease(metadata, snapshot.lease_id)
        return _details_with_metadata(details, new_metadata), self._observers.for_lease(snapshot.lease_id)

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, observer = self._prepare(client_call_details)
        outcome = continuation(details, request)
        if observer is not None:
            outcome.add_done_callback(observer.observe_call)
        return outcome

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        details, observer = self._prepare(client_call_details)
        call = continuation(details, request)
        if observer is None:
            return call
        call.add_done_callback(observer.observe_call)
        return _ResponseStream(call, self._session.mark_activity, observer)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        details, observer = self._prepare(client_call_details)
        if observer is None:
            return continuation(details, request_iterator)
        requests = _requests_marking_activity(request_iterator, self._session.mark_activity)
        outcome = continuation(details, requests)
        outcome.add_done_callback(observer.observe_call)
        return outcome

    def intercept_stream_stream(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        details, observer = self._prepare(client_call_details)
        if observer is None:
            return continuation(details, request_iterator)
        requests = _requests_marking_activity(request_iterator, self._session.mark_activity)
        call = continuation(details, requests)
        call.add_done_callback(observer.observe_call)
        return _ResponseStream(call, self._session.mark_activity, observer)

"""Server interceptor for ``grpc.server`` that enforces session leases on every call shape.

Cutting off a call in a sync server: ``context.abort`` only works on the
handler's own thread, and a handler blocked on its request iterator waits on
the RPC's condition variable until a message or the end of the stream
arrives. So the enforcer's thread sends the final status itself, with the
same internal routine grpcio uses for ``abort`` (``grpc._server._abort``,
checked against grpcio 1.85). The client gets ``UNAUTHENTICATED`` and the
trailer at once. The core then completes the pending receive, so the blocked
iterator returns. The wrappers around the request and response iterators then raise an
``RpcError`` registered with the RPC, which grpcio treats as "status already
sent", so the worker thread goes back to the pool without sending a second
status. A handler busy in its own code (not reading or yielding) keeps its
worker thread until it next reads, yields or returns; ``context.is_active()``
turns False at the cut-off so such a handler can stop early.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any, Callable, Iterator

import grpc

from session_authority.interceptors import _telemetry
from session_authority.interceptors._enforcer import (
    EXEMPT,
    Enforcer,
    EnforcingInterceptor,
    _Entry,
    close_responses,
    set_current_lease,
)
from session_authority.interceptors._errors import LeaseRefused

logger = logging.getLogger(__name__)

try:
    from grpc import _server as _grpc_server
    from grpc._cython import cygrpc as _cygrpc

    _INTERNALS = all(hasattr(_grpc_server, name) for name in ("_abort", "_is_rpc_state_active"))
except ImportError:  # pragma: no cover - every supported grpcio has them
    _INTERNALS = False

_warned_no_internals = False


def _send_status_now(context: Any, refusal: LeaseRefused) -> bool:
    """Send the refusal as the final status of a call from any thread.

    Returns:
        True when this sent the status; False when the call had already ended
        or, on a grpcio without the internals, was only cancelled.
    """
    state = getattr(context, "_state", None)
    rpc_event = getattr(context, "_rpc_event", None)
    if not _INTERNALS or state is None or rpc_event is None:
        _cancel_without_internals(context)
        return False
    details = refusal.details.encode("utf-8")
    with state.condition:
        if not _grpc_server._is_rpc_state_active(state):
            return False
        kept = tuple(item for item in state.trailing_metadata or () if item[0] != refusal.trailing_metadata()[0][0])
        state.trailing_metadata = kept + refusal.trailing_metadata()
        state.code = refusal.code
        state.details = details
        _grpc_server._abort(state, rpc_event.call, _cygrpc.StatusCode.unauthenticated, details)
    return True


def _cancel_without_internals(context: Any) -> None:
    global _warned_no_internals
    if not _warned_no_internals:
        _warned_no_internals = True
        logger.warning(
            "this grpcio version lacks the internals used to end calls with UNAUTHENTICATED from another"
            " thread; calls cut off in flight end with CANCELLED instead"
        )
    context.cancel()


def _registered_rpc_error(context: Any) -> grpc.RpcError:
    # grpcio sends no status of its own for an exception it finds in
    # state.rpc_errors, which is what a cut-off call needs: its status is out.
    error = grpc.RpcError()
    state = getattr(context, "_state", None)
    if state is not None:
        with state.condition:
            state.rpc_errors.append(error)
            state.aborted = False
    return error


class _SyncCall:
    """One admitted call on a sync server, as stored in the enforcer's registry."""

    __slots__ = (
        "_context",
        "_method",
        "admission_context",
        "_lock",
        "_finished",
        "refusal",
        "_error",
        "handler_context",
    )

    def __init__(self, context: Any, method: str) -> None:
        self._context = context
        self._method = method
        # Copying a context costs far less than reading the active span, so
        # the span is looked up only if the call is cut off.
        self.admission_context = contextvars.copy_context()
        self._lock = threading.Lock()
        self._finished = False
        self.refusal: LeaseRefused | None = None
        self._error: grpc.RpcError | None = None
        # The context the handler runs in, set before it starts. A cut-off
        # reads the RPC span of an instrumentation placed after ours from it.
        self.handler_context: contextvars.Context | None = None

    def cut_off(self, refusal: LeaseRefused) -> None:
        with self._lock:
            if self._finished or self.refusal is not None:
                return
            self.refusal = refusal
        _telemetry.add_cut_off_event(self.admission_context, self.handler_context, refusal, self._method)
        if _send_status_now(self._context, refusal):
            _telemetry.report_status(self._context, refusal)

    def finish(self) -> bool:
        """Mark the handler done (returned or raised), so that no later cut-off sends a status.

        Returns:
            False when the call was cut off first.
        """
        with self._lock:
            if self.refusal is not None:
                return False
            self._finished = True
            return True

    def rpc_error(self) -> grpc.RpcError:
        """Return the exception that ends the handler's thread quietly after a cut-off."""
        with self._lock:
            if self._error is None:
                self._error = _registered_rpc_error(self._context)
            return self._error


class _Requests:
    """The request iterator a handler gets: counts messages as activity and raises after a cut-off."""

    def __init__(self, requests: Iterator[Any], call: _SyncCall, enforcer: Enforcer, entry: _Entry) -> None:
        self._requests = requests
        self._call = call
        self._enforcer = enforcer
        self._entry = entry

    def __iter__(self) -> _Requests:
        return self

    def __next__(self) -> Any:
        if self._call.refusal is not None:
            raise self._call.rpc_error()
        try:
            request = next(self._requests)
        except (StopIteration, grpc.RpcError):
            # A cut-off completes the pending receive, which looks like the
            # end of the stream: tell the handler the truth instead.
            if self._call.refusal is not None:
                raise self._call.rpc_error() from None
            raise
        self._enforcer.touch(self._entry)
        return request

    def next(self) -> Any:
        """Alias of ``__next__``, as grpcio's own request iterator has."""
        return self.__next__()


class LeaseServerInterceptor(EnforcingInterceptor, grpc.ServerInterceptor):
    """Enforces session leases on a ``grpc.server``: admission, activity and cut-off of calls in flight.

    Add it with ``grpc.server(executor, interceptors=[LeaseServerInterceptor(...)])``.
    Every call to a method that is not exempt must carry a live lease in the
    ``session-lease`` metadata key. Refusals and cut-offs use
    ``UNAUTHENTICATED`` when the call has no usable lease (missing, malformed,
    unknown, ended, authority unreachable) and ``PERMISSION_DENIED`` when the
    lease lives but may not be used for this call (principal mismatch, method
    policy); both carry details and the ``session-end-reason`` trailer.

    Threading: gRPC calls :meth:`intercept_service` on its polling thread;
    the wrapped handlers run on the server's worker threads. Admission blocks
    a worker thread for one ``Validate`` on a cache miss.

    Args:
        config: The enforcer's settings; or pass them as keyword arguments.
        **settings: Fields of :class:`EnforcerConfig`, when ``config`` is None.

    Raises:
        ValueError: A setting is invalid.
    """

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if self._enforcer.is_exempt(method):
            return handler
        return self._enforced_handler(method, handler, self._wrap_handler)

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._stream_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._stream_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._unary_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary_unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    # -- admission -----------------------------------------------------------------

    def _admit(self, context: grpc.ServicerContext, method: str) -> tuple[_SyncCall | None, Any]:
        # Returns (call, entry), or (None, EXEMPT); on refusal it aborts the
        # call through the public API, which raises.
        enforcer = self._enforcer
        try:
            lease_id = enforcer.read_lease_id(context.invocation_metadata())
            call = _SyncCall(context, method)
            entry = enforcer.admit(lease_id, method, enforcer.caller_principal(context), call)
        except LeaseRefused as refusal:
            logger.debug(
                "refused %s on lease %s: %s", method, refusal.fingerprint or "(none)", refusal.reason.value
            )
            _telemetry.add_refusal_event(_telemetry.current_span(), _telemetry.REFUSED_EVENT, refusal, method)
            enforcer.metrics.record_refusal(refusal)
            context.set_trailing_metadata(refusal.trailing_metadata())
            context.abort(refusal.code, refusal.details)
            raise AssertionError("context.abort returned") from None
        if entry is EXEMPT:
            return None, EXEMPT
        assert isinstance(entry, _Entry)
        if not context.add_callback(lambda: enforcer.release(entry, call)):
            enforcer.release(entry, call)
        if call.refusal is not None:
            enforcer.release(entry, call)
            raise call.rpc_error()
        return call, entry

    # -- one wrapper per call shape --------------------------------------------------

    def _unary_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def unary_unary(request: Any, context: grpc.ServicerContext) -> Any:
            call, entry = self._admit(context, method)
            if call is None:
                return behavior(request, context)
            return self._run_unary_response(call, entry, behavior, request, context)

        return unary_unary

    def _stream_unary(self, behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
        def stream_unary(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Any:
            call, entry = self._admit(context, method)
            if call is None:
                return behavior(request_iterator, context)
            requests = _Requests(request_iterator, call, self._enforcer, entry)
            return self._run_unary_response(call, entry, behavior, requests, context)

        return stream_unary

    def _unary_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Iterator[Any]]:
        def unary_stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call, entry = self._admit(context, method)
            if call is None:
                yield from behavior(request, context)
                return
            yield from self._run_stream_response(call, entry, behavior, request, context)

        return unary_stream

    def _stream_stream(self, behavior: Callable[..., Any], method: str) -> Callable[..., Iterator[Any]]:
        def stream_stream(request_iterator: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            call, entry = self._admit(context, method)
            if call is None:
                yield from behavior(request_iterator, context)
                return
            requests = _Requests(request_iterator, call, self._enforcer, entry)
            yield from self._run_stream_response(call, entry, behavior, requests, context)

        return stream_stream

    def _handler_context(self, call: _SyncCall, entry: _Entry) -> contextvars.Context:
        # The handler's code runs in a copy of the worker's context, where
        # current_lease() is set; the worker's own context never changes.
        handler_context = call.admission_context.copy()
        handler_context.run(set_current_lease, self._enforcer.lease_context(entry))
        call.handler_context = handler_context
        return handler_context

    def _run_unary_response(
        self, call: _SyncCall, entry: _Entry, behavior: Callable[..., Any], argument: Any, context: Any
    ) -> Any:
        handler_context = self._handler_context(call, entry)
        try:
            response = handler_context.run(behavior, argument, context)
        except Exception:
            # The handler's exception, or its own abort, decides the status
            # unless a cut-off came first. A later cut-off sends nothing.
            if not call.finish():
                raise call.rpc_error() from None
            raise
        finally:
            self._enforcer.release(entry, call)
        if not call.finish():
            raise call.rpc_error()
        return response

    def _run_stream_response(
        self, call: _SyncCall, entry: _Entry, behavior: Callable[..., Any], argument: Any, context: Any
    ) -> Iterator[Any]:
        enforcer = self._enforcer
        handler_context = self._handler_context(call, entry)
        responses: Iterator[Any] | None = None
        try:
            try:
                responses = iter(handler_context.run(behavior, argument, context))
            except Exception:
                if not call.finish():
                    raise call.rpc_error() from None
                raise
            while True:
                if call.refusal is not None:
                    raise call.rpc_error()
                # Every step of the handler's generator runs in its context,
                # because this generator's frame shares the worker's context.
                try:
                    response = handler_context.run(next, responses)
                except StopIteration:
                    break
                except Exception:
                    if not call.finish():
                        raise call.rpc_error() from None
                    raise
                if call.refusal is not None:
                    raise call.rpc_error()
                enforcer.touch(entry)
                yield response
            if not call.finish():
                raise call.rpc_error()
        finally:
            enforcer.release(entry, call)
            # A cut-off leaves the handler's generator suspended: close it
            # here, on its own thread and in its context, so its cleanup
            # runs now and not at garbage collection.
            handler_context.run(close_responses, responses)

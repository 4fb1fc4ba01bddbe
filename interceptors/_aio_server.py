"""Server interceptor for ``grpc.aio.server`` that enforces session leases on every call shape.

Cutting off a call on an aio server: the wrapper runs the handler in a child
task named ``session-lease-handler <method>``. When the lease ends, the
enforcer's thread schedules a cancel of that task on the server's event loop;
the wrapper, still running in gRPC's own task for the RPC, then aborts the
call with ``UNAUTHENTICATED``, the details and the ``session-end-reason``
trailer. The cancel reaches the handler wherever it waits: reading the next
request, writing, sleeping or awaiting anything else. Streamed responses of
async generators are written by the wrapper with ``context.write``, so every
message in either direction passes through it and counts as activity.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from session_authority.interceptors import _telemetry
from session_authority.interceptors._enforcer import (
    EXEMPT,
    Enforcer,
    EnforcerConfig,
    SessionEndCallback,
    _Entry,
    reset_current_lease,
    set_current_lease,
)
from session_authority.interceptors._errors import LeaseRefused

logger = logging.getLogger(__name__)

HANDLER_TASK_PREFIX = "session-lease-handler"
"""Name prefix of the child tasks that run handlers under an enforced lease."""


class _AioCall:
    """One admitted call on an aio server, as stored in the enforcer's registry."""

    __slots__ = ("_loop", "_method", "_span", "task", "finished", "refusal")

    def __init__(self, loop: asyncio.AbstractEventLoop, method: str, span: Any) -> None:
        self._loop = loop
        self._method = method
        self._span = span
        self.task: asyncio.Task[Any] | None = None
        self.finished = False
        self.refusal: LeaseRefused | None = None

    def cut_off(self, refusal: LeaseRefused) -> None:
        try:
            self._loop.call_soon_threadsafe(self._cut_off_on_loop, refusal)
        except RuntimeError:
            logger.debug("event loop closed before a cut-off of lease %s could run", refusal.fingerprint)

    def _cut_off_on_loop(self, refusal: LeaseRefused) -> None:
        if self.finished or self.refusal is not None:
            return
        if self.task is not None and self.task.done():
            return
        self.refusal = refusal
        _telemetry.add_refusal_event(self._span, _telemetry.CUT_OFF_EVENT, refusal, self._method)
        if self.task is not None:
            self.task.cancel()


class _Requests:
    """The request iterator a handler gets: every message counts as activity."""

    def __init__(self, requests: AsyncIterator[Any], enforcer: Enforcer, entry: _Entry) -> None:
        # __aiter__ is called on first use: a handler that reads with
        # context.read() must not leave an unstarted receiver behind.
        self._source = requests
        self._requests: AsyncIterator[Any] | None = None
        self._enforcer = enforcer
        self._entry = entry

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        if self._requests is None:
            self._requests = self._source.__aiter__()
        request = await self._requests.__anext__()
        self._enforcer.touch(self._entry)
        return request


class _Context:
    """The servicer context a handler gets: ``read`` and ``write`` count as activity.

    Everything else is the server's own context, reached by attribute lookup.
    """

    def __init__(self, context: grpc.aio.ServicerContext, enforcer: Enforcer, entry: _Entry) -> None:
        self._context = context
        self._enforcer = enforcer
        self._entry = entry

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._enforcer.touch(self._entry)
        return message

    async def write(self, message: Any) -> None:
        self._enforcer.touch(self._entry)
        await self._context.write(message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


grpc.aio.ServicerContext.register(_Context)


async def _drive_stream_response(
    behavior: Callable[..., Any], argument: Any, context: Any
) -> None:
    # Async generators are written out here; coroutines write for themselves.
    result = behavior(argument, context)
    if hasattr(result, "__aiter__"):
        async for response in result:
            await context.write(response)
        return
    if inspect.isawaitable(result):
        await result
        return
    # NOTE: sync handlers on an aio server are not wrapped for cut-off; they
    # run on the server's thread pool, which the interceptor cannot reach.
    raise TypeError(
        f"handler {behavior!r} returned {type(result).__name__}; on grpc.aio servers the lease"
        " interceptor supports coroutines and async generators"
    )


async def _drive_unary_response(behavior: Callable[..., Any], argument: Any, context: Any) -> Any:
    result = behavior(argument, context)
    if inspect.isawaitable(result):
        return await result
    raise TypeError(
        f"handler {behavior!r} returned {type(result).__name__}; on grpc.aio servers the lease"
        " interceptor supports coroutines and async generators"
    )


class AioLeaseServerInterceptor(grpc.aio.ServerInterceptor):
    """Enforces session leases on a ``grpc.aio.server``: admission, activity and cut-off of calls in flight.

    Add it with ``grpc.aio.server(interceptors=[AioLeaseServerInterceptor(...)])``.
    Status codes, details and trailers are those of
    :class:`~session_authority.interceptors.LeaseServerInterceptor`.

    Threading: construction blocks for up to ``policy_timeout_seconds`` while
    the policy is fetched. Handlers run on the server's event loop; a cache
    miss awaits ``Validate`` on a worker thread and never blocks the loop.
    :meth:`close` joins background threads; from a coroutine, use
    :meth:`aclose`.

    Args:
        config: The enforcer's settings; or pass them as keyword arguments.
        **settings: Fields of :class:`EnforcerConfig`, when ``config`` is None.

    Raises:
        ValueError: A setting is invalid.
    """

    def __init__(self, config: EnforcerConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = EnforcerConfig(**settings)
        elif settings:
            raise TypeError("pass either config= or keyword settings, not both")
        self._enforcer = Enforcer(config).start()

    @property
    def enforcer(self) -> Enforcer:
        """The enforcement core (cache, registry, link to the authority)."""
        return self._enforcer

    def on_session_end(self, callback: SessionEndCallback) -> SessionEndCallback:
        """Register a callback for leases that had calls here and ended; see :meth:`Enforcer.on_session_end`."""
        return self._enforcer.on_session_end(callback)

    def close(self) -> None:
        """Stop the enforcer's background threads (blocks); call after the server stopped."""
        self._enforcer.close()

    async def aclose(self) -> None:
        """Like :meth:`close`, without blocking the event loop."""
        await asyncio.get_running_loop().run_in_executor(None, self._enforcer.close)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if self._enforcer.is_exempt(method):
            return handler
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._wrap(handler.stream_stream, method, _drive_stream_response, streaming_requests=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap(handler.stream_unary, method, _drive_unary_response, streaming_requests=True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap(handler.unary_stream, method, _drive_stream_response, streaming_requests=False),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(handler.unary_unary, method, _drive_unary_response, streaming_requests=False),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap(
        self,
        behavior: Callable[..., Any],
        method: str,
        drive: Callable[[Callable[..., Any], Any, Any], Awaitable[Any]],
        *,
        streaming_requests: bool,
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        # gRPC awaits a coroutine function for every call shape, so the
        # wrapper is one for all four; streamed responses go out by write().
        async def enforced(argument: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._handle(behavior, method, drive, argument, context, streaming_requests)

        return enforced

    async def _handle(
        self,
        behavior: Callable[..., Any],
        method: str,
        drive: Callable[[Callable[..., Any], Any, Any], Awaitable[Any]],
        argument: Any,
        context: grpc.aio.ServicerContext,
        streaming_requests: bool,
    ) -> Any:
        enforcer = self._enforcer
        loop = asyncio.get_running_loop()
        span = _telemetry.current_span()
        call = _AioCall(loop, method, span)
        try:
            lease_id = enforcer.read_lease_id(context.invocation_metadata())
            entry = await enforcer.admit_async(lease_id, method, enforcer.caller_principal(context), call)
        except LeaseRefused as refusal:
            logger.debug(
                "refused %s on lease %s: %s", method, refusal.fingerprint or "(none)", refusal.reason.value
            )
            _telemetry.add_refusal_event(span, _telemetry.REFUSED_EVENT, refusal, method)
            await _abort(context, refusal)
            raise AssertionError("context.abort returned") from None
        if entry is EXEMPT:
            return await drive(behavior, argument, context)
        assert isinstance(entry, _Entry)

        try:
            if call.refusal is not None:
                await _abort(context, call.refusal)
            if streaming_requests:
                argument = _Requests(argument, enforcer, entry)
            token = set_current_lease(enforcer.lease_context(entry))
            try:
                task = loop.create_task(
                    drive(behavior, argument, _Context(context, enforcer, entry)),
                    name=f"{HANDLER_TASK_PREFIX} {method}",
                )
            finally:
                reset_current_lease(token)
            call.task = task
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:
                # gRPC cancelled the RPC (client cancel, deadline or
                # shutdown): stop the handler too, and leave the status to gRPC.
                task.cancel()
                await asyncio.wait({task})
                raise
            call.finished = True
            if call.refusal is not None:
                if not task.cancelled() and task.exception() is not None:
                    logger.debug("handler of a cut-off call raised %r", task.exception())
                await _abort(context, call.refusal)
            return task.result()
        finally:
            enforcer.release(entry, call)


async def _abort(context: grpc.aio.ServicerContext, refusal: LeaseRefused) -> None:
    """Abort the call with the refusal, keeping trailing metadata the handler set."""
    trailer_key = refusal.trailing_metadata()[0][0]
    existing = getattr(context, "trailing_metadata", None)
    kept: tuple[tuple[str, Any], ...] = ()
    if callable(existing):
        kept = tuple(item for item in existing() or () if item[0] != trailer_key)
    await context.abort(refusal.code, refusal.details, kept + refusal.trailing_metadata())

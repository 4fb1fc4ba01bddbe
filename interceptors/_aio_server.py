"""Server interceptor for ``grpc.aio.server`` that enforces session leases on every call shape.

Cutting off a call on an aio server: the wrapper runs the handler in gRPC's
own task for the RPC, with every step in a copy of the task's context
(``_RunInContext``), so a call costs no extra task. When the lease ends, the
enforcer's thread queues the cut-off for the server's event loop, which, in
one callback for every call of that lease, starts a task that aborts the call
with ``UNAUTHENTICATED``, the details and the ``session-end-reason`` trailer,
and cancels the handler's task. The cancellation reaches the handler wherever
it waits: reading the next request, writing, sleeping or awaiting anything
else. A handler that swallows it does not delay the status, and its later
reads and writes raise ``CancelledError``. Streamed responses of async
generators are written by the wrapper with ``context.write``, so every
message in either direction passes through it and counts as activity.

Sync handlers (plain functions and sync generators) are legal on aio servers
too. The wrapper runs them on a worker thread (the loop's default executor, or
the one given to the interceptor) with a sync servicer context. Every wait of
such a handler on the event loop (reading the next request, writing a
response, ``send_initial_metadata``) goes through one pending future per call,
which a cut-off cancels: a handler blocked reading its request iterator wakes
with a ``grpc.RpcError`` and its thread goes back to the pool. A handler busy
in its own code sees ``context.is_active()`` turn False.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import threading
import types
from typing import Any, AsyncIterator, Awaitable, Callable, Coroutine, Generator, Iterator

import grpc

from session_authority.interceptors import _telemetry
from session_authority.interceptors._enforcer import (
    EXEMPT,
    Enforcer,
    EnforcerConfig,
    EnforcingInterceptor,
    _Entry,
    close_responses,
    set_current_lease,
)
from session_authority.interceptors._errors import LeaseRefused

logger = logging.getLogger(__name__)


class _CutOffQueue:
    """Cut-offs waiting to run on one event loop.

    The enforcer ends every call of a lease in one pass from its own thread.
    Queuing them here wakes the loop once per pass instead of once per call.
    The loop then starts every status task in one callback and cancels the
    handlers in the next, so that the sends of all the statuses have started
    before the loop spends its time on the handlers' cancellations.
    """

    __slots__ = ("loop", "_lock", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[_AioCall, LeaseRefused]] = []

    def put(self, call: _AioCall, refusal: LeaseRefused) -> None:
        """Queue a cut-off. Safe from any thread."""
        with self._lock:
            wake = not self._pending
            self._pending.append((call, refusal))
        if not wake:
            return
        try:
            self.loop.call_soon_threadsafe(self._run)
        except RuntimeError:
            logger.debug("event loop closed before a cut-off of lease %s could run", refusal.fingerprint)

    def _run(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        started = [call for call, refusal in pending if call.cut_off_on_loop(refusal)]
        if started:
            # Queued after the first step of every status task just created.
            self.loop.call_soon(_cancel_handlers, started)


def _cancel_handlers(calls: list[_AioCall]) -> None:
    for call in calls:
        call.cancel_handler()


class _AioCall:
    """One admitted call on an aio server, as stored in the enforcer's registry.

    The handler runs in gRPC's own task for the RPC. A cut-off sends the
    status from a task of its own and cancels the handler's task, so the
    client gets the status even when the handler swallows the cancellation.
    """

    __slots__ = (
        "_queue",
        "_task",
        "_method",
        "_context",
        "aborting",
        "admission_context",
        "_lock",
        "_pending",
        "handler_context",
        "running",
        "finished",
        "stopped",
        "refusal",
        "headers",
    )

    def __init__(
        self, queue: _CutOffQueue, task: asyncio.Task[Any] | None, method: str, context: grpc.aio.ServicerContext
    ) -> None:
        self._queue = queue
        self._task = task
        self._method = method
        self._context = context
        # The task that sends the cut-off status, once cut off.
        self.aborting: asyncio.Task[None] | None = None
        # Copying a context costs far less than reading the active span, so
        # the span is looked up only if the call is cut off.
        self.admission_context = contextvars.copy_context()
        # Only a sync handler's thread waits on the loop, so only _run_sync creates the lock.
        self._lock: threading.Lock | None = None
        self._pending: concurrent.futures.Future[Any] | None = None
        self.handler_context: contextvars.Context | None = None
        self.running = False
        self.finished = False
        self.stopped = False
        self.refusal: LeaseRefused | None = None
        # The task that sends the call's initial metadata, once started.
        self.headers: asyncio.Task[None] | None = None

    def cut_off(self, refusal: LeaseRefused) -> None:
        self._queue.put(self, refusal)

    def cut_off_on_loop(self, refusal: LeaseRefused) -> bool:
        """Record the refusal and start sending the status (event loop thread).

        Returns:
            True when this cut the call off; then call :meth:`cancel_handler`
            once the status task has taken its first step.
        """
        if self.finished or self.refusal is not None:
            return False
        self.refusal = refusal
        _telemetry.add_cut_off_event(self.admission_context, self.handler_context, refusal, self._method)
        self.stop()
        aborting = asyncio.ensure_future(self._send_cut_off_status(refusal), loop=self._queue.loop)
        aborting.add_done_callback(_retrieve_error)
        self.aborting = aborting
        return True

    def cancel_handler(self) -> None:
        """Cancel the handler's task if the handler still runs (event loop thread).

        A handler that reached one of the wrapper's stop checks since the
        cut-off has returned already, and its task is left alone.
        """
        if self.running and self._task is not None:
            self._task.cancel()

    async def _send_cut_off_status(self, refusal: LeaseRefused) -> None:
        """Abort the call with the refusal, and raise the ``AbortError`` that gRPC expects from the handler.

        Returns without sending when the handler's own ``context.abort``
        already sent a status: the client gets that one, and gRPC raises the
        handler's ``AbortError`` once the wrapper returns.
        """
        await self.headers_settled()
        if self._context.done():
            return
        await _abort(self._context, refusal)

    async def cut_off_status_sent(self) -> None:
        """Wait for the cut-off status to go out, then raise its ``AbortError`` (handler's task).

        A cancellation of the handler's task (the client left) stops only
        this wait: the status task goes on by itself.
        """
        aborting = self.aborting
        assert aborting is not None, "the call was not cut off"
        try:
            await asyncio.shield(aborting)
        finally:
            if aborting.done():
                # The task keeps its AbortError, whose traceback leads back
                # to this call. Dropping the task removes that reference
                # cycle; gRPC's own call state keeps the error too, in a
                # cycle that only the garbage collector can free.
                self.aborting = None

    def raise_if_stopped(self) -> None:
        """Raise ``CancelledError`` once the call was cut off or cancelled.

        A handler that swallows the cancellation of a cut-off must not go on
        reading or writing the call.
        """
        if self.stopped:
            raise asyncio.CancelledError()

    async def send_headers(self, metadata: Any) -> None:
        """Send the call's initial metadata in a task of its own, which a cut-off cannot interrupt.

        grpc.aio records the metadata as sent only when the awaiting task
        resumes after the send completes. Were the handler's own task cancelled
        in between, the abort would send the metadata a second time, the core
        would refuse the whole batch, and the client would get no status.
        """
        if self.headers is not None:
            # A second send: grpc.aio raises its own error for it.
            await self._context.send_initial_metadata(metadata)
            return
        headers = asyncio.ensure_future(self._context.send_initial_metadata(metadata))
        headers.add_done_callback(_retrieve_error)
        self.headers = headers
        await asyncio.shield(headers)

    async def write(self, message: Any) -> None:
        """Write a response; the first write sends the initial metadata on its own first."""
        if self.headers is None:
            await self.send_headers(())
        await self._context.write(message)

    async def headers_settled(self) -> None:
        """Wait until a send of initial metadata that a cut-off overtook has completed (event loop)."""
        headers = self.headers
        if headers is not None and not headers.done():
            await asyncio.wait((headers,), timeout=HEADERS_WAIT_SECONDS)

    def enable_waits(self) -> None:
        """Prepare :meth:`wait_on_loop` for a sync handler; call before its thread starts."""
        if self._lock is None:
            self._lock = threading.Lock()

    def stop(self) -> None:
        """Wake a sync handler that waits on the loop and make its later waits raise. Safe from any thread."""
        self.stopped = True
        if self._lock is None:
            return
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def wait_on_loop(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine`` on the loop and block the sync handler's thread for its result.

        Raises:
            grpc.RpcError: The call was cut off or cancelled before or while waiting.
        """
        lock = self._lock
        assert lock is not None, "enable_waits() was not called"
        with lock:
            if self.stopped:
                coroutine.close()
                raise _ended_error(self.refusal)
            future = asyncio.run_coroutine_threadsafe(coroutine, self._queue.loop)
            self._pending = future
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise _ended_error(self.refusal) from None
        finally:
            with lock:
                if self._pending is future:
                    self._pending = None


HEADERS_WAIT_SECONDS = 5.0
"""Maximum wait, at a cut-off, for the call's initial metadata to finish sending before the status is sent."""


def _retrieve_error(task: asyncio.Task[None]) -> None:
    # The handler that started the send may be gone when it fails (the
    # client left), and the cut-off status task always ends with the
    # AbortError: read the error so that asyncio does not report it.
    if not task.cancelled():
        task.exception()


class _CallEnded(grpc.RpcError):
    """Raised in a sync handler's thread when its call was cut off or cancelled."""


def _ended_error(refusal: LeaseRefused | None) -> _CallEnded:
    if refusal is None:
        return _CallEnded("the call was cancelled")
    return _CallEnded(refusal.details)


class _Requests:
    """The request iterator a handler gets: every message counts as activity."""

    def __init__(self, requests: AsyncIterator[Any], enforcer: Enforcer, entry: _Entry, call: _AioCall) -> None:
        # __aiter__ is called on first use: a handler that reads with
        # context.read() must not leave an unstarted receiver behind.
        self._source = requests
        self._requests: AsyncIterator[Any] | None = None
        self._enforcer = enforcer
        self._entry = entry
        self._call = call

    def __aiter__(self) -> _Requests:
        return self

    async def __anext__(self) -> Any:
        # This runs for every request message, so the stop check of raise_if_stopped is inlined.
        if self._call.stopped:
            raise asyncio.CancelledError()
        requests = self._requests
        if requests is None:
            requests = self._requests = self._source.__aiter__()
        request = await requests.__anext__()
        self._enforcer.touch(self._entry)
        return request


class _Context:
    """The servicer context a handler gets: ``read`` and ``write`` count as activity.

    Everything else is the server's own context, reached by attribute lookup.
    """

    def __init__(self, context: grpc.aio.ServicerContext, enforcer: Enforcer, entry: _Entry, call: _AioCall) -> None:
        self._context = context
        self._enforcer = enforcer
        self._entry = entry
        self._call = call

    async def read(self) -> Any:
        self._call.raise_if_stopped()
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._enforcer.touch(self._entry)
        return message

    async def write(self, message: Any) -> None:
        # This runs for every response message, so the stop check is inlined.
        # After the first write it calls the server's context directly.
        call = self._call
        if call.stopped:
            raise asyncio.CancelledError()
        self._enforcer.touch(self._entry)
        if call.headers is None:
            await call.write(message)
        else:
            await self._context.write(message)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._call.raise_if_stopped()
        await self._call.send_headers(initial_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


grpc.aio.ServicerContext.register(_Context)


async def _drive_stream_response(
    behavior: Callable[..., Any], argument: Any, context: Any
) -> None:
    # Async generators are written out here; coroutines write for themselves.
    result = behavior(argument, context)
    if hasattr(result, "__aiter__"):
        try:
            async for response in result:
                await context.write(response)
        finally:
            # A cut-off or cancel that lands in a write leaves the generator
            # suspended at its yield: run its cleanup now, not at garbage
            # collection.
            await _close_async_responses(result)
        return
    await result


async def _close_async_responses(responses: Any) -> None:
    aclose = getattr(responses, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:  # noqa: BLE001 - the call's status does not depend on the cleanup
        logger.exception("closing the handler's async response generator failed")


async def _drive_unary_response(behavior: Callable[..., Any], argument: Any, context: Any) -> Any:
    return await behavior(argument, context)


def _start_coroutine(behavior: Callable[..., Any], argument: Any, context: Any) -> Any:
    # Takes the place of a drive function for handlers that
    # _only_creates_coroutine accepts, which saves a coroutine per call.
    return behavior(argument, context)


def _only_creates_coroutine(behavior: Callable[..., Any]) -> bool:
    """Return whether calling ``behavior`` only creates a coroutine, running none of its code.

    True for ``async def`` functions and methods bound to them. Other
    awaitable-returning callables may run code when called, which must
    happen inside the handler's context, so they keep a drive coroutine.
    """
    function = getattr(behavior, "__func__", behavior)
    return isinstance(function, types.FunctionType) and bool(function.__code__.co_flags & inspect.CO_COROUTINE)


def _run_sync_unary_response(behavior: Callable[..., Any], argument: Any, context: _SyncContext) -> Any:
    return behavior(argument, context)


def _run_sync_stream_response(
    behavior: Callable[..., Any],
    argument: Any,
    context: _SyncContext,
    call: _AioCall,
    touch: Callable[[], None],
) -> None:
    # Runs on a worker thread: each response is written on the event loop.
    responses: Iterator[Any] = iter(behavior(argument, context))
    try:
        for response in responses:
            touch()
            call.wait_on_loop(call.write(response))
    finally:
        # After a cut-off the generator is suspended: run its cleanup now.
        close_responses(responses)


_EOF = object()


async def _next_or_eof(requests: AsyncIterator[Any]) -> Any:
    try:
        return await requests.__anext__()
    except StopAsyncIteration:
        return _EOF


class _SyncRequests:
    """The request iterator a sync handler gets on an aio server.

    Each message is read on the event loop while the handler's thread waits;
    a cut-off wakes the wait with ``grpc.RpcError``.
    """

    def __init__(self, requests: AsyncIterator[Any], call: _AioCall, touch: Callable[[], None]) -> None:
        self._source = requests
        self._requests: AsyncIterator[Any] | None = None
        self._call = call
        self._touch = touch
        self._finished = False

    def __iter__(self) -> _SyncRequests:
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        if self._requests is None:
            self._requests = self._source.__aiter__()
        request = self._call.wait_on_loop(_next_or_eof(self._requests))
        if request is _EOF:
            self._finished = True
            raise StopIteration
        self._touch()
        return request

    def next(self) -> Any:
        """Alias of ``__next__``, as grpcio's own request iterator has."""
        return self.__next__()


class _SyncContext:
    """The servicer context a sync handler gets on an aio server.

    Methods that wait on the event loop block the handler's thread; the rest
    are the aio context's own. ``is_active`` turns False at a cut-off.
    """

    def __init__(self, context: grpc.aio.ServicerContext, call: _AioCall) -> None:
        self._context = context
        self._call = call

    def is_active(self) -> bool:
        return not self._call.stopped and not self._context.done()

    def add_callback(self, callback: Callable[[], None]) -> bool:
        self._context.add_done_callback(lambda _context: callback())
        return True

    def send_initial_metadata(self, initial_metadata: Any) -> None:
        self._call.wait_on_loop(self._call.send_headers(initial_metadata))

    def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()) -> None:
        # The aio abort sends the status and raises AbortError. The same
        # exception object reaches gRPC, so it sends no second status.
        self._call.wait_on_loop(self._context.abort(code, details, trailing_metadata))
        raise AssertionError("context.abort returned")

    def abort_with_status(self, status: grpc.Status) -> None:
        self.abort(status.code, status.details, status.trailing_metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


grpc.ServicerContext.register(_SyncContext)


def _is_async_behavior(behavior: Callable[..., Any]) -> bool:
    # Coroutine and async generator functions run on the loop; any other
    # callable is a sync handler and runs on a worker thread.
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


class AioLeaseServerInterceptor(EnforcingInterceptor, grpc.aio.ServerInterceptor):
    """Enforces session leases on a ``grpc.aio.server``: admission, activity and cut-off of calls in flight.

    Add it with ``grpc.aio.server(interceptors=[AioLeaseServerInterceptor(...)])``.
    Status codes, details and trailers are those of
    :class:`~session_authority.interceptors.LeaseServerInterceptor`.

    Threading: construction blocks for up to ``policy_timeout_seconds`` while
    the policy is fetched. Coroutine and async generator handlers run on the
    server's event loop; plain functions and sync generators run on
    ``sync_handler_executor``, each holding one of its threads until the
    handler returns, also while it waits for a request. A cache miss awaits
    ``Validate`` on a worker thread and never blocks the loop.
    :meth:`close` joins background threads; from a coroutine, use
    :meth:`aclose`.

    Without the interceptor, grpc.aio runs sync handlers on the server's
    ``migration_thread_pool``, which the interceptor cannot read from the
    server, so pass that pool here as well. Otherwise sync handlers share the
    loop's default executor, which CPython sizes from the CPU count
    (``min(32, CPU count + 4)`` threads since Python 3.8). Once blocked
    handlers hold all of its threads, a new call waits in the executor's
    queue and reads no request. The server then records no activity for that
    call, so its lease can end with ``idle_timeout`` before the handler starts.

    Args:
        config: The enforcer's settings; or pass them as keyword arguments.
        sync_handler_executor: Where sync handlers run, normally the
            ``migration_thread_pool`` given to ``grpc.aio.server``. None means
            the loop's default executor.
        **settings: Fields of :class:`EnforcerConfig`, when ``config`` is None.

    Raises:
        ValueError: A setting is invalid.
    """

    def __init__(
        self,
        config: EnforcerConfig | None = None,
        *,
        sync_handler_executor: concurrent.futures.Executor | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(config, **settings)
        self._sync_handler_executor = sync_handler_executor
        self._queue: _CutOffQueue | None = None

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
        return self._enforced_handler(method, handler, self._wrap_handler)

    def _wrap_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
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
    ) -> Callable[[Any, grpc.aio.ServicerContext], Any]:
        # Streamed responses go out by write() in every shape. Wrappers of
        # response-streaming methods are still async generators (that yield
        # nothing), because interceptors around ours, such as
        # opentelemetry-instrumentation-grpc, iterate those handlers with
        # "async for" and fail on a coroutine.
        is_async = _is_async_behavior(behavior)
        streaming_responses = drive is _drive_stream_response
        if is_async and _only_creates_coroutine(behavior):
            drive = _start_coroutine
        if streaming_responses:

            async def enforced_stream(argument: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                await self._handle(behavior, is_async, method, drive, argument, context, streaming_requests)
                return
                yield  # unreachable: marks this function as an async generator

            return enforced_stream

        async def enforced(argument: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self._handle(behavior, is_async, method, drive, argument, context, streaming_requests)

        return enforced

    def _cut_off_queue(self, task: asyncio.Task[Any] | None) -> _CutOffQueue:
        loop = task.get_loop() if task is not None else asyncio.get_running_loop()
        queue = self._queue
        if queue is None or queue.loop is not loop:
            # A grpc.aio server runs on one loop, so this changes only when
            # the interceptor serves a server on another loop.
            queue = self._queue = _CutOffQueue(loop)
        return queue

    async def _handle(
        self,
        behavior: Callable[..., Any],
        is_async: bool,
        method: str,
        drive: Callable[[Callable[..., Any], Any, Any], Awaitable[Any]],
        argument: Any,
        context: grpc.aio.ServicerContext,
        streaming_requests: bool,
    ) -> Any:
        enforcer = self._enforcer
        task = asyncio.current_task()
        call = _AioCall(self._cut_off_queue(task), task, method, context)
        try:
            lease_id = enforcer.read_lease_id(context.invocation_metadata())
            caller = enforcer.caller_principal(context)
            entry = enforcer.admit_cached(lease_id, method, caller, call)
            if entry is None:
                entry = await enforcer.admit_async(lease_id, method, caller, call)
        except LeaseRefused as refusal:
            logger.debug(
                "refused %s on lease %s: %s", method, refusal.fingerprint or "(none)", refusal.reason.value
            )
            _telemetry.add_refusal_event(_telemetry.current_span(), _telemetry.REFUSED_EVENT, refusal, method)
            enforcer.metrics.record_refusal(refusal)
            await _abort(context, refusal)
            raise AssertionError("context.abort returned") from None
        if entry is EXEMPT:
            if not is_async:
                return await self._run_sync(behavior, drive, argument, context, call, None, streaming_requests)
            return await drive(behavior, argument, context)
        assert isinstance(entry, _Entry)

        try:
            if is_async:
                if streaming_requests:
                    argument = _Requests(argument, enforcer, entry, call)
                handler_run = drive(behavior, argument, _Context(context, enforcer, entry, call))
            else:
                handler_run = self._run_sync(behavior, drive, argument, context, call, entry, streaming_requests)
            handler_context = call.admission_context.copy()
            handler_context.run(set_current_lease, enforcer.lease_context(entry))
            call.handler_context = handler_context
            # Nothing was awaited since admission registered the call, so no
            # cut-off has run yet. From here on a cut-off cancels this task.
            call.running = True
            result = None
            try:
                result = await _RunInContext(handler_run, handler_context)
            except asyncio.CancelledError:
                call.stop()
                if call.refusal is None or _uncancel(task) > 0:
                    # gRPC cancelled the RPC (client cancel, deadline or
                    # shutdown): leave the status to gRPC.
                    raise
            except Exception as exc:
                if call.refusal is None:
                    raise
                logger.debug("handler of a cut-off call raised %r", exc)
                _uncancel(task)
            else:
                if call.refusal is not None:
                    # The handler swallowed the cancellation and returned.
                    _uncancel(task)
            finally:
                call.running = False
                call.finished = True
            call.stop()
            if call.refusal is not None:
                await call.cut_off_status_sent()
            return result
        finally:
            enforcer.release(entry, call)

    async def _run_sync(
        self,
        behavior: Callable[..., Any],
        drive: Callable[[Callable[..., Any], Any, Any], Awaitable[Any]],
        argument: Any,
        context: grpc.aio.ServicerContext,
        call: _AioCall,
        entry: _Entry | None,
        streaming_requests: bool,
    ) -> Any:
        # A sync handler runs on a worker thread. Cancelling this task (a
        # cut-off) stops the wait here at once; the thread comes back when the
        # handler's next wait on the loop raises or it checks is_active().
        enforcer = self._enforcer
        loop = asyncio.get_running_loop()
        call.enable_waits()
        touch: Callable[[], None] = (lambda: enforcer.touch(entry)) if entry is not None else (lambda: None)
        if streaming_requests:
            argument = _SyncRequests(argument, call, touch)
        sync_context = _SyncContext(context, call)
        handler_context = contextvars.copy_context()
        if drive is _drive_stream_response:
            run: Callable[[], Any] = lambda: _run_sync_stream_response(
                behavior, argument, sync_context, call, touch
            )
        else:
            run = lambda: _run_sync_unary_response(behavior, argument, sync_context)
        return await loop.run_in_executor(self._sync_handler_executor, handler_context.run, run)


def _uncancel(task: asyncio.Task[Any] | None) -> int:
    """Withdraw the cancel request of a cut-off and return how many cancel requests are left (0 before Python 3.11)."""
    uncancel = getattr(task, "uncancel", None)
    if uncancel is None:
        return 0
    return int(uncancel())


class _RunInContext:
    """An awaitable that runs a coroutine with each of its steps in the given ``contextvars.Context``.

    It drives the coroutine the way an ``asyncio.Task`` does, but inside the
    awaiting task, so the handler needs no task of its own. Everything the
    task sends or throws in (a cancellation among them) reaches the coroutine.
    While it waits, any thread can read the handler's context variables from
    ``context``.
    """

    __slots__ = ("_coroutine", "_context")

    def __init__(self, coroutine: Coroutine[Any, Any, Any], context: contextvars.Context) -> None:
        self._coroutine = coroutine
        self._context = context

    def __await__(self) -> Generator[Any, Any, Any]:
        coroutine = self._coroutine
        run = self._context.run
        send = coroutine.send
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                if error is None:
                    step = run(send, value)
                else:
                    step = run(coroutine.throw, error)
            except StopIteration as stop:
                return stop.value
            finally:
                # An exception leaving this frame has it in its traceback:
                # holding the exception here too would make a reference cycle.
                error = None
            value = None
            try:
                value = yield step
            except GeneratorExit:
                run(coroutine.close)
                raise
            except BaseException as exc:  # noqa: BLE001 - handed on to the coroutine, which decides
                error = exc


async def _abort(context: grpc.aio.ServicerContext, refusal: LeaseRefused) -> None:
    """Abort the call with the refusal, keeping trailing metadata the handler set."""
    trailer_key = refusal.trailing_metadata()[0][0]
    existing = getattr(context, "trailing_metadata", None)
    kept: tuple[tuple[str, Any], ...] = ()
    if callable(existing):
        kept = tuple(item for item in existing() or () if item[0] != trailer_key)
    await context.abort(refusal.code, refusal.details, kept + refusal.trailing_metadata())

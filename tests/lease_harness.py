"""Test harness: real servers behind the lease interceptors, a recording test service, a blocking client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

import grpc
import pytest

from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY
from session_authority.interceptors._aio_server import AioLeaseServerInterceptor
from session_authority.interceptors._enforcer import EnforcerConfig
from session_authority.interceptors._server import LeaseServerInterceptor

SERVICE = "test.Lease"
SHAPES = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
GUARD_SECONDS = 15.0
"""A held handler gives up after this long, so a broken cut-off fails a test instead of hanging it."""

QUICK = b"quick"
HOLD = b"hold"


def enforcer_config(target: str, **overrides: Any) -> EnforcerConfig:
    """Enforcer settings for tests: short staleness bound and batch interval."""
    settings: dict[str, Any] = {
        "authority_target": target,
        "staleness_bound_seconds": 1.0,
        "activity_batch_interval_seconds": 0.05,
        "drift_margin_seconds": 0.05,
        "reconnect_backoff_initial_seconds": 0.05,
        "reconnect_backoff_max_seconds": 0.5,
    }
    settings.update(overrides)
    return EnforcerConfig(**settings)


class Recorder:
    """What the test service's handlers saw."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered: list[str] = []
        self.holding = threading.Event()
        self.exited = threading.Event()
        self.leases: list[Any] = []

    def enter(self, form: str) -> None:
        from session_authority.interceptors._enforcer import current_lease

        with self.lock:
            self.entered.append(form)
            self.leases.append(current_lease())


# -- handler forms: sync ------------------------------------------------------------


def _sync_forms(recorder: Recorder) -> dict[str, tuple[str, Callable[..., Any]]]:
    def wait_quietly(context: grpc.ServicerContext) -> None:
        recorder.holding.set()
        deadline = time.monotonic() + GUARD_SECONDS
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)

    def unary_function(request: bytes, context: grpc.ServicerContext) -> bytes:
        recorder.enter("unary_function")
        try:
            if request == HOLD:
                wait_quietly(context)
            return b"done"
        finally:
            recorder.exited.set()

    def server_stream_generator(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        recorder.enter("server_stream_generator")
        try:
            yield b"first"
            if request == HOLD:
                wait_quietly(context)
                yield b"late"
        finally:
            recorder.exited.set()

    def client_stream_function(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        recorder.enter("client_stream_function")
        try:
            count = 0
            for request in requests:
                count += 1
                if request == HOLD:
                    recorder.holding.set()
            return str(count).encode()
        finally:
            recorder.exited.set()

    def bidi_generator(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        recorder.enter("bidi_generator")
        try:
            for request in requests:
                if request == HOLD:
                    recorder.holding.set()
                yield request
        finally:
            recorder.exited.set()

    return {
        "unary_function": ("unary_unary", unary_function),
        "server_stream_generator": ("unary_stream", server_stream_generator),
        "client_stream_function": ("stream_unary", client_stream_function),
        "bidi_generator": ("stream_stream", bidi_generator),
    }


SYNC_FORMS = ("unary_function", "server_stream_generator", "client_stream_function", "bidi_generator")


# -- handler forms: aio ---------------------------------------------------------------


def _aio_forms(recorder: Recorder) -> dict[str, tuple[str, Callable[..., Any]]]:
    async def hold() -> None:
        recorder.holding.set()
        await asyncio.sleep(GUARD_SECONDS)

    async def unary_coroutine(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        recorder.enter("unary_coroutine")
        try:
            if request == HOLD:
                await hold()
            return b"done"
        finally:
            recorder.exited.set()

    async def server_stream_async_generator(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        recorder.enter("server_stream_async_generator")
        try:
            yield b"first"
            if request == HOLD:
                await hold()
                yield b"late"
        finally:
            recorder.exited.set()

    async def server_stream_write(request: bytes, context: grpc.aio.ServicerContext) -> None:
        recorder.enter("server_stream_write")
        try:
            await context.write(b"first")
            if request == HOLD:
                await hold()
                await context.write(b"late")
        finally:
            recorder.exited.set()

    async def client_stream_iterator(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        recorder.enter("client_stream_iterator")
        try:
            count = 0
            async for request in requests:
                count += 1
                if request == HOLD:
                    recorder.holding.set()
            return str(count).encode()
        finally:
            recorder.exited.set()

    async def client_stream_read(requests: Any, context: grpc.aio.ServicerContext) -> bytes:
        recorder.enter("client_stream_read")
        try:
            count = 0
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return str(count).encode()
                count += 1
                if request == HOLD:
                    recorder.holding.set()
        finally:
            recorder.exited.set()

    async def bidi_async_generator(requests: Any, context: grpc.aio.ServicerContext) -> Any:
        recorder.enter("bidi_async_generator")
        try:
            async for request in requests:
                if request == HOLD:
                    recorder.holding.set()
                yield request
        finally:
            recorder.exited.set()

    async def bidi_read_write(requests: Any, context: grpc.aio.ServicerContext) -> None:
        recorder.enter("bidi_read_write")
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                if request == HOLD:
                    recorder.holding.set()
                await context.write(request)
        finally:
            recorder.exited.set()

    return {
        "unary_coroutine": ("unary_unary", unary_coroutine),
        "server_stream_async_generator": ("unary_stream", server_stream_async_generator),
        "server_stream_write": ("unary_stream", server_stream_write),
        "client_stream_iterator": ("stream_unary", client_stream_iterator),
        "client_stream_read": ("stream_unary", client_stream_read),
        "bidi_async_generator": ("stream_stream", bidi_async_generator),
        "bidi_read_write": ("stream_stream", bidi_read_write),
    }


AIO_FORMS = (
    "unary_coroutine",
    "server_stream_async_generator",
    "server_stream_write",
    "client_stream_iterator",
    "client_stream_read",
    "bidi_async_generator",
    "bidi_read_write",
)

_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _generic_handler(forms: dict[str, tuple[str, Callable[..., Any]]], extra: dict[str, Any]) -> grpc.GenericRpcHandler:
    handlers = {name: _HANDLER_FACTORIES[shape](behavior) for name, (shape, behavior) in forms.items()}
    handlers.update(extra)
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


GUARDED_SERVICE = "test.Guarded"
"""A service under method rules of the test policy: a 2 s session age limit, and ShortOnly for tier short."""


def _guarded_handler(recorder: Recorder, *, aio: bool) -> grpc.GenericRpcHandler:
    def behavior(name: str) -> Callable[..., Any]:
        if aio:

            async def guarded_coroutine(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                recorder.enter(f"{GUARDED_SERVICE}/{name}")
                return b"guarded"

            return guarded_coroutine

        def guarded_function(request: bytes, context: grpc.ServicerContext) -> bytes:
            recorder.enter(f"{GUARDED_SERVICE}/{name}")
            return b"guarded"

        return guarded_function

    return grpc.method_handlers_generic_handler(
        GUARDED_SERVICE,
        {name: grpc.unary_unary_rpc_method_handler(behavior(name)) for name in ("ShortOnly", "Aged")},
    )


def form_shape(form: str) -> str:
    """Return the call shape a handler form serves."""
    return dict(_sync_forms(Recorder()), **_aio_forms(Recorder()))[form][0]


# -- servers -----------------------------------------------------------------------------


class SyncServer:
    """A ``grpc.server`` on loopback behind a :class:`LeaseServerInterceptor`."""

    def __init__(
        self,
        config: EnforcerConfig,
        *,
        max_workers: int = 8,
        extra: dict[str, Any] | None = None,
        outer: list[grpc.ServerInterceptor] | None = None,
    ) -> None:
        self.recorder = Recorder()
        self.interceptor = LeaseServerInterceptor(config)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=max_workers)
        self.server = grpc.server(self.executor, interceptors=[*(outer or []), self.interceptor])
        self.server.add_generic_rpc_handlers(
            [_generic_handler(_sync_forms(self.recorder), extra or {}), _guarded_handler(self.recorder, aio=False)]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)
        self.executor.shutdown(wait=True)
        self.interceptor.close()

    def rpc_tasks(self) -> list[str]:
        return []


class AioServer:
    """A ``grpc.aio.server`` on loopback behind an :class:`AioLeaseServerInterceptor`, on its own loop thread."""

    def __init__(
        self,
        config: EnforcerConfig,
        *,
        extra: dict[str, Any] | None = None,
        outer: list[grpc.aio.ServerInterceptor] | None = None,
        sync_handler_pool: concurrent.futures.Executor | None = None,
    ) -> None:
        self.recorder = Recorder()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-aio-server", daemon=True)
        self.thread.start()
        self._run(self._start(config, extra or {}, outer or [], sync_handler_pool))

    async def _start(
        self,
        config: EnforcerConfig,
        extra: dict[str, Any],
        outer: list[Any],
        sync_handler_pool: concurrent.futures.Executor | None,
    ) -> None:
        # grpc.aio binds a server to the loop it is created on. A given pool
        # goes to both the server and the interceptor, so sync handlers run
        # on the same threads as they would without the interceptor.
        self.interceptor = AioLeaseServerInterceptor(config, sync_handler_executor=sync_handler_pool)
        self.server = grpc.aio.server(
            migration_thread_pool=sync_handler_pool, interceptors=[*outer, self.interceptor]
        )
        # Sync handlers are legal on aio servers too, so the aio server serves both sets of forms.
        forms = dict(_aio_forms(self.recorder), **_sync_forms(self.recorder))
        self.server.add_generic_rpc_handlers(
            [_generic_handler(forms, extra), _guarded_handler(self.recorder, aio=True)]
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def rpc_tasks(self) -> list[str]:
        """Return the names of tasks still serving a call of the test service.

        grpc.aio (checked with 1.85) runs each handler in a task named after
        its method, such as ``HandleExceptions[/test.Lease/unary_coroutine]``.
        """

        async def names() -> list[str]:
            return [task.get_name() for task in asyncio.all_tasks() if f"/{SERVICE}/" in task.get_name()]

        return self._run(names())

    def stop(self) -> None:
        self._run(self.server.stop(None))
        self._run(self.interceptor.aclose())
        self._run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


class LoopGate:
    """Blocks an event loop from inside one of its callbacks until the test releases it.

    Tests use it to hold a race window open: a handler calls
    :meth:`block_soon` just before the step under test, and whatever the test
    then queues for the loop (a cut-off, a completion) runs only after
    ``release`` is set.
    """

    def __init__(self) -> None:
        # Set once the server's loop exists.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.blocked = threading.Event()
        self.release = threading.Event()

    def _block(self) -> None:
        self.blocked.set()
        self.release.wait(GUARD_SECONDS)

    def block_soon(self) -> None:
        """Block the loop at its next iteration; safe from the loop or a handler thread."""
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self._block)


class GatedAioSetup:
    """An authority client, an aio server with extra handlers, a channel to it and one lease.

    ``gate`` blocks the server's loop for a race test, as :class:`LoopGate`
    does; it gets the loop once the server runs.
    """

    def __init__(self, authority_target: str, gate: Any, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.admin = AuthorityClient(authority_target, principal="svc")
        self.gate = gate
        self.server = AioServer(enforcer_config(authority_target), extra=handlers)
        gate.loop = self.server.loop
        self.channel = grpc.insecure_channel(self.server.target)
        self.lease_id = self.admin.grant("standard", principal="svc").lease_id

    def cut_off_queued(self) -> bool:
        """Tell whether a cut-off waits in the interceptor's queue for the blocked loop."""
        queue = self.server.interceptor._queue
        return bool(queue and queue._pending)

    def close(self) -> None:
        self.gate.release.set()
        self.channel.close()
        self.server.stop()
        self.admin.close()


# -- client ------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    """How a test call ended."""

    code: grpc.StatusCode
    details: str
    trailers: dict[str, str]
    responses: list[bytes]

    @property
    def end_reason(self) -> str | None:
        return self.trailers.get(END_REASON_TRAILER_KEY)


class TestCall:
    """One call on a background thread; a streaming-request call keeps its stream open until :meth:`close`."""

    __test__ = False

    def __init__(
        self,
        channel: grpc.Channel,
        form: str,
        shape: str,
        payload: bytes,
        metadata: tuple[tuple[str, str], ...],
        timeout_seconds: float = 30.0,
    ) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._requests.put(payload)
        if payload != HOLD:
            self._requests.put(None)
        self._outcome: Outcome | None = None
        self._done = threading.Event()
        method = f"/{SERVICE}/{form}"
        self._thread = threading.Thread(
            target=self._run, args=(channel, method, shape, payload, metadata, timeout_seconds), daemon=True
        )
        self._thread.start()

    def _request_stream(self) -> Iterator[bytes]:
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def _run(
        self,
        channel: grpc.Channel,
        method: str,
        shape: str,
        payload: bytes,
        metadata: tuple[tuple[str, str], ...],
        timeout_seconds: float,
    ) -> None:
        responses: list[bytes] = []
        try:
            if shape == "unary_unary":
                response, call = channel.unary_unary(method).with_call(
                    payload, metadata=metadata, timeout=timeout_seconds
                )
                responses.append(response)
            elif shape == "stream_unary":
                response, call = channel.stream_unary(method).with_call(
                    self._request_stream(), metadata=metadata, timeout=timeout_seconds
                )
                responses.append(response)
            else:
                if shape == "unary_stream":
                    call = channel.unary_stream(method)(payload, metadata=metadata, timeout=timeout_seconds)
                else:
                    call = channel.stream_stream(method)(
                        self._request_stream(), metadata=metadata, timeout=timeout_seconds
                    )
                for response in call:
                    responses.append(response)
            self._outcome = Outcome(call.code(), call.details() or "", _trailers(call), responses)
        except grpc.RpcError as exc:
            self._outcome = Outcome(exc.code(), exc.details() or "", _trailers(exc), responses)
        finally:
            self._done.set()

    def send(self, payload: bytes) -> None:
        self._requests.put(payload)

    def close(self) -> None:
        """End the request stream so the client's sending thread can exit."""
        self._requests.put(None)

    def done(self, timeout_seconds: float = 0.0) -> bool:
        """Return whether the call has ended, waiting up to ``timeout_seconds`` for it."""
        return self._done.wait(timeout_seconds)

    def result(self, timeout_seconds: float = 10.0) -> Outcome:
        assert self._done.wait(timeout_seconds), f"call did not end within {timeout_seconds} s"
        self.close()
        self._thread.join(timeout=5)
        assert self._outcome is not None
        return self._outcome


def _trailers(call: Any) -> dict[str, str]:
    return {item.key: item.value for item in call.trailing_metadata() or ()}


def lease_metadata(lease_id: str) -> tuple[tuple[str, str], ...]:
    return ((LEASE_METADATA_KEY, lease_id),)


def wait_for(predicate: Callable[[], bool], timeout_seconds: float = 5.0, message: str = "condition") -> None:
    deadline = time.monotonic() + timeout_seconds
    while not predicate():
        assert time.monotonic() < deadline, f"{message} not reached within {timeout_seconds} s"
        time.sleep(0.01)


def wait_for_threads(baseline: int, timeout_seconds: float = 10.0) -> None:
    """Wait until the thread count is back to ``baseline``; fail naming the extra threads."""
    deadline = time.monotonic() + timeout_seconds
    while threading.active_count() > baseline:
        if time.monotonic() > deadline:
            names = sorted(thread.name for thread in threading.enumerate())
            raise AssertionError(f"{threading.active_count()} threads alive, baseline {baseline}: {names}")
        time.sleep(0.02)

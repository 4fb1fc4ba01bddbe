"""Test helpers for the client interceptor suites: real protected servers and a TCP proxy."""

from __future__ import annotations

import asyncio
import concurrent.futures
import selectors
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio

from session_authority.interceptors._aio_server import AioLeaseServerInterceptor
from session_authority.interceptors._enforcer import EnforcerConfig, SessionEndInfo
from session_authority.interceptors._server import LeaseServerInterceptor

SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
HANG = f"/{SERVICE}/Hang"

HANG_GUARD_SECONDS = 10.0
"""A ``Hang`` handler returns after this long, so a call that is never cut off fails its test instead of hanging it."""


def enforcer_settings(authority_target: str) -> EnforcerConfig:
    """Return enforcer settings for tests: a short activity batch interval and fast watch reconnects."""
    return EnforcerConfig(
        authority_target=authority_target,
        staleness_bound_seconds=2.0,
        activity_batch_interval_seconds=0.05,
        reconnect_backoff_initial_seconds=0.05,
        reconnect_backoff_max_seconds=0.5,
    )


class EchoService:
    """An echo service that records the metadata of every call and whether a ``Hang`` call ended early."""

    def __init__(self) -> None:
        self.metadata_seen: list[tuple[tuple[str, Any], ...]] = []
        # The peer address of every call, in the order of metadata_seen.
        self.peers_seen: list[str] = []
        self.hang_started = threading.Event()
        # Set when a Hang call stops before its handler returns, because the client cancelled it or the
        # server interceptor cut it off.
        self.cancelled = threading.Event()

    def record(self, context: Any) -> None:
        self.metadata_seen.append(tuple(context.invocation_metadata() or ()))
        self.peers_seen.append(context.peer())

    def sync_handler(self) -> grpc.GenericRpcHandler:
        """Build handlers for ``grpc.server``."""

        def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.record(context)
            context.set_trailing_metadata((("echo-trailer", "unary"),))
            return request

        def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
            self.record(context)
            for index in range(int(request or b"3")):
                yield str(index).encode()

        def client_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
            self.record(context)
            return b"".join(requests)

        def bidi(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            self.record(context)
            yield from requests

        def hang(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.record(context)
            self.hang_started.set()
            deadline = time.monotonic() + HANG_GUARD_SECONDS
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            if not context.is_active():
                self.cancelled.set()
            return request

        return _generic_handler(unary, server_stream, client_stream, bidi, hang)

    def aio_handler(self) -> grpc.GenericRpcHandler:
        """Build handlers for ``grpc.aio.server``."""

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.record(context)
            context.set_trailing_metadata((("echo-trailer", "unary"),))
            return request

        async def server_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            self.record(context)
            for index in range(int(request or b"3")):
                yield str(index).encode()

        async def client_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            self.record(context)
            return b"".join([request async for request in requests])

        async def bidi(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            self.record(context)
            async for request in requests:
                yield request

        async def hang(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.record(context)
            self.hang_started.set()
            try:
                await asyncio.sleep(HANG_GUARD_SECONDS)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
            return request

        return _generic_handler(unary, server_stream, client_stream, bidi, hang)


def _generic_handler(unary: Any, server_stream: Any, client_stream: Any, bidi: Any, hang: Any) -> grpc.GenericRpcHandler:
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
        "Hang": grpc.unary_unary_rpc_method_handler(hang),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


class SyncProtectedServer(EchoService):
    """A ``grpc.server`` on loopback serving the echo service behind a real :class:`LeaseServerInterceptor`.

    ``server_ends`` lists the leases that had calls here and ended, as the
    interceptor's session-end callback reports them.
    """

    def __init__(self, authority_target: str) -> None:
        super().__init__()
        self.server_ends: list[SessionEndInfo] = []
        self.interceptor = LeaseServerInterceptor(enforcer_settings(authority_target))
        self.interceptor.on_session_end(self.server_ends.append)
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=16)
        self._server = grpc.server(self._executor, interceptors=[self.interceptor])
        self._server.add_generic_rpc_handlers((self.sync_handler(),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None).wait(10)
        self._executor.shutdown(wait=True)
        self.interceptor.close()


class AioProtectedServer(EchoService):
    """A ``grpc.aio.server`` behind a real :class:`AioLeaseServerInterceptor`, on its own event loop thread.

    Its own loop lets a test drive it from sync clients and from aio clients on
    another loop alike. ``server_ends`` is as in :class:`SyncProtectedServer`.
    """

    def __init__(self, authority_target: str) -> None:
        super().__init__()
        self.server_ends: list[SessionEndInfo] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-aio-protected", daemon=True)
        self._thread.start()
        self._run(self._start(authority_target))

    async def _start(self, authority_target: str) -> None:
        # grpc.aio binds a server to the event loop it is created on.
        self.interceptor = AioLeaseServerInterceptor(enforcer_settings(authority_target))
        self.interceptor.on_session_end(self.server_ends.append)
        self._server = grpc.aio.server(interceptors=[self.interceptor])
        self._server.add_generic_rpc_handlers((self.aio_handler(),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._run(self._server.stop(None))
        self._run(self.interceptor.aclose())
        self._run(self._loop.shutdown_default_executor())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def start_protected_server(kind: str, authority_target: str) -> SyncProtectedServer | AioProtectedServer:
    """Start a sync (``kind="sync"``) or aio (``kind="aio"``) protected server."""
    if kind == "sync":
        return SyncProtectedServer(authority_target)
    if kind == "aio":
        return AioProtectedServer(authority_target)
    raise ValueError(f"kind must be 'sync' or 'aio', got {kind!r}")


class TcpProxy:
    """A loopback TCP proxy that can reject connections, to make an authority unreachable."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._rejecting = False
        self._open: list[socket.socket] = []
        self.rejected = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def reject_connections(self) -> None:
        """Cut every open connection and close new ones at once."""
        with self._lock:
            self._rejecting = True
            sockets, self._open = self._open, []
        for sock in sockets:
            _close(sock)

    def accept_connections(self) -> None:
        with self._lock:
            self._rejecting = False

    def stop(self) -> None:
        self._stopped = True
        self.reject_connections()
        _close(self._listener)

    def _accept(self) -> None:
        while not self._stopped:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                rejecting = self._rejecting
                if rejecting:
                    self.rejected += 1
            if rejecting:
                _close(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self._target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream), daemon=True).start()

    def _pipe(self, first: socket.socket, second: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(first, selectors.EVENT_READ, second)
        selector.register(second, selectors.EVENT_READ, first)
        try:
            while True:
                for key, _ in selector.select(timeout=0.5):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            selector.close()
            _close(first)
            _close(second)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


FAST_RECONNECT_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.min_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)
"""Channel options so a channel retries a lost authority within the 1 s idle timeout of tier ``short``."""

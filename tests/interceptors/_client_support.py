"""Test helpers for the client interceptor suites: a lease-checking server and a TCP proxy."""

from __future__ import annotations

import concurrent.futures
import selectors
import socket
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY
from session_authority.clients._types import LeaseState

SERVICE = "test.Echo"
UNARY = f"/{SERVICE}/Unary"
SERVER_STREAM = f"/{SERVICE}/ServerStream"
CLIENT_STREAM = f"/{SERVICE}/ClientStream"
BIDI = f"/{SERVICE}/Bidi"
HANG = f"/{SERVICE}/Hang"


class ProtectedServer:
    """A real gRPC server whose handlers admit a call only under a live lease.

    Each call's ``session-lease`` is checked with the authority's TimeToLive.
    An ended or unknown lease is rejected with UNAUTHENTICATED and the
    ``session-end-reason`` trailer, as the enforcing server interceptor does.
    It records the metadata of every call and the calls that were cancelled.
    """

    def __init__(self, authority_target: str) -> None:
        self._authority = AuthorityClient(authority_target, principal="enforcer")
        self.metadata_seen: list[tuple[tuple[str, Any], ...]] = []
        self.cancelled = threading.Event()
        self.hang_started = threading.Event()
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Hang": grpc.unary_unary_rpc_method_handler(self._hang),
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None)
        self._authority.close()

    def _admit(self, context: grpc.ServicerContext) -> None:
        metadata = tuple(context.invocation_metadata())
        self.metadata_seen.append(metadata)
        lease_ids = [value for key, value in metadata if key == LEASE_METADATA_KEY]
        if len(lease_ids) != 1:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"expected one session-lease, got {len(lease_ids)}")
        lease = self._authority.time_to_live(lease_ids[0])
        if lease.state is not LeaseState.ALIVE:
            reason = lease.end_reason.value if lease.end_reason else "unknown"
            context.set_trailing_metadata(((END_REASON_TRAILER_KEY, reason),))
            context.abort(grpc.StatusCode.UNAUTHENTICATED, f"session ended: {reason}")

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._admit(context)
        context.set_trailing_metadata((("echo-trailer", "unary"),))
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._admit(context)
        for index in range(int(request or b"3")):
            yield str(index).encode()

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._admit(context)
        return b"".join(requests)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._admit(context)
        for request in requests:
            yield request

    def _hang(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._admit(context)
        context.add_callback(self._on_done(context))
        self.hang_started.set()
        # Wait for the client to cancel; the bound keeps a broken test from hanging.
        for _ in range(200):
            if not context.is_active():
                break
            threading.Event().wait(0.05)
        return request

    def _on_done(self, context: grpc.ServicerContext) -> Any:
        def callback() -> None:
            if context.is_active() is False:
                self.cancelled.set()

        return callback


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

"""A loopback TCP proxy for fault tests: pass traffic, black-hole it, or refuse connections."""

from __future__ import annotations

import enum
import logging
import select
import socket
import struct
import threading

logger = logging.getLogger(__name__)

_CHUNK_BYTES = 65536
_POLL_SECONDS = 0.05


class ProxyMode(enum.Enum):
    """What the proxy does with traffic."""

    PASS = "pass"
    """Forward bytes both ways."""
    BLACKHOLE = "blackhole"
    """Accept connections but forward nothing, in either direction, on new and open connections.

    Bytes already sent stay in the kernel buffers, as packets would in a
    partitioned network, and flow again when the mode returns to ``PASS``.
    """
    REFUSE = "refuse"
    """Reset every open connection and reset new ones as soon as they are accepted."""


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to an upstream ``host:port``, one thread pair per connection.

    The listening port stays the same for the proxy's lifetime, so clients
    keep one target while the mode changes. ``upstream`` may be changed too,
    for example after the authority restarts on another port.

    Threading: ``set_mode``, ``upstream`` and ``close`` may be called from any
    thread. ``close`` stops and joins every thread the proxy started.

    Args:
        upstream: ``host:port`` to forward to; loopback only.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self._mode = ProxyMode.PASS
        self._condition = threading.Condition()
        self._closed = False
        self._connections: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(_POLL_SECONDS)
        self.port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="fault-proxy-accept", daemon=True)
        self._accept_thread.start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def mode(self) -> ProxyMode:
        with self._condition:
            return self._mode

    def set_mode(self, mode: ProxyMode) -> None:
        """Switch the mode; ``REFUSE`` also resets every open connection at once."""
        with self._condition:
            self._mode = mode
            doomed = list(self._connections) if mode is ProxyMode.REFUSE else []
            self._condition.notify_all()
        for sock in doomed:
            _reset(sock)
        logger.info("fault proxy on port %d now in mode %s (%d connections reset)", self.port, mode.value, len(doomed))

    def close(self) -> None:
        """Stop accepting, reset every connection and join the threads."""
        with self._condition:
            self._closed = True
            doomed = list(self._connections)
            self._condition.notify_all()
        for sock in doomed:
            _reset(sock)
        self._accept_thread.join(timeout=5)
        self._listener.close()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- threads ----------------------------------------------------------------

    def _accept_loop(self) -> None:
        while True:
            with self._condition:
                if self._closed:
                    return
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.mode is ProxyMode.REFUSE:
                _reset(client)
                continue
            thread = threading.Thread(target=self._serve, args=(client,), name="fault-proxy-connection", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _wait_until_passing(self) -> bool:
        """Block while black-holed; return False once the connection must end."""
        with self._condition:
            while self._mode is ProxyMode.BLACKHOLE and not self._closed:
                self._condition.wait()
            return self._mode is ProxyMode.PASS and not self._closed

    def _serve(self, client: socket.socket) -> None:
        with self._condition:
            self._connections.add(client)
        server: socket.socket | None = None
        try:
            # A black-holed connection is accepted but never reaches the upstream.
            if not self._wait_until_passing():
                return
            host, port = self.upstream.rsplit(":", 1)
            try:
                server = socket.create_connection((host, int(port)), timeout=5)
            except OSError as exc:
                logger.debug("fault proxy cannot reach %s: %s", self.upstream, exc)
                return
            with self._condition:
                self._connections.add(server)
            self._pump(client, server)
        finally:
            with self._condition:
                self._connections.discard(client)
                if server is not None:
                    self._connections.discard(server)
            _reset(client)
            if server is not None:
                _reset(server)

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peers = {client: server, server: client}
        while True:
            if not self._wait_until_passing():
                return
            try:
                readable, _, _ = select.select(list(peers), [], [], _POLL_SECONDS)
            except (OSError, ValueError):
                return
            for source in readable:
                # The mode may have changed while select waited: read nothing while black-holed.
                if not self._wait_until_passing():
                    return
                try:
                    data = source.recv(_CHUNK_BYTES)
                    if not data:
                        return
                    peers[source].sendall(data)
                except OSError:
                    return


def _reset(sock: socket.socket) -> None:
    """Close a socket with a TCP reset instead of an orderly shutdown."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass

"""Lease store on etcd v3, shared by several authority replicas.

Key layout under the prefix (default ``/session-authority/v1/``), as
``docs/replication.md`` describes it:

- ``leases/<digest>``: a live lease record (JSON), written by ``Grant`` and by
  batched renewals.
- ``ends/<digest>``: an ended lease record, attached to an etcd lease whose
  TTL covers the retention time, so etcd removes it afterwards.
- ``audit-pending/<replica>/<digest>``: an end claimed by ``<replica>`` whose
  audit record is not yet durable.
- ``high-water/<replica>``: the highest authority time the replica has seen.

``<digest>`` is the hex SHA-256 of the lease ID, so etcd never contains a
lease ID. Stored times are authority time (see ``_store``).

The etcd API comes from the ``aetcd`` package (its generated ``aetcd.rpc``
messages and stubs, which import under current grpcio and protobuf). The
store opens its own ``grpc.aio`` channel rather than use ``aetcd.Client``,
because that client connects to exactly one ``host:port``. A replica needs
every member of the etcd cluster, and its watch resumes from the last
revision it saw.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import ipaddress
import json
import logging
import math
import re
import threading
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

import grpc
from aetcd.rpc import kv_pb2, rpc_pb2, rpc_pb2_grpc

from ._log_limit import LogLimit
from ._store import StoredLease, StoredState, StoreError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

FORMAT_VERSION = 1
"""Version written in every lease and end record."""

DEFAULT_PREFIX = "/session-authority/v1/"

ACTIVITY_FLUSH_INTERVAL_SECONDS = 0.05
"""Renewals of this interval go to etcd together, in one transaction per batch."""

HIGH_WATER_INTERVAL_SECONDS = 1.0

REQUEST_TIMEOUT_SECONDS = 3.0
"""Deadline of one etcd request, and the time a grant, a fetch or a revoke's reply waits for etcd.

It is shorter than the clients' default deadline of 5 s
(``session_authority.clients._common.DEFAULT_TIMEOUT_SECONDS``), so that a
caller with the default deadline receives the authority's UNAVAILABLE reply,
which names the etcd endpoints, instead of its own DEADLINE_EXCEEDED.
"""

LOAD_TIMEOUT_SECONDS = 20.0
"""Time the start-up read may take, retries included, before the replica gives up."""

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: the maximum number of operations in one transaction."""

# etcd counts a nested transaction against the outer one: the outer
# transaction's operations plus the widest branch of any nested transaction
# must not exceed --max-txn-ops (checkTxnRequest in etcd 3.4's
# etcdserver/api/v3rpc/key.go). Against etcd 3.4.23, 127 nested renewals
# and 125 nested claims pass, and one more of either fails.
MAX_RENEWALS_PER_TXN = MAX_TXN_OPS - 1
"""Maximum renewals in one etcd transaction, each a nested transaction of one put."""

MAX_CLAIMS_PER_TXN = MAX_TXN_OPS - 3
"""Maximum end claims in one etcd transaction, each a nested transaction of a delete and two puts."""

LOAD_PAGE_SIZE = 1000
"""Keys per range request at start-up, to stay far below gRPC's 4 MiB message limit."""

END_LEASE_REUSE_SECONDS = 60.0
"""Ends claimed within this interval share one etcd lease, whose TTL adds this interval."""

MIN_RETRY_SECONDS = 0.05
MAX_RETRY_SECONDS = 1.0

REPLICA_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_LEASE_NOT_FOUND = "requested lease not found"
"""etcd's error details when a put names an etcd lease that has expired."""

_CONTEXT_DEADLINE = "context deadline exceeded"

_SOCKET_CLOSED = "Socket closed"
_TRANSIENT_DETAILS = ("leader changed", "no leader", "timed out", "Stream removed", _SOCKET_CLOSED)
"""Parts of UNAVAILABLE details that last only until an election ends or a member is replaced, so a retry can cure them.

The first three match ``etcdserver: leader changed``, ``etcdserver: no
leader`` and the ``etcdserver: request timed out`` family, as etcd's
``api/v3rpc/rpctypes/error.go`` defines them. The last two are grpcio's
details when the member serving the request dies with the request in
flight; the channel then moves to another member. A retried grant accepts
its own committed record, so sending a write twice is safe.
"""


# -- flag values ---------------------------------------------------------------


def parse_endpoints(text: str) -> tuple[str, ...]:
    """Split a comma-separated list of etcd client URLs and check it with :func:`check_endpoints`.

    Raises:
        ValueError: The message names the bad endpoint and the expected form.
    """
    return check_endpoints(part.strip() for part in text.split(",") if part.strip())


def check_endpoints(endpoints: Iterable[str]) -> tuple[str, ...]:
    """Return etcd client URLs as a tuple if the store can reach all of them.

    Every endpoint is ``http://HOST:PORT`` or ``https://HOST:PORT`` without a
    user name or password, all with the same scheme. The store reaches all
    endpoints through one gRPC channel whose target is a list of addresses,
    so several endpoints must be IP addresses of one family. A single
    endpoint may be a DNS name.

    Raises:
        ValueError: The message names the bad endpoint, with any user name
            and password replaced by ``***``, and the expected form.
    """
    endpoints = tuple(endpoints)
    if not endpoints:
        raise ValueError("no etcd endpoint given; pass URLs such as http://127.0.0.1:2379,http://127.0.0.1:22379")
    families = [_endpoint_family(endpoint) for endpoint in endpoints]
    schemes = {urllib.parse.urlsplit(endpoint).scheme for endpoint in endpoints}
    if len(schemes) > 1:
        raise ValueError(
            f"etcd endpoints {','.join(endpoints)} mix http and https; the store reaches them all over one"
            " channel, so give every endpoint the same scheme"
        )
    if len(endpoints) > 1 and 0 in families:
        hosts = [str(urllib.parse.urlsplit(endpoint).hostname) for endpoint, family in zip(endpoints, families) if family == 0]
        names = ", ".join(dict.fromkeys(hosts))
        raise ValueError(
            f"etcd endpoints {','.join(endpoints)} contain DNS names ({names}), which this store supports only"
            " as a single endpoint, because a gRPC channel lists several addresses only as IP addresses;"
            " give the members' IP addresses, for example http://10.0.0.1:2379,http://10.0.0.2:2379"
        )
    if len(set(families)) > 1:
        raise ValueError(
            f"etcd endpoints {','.join(endpoints)} mix IPv4 and IPv6 addresses; list addresses of one family"
        )
    return endpoints


def uses_tls(endpoints: Sequence[str]) -> bool:
    """Return whether checked ``endpoints`` are ``https`` URLs (they all share one scheme)."""
    return bool(endpoints) and urllib.parse.urlsplit(endpoints[0]).scheme == "https"


def check_tls(endpoints: Sequence[str], *, credentials: bool, server_name: str) -> str:
    """Check the TLS settings towards etcd against the endpoints, and return the name to verify, or "".

    Args:
        endpoints: Endpoints already checked by :func:`check_endpoints`.
        credentials: Whether TLS credentials (a CA or a client certificate) were given.
        server_name: The name that etcd's certificates must contain, or "" for
            the host of the single endpoint.

    Raises:
        ValueError: TLS settings with ``http`` endpoints, several ``https``
            endpoints without a server name, or a server name that is not a
            host name or IP address.
    """
    if not uses_tls(endpoints):
        if credentials or server_name:
            raise ValueError(
                "TLS settings for etcd (CA, client certificate or server name) apply only to https endpoints;"
                " write the endpoints as https://HOST:PORT, or drop the TLS settings"
            )
        return ""
    if server_name:
        if not _is_host_name(server_name):
            raise ValueError(
                f"etcd server name {server_name[:260]!r} is not a host name or IP address; give the name that"
                " the members' certificates contain, such as etcd.internal or 10.0.0.1, without a port"
            )
        return server_name
    if len(endpoints) > 1:
        raise ValueError(
            f"several https endpoints ({','.join(endpoints)}) share one channel, which checks every member's"
            " certificate against one name; give that name (a DNS name or IP address that every member's"
            " certificate contains) as the etcd server name"
        )
    return urllib.parse.urlsplit(endpoints[0]).hostname or ""


_HOST_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_host_name(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return len(text) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in text.split("."))
    return True


def _endpoint_family(endpoint: str) -> int:
    """Check one etcd client URL and return its IP version, or 0 for a DNS name.

    Raises:
        ValueError: The endpoint is not ``http://HOST:PORT`` or ``https://HOST:PORT``.
    """
    redacted = redact_userinfo(endpoint)
    if redacted != endpoint:
        raise ValueError(
            f"etcd endpoint {redacted!r} contains a user name or password, but this store does not support"
            " etcd's password authentication; give http(s)://HOST:PORT without them, and use client"
            " certificates (https endpoints) or a private network to limit who reaches etcd"
        )
    expected = f"etcd endpoint {endpoint!r} is not http://HOST:PORT or https://HOST:PORT, for example http://127.0.0.1:2379"
    try:
        parsed = urllib.parse.urlsplit(endpoint)
    except ValueError:
        raise ValueError(expected) from None
    port_text = parsed.netloc.rpartition("]")[2].rpartition(":")[2]
    if port_text.isdigit() and not 1 <= int(port_text) <= 65535:
        raise ValueError(f"etcd endpoint {endpoint!r} has port {port_text}, which is out of range 1-65535")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme not in ("http", "https") or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise ValueError(expected)
    try:
        return ipaddress.ip_address(parsed.hostname).version
    except ValueError:
        return 0


def redact_userinfo(endpoint: str) -> str:
    """Return ``endpoint`` with any ``user:password@`` before the host replaced by ``***@``."""
    scheme, separator, rest = endpoint.partition("://")
    if not separator:
        scheme, rest = "", endpoint
    # The last '@' ends the user information even when the password contains
    # a '/' that was not percent-encoded, because an endpoint has no other '@'.
    if "@" not in rest:
        return endpoint
    host = rest.rpartition("@")[2]
    return f"{scheme}{separator}***@{host}"


def check_replica_id(text: str) -> str:
    """Return ``text`` if it can name a replica in etcd keys.

    Raises:
        ValueError: The message states the allowed characters.
    """
    if not REPLICA_ID_PATTERN.fullmatch(text):
        raise ValueError(
            f"replica ID {text[:140]!r} is invalid; use 1 to 128 letters, digits, '.', '_' or '-',"
            " starting with a letter or digit, unique in the fleet"
        )
    return text


def check_prefix(text: str) -> str:
    """Return ``text`` if it can be the key prefix of the store.

    Raises:
        ValueError: The message states the expected form.
    """
    if not text.startswith("/") or not text.endswith("/"):
        raise ValueError(f"etcd prefix {text!r} must start and end with '/', for example {DEFAULT_PREFIX}")
    if text == "/":
        raise ValueError(
            "etcd prefix '/' covers every key that starts with '/', so the store would read and watch other"
            f" applications' keys; give the replicas a prefix of their own, for example {DEFAULT_PREFIX}"
        )
    return text


def channel_target(endpoints: Sequence[str]) -> str:
    """Return the gRPC target that reaches every endpoint (``pick_first`` moves on when one fails)."""
    hosts = []
    for endpoint in endpoints:
        parsed = urllib.parse.urlsplit(endpoint)
        host = parsed.hostname or ""
        hosts.append((host, parsed.port))
    if len(hosts) == 1:
        host, port = hosts[0]
        try:
            if ipaddress.ip_address(host).version == 6:
                return f"ipv6:[{host}]:{port}"
            return f"ipv4:{host}:{port}"
        except ValueError:
            return f"dns:///{host}:{port}"
    if ipaddress.ip_address(hosts[0][0]).version == 6:
        return "ipv6:" + ",".join(f"[{host}]:{port}" for host, port in hosts)
    return "ipv4:" + ",".join(f"{host}:{port}" for host, port in hosts)


# -- records -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class MirroredLease:
    """A lease record read from etcd, with the replicas that granted and ended it.

    ``lease.ended_at`` is None for a live lease (``leases/``) and set for an
    ended one (``ends/``). ``claimed_by`` is empty for a live lease.
    """

    lease: StoredLease
    granted_by: str
    claimed_by: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class EndClaim:
    """Result of :meth:`EtcdLeaseStore.save_end`.

    Attributes:
        won: True when this replica's transaction ended the lease in etcd, so
            this replica writes its audit records; False when another replica
            had ended it first, or etcd had no such lease.
        stored_end: The end that etcd holds when ``won`` is False, or None
            when etcd had neither the lease nor its end.
    """

    won: bool
    stored_end: MirroredLease | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaState:
    """The shared lease table and this replica's pending audit keys, as read at start-up.

    Attributes:
        leases: Every live lease and every retained end.
        high_water: The highest authority time any replica has stored.
        audit_pending: Digests of the ends this replica claimed whose audit
            records may be missing.
        revision: The etcd revision of the read; the watch starts after it.
    """

    leases: list[MirroredLease]
    high_water: float
    audit_pending: set[bytes]
    revision: int


class ReplicaListener(Protocol):
    """Receives changes to the shared lease table from the store's watch.

    Calls come from the store's event loop, in etcd's revision order, and
    must return without blocking. They include this replica's own writes.
    """

    def lease_stored(self, lease: MirroredLease) -> None:
        """Apply a lease that was granted or whose last activity moved (``leases/`` put)."""

    def lease_ended(self, lease: MirroredLease) -> None:
        """Apply the end of a lease that a replica claimed (``ends/`` put)."""

    def lease_deleted(self, digest: bytes) -> None:
        """Apply the deletion of a lease key without an end record (by hand, or by a tool)."""


def encode_lease(lease: StoredLease, granted_by: str, claimed_by: str = "") -> bytes:
    """Return the JSON value of a ``leases/`` key, or of an ``ends/`` key when the lease has ended."""
    record: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "principal": lease.principal,
        "tier": lease.tier,
        "idle_timeout": lease.idle_timeout,
        "max_duration": lease.max_duration,
        "granted_at": lease.granted_at,
        "granted_wall": lease.granted_wall,
        "last_activity": lease.last_activity,
        "granted_by": granted_by,
    }
    if lease.grant_span:
        record["grant_span"] = lease.grant_span
    if lease.ended_at is not None:
        record.update(
            ended_at=lease.ended_at,
            ended_wall=lease.ended_wall,
            end_reason=lease.end_reason,
            revoked_by=lease.revoked_by,
            claimed_by=claimed_by,
        )
    return json.dumps(record, separators=(",", ":"), sort_keys=True).encode()


def decode_lease(digest: bytes, value: bytes) -> MirroredLease:
    """Parse the value of a ``leases/`` or ``ends/`` key.

    Raises:
        ValueError: The value is not a record of a version this authority reads.
    """
    record = json.loads(value)
    if not isinstance(record, dict) or record.get("version") != FORMAT_VERSION:
        version = record.get("version") if isinstance(record, dict) else None
        raise ValueError(f"record version {version!r}, this authority reads version {FORMAT_VERSION}")
    ended_at = record.get("ended_at")
    lease = StoredLease(
        digest=digest,
        principal=str(record["principal"]),
        tier=str(record["tier"]),
        idle_timeout=float(record["idle_timeout"]),
        max_duration=float(record["max_duration"]),
        granted_at=float(record["granted_at"]),
        granted_wall=float(record["granted_wall"]),
        last_activity=float(record["last_activity"]),
        ended_at=float(ended_at) if ended_at is not None else None,
        ended_wall=float(record["ended_wall"]) if ended_at is not None else None,
        end_reason=int(record["end_reason"]) if ended_at is not None else None,
        revoked_by=str(record.get("revoked_by", "")),
        grant_span=str(record.get("grant_span", "")),
    )
    return MirroredLease(lease, str(record.get("granted_by", "")), str(record.get("claimed_by", "")))


@dataclasses.dataclass(slots=True)
class _Known:
    """A ``leases/`` key as last seen: its create revision guards every activity put."""

    create_revision: int
    mirrored: MirroredLease


@dataclasses.dataclass(slots=True)
class _Claim:
    digest: bytes
    ended_at: float
    ended_wall: float
    end_reason: int
    revoked_by: str
    future: concurrent.futures.Future[EndClaim]


def _prefix_end(prefix: bytes) -> bytes:
    """Return the smallest key greater than every key that starts with ``prefix``."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def _describe_rpc_error(exc: grpc.aio.AioRpcError) -> str:
    return f"{exc.code().name}: {exc.details()}"


_TLS_FAILURE_DETAILS = ("handshake", "Handshake", "verification", "Verification", "Unwrap failed", "SSL_ERROR")
"""Parts of the details of an UNAVAILABLE that gRPC gives when TLS to a member failed.

Seen with grpcio 1.85 against etcd 3.4: "Tls handshake failed" (an unknown
CA), "Hostname Verification Check failed" (a certificate without the
expected name), "Unwrap failed" (etcd rejecting a missing client certificate).
"""


_LOCAL_TLS_FAILURE = "Failed to create security handshaker"
"""gRPC's details when the client's own TLS files are unusable (a key that does not match its certificate, bad PEM)."""


def _is_tls_failure(exc: grpc.aio.AioRpcError) -> bool:
    details = exc.details() or ""
    return any(part in details for part in _TLS_FAILURE_DETAILS)


def is_transient(exc: grpc.aio.AioRpcError) -> bool:
    """Return whether a failed etcd request may succeed when sent again, as during a leader election.

    A connection that no endpoint accepted is not transient: the replica
    reports it at once rather than wait for etcd to come up.
    """
    details = exc.details() or ""
    if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    if exc.code() == grpc.StatusCode.UNKNOWN:
        # etcd 3.4.23 returns UNKNOWN "context deadline exceeded" when the
        # request's deadline passes inside the server, as without a quorum.
        return _CONTEXT_DEADLINE in details
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(part in details for part in _TRANSIENT_DETAILS)


# -- the store -----------------------------------------------------------------


class EtcdLeaseStore:
    """Leases in etcd v3, shared by several authority replicas.

    Implements the ``LeaseStore`` protocol, plus what a replica needs: the
    watch (:meth:`start_watch`), reads of leases that the mirror lacks
    (:meth:`fetch`) and the ``audit-pending`` keys (:meth:`load_replica`,
    :meth:`clear_audit_pending`).

    Threading: every request runs on one event loop: ``loop`` if given (the
    authority's), else a loop on a thread of the store's own. Public methods
    may be called from any thread and do not wait for etcd, except
    :meth:`load_replica`, :meth:`flush` and :meth:`close`, which block and are
    meant for start-up and shutdown; never call those three on the loop's
    own thread.

    Failures: the start-up read, a grant and a fetch send their request
    again after a transient error (see :func:`is_transient`) until their
    time is up: ``load_timeout_seconds`` for the start-up read,
    ``request_timeout_seconds`` for the others. Then they fail with
    ``StoreError`` naming the endpoints and the errors seen. Activity, end
    claims, high-water marks and pending-key deletions are retried until
    they land. Every retry is logged at WARNING.

    Args:
        endpoints: etcd client URLs (see :func:`parse_endpoints`).
        replica_id: This replica's name, unique in the fleet and kept across
            restarts.
        prefix: Key prefix of every key the store writes.
        retention_seconds: How long ends stay in etcd before etcd removes them.
        request_timeout_seconds: Deadline of one etcd request, and the time a
            grant or a fetch may take, retries included.
        load_timeout_seconds: Time the start-up read may take, retries included.
        loop: A running event loop to do the I/O on. A process whose gRPC
            calls all run on one loop avoids the spurious ``BlockingIOError``
            that grpc.aio logged in this project's tests when several loops
            in several threads shared its completion queue.
        credentials: TLS credentials for ``https`` endpoints, such as those
            of ``grpc.ssl_channel_credentials(ca, key, cert)`` with a client
            certificate for etcd's ``--client-cert-auth``; None with
            ``https`` endpoints trusts the system's roots and sends no
            client certificate.
        server_name: The name that every member's certificate must contain, for
            ``https`` endpoints; "" checks the host of the single endpoint.
            Several ``https`` endpoints need it (see :func:`check_tls`).

    Raises:
        ValueError: An endpoint or setting is invalid; see
            :func:`check_endpoints` and :func:`check_tls`.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        replica_id: str,
        prefix: str = DEFAULT_PREFIX,
        retention_seconds: float = 3600.0,
        request_timeout_seconds: float = REQUEST_TIMEOUT_SECONDS,
        load_timeout_seconds: float = LOAD_TIMEOUT_SECONDS,
        loop: asyncio.AbstractEventLoop | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        # Checked here too, so that no caller can make the store log a password.
        self.endpoints = check_endpoints(endpoints)
        self._server_name = check_tls(self.endpoints, credentials=credentials is not None, server_name=server_name)
        self._credentials = credentials
        self.replica_id = check_replica_id(replica_id)
        self.prefix = check_prefix(prefix)
        self.retention_seconds = retention_seconds
        self.request_timeout_seconds = request_timeout_seconds
        self.load_timeout_seconds = load_timeout_seconds
        self.description = f"etcd:{','.join(self.endpoints)} (prefix {self.prefix}, replica {self.replica_id})"
        self._prefix = self.prefix.encode()
        self._target = channel_target(self.endpoints)

        self._lock = threading.Lock()
        self._pending_activity: dict[bytes, float] = {}
        self._pending_deletes: set[bytes] = set()
        self._queued_claims: list[_Claim] = []
        self._high_water: float | None = None
        self._closed = False
        self._retry_log_limit = LogLimit()

        # Owned by the store's event loop thread.
        self._known: dict[bytes, _Known] = {}
        self._granting: set[bytes] = set()
        self._claims: set[asyncio.Task[None]] = set()
        self._claimer: asyncio.Task[None] | None = None
        self._end_lease: tuple[int, float] | None = None
        self._revision = 0
        self._listener: ReplicaListener | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._flushed_high_water: float | None = None

        self._thread: threading.Thread | None = None
        self._loop_thread_id: int | None = None
        if loop is not None and _running_loop() is loop:
            self._loop_thread_id = threading.get_ident()
        if loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="etcd-store", daemon=True)
            self._thread.start()
        self._loop = loop
        # Scheduled before any request, and done in its first step, so every
        # request finds the channel open.
        asyncio.run_coroutine_threadsafe(self._open(), loop)
        logger.info("etcd lease store opened: %s", self.description)

    # -- start-up ------------------------------------------------------------

    def load(self) -> StoredState:
        """Read every live lease and retained end, and the highest high-water mark."""
        state = self.load_replica()
        return StoredState(leases=[m.lease for m in state.leases], high_water=state.high_water)

    def load_replica(self) -> ReplicaState:
        """Read the shared lease table and this replica's pending audit keys (blocks).

        Transient errors, such as those during an etcd leader election, are
        retried for up to ``load_timeout_seconds``.

        Raises:
            StoreError: etcd could not be read; the message names the
                endpoints and the errors seen.
        """
        # The last attempt ends by the budget's deadline, and the margin covers the handover from the loop.
        return self._run(self._load(), self.load_timeout_seconds + 1.0)

    def start_watch(self, listener: ReplicaListener) -> None:
        """Deliver every change after the revision of :meth:`load_replica` to ``listener``."""
        self._loop.call_soon_threadsafe(self._start_watch, listener)

    # -- LeaseStore writes -----------------------------------------------------

    def save_grant(self, lease: StoredLease) -> concurrent.futures.Future[None]:
        """Create ``leases/<digest>``; the future fails with ``StoreError`` if etcd did not commit it."""
        return self._submit(self._grant(lease))

    def save_activity(self, digest: bytes, last_activity: float) -> None:
        """Queue a renewal; the next batch writes it unless the lease has left etcd."""
        with self._lock:
            if last_activity > self._pending_activity.get(digest, -math.inf):
                self._pending_activity[digest] = last_activity

    def save_end(
        self,
        digest: bytes,
        ended_at: float,
        ended_wall: float,
        end_reason: int,
        revoked_by: str,
    ) -> concurrent.futures.Future[EndClaim]:
        """Claim a lease's end in etcd, retrying until etcd returns a result.

        Claims queued while an earlier claim transaction is in flight go to
        etcd together, up to :data:`MAX_CLAIMS_PER_TXN` in one transaction.

        Returns:
            A future of the :class:`EndClaim`. It fails only when the store
            closes before the claim lands.
        """
        future: concurrent.futures.Future[EndClaim] = concurrent.futures.Future()
        if self._closed:
            future.set_exception(StoreError(f"lease store {self.description} is closed"))
            return future
        self._queue_claims([_Claim(digest, ended_at, ended_wall, end_reason, revoked_by, future)])
        return future

    def set_high_water(self, authority_time: float) -> None:
        """Queue this replica's high-water mark; the write-behind task writes it about once a second."""
        with self._lock:
            if self._high_water is None or authority_time > self._high_water:
                self._high_water = authority_time

    def purge_ended_before(self, authority_time: float) -> None:
        """Do nothing: etcd removes ``ends/`` keys when their etcd lease expires."""

    def clear_audit_pending(self, digest: bytes) -> None:
        """Queue the deletion of ``audit-pending/<replica>/<digest>`` once its audit record is durable."""
        with self._lock:
            self._pending_deletes.add(digest)

    def fetch(self, digest: bytes) -> concurrent.futures.Future[MirroredLease | None]:
        """Read a lease or its end from etcd with a linearizable read.

        For lookups that miss the mirror, such as a lease granted through
        another replica a moment ago. The future fails with ``StoreError``
        when etcd does not respond within the request timeout.
        """
        return self._submit(self._fetch(digest))

    def flush(self, timeout_seconds: float) -> None:
        """Write queued activity, claims and pending-key deletions now (blocks).

        Transient errors are retried until ``timeout_seconds`` have passed.

        Raises:
            StoreError: They did not land within ``timeout_seconds``, or etcd
                rejected them with an error that is not transient.
        """
        self._run(self._flush_all(timeout_seconds), timeout_seconds)

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Flush what is queued (up to ``timeout_seconds``), stop the watch and close the channel."""
        if self._closed:
            return
        if self._on_loop_thread():
            # Called on the loop itself, as after a failed start: shut down without waiting.
            logger.warning("etcd lease store closed from its own event loop; queued writes are dropped")
            self._closed = True
            self._loop.create_task(self._shutdown())
            return
        try:
            self.flush(timeout_seconds)
        except StoreError as exc:
            logger.error("etcd lease store closes with writes not landed: %s", exc)
        self._closed = True
        try:
            self._run(self._shutdown(), timeout_seconds)
        except StoreError:
            logger.exception("etcd lease store did not shut down cleanly")
        if self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout_seconds)
            if not self._thread.is_alive():
                self._loop.close()
        logger.info("etcd lease store closed: %s", self.description)

    # -- keys ----------------------------------------------------------------

    def _key(self, kind: str, digest: bytes) -> bytes:
        return self._prefix + kind.encode() + b"/" + digest.hex().encode()

    def _pending_key(self, digest: bytes) -> bytes:
        return self._prefix + f"audit-pending/{self.replica_id}/{digest.hex()}".encode()

    def _high_water_key(self) -> bytes:
        return self._prefix + f"high-water/{self.replica_id}".encode()

    # -- plumbing ----------------------------------------------------------------

    def _submit(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        if self._closed:
            coroutine.close()
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(StoreError(f"lease store {self.description} is closed"))
            return future
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread_id

    def _run(self, coroutine: Any, timeout_seconds: float | None) -> Any:
        if self._on_loop_thread():
            coroutine.close()
            raise RuntimeError("EtcdLeaseStore blocks in load_replica, flush and close; call them off its event loop")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(timeout_seconds)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise StoreError(
                f"etcd at {','.join(self.endpoints)} did not respond within {timeout_seconds} s;"
                " check that a quorum of etcd members runs"
            ) from exc

    def _unavailable(self, action: str, exc: grpc.aio.AioRpcError) -> StoreError:
        message = f"etcd at {','.join(self.endpoints)} did not {action} ({_describe_rpc_error(exc)})"
        tls_failure = exc.code() == grpc.StatusCode.UNAVAILABLE and uses_tls(self.endpoints) and _is_tls_failure(exc)
        if tls_failure and _LOCAL_TLS_FAILURE in (exc.details() or ""):
            message += (
                "; the local TLS files could not be used: check that --etcd-key is the private key of"
                " --etcd-cert, and that --etcd-ca, --etcd-cert and --etcd-key hold the PEM blocks their names say"
            )
        elif tls_failure:
            message += (
                "; the TLS handshake failed: check that the CA (--etcd-ca) signed the members' certificates,"
                f" that those certificates contain the name {self._server_name!r} (--etcd-server-name), and that"
                " the client certificate (--etcd-cert, --etcd-key) is one that etcd trusts and has not expired"
            )
        elif exc.code() == grpc.StatusCode.UNAVAILABLE:
            message += "; check that the etcd members at these endpoints run and accept connections"
        return StoreError(message)

    async def _retry_transient(
        self, action: str, attempt: Callable[[float], Awaitable[_T]], budget_seconds: float
    ) -> _T:
        """Await ``attempt(timeout_seconds)`` again after each transient error until ``budget_seconds`` have passed.

        ``action`` completes "etcd did not ..." in log lines and errors.

        Raises:
            StoreError: An attempt failed with an error that is not
                transient, or the last attempt within the budget failed. The
                message names the endpoints and every error seen.
        """
        deadline = time.monotonic() + budget_seconds
        delay = MIN_RETRY_SECONDS
        seen: collections.Counter[str] = collections.Counter()
        while True:
            timeout_seconds = max(0.0, min(self.request_timeout_seconds, deadline - time.monotonic()))
            try:
                return await attempt(timeout_seconds)
            except grpc.aio.AioRpcError as exc:
                if not is_transient(exc):
                    raise self._unavailable(action, exc) from exc
                reason = _describe_rpc_error(exc)
                seen[reason] += 1
                if time.monotonic() + delay >= deadline:
                    raise self._gave_up(action, budget_seconds, seen) from exc
                # Every request waiting for etcd retries, so an outage would
                # otherwise log one line per request and retry.
                held_back = self._retry_log_limit.allow()
                if held_back is not None:
                    logger.warning(
                        "etcd at %s did not %s (%s); retrying in %.2f s%s",
                        ",".join(self.endpoints),
                        action,
                        reason,
                        delay,
                        self._retry_log_limit.note(held_back),
                    )
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_SECONDS, delay * 2)

    def _gave_up(self, action: str, budget_seconds: float, seen: collections.Counter[str]) -> StoreError:
        attempts = sum(seen.values())
        errors = ", ".join(f"{count} with {reason}" for reason, count in seen.most_common())
        hint = ""
        if not uses_tls(self.endpoints) and all(_SOCKET_CLOSED in reason for reason in seen):
            # A member that serves https closes a plaintext connection at once.
            hint = " If the members serve https, write the endpoints as https://HOST:PORT."
        return StoreError(
            f"etcd at {','.join(self.endpoints)} did not {action} within {budget_seconds:g} s;"
            f" {attempts} {'attempt' if attempts == 1 else 'attempts'} failed: {errors}.{hint}"
            " Run `etcdctl endpoint status` against these endpoints to see each member's state"
        )

    async def _open(self) -> None:
        self._loop_thread_id = threading.get_ident()
        options = [
            # Reconnect within a second of etcd's return, not after gRPC's default back-off of up to 2 minutes.
            # grpc.min_reconnect_backoff_ms stays unset: it is gRPC's minimum connect timeout (default 20 s,
            # MIN_CONNECT_TIMEOUT in grpc's doc/connection-backoff.md), and a short one fails connects under load.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if uses_tls(self.endpoints):
            # The channel checks every member's certificate against its default authority.
            host = f"[{self._server_name}]" if ":" in self._server_name else self._server_name
            options.append(("grpc.default_authority", host))
            credentials = self._credentials or grpc.ssl_channel_credentials()
            self._channel = grpc.aio.secure_channel(self._target, credentials, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(self._target, options=options)
        self._kv = rpc_pb2_grpc.KVStub(self._channel)
        self._watch = rpc_pb2_grpc.WatchStub(self._channel)
        self._leases = rpc_pb2_grpc.LeaseStub(self._channel)
        # Held by whichever writes queued activity, deletions and the high-water
        # mark: the write-behind loop or a flush. A flush that finds the queue
        # just taken by the loop then waits for those writes to land.
        self._write_lock = asyncio.Lock()
        self._flush_task = asyncio.get_running_loop().create_task(self._run_flusher())

    async def _shutdown(self) -> None:
        tasks = [task for task in (self._watch_task, self._flush_task, self._claimer) if task is not None]
        tasks += list(self._claims)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._fail_queued_claims()
        await self._channel.close()
        if self._thread is not None:
            # gRPC finishes cancelled calls in tasks of its own; the store's loop stops only after them.
            leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    async def _txn(self, request: rpc_pb2.TxnRequest, timeout_seconds: float | None = None) -> rpc_pb2.TxnResponse:
        timeout = self.request_timeout_seconds if timeout_seconds is None else timeout_seconds
        return await self._kv.Txn(request, timeout=timeout)

    # -- reads ---------------------------------------------------------------

    async def _load(self) -> ReplicaState:
        kvs, revision = await self._retry_transient("return the lease table", self._read_prefix, self.load_timeout_seconds)
        self._revision = revision
        leases: list[MirroredLease] = []
        high_water = 0.0
        pending: set[bytes] = set()
        pending_prefix = f"audit-pending/{self.replica_id}/"
        for kv in kvs:
            name = kv.key[len(self._prefix) :].decode(errors="replace")
            kind, _, rest = name.partition("/")
            if kind in ("leases", "ends"):
                mirrored = self._decode(kv)
                if mirrored is None:
                    continue
                leases.append(mirrored)
                if kind == "leases":
                    self._known[mirrored.lease.digest] = _Known(kv.create_revision, mirrored)
            elif kind == "high-water":
                try:
                    high_water = max(high_water, float(kv.value))
                except ValueError:
                    logger.error("etcd key %s is not a number of seconds; ignored", kv.key.decode(errors="replace"))
            elif name.startswith(pending_prefix):
                try:
                    pending.add(bytes.fromhex(name[len(pending_prefix) :]))
                except ValueError:
                    logger.error("etcd key %s does not end in a lease digest; ignored", kv.key.decode(errors="replace"))
        logger.info(
            "read %d leases and ends from etcd at revision %d; %d audit records of this replica pending",
            len(leases),
            revision,
            len(pending),
        )
        return ReplicaState(leases=leases, high_water=high_water, audit_pending=pending, revision=revision)

    async def _read_prefix(self, timeout_seconds: float | None = None) -> tuple[list[kv_pb2.KeyValue], int]:
        """Read every key under the prefix at one revision, a page at a time, each page within ``timeout_seconds``."""
        timeout = self.request_timeout_seconds if timeout_seconds is None else timeout_seconds
        kvs: list[kv_pb2.KeyValue] = []
        start = self._prefix
        end = _prefix_end(self._prefix)
        revision = 0
        while True:
            request = rpc_pb2.RangeRequest(key=start, range_end=end, limit=LOAD_PAGE_SIZE, revision=revision)
            response = await self._kv.Range(request, timeout=timeout)
            if revision == 0:
                revision = response.header.revision
            kvs.extend(response.kvs)
            if not response.more or not response.kvs:
                return kvs, revision
            start = response.kvs[-1].key + b"\0"

    def _decode(self, kv: kv_pb2.KeyValue) -> MirroredLease | None:
        try:
            digest = bytes.fromhex(kv.key.rsplit(b"/", 1)[1].decode())
            return decode_lease(digest, kv.value)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            logger.error("etcd key %s does not contain a lease record this authority can read (%s); ignored", kv.key, exc)
            return None

    async def _fetch(self, digest: bytes) -> MirroredLease | None:
        lease_key, end_key = self._key("leases", digest), self._key("ends", digest)
        request = rpc_pb2.TxnRequest(
            success=[
                rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=lease_key)),
                rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=end_key)),
            ]
        )
        response = await self._retry_transient(
            f"answer the read of lease {digest[:6].hex()}",
            lambda timeout_seconds: self._txn(request, timeout_seconds),
            self.request_timeout_seconds,
        )
        for result in response.responses:
            for kv in result.response_range.kvs:
                mirrored = self._decode(kv)
                if mirrored is not None:
                    if mirrored.lease.ended_at is None:
                        self._known.setdefault(digest, _Known(kv.create_revision, mirrored))
                    return mirrored
        return None

    # -- grants ----------------------------------------------------------------

    async def _grant(self, lease: StoredLease) -> None:
        digest = lease.digest
        lease_key, end_key = self._key("leases", digest), self._key("ends", digest)
        mirrored = MirroredLease(lease, self.replica_id)
        value = encode_lease(lease, self.replica_id)
        request = rpc_pb2.TxnRequest(
            # Neither the lease nor its end may exist yet, so a late grant can
            # never bring back a lease that has already ended.
            compare=[_created(lease_key, 0), _created(end_key, 0)],
            success=[_put(lease_key, value)],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=lease_key))],
        )

        self._granting.add(digest)
        try:
            response = await self._retry_transient(
                f"store the grant of lease {digest[:6].hex()}",
                lambda timeout_seconds: self._txn(request, timeout_seconds),
                self.request_timeout_seconds,
            )
        except StoreError:
            # The last attempt may still have been committed. The caller gets
            # no lease ID, so the record is withdrawn. Left alone, it would live
            # and later end with an audit record but no grant record.
            self._start_withdrawal(lease_key, value, digest)
            raise
        finally:
            self._granting.discard(digest)

        if response.succeeded:
            self._known[digest] = _Known(response.header.revision, mirrored)
            return
        # An attempt that etcd committed, but whose reply was lost, makes the
        # retry fail its comparison. The record is then this grant's own.
        for kv in response.responses[0].response_range.kvs:
            if kv.value == value:
                self._known[digest] = _Known(kv.create_revision, mirrored)
                return
        raise StoreError(f"lease {digest[:6].hex()} already exists in etcd at {','.join(self.endpoints)}")

    def _start_withdrawal(self, lease_key: bytes, value: bytes, digest: bytes) -> None:
        self._start_task(self._withdraw_grant(lease_key, value, digest))

    async def _withdraw_grant(self, lease_key: bytes, value: bytes, digest: bytes) -> None:
        """Delete a failed grant's record if etcd committed it after all, retrying until a request succeeds."""
        request = rpc_pb2.TxnRequest(
            # Only this grant's own record, unchanged by any renewal; a lease
            # that was renewed was in use, so its ID reached someone.
            compare=[rpc_pb2.Compare(result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.VALUE, key=lease_key, value=value)],
            success=[rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=lease_key))],
        )
        delay = MIN_RETRY_SECONDS
        while True:
            try:
                response = await self._txn(request, self.request_timeout_seconds)
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "withdrawal of the failed grant of lease %s failed in etcd (%s); retrying in %.2f s",
                    digest[:6].hex(),
                    _describe_rpc_error(exc),
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_SECONDS)
                continue
            if response.succeeded:
                self._known.pop(digest, None)
                logger.warning("failed grant of lease %s had been committed; its record is withdrawn", digest[:6].hex())
            return

    # -- end claims --------------------------------------------------------------

    # Claims go to etcd in batches, one transaction in flight at a time. An
    # expiry pass can end hundreds of leases within a few milliseconds, and
    # the store shares the authority's event loop with the gRPC server that
    # sends those ends to WatchSessionEnds streams. A transaction per lease
    # would cost the loop a task and a gRPC call per end, and etcd a Raft
    # entry per end.

    def _queue_claims(self, claims: list[_Claim], *, first: bool = False) -> None:
        """Queue claims from any thread. With ``first`` they go ahead of those queued, as a retry does."""
        with self._lock:
            was_empty = not self._queued_claims
            if first:
                self._queued_claims[:0] = claims
            else:
                self._queued_claims.extend(claims)
        if was_empty:
            self._loop.call_soon_threadsafe(self._start_claimer)

    def _start_claimer(self) -> None:
        if self._closed:
            self._fail_queued_claims()
            return
        if self._claimer is None or self._claimer.done():
            self._claimer = self._loop.create_task(self._run_claims())

    def _take_claims(self) -> list[_Claim]:
        """Remove and return up to :data:`MAX_CLAIMS_PER_TXN` queued claims, each of a different lease."""
        batch: list[_Claim] = []
        digests: set[bytes] = set()
        with self._lock:
            left: list[_Claim] = []
            for claim in self._queued_claims:
                # etcd rejects a transaction that writes one key twice, so a
                # second claim of the same lease waits for the next batch.
                if len(batch) < MAX_CLAIMS_PER_TXN and claim.digest not in digests:
                    batch.append(claim)
                    digests.add(claim.digest)
                else:
                    left.append(claim)
            self._queued_claims = left
        return batch

    def _fail_queued_claims(self) -> None:
        with self._lock:
            claims, self._queued_claims = self._queued_claims, []
        for claim in claims:
            _settle(claim.future, StoreError(f"lease store {self.description} closed before the end was stored"))

    async def _run_claims(self) -> None:
        """Send queued claims to etcd batch by batch until none is left, retrying failed batches."""
        delay = MIN_RETRY_SECONDS
        attempt = 1
        claimed: list[tuple[_Claim, _Known]] = []
        try:
            while True:
                batch = self._take_claims()
                if not batch:
                    return
                claimed = self._known_claims(batch)
                if not claimed:
                    continue
                try:
                    await self._claim_batch(claimed)
                except grpc.aio.AioRpcError as exc:
                    if _LEASE_NOT_FOUND in (exc.details() or ""):
                        self._end_lease = None
                    logger.warning(
                        "claim of the ends of %d leases in etcd failed (attempt %d, %s, first lease %s);"
                        " retrying in %.2f s",
                        len(claimed),
                        attempt,
                        _describe_rpc_error(exc),
                        claimed[0][0].digest[:6].hex(),
                        delay,
                    )
                    self._queue_claims([claim for claim, _ in claimed], first=True)
                    claimed = []
                    await asyncio.sleep(delay)
                    delay = min(MAX_RETRY_SECONDS, delay * 2)
                    attempt += 1
                else:
                    claimed = []
                    delay = MIN_RETRY_SECONDS
                    attempt = 1
        except asyncio.CancelledError:
            # Cancelled by close, in a transaction or in the wait between two.
            for claim, _ in claimed:
                _settle(claim.future, StoreError(f"lease store {self.description} closed before the end was stored"))
            self._fail_queued_claims()
            raise

    def _known_claims(self, batch: list[_Claim]) -> list[tuple[_Claim, _Known]]:
        """Return the claims of leases this store has seen, and hand each other one to :meth:`_claim_unknown`."""
        claimed = []
        for claim in batch:
            known = self._known.get(claim.digest)
            if known is None:
                self._start_task(self._claim_unknown(claim))
            else:
                claimed.append((claim, known))
        return claimed

    async def _claim_batch(self, claimed: list[tuple[_Claim, _Known]]) -> None:
        """Claim the ends of ``claimed`` in one etcd transaction and settle each claim with its result.

        Raises:
            grpc.aio.AioRpcError: The transaction failed, and no claim of it is settled.
        """
        end_lease = await self._end_lease_id()
        operations = [
            rpc_pb2.RequestOp(request_txn=self._claim_request(claim, known, end_lease)) for claim, known in claimed
        ]

        response = await self._txn(rpc_pb2.TxnRequest(success=operations))

        for (claim, _known), result in zip(claimed, response.responses):
            self._known.pop(claim.digest, None)
            _settle(claim.future, self._claim_result(claim.digest, result.response_txn))

    def _claim_request(self, claim: _Claim, known: _Known, end_lease: int) -> rpc_pb2.TxnRequest:
        """Return the transaction that moves a lease from ``leases/`` to ``ends/`` unless it was recreated or ended."""
        digest = claim.digest
        lease_key, end_key = self._key("leases", digest), self._key("ends", digest)
        ended = dataclasses.replace(
            known.mirrored.lease,
            ended_at=claim.ended_at,
            ended_wall=claim.ended_wall,
            end_reason=claim.end_reason,
            revoked_by=claim.revoked_by,
        )
        return rpc_pb2.TxnRequest(
            compare=[_created(lease_key, known.create_revision)],
            success=[
                rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=lease_key)),
                _put(end_key, encode_lease(ended, known.mirrored.granted_by, self.replica_id), lease=end_lease),
                _put(self._pending_key(digest), b""),
            ],
            failure=[rpc_pb2.RequestOp(request_range=rpc_pb2.RangeRequest(key=end_key))],
        )

    def _claim_result(self, digest: bytes, response: rpc_pb2.TxnResponse) -> EndClaim:
        if response.succeeded:
            return EndClaim(won=True)
        stored: MirroredLease | None = None
        for kv in response.responses[0].response_range.kvs:
            stored = self._decode(kv)
        if stored is None:
            logger.warning("lease %s ended here but was no longer in etcd; no replica records its end", digest[:6].hex())
        elif stored.claimed_by == self.replica_id:
            # An earlier attempt of this claim committed, but its reply was
            # lost (the connection broke or the request timed out). The claim
            # is this replica's, and so is the audit record.
            logger.info("claim of lease %s had committed before a retry", digest[:6].hex())
            return EndClaim(won=True)
        return EndClaim(won=False, stored_end=stored)

    def _start_task(self, coroutine: Any) -> None:
        """Run ``coroutine`` in a task that :meth:`flush` waits for and :meth:`close` cancels."""
        task = self._loop.create_task(coroutine)
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)

    async def _claim_unknown(self, claim: _Claim) -> None:
        """Read a lease this store never saw, then settle its claim or queue it again.

        Such a lease was granted through another replica whose watch event
        has not arrived yet.
        """
        delay = MIN_RETRY_SECONDS
        attempt = 1
        try:
            while True:
                try:
                    found = await self._fetch(claim.digest)
                    break
                except StoreError as exc:
                    logger.warning(
                        "claim of the end of lease %s in etcd failed (attempt %d, %s); retrying in %.2f s",
                        claim.digest[:6].hex(),
                        attempt,
                        exc,
                        delay,
                    )
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY_SECONDS, delay * 2)
                attempt += 1
        except asyncio.CancelledError:
            _settle(claim.future, StoreError(f"lease store {self.description} closed before the end was stored"))
            raise
        if found is None or found.lease.ended_at is not None:
            _settle(claim.future, EndClaim(won=found is not None and found.claimed_by == self.replica_id, stored_end=found))
        else:
            # _fetch put the lease into _known, so the next batch claims it.
            self._queue_claims([claim], first=True)

    async def _end_lease_id(self) -> int:
        """Return an etcd lease for ``ends/`` keys, granting a new one once the current one is old."""
        now = time.monotonic()
        if self._end_lease is not None and now - self._end_lease[1] < END_LEASE_REUSE_SECONDS:
            return self._end_lease[0]
        ttl = max(1, math.ceil(self.retention_seconds + END_LEASE_REUSE_SECONDS))
        response = await self._leases.LeaseGrant(
            rpc_pb2.LeaseGrantRequest(TTL=ttl), timeout=self.request_timeout_seconds
        )
        self._end_lease = (response.ID, now)
        return response.ID

    # -- write-behind ------------------------------------------------------------

    async def _run_flusher(self) -> None:
        delay = ACTIVITY_FLUSH_INTERVAL_SECONDS
        last_high_water = -math.inf
        while True:
            await asyncio.sleep(delay)
            try:
                async with self._write_lock:
                    await self._flush_activity()
                    await self._flush_deletes()
                    if time.monotonic() - last_high_water >= HIGH_WATER_INTERVAL_SECONDS:
                        await self._flush_high_water()
                        last_high_water = time.monotonic()
            except (grpc.aio.AioRpcError, _RetryLater) as exc:
                delay = min(MAX_RETRY_SECONDS, max(delay * 2, MIN_RETRY_SECONDS))
                logger.warning(
                    "write-behind to etcd at %s failed (%s); retrying in %.2f s",
                    ",".join(self.endpoints),
                    _describe_rpc_error(exc) if isinstance(exc, grpc.aio.AioRpcError) else exc,
                    delay,
                )
            else:
                delay = ACTIVITY_FLUSH_INTERVAL_SECONDS

    async def _flush_all(self, timeout_seconds: float) -> None:
        await self._retry_transient(
            "take the queued writes", lambda _timeout_seconds: self._flush_writes(), timeout_seconds
        )
        # A claim of an unknown lease moves from its own task back to the
        # claimer's queue, so the wait repeats until both are idle.
        while True:
            with self._lock:
                queued = bool(self._queued_claims)
            if queued:
                self._start_claimer()
            claims = list(self._claims)
            if self._claimer is not None and not self._claimer.done():
                claims.append(self._claimer)
            if not claims:
                return
            # asyncio.wait, unlike gather, leaves the claims running if this wait is cancelled.
            await asyncio.wait(claims)

    async def _flush_writes(self) -> None:
        """Write queued activity, pending-key deletions and the high-water mark once.

        Raises:
            grpc.aio.AioRpcError: A write failed; what it did not write stays queued.
        """
        async with self._write_lock:
            try:
                await self._flush_activity()
            except _RetryLater as exc:
                assert isinstance(exc.__cause__, grpc.aio.AioRpcError)
                raise exc.__cause__ from None
            await self._flush_deletes()
            await self._flush_high_water()

    async def _flush_activity(self) -> None:
        with self._lock:
            activity, self._pending_activity = self._pending_activity, {}
        if not activity:
            return
        writes: list[tuple[bytes, float, _Known]] = []
        for digest, at in activity.items():
            known = self._known.get(digest)
            if known is None:
                if digest in self._granting:
                    self._requeue_activity({digest: at})
                continue
            if at > known.mirrored.lease.last_activity:
                writes.append((digest, at, known))
        for start in range(0, len(writes), MAX_RENEWALS_PER_TXN):
            chunk = writes[start : start + MAX_RENEWALS_PER_TXN]
            try:
                await self._write_activity(chunk)
            except grpc.aio.AioRpcError as exc:
                self._requeue_activity({digest: at for digest, at, _ in writes[start:]})
                raise _RetryLater(
                    f"activity not written ({len(writes) - start} leases, lease {chunk[0][0][:6].hex()} first):"
                    f" {_describe_rpc_error(exc)}"
                ) from exc

    async def _write_activity(self, chunk: list[tuple[bytes, float, _Known]]) -> None:
        # One nested transaction per lease: each put is guarded by the
        # lease's create revision, so a renewal never brings back a lease that
        # a claim deleted, and one ended lease does not fail the others.
        operations = []
        for digest, at, known in chunk:
            key = self._key("leases", digest)
            lease = dataclasses.replace(known.mirrored.lease, last_activity=at)
            operations.append(
                rpc_pb2.RequestOp(
                    request_txn=rpc_pb2.TxnRequest(
                        compare=[_created(key, known.create_revision)],
                        success=[_put(key, encode_lease(lease, known.mirrored.granted_by))],
                    )
                )
            )
        response = await self._txn(rpc_pb2.TxnRequest(success=operations))
        for (digest, at, known), result in zip(chunk, response.responses):
            if result.response_txn.succeeded:
                current = self._known.get(digest)
                if current is known:
                    known.mirrored = MirroredLease(
                        dataclasses.replace(known.mirrored.lease, last_activity=at), known.mirrored.granted_by
                    )
            else:
                self._known.pop(digest, None)

    def _requeue_activity(self, activity: dict[bytes, float]) -> None:
        with self._lock:
            for digest, at in activity.items():
                if at > self._pending_activity.get(digest, -math.inf):
                    self._pending_activity[digest] = at

    async def _flush_deletes(self) -> None:
        with self._lock:
            deletes, self._pending_deletes = self._pending_deletes, set()
        ordered = sorted(deletes)
        for start in range(0, len(ordered), MAX_TXN_OPS):
            chunk = ordered[start : start + MAX_TXN_OPS]
            operations = [
                rpc_pb2.RequestOp(request_delete_range=rpc_pb2.DeleteRangeRequest(key=self._pending_key(digest)))
                for digest in chunk
            ]
            try:
                await self._txn(rpc_pb2.TxnRequest(success=operations))
            except grpc.aio.AioRpcError:
                with self._lock:
                    self._pending_deletes.update(ordered[start:])
                raise

    async def _flush_high_water(self) -> None:
        with self._lock:
            high_water = self._high_water
        if high_water is None or high_water == self._flushed_high_water:
            return
        await self._kv.Put(
            rpc_pb2.PutRequest(key=self._high_water_key(), value=repr(high_water).encode()),
            timeout=self.request_timeout_seconds,
        )
        self._flushed_high_water = high_water

    # -- watch ---------------------------------------------------------------

    def _start_watch(self, listener: ReplicaListener) -> None:
        if self._watch_task is not None or self._closed:
            return
        self._listener = listener
        self._watch_task = self._loop.create_task(self._run_watch())

    async def _run_watch(self) -> None:
        delay = MIN_RETRY_SECONDS
        while True:
            try:
                await self._watch_from(self._revision + 1)
            except grpc.aio.AioRpcError as exc:
                logger.warning(
                    "watch of etcd at %s from revision %d failed (%s); resuming in %.2f s",
                    ",".join(self.endpoints),
                    self._revision + 1,
                    _describe_rpc_error(exc),
                    delay,
                )
            except _Compacted as exc:
                logger.warning(
                    "etcd has compacted its history up to revision %d, past where the watch resumes;"
                    " reading the whole lease table again",
                    exc.revision,
                )
                try:
                    await self._reload()
                except grpc.aio.AioRpcError as reload_exc:
                    logger.warning("reading the lease table again failed (%s)", _describe_rpc_error(reload_exc))
                    # Stay behind the compaction, so the next attempt reloads again.
                    self._revision = min(self._revision, exc.revision - 1)
                else:
                    delay = MIN_RETRY_SECONDS
                    continue
            await asyncio.sleep(delay)
            delay = min(MAX_RETRY_SECONDS, delay * 2)

    async def _watch_from(self, start_revision: int) -> None:
        # "hasleader" makes a member that has lost its leader cancel the watch,
        # instead of keeping a stream open that receives nothing.
        call = self._watch.Watch(metadata=(("hasleader", "true"),))
        # The request is written on this task rather than from a request
        # iterator, because grpc.aio logs a traceback when the task that
        # consumes such an iterator is cancelled, as it is at every close.
        try:
            await call.write(
                rpc_pb2.WatchRequest(
                    create_request=rpc_pb2.WatchCreateRequest(
                        key=self._prefix, range_end=_prefix_end(self._prefix), start_revision=start_revision
                    )
                )
            )
            async for response in call:
                if response.compact_revision:
                    raise _Compacted(response.compact_revision)
                if response.canceled:
                    logger.warning("etcd cancelled the watch: %s; resuming", response.cancel_reason or "no reason given")
                    return
                if response.events:
                    self._deliver(response.events)
        finally:
            call.cancel()

    async def _reload(self) -> None:
        kvs, revision = await self._read_prefix()
        self._revision = revision
        listener = self._listener
        for kv in kvs:
            kind = kv.key[len(self._prefix) :].split(b"/", 1)[0]
            if kind not in (b"leases", b"ends"):
                continue
            mirrored = self._decode(kv)
            if mirrored is None or listener is None:
                continue
            if kind == b"leases":
                self._known[mirrored.lease.digest] = _Known(kv.create_revision, mirrored)
                _call(listener.lease_stored, mirrored)
            else:
                self._known.pop(mirrored.lease.digest, None)
                _call(listener.lease_ended, mirrored)
        # NOTE: a lease that left etcd entirely during the gap (its end
        # expired too) stays live in the mirror until its own deadline.

    def _deliver(self, events: Iterable[kv_pb2.Event]) -> None:
        events = list(events)
        listener = self._listener
        # A claim deletes the lease and puts its end in one transaction; the
        # end's record (reason, revoking principal) is what the mirror needs.
        ended = {
            event.kv.key.rsplit(b"/", 1)[1]
            for event in events
            if event.type == kv_pb2.Event.PUT and event.kv.key.startswith(self._prefix + b"ends/")
        }
        for event in events:
            self._revision = max(self._revision, event.kv.mod_revision)
            key = event.kv.key
            kind = key[len(self._prefix) :].split(b"/", 1)[0]
            if kind == b"leases":
                if event.type == kv_pb2.Event.PUT:
                    mirrored = self._decode(event.kv)
                    if mirrored is None:
                        continue
                    self._known[mirrored.lease.digest] = _Known(event.kv.create_revision, mirrored)
                    if listener is not None:
                        _call(listener.lease_stored, mirrored)
                else:
                    hex_digest = key.rsplit(b"/", 1)[1]
                    try:
                        digest = bytes.fromhex(hex_digest.decode())
                    except ValueError:
                        continue
                    self._known.pop(digest, None)
                    if hex_digest not in ended and listener is not None:
                        _call(listener.lease_deleted, digest)
            elif kind == b"ends" and event.type == kv_pb2.Event.PUT:
                mirrored = self._decode(event.kv)
                if mirrored is not None and listener is not None:
                    _call(listener.lease_ended, mirrored)


class _RetryLater(Exception):
    """A write-behind batch failed; the message names what was not written."""


class _Compacted(Exception):
    def __init__(self, revision: int) -> None:
        super().__init__(f"revision {revision} compacted")
        self.revision = revision


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _created(key: bytes, revision: int) -> rpc_pb2.Compare:
    """Compare a key's create revision; 0 means the key does not exist."""
    return rpc_pb2.Compare(
        result=rpc_pb2.Compare.EQUAL, target=rpc_pb2.Compare.CREATE, key=key, create_revision=revision
    )


def _put(key: bytes, value: bytes, *, lease: int = 0) -> rpc_pb2.RequestOp:
    return rpc_pb2.RequestOp(request_put=rpc_pb2.PutRequest(key=key, value=value, lease=lease))


def _call(method: Any, argument: Any) -> None:
    try:
        method(argument)
    except Exception:  # noqa: BLE001 - a listener error must not stop the watch
        logger.exception("etcd watch listener %r failed", method)


def _settle(future: concurrent.futures.Future[Any], result: Any) -> None:
    try:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        logger.debug("etcd store result arrived after its waiter cancelled it")

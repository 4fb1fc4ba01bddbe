"""The ``SessionAuthority`` gRPC servicer (``grpc.aio``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import math
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from ._auth import AuthenticationError, Authenticator, caller_info_from_context
from ._etcd_store import EndClaim
from ._errors import (
    AuthorityError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ._limits import LimitExceeded, PrincipalLimiter
from ._log_limit import LogLimit
from ._policy import MethodRule, Policy, UnknownTierError
from ._table import (
    MAX_LEASE_ID_LENGTH,
    EndReason,
    LeaseSnapshot,
    LeaseState,
    LeaseTable,
    SessionEnd,
    lease_digest,
)
from ._watch import WatchHub

if TYPE_CHECKING:
    from ._authority import Persistence

logger = logging.getLogger(__name__)

RETRY_AFTER_METADATA_KEY = "retry-after-ms"
"""Trailing metadata key of the back-off suggested with ``RESOURCE_EXHAUSTED``, in milliseconds."""

MAX_RENEW_ENTRIES = 10_000
"""Maximum number of entries in one Renew request or KeepAlive message."""

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_METHOD_LENGTH = 1024
MAX_DURATION_SECONDS = 315_576_000_000
"""The largest value google.protobuf.Duration allows (10,000 years)."""

_Handler = TypeVar("_Handler", bound=Callable[..., Any])


# -- conversions -------------------------------------------------------------


def seconds_to_duration(seconds: float) -> duration_pb2.Duration:
    # Rounding the whole value, not only its fraction, carries a fraction that
    # rounds up to a full second: 0.9999999999 s becomes 1 s, not 0 s.
    nanoseconds = round(seconds * 1e9)
    whole, nanos = divmod(abs(nanoseconds), 1_000_000_000)
    if nanoseconds < 0:
        # google.protobuf.Duration requires seconds and nanos of the same sign.
        return duration_pb2.Duration(seconds=-whole, nanos=-nanos)
    return duration_pb2.Duration(seconds=whole, nanos=nanos)


def wall_to_timestamp(wall: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(wall * 1e9))
    return stamp


def lease_to_proto(lease: LeaseSnapshot) -> pb.Lease:
    """Convert a snapshot to the wire ``Lease`` (an empty one for not found)."""
    if lease.state is LeaseState.NOT_FOUND:
        return pb.Lease(state=pb.LEASE_STATE_NOT_FOUND)
    message = pb.Lease(
        fingerprint=lease.fingerprint,
        digest=lease.digest.hex(),
        principal=lease.principal,
        tier=lease.tier,
        state=int(lease.state),
        end_reason=int(lease.end_reason) if lease.end_reason is not None else 0,
        idle_timeout=seconds_to_duration(lease.idle_timeout),
        max_duration=seconds_to_duration(lease.max_duration),
        ttl=seconds_to_duration(lease.ttl),
        max_remaining=seconds_to_duration(lease.max_remaining),
        age=seconds_to_duration(lease.age),
        idle_for=seconds_to_duration(lease.idle_for),
        granted_at=wall_to_timestamp(lease.granted_wall),
    )
    if lease.ended_wall is not None:
        message.ended_at.CopyFrom(wall_to_timestamp(lease.ended_wall))
    return message


def encode_watched_end(end: SessionEnd) -> bytes:
    """Return the encoded ``WatchSessionEndsResponse`` that carries ``end`` to watchers."""
    message = pb.WatchSessionEndsResponse(
        end=pb.SessionEnd(sequence=end.sequence, lease=lease_to_proto(end.lease), revoked_by=end.lease.revoked_by)
    )
    return message.SerializeToString()


class GrantReplies:
    """Cache of ``GrantResponse`` templates, one per tier and timeouts, that Grant replies are copied from.

    A lease in a Grant reply has just been granted, so its durations follow
    from its tier and timeouts alone: ``ttl`` is the shorter of
    ``idle_timeout`` and ``max_duration``, ``max_remaining`` is
    ``max_duration``, and ``age`` and ``idle_for`` are zero. Copying a
    template with those fields costs a fraction of converting six durations
    per reply. The reply equals
    ``GrantResponse(lease_id=..., lease=lease_to_proto(lease))``, except
    that the snapshot's ``ttl`` and ``max_remaining`` are differences of
    clock readings and can be one nanosecond off after rounding.

    Threading: call it from one thread (the servicer's event loop).
    """

    MAX_TEMPLATES = 256
    """Maximum number of cached templates. Callers may request any idle timeout, so a full cache is cleared."""

    def __init__(self) -> None:
        self._templates: dict[tuple[str, float, float], pb.GrantResponse] = {}

    def build(self, lease_id: str, lease: LeaseSnapshot) -> pb.GrantResponse:
        """Return the reply to a Grant that created ``lease`` (a snapshot taken at its grant)."""
        key = (lease.tier, lease.idle_timeout, lease.max_duration)
        template = self._templates.get(key)
        if template is None:
            template = self._template(*key)
        reply = pb.GrantResponse()
        reply.CopyFrom(template)
        reply.lease_id = lease_id
        message = reply.lease
        message.fingerprint = lease.fingerprint
        message.digest = lease.digest.hex()
        message.principal = lease.principal
        # The same split as Timestamp.FromNanoseconds, without building a second message.
        granted_at = message.granted_at
        granted_at.seconds, granted_at.nanos = divmod(int(lease.granted_wall * 1e9), 1_000_000_000)
        return reply

    def _template(self, tier: str, idle_timeout: float, max_duration: float) -> pb.GrantResponse:
        if len(self._templates) >= self.MAX_TEMPLATES:
            self._templates.clear()
        template = pb.GrantResponse(
            lease=pb.Lease(
                tier=tier,
                state=pb.LEASE_STATE_ALIVE,
                idle_timeout=seconds_to_duration(idle_timeout),
                max_duration=seconds_to_duration(max_duration),
                ttl=seconds_to_duration(min(idle_timeout, max_duration)),
                max_remaining=seconds_to_duration(max_duration),
                age=seconds_to_duration(0.0),
                idle_for=seconds_to_duration(0.0),
            )
        )
        self._templates[(tier, idle_timeout, max_duration)] = template
        return template


def rule_to_proto(rule: MethodRule) -> pb.MethodRule:
    message = pb.MethodRule(pattern=rule.pattern, tiers=list(rule.tiers), exempt=rule.exempt)
    if rule.max_session_age_seconds is not None:
        message.max_session_age.CopyFrom(seconds_to_duration(rule.max_session_age_seconds))
    return message


# -- request validation ------------------------------------------------------


def check_duration(value: duration_pb2.Duration, field: str) -> float:
    """Return a request duration in seconds, rejecting malformed or negative values."""
    if not -MAX_DURATION_SECONDS <= value.seconds <= MAX_DURATION_SECONDS or not (
        -999_999_999 <= value.nanos <= 999_999_999
    ):
        raise InvalidArgument(
            f"{field} is out of the range of google.protobuf.Duration"
            f" (seconds={value.seconds}, nanos={value.nanos})"
        )
    if (value.seconds > 0 and value.nanos < 0) or (value.seconds < 0 and value.nanos > 0):
        raise InvalidArgument(
            f"{field} has seconds={value.seconds} and nanos={value.nanos} of opposite signs;"
            " both must have the same sign"
        )
    seconds = value.seconds + value.nanos / 1e9
    if seconds < 0:
        raise InvalidArgument(f"{field} must not be negative, got {seconds:g} s")
    return seconds


def check_lease_id(lease_id: str, field: str) -> bytes:
    """Return the digest of a well-formed lease ID from a request.

    Leases are looked up by this SHA-256 digest, never by the ID itself, so no code compares a
    presented ID with a stored one. A dictionary lookup that takes longer for a digest sharing a
    prefix with a stored digest reveals information about digests only, and inverting SHA-256 to
    turn that into bytes of a 128-bit ID is infeasible. So these lookups need no constant-time
    comparison, unlike the API key check (``hmac.compare_digest`` in ``_auth``).
    """
    if not lease_id:
        raise InvalidArgument(f"{field} is empty; pass the lease_id returned by Grant")
    if len(lease_id) > MAX_LEASE_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {len(lease_id)} characters long, over the maximum {MAX_LEASE_ID_LENGTH};"
            " pass the lease_id returned by Grant"
        )
    return lease_digest(lease_id)


def check_method(method: str) -> str:
    if not method:
        raise InvalidArgument('method is empty; pass the full method name, "/package.Service/Method"')
    if len(method) > MAX_METHOD_LENGTH or not method.startswith("/") or method.count("/") != 2:
        shown = method if len(method) <= 80 else method[:80] + "..."
        raise InvalidArgument(
            f'method {shown!r} is not a full method name; expected "/package.Service/Method"'
        )
    return method


# -- the servicer -------------------------------------------------------------


class UndecodableRequest:
    """Stands in for a request message that failed to parse.

    grpc.aio turns a deserializer exception into UNKNOWN, so the
    deserializer returns this instead and the handler rejects it with
    INVALID_ARGUMENT.
    """

    __slots__ = ("message_name", "error")

    def __init__(self, message_name: str, error: Exception) -> None:
        self.message_name = message_name
        self.error = error


def checked_request(request: Any) -> Any:
    """Return ``request``, or raise ``InvalidArgument`` for one that failed to parse."""
    if isinstance(request, UndecodableRequest):
        raise InvalidArgument(
            f"the request is not a valid serialized {request.message_name} ({request.error});"
            " send a message built from session_authority.proto"
        )
    return request


def _safe_deserializer(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def deserialize(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as exc:
            return UndecodableRequest(name, exc)

    return deserialize


def add_servicer_to_server(servicer: AuthorityServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated helper, but with deserializers that never raise."""
    service = pb.DESCRIPTOR.services_by_name["SessionAuthority"]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        if method.client_streaming and method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler
        elif method.server_streaming:
            make = grpc.unary_stream_rpc_method_handler
        elif method.client_streaming:
            make = grpc.stream_unary_rpc_method_handler
        else:
            make = grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=_safe_deserializer(request_class),
            response_serializer=response_class.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _rpc(handler: _Handler) -> _Handler:
    """Turn ``AuthorityError`` into a status and log unexpected errors, in one place."""

    @functools.wraps(handler)
    async def unary(self: AuthorityServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, checked_request(request), context)
        except AuthorityError as exc:
            await _abort(context, handler.__name__, exc)

    return unary  # type: ignore[return-value]


def _stream_rpc(handler: _Handler) -> _Handler:
    """Like ``_rpc`` for handlers that are async generators."""

    @functools.wraps(handler)
    async def streaming(self: AuthorityServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for response in handler(self, checked_request(request), context):
                yield response
        except AuthorityError as exc:
            await _abort(context, handler.__name__, exc)

    return streaming  # type: ignore[return-value]


async def _abort(context: grpc.aio.ServicerContext, rpc: str, exc: AuthorityError) -> None:
    logger.debug("%s rejected: %s: %s", rpc, exc.code.name, exc.details)
    if exc.trailing_metadata:
        context.set_trailing_metadata(exc.trailing_metadata)
    await context.abort(exc.code, exc.details)


_Result = TypeVar("_Result")


class _StoreReplies:
    """Delivery of store write results from the writer thread to the event loop, with one wake-up per burst.

    ``asyncio.wrap_future`` wakes the loop once per future, but the store
    settles all the futures of one commit together. This queues them and
    completes their loop futures in one callback. Cancelling a returned
    future, as a caller that gives up does, leaves the store write alone.

    Threading: :meth:`wait` runs on the event loop; the store calls the done
    callbacks on its writer thread.
    """

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._settled: list[tuple[asyncio.Future[Any], concurrent.futures.Future[Any]]] = []

    def wait(self, future: concurrent.futures.Future[_Result]) -> asyncio.Future[_Result]:
        """Return a future of the running loop that completes like ``future``."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        waiter: asyncio.Future[_Result] = self._loop.create_future()
        future.add_done_callback(functools.partial(self._on_settled, waiter))
        return waiter

    def _on_settled(self, waiter: asyncio.Future[Any], future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._settled.append((waiter, future))
            first = len(self._settled) == 1
        if not first:
            return
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            logger.debug("a store write finished after the event loop closed; its result is dropped")

    def _deliver(self) -> None:
        with self._lock:
            settled, self._settled = self._settled, []
        for waiter, future in settled:
            if waiter.done():
                continue
            if future.cancelled():
                waiter.cancel()
            elif future.exception() is not None:
                waiter.set_exception(future.exception())
            else:
                waiter.set_result(future.result())


class AuthorityServicer(pb_grpc.SessionAuthorityServicer):
    """Serves the wire contract over a lease table.

    Every handler runs on the server's event loop; table calls take
    microseconds and do not block. Store writes are awaited through futures.

    Args:
        table: The lease table.
        policy: Tiers, method rules and admins.
        authenticator: Decides who a caller is, for grants and admin calls.
        persistence: Store writes for grants, ends and activity.
        hub: Fan-out of ends to watchers.
        heartbeat_interval_seconds: Maximum silence on a watch stream.
        admin_everyone: Treat every authenticated caller as admin
            (insecure development mode only).
        limiter: Per-principal limits on live leases and grant rate; None
            grants without limits. It must be a listener of ``table``, so
            that ended leases free their slots.
        fetch_missing: Called with the digest of a lease that the table
            lacks, before a reply reports it as not found. It reads the
            lease from a shared store into the table and returns whether it
            found one. None (a store of this authority alone) skips it.
        end_reply_timeout_seconds: Maximum wait of a revoke for the store
            write of its end; None waits until the store settles the write.
    """

    def __init__(
        self,
        table: LeaseTable,
        policy: Policy,
        authenticator: Authenticator,
        persistence: Persistence,
        hub: WatchHub,
        *,
        heartbeat_interval_seconds: float = 1.0,
        admin_everyone: bool = False,
        limiter: PrincipalLimiter | None = None,
        fetch_missing: Callable[[bytes], Awaitable[bool]] | None = None,
        end_reply_timeout_seconds: float | None = None,
    ) -> None:
        self._table = table
        self._policy = policy
        self._authenticator = authenticator
        self._persistence = persistence
        self._hub = hub
        self._heartbeat_interval = heartbeat_interval_seconds
        self._admin_everyone = admin_everyone
        self._limiter = limiter
        self._fetch_missing = fetch_missing
        self._end_reply_timeout = end_reply_timeout_seconds
        self.grant_gate: Callable[[], str | None] = lambda: None
        self._store_replies = _StoreReplies()
        self._grant_replies = GrantReplies()
        self._auth_log_limit = LogLimit()
        self._watch_log_limit = LogLimit()

    # -- helpers ---------------------------------------------------------------

    def _authenticate(self, context: grpc.aio.ServicerContext, requested_principal: str = "") -> str:
        try:
            return self._authenticator.authenticate(caller_info_from_context(context), requested_principal)
        except AuthenticationError as exc:
            self._log_rejected_authentication(context.peer(), str(exc))
            raise Unauthenticated(str(exc)) from exc

    def _log_rejected_authentication(self, peer: str, reason: str) -> None:
        held_back = self._auth_log_limit.allow()
        if held_back is not None:
            limit = self._auth_log_limit
            logger.warning("authentication rejected from %s: %s%s", peer, reason, limit.note(held_back))

    def _is_admin(self, principal: str) -> bool:
        return self._admin_everyone or self._policy.is_admin(principal)

    async def _lookup(self, digest: bytes) -> LeaseSnapshot:
        """Describe a lease, reading it from a shared store when the table lacks it."""
        # NOTE: misses are not cached, so every unknown lease ID in a request
        # costs one read from the shared store.
        lease = self._table.lookup_digest(digest)
        if lease.state is LeaseState.NOT_FOUND and self._fetch_missing is not None and await self._fetch_missing(digest):
            lease = self._table.lookup_digest(digest)
        return lease

    async def _renew_fetching(
        self, entries: Sequence[pb.RenewEntry], field: str, *, strict: bool
    ) -> list[LeaseSnapshot]:
        """Renew a batch like ``_renew_entries``, reading leases the table lacks from a shared store first."""
        answers = self._renew_entries(entries, field, strict=strict)
        if self._fetch_missing is None:
            return answers
        missing = [
            index
            for index, answer in enumerate(answers)
            if answer.state is LeaseState.NOT_FOUND and 0 < len(entries[index].lease_id) <= MAX_LEASE_ID_LENGTH
        ]
        if not missing:
            return answers
        found = await asyncio.gather(*(self._fetch_missing(lease_digest(entries[i].lease_id)) for i in missing))
        again = [index for index, fetched in zip(missing, found) if fetched]
        if again:
            renewed = self._renew_entries([entries[i] for i in again], field, strict=strict)
            for index, answer in zip(again, renewed):
                answers[index] = answer
        return answers

    def _renew_entries(
        self, entries: Sequence[pb.RenewEntry], field: str, *, strict: bool
    ) -> list[LeaseSnapshot]:
        """Renew a batch and return the results in entry order.

        With ``strict`` a malformed entry fails the whole request. Without it
        (the shared KeepAlive stream, which carries many holders' leases) a
        malformed entry gets a not-found result and the others go through.
        """
        if len(entries) > MAX_RENEW_ENTRIES:
            raise InvalidArgument(
                f"{field} has {len(entries)} entries, over the maximum {MAX_RENEW_ENTRIES};"
                " split the renewals over several messages"
            )
        checked: list[tuple[bytes, float]] = []
        for index, entry in enumerate(entries):
            try:
                checked.append(
                    (
                        check_lease_id(entry.lease_id, f"{field}[{index}].lease_id"),
                        check_duration(entry.idle_for, f"{field}[{index}].idle_for"),
                    )
                )
            except InvalidArgument as exc:
                if strict:
                    raise
                logger.debug("keep-alive entry returned as not found: %s", exc.details)
                # An empty digest matches no lease.
                checked.append((b"", 0.0))
        answers = self._table.renew_many(checked)
        self._persistence.record_activity(answers)
        return answers

    # -- RPCs --------------------------------------------------------------

    @_rpc
    async def Grant(self, request: pb.GrantRequest, context: grpc.aio.ServicerContext) -> pb.GrantResponse:
        principal = self._authenticate(context, request.principal)
        try:
            tier = self._policy.tier(request.tier)
        except UnknownTierError as exc:
            raise InvalidArgument(str(exc)) from exc
        idle_timeout = tier.idle_timeout_seconds
        if request.HasField("idle_timeout"):
            requested = check_duration(request.idle_timeout, "idle_timeout")
            minimum = self._policy.bounds.min_idle_timeout_seconds
            if requested < minimum:
                raise InvalidArgument(
                    f"idle_timeout {requested:g} s is below the minimum {minimum:g} s;"
                    f" ask for at least {minimum:g} s or leave it unset for the tier's"
                    f" {idle_timeout:g} s"
                )
            idle_timeout = min(idle_timeout, requested)
        refusal = self.grant_gate()
        if refusal is not None:
            raise Unavailable(refusal)
        self._acquire_grant_slot(principal)

        lease_id, lease = self._table.grant(principal, tier.name, idle_timeout, tier.max_duration_seconds)
        try:
            # A caller that gives up cancels only this wait, never the store
            # write. The lease then stays granted, unclaimed, and idles out
            # like any lease whose reply was lost.
            await self._store_replies.wait(self._persistence.save_grant(lease))
        except asyncio.CancelledError:
            logger.debug("grant of lease %s cancelled by the caller; the unclaimed lease idles out", lease.fingerprint)
            raise
        except Exception as exc:
            self._table.discard(lease.digest)
            if self._limiter is not None:
                self._limiter.release(principal)
            logger.error("grant for %s in tier %s not stored: %s", principal, tier.name, exc)
            raise Unavailable(f"the lease could not be stored: {exc}; retry later") from exc
        # Grants are in the audit log; one INFO line per grant would dominate a burst.
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("granted lease %s to %s in tier %s", lease.fingerprint, principal, tier.name)
        return self._grant_replies.build(lease_id, lease)

    def _acquire_grant_slot(self, principal: str) -> None:
        if self._limiter is None:
            return
        try:
            self._limiter.acquire(principal)
        except LimitExceeded as exc:
            logger.info("grant for %s rejected: %s", principal, exc.details)
            milliseconds = max(1, math.ceil(exc.retry_after_seconds * 1000))
            raise ResourceExhausted(
                exc.details, trailing_metadata=((RETRY_AFTER_METADATA_KEY, str(milliseconds)),)
            ) from exc

    @_rpc
    async def Renew(self, request: pb.RenewRequest, context: grpc.aio.ServicerContext) -> pb.RenewResponse:
        answers = await self._renew_fetching(request.entries, "entries", strict=True)
        return pb.RenewResponse(leases=[lease_to_proto(a) for a in answers])

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        try:
            async for request in request_iterator:
                request = checked_request(request)
                answers = await self._renew_fetching(
                    request.entries, f"message {request.sequence}: entries", strict=False
                )
                yield pb.KeepAliveResponse(
                    sequence=request.sequence, leases=[lease_to_proto(a) for a in answers]
                )
        except AuthorityError as exc:
            await _abort(context, "KeepAlive", exc)

    @_rpc
    async def Revoke(self, request: pb.RevokeRequest, context: grpc.aio.ServicerContext) -> pb.RevokeResponse:
        target = request.WhichOneof("target")
        reason = EndReason.RELEASED if request.release else EndReason.REVOKED
        if target == "lease_id":
            digest = check_lease_id(request.lease_id, "lease_id")
        elif target == "fingerprint":
            digest = b""
        else:
            raise InvalidArgument("set exactly one of lease_id or fingerprint to name the lease to revoke")
        # The lease ID alone is not enough: a leaked ID must not let another principal end
        # the session. In insecure development mode every caller is admin, so any bearer may.
        revoked_by = self._authenticate(context)
        if target == "fingerprint":
            digest = self._resolve_fingerprint(request.fingerprint)
        current = await self._lookup(digest)
        if (
            current.state is not LeaseState.NOT_FOUND
            and current.principal != revoked_by
            and not self._is_admin(revoked_by)
        ):
            action = "release" if request.release else "revoke"
            logger.warning(
                "%s of lease %s of %s by %s rejected: not its principal and not an admin",
                action,
                current.fingerprint,
                current.principal,
                revoked_by,
            )
            raise PermissionDenied(
                f'principal "{revoked_by}" may not {action} lease {current.fingerprint} of'
                f' principal "{current.principal}": ending another principal\'s lease needs the'
                " admin permission (list the principal under admins in the policy)"
            )

        lease, already_ended = self._table.end(digest, reason, revoked_by=revoked_by)
        if lease.state is LeaseState.NOT_FOUND:
            return pb.RevokeResponse(lease=lease_to_proto(lease), already_ended=False)
        # A lease that an earlier revoke ended may still wait for its store
        # write. A repeated revoke waits for that same write, so that no reply
        # confirms an end that a restart could undo.
        try:
            claim = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(self._persistence.end_written(digest))), self._end_reply_timeout
            )
        except asyncio.TimeoutError as exc:
            logger.error("end of lease %s not stored within %g s", lease.fingerprint, self._end_reply_timeout)
            raise Unavailable(
                f"the lease ended on this replica, but etcd did not commit the end within"
                f" {self._end_reply_timeout:g} s, and other replicas accept the lease until it does."
                " The revoke is not confirmed: send it again until it succeeds"
            ) from exc
        except Exception as exc:
            logger.error("end of lease %s not stored: %s", lease.fingerprint, exc)
            raise Unavailable(
                f"the lease ended, but storing the end failed: {exc}. The revoke is not confirmed, and a"
                " restart of the authority would bring the lease back: send it again until it succeeds"
            ) from exc
        if isinstance(claim, EndClaim) and not claim.won:
            # Another replica had ended the lease first; its end is the one that counts.
            return pb.RevokeResponse(lease=lease_to_proto(self._table.lookup_digest(digest)), already_ended=True)
        if not already_ended:
            logger.info(
                "lease %s %s by %s", lease.fingerprint, "released" if request.release else "revoked", revoked_by
            )
        return pb.RevokeResponse(lease=lease_to_proto(lease), already_ended=already_ended)

    def _resolve_fingerprint(self, fingerprint: str) -> bytes:
        if len(fingerprint) != 12 or any(c not in "0123456789abcdef" for c in fingerprint):
            raise InvalidArgument(
                f"fingerprint {fingerprint[:40]!r} is not 12 lower-case hex characters;"
                " copy it from ListLeases or the audit log"
            )
        matches = self._table.find_by_fingerprint(fingerprint)
        if not matches:
            raise FailedPrecondition(
                f"no lease has fingerprint {fingerprint}: it may have ended and been purged, or be held by"
                " another authority; check it with ListLeases or the audit log"
            )
        if len(matches) > 1:
            raise FailedPrecondition(
                f"{len(matches)} leases share fingerprint {fingerprint}; revoke by lease_id instead"
            )
        return matches[0]

    @_rpc
    async def TimeToLive(
        self, request: pb.TimeToLiveRequest, context: grpc.aio.ServicerContext
    ) -> pb.TimeToLiveResponse:
        digest = check_lease_id(request.lease_id, "lease_id")
        return pb.TimeToLiveResponse(lease=lease_to_proto(await self._lookup(digest)))

    @_rpc
    async def ListLeases(
        self, request: pb.ListLeasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLeasesResponse:
        caller = self._authenticate(context)
        if request.principal != caller and not self._is_admin(caller):
            raise PermissionDenied(
                f'principal "{caller}" may only list its own leases (set principal to "{caller}");'
                " listing all leases needs the admin permission (list the principal under admins"
                " in the policy)"
            )
        page_size = request.page_size or DEFAULT_PAGE_SIZE
        if page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(f"page_size {page_size} is over the maximum {MAX_PAGE_SIZE}")
        after = b""
        if request.page_token:
            try:
                after = bytes.fromhex(request.page_token)
            except ValueError:
                after = b""
            if len(after) != 32:
                raise InvalidArgument("page_token is not a token returned by ListLeases; start over with an empty one")
        leases, next_key = self._table.list_live(
            principal=request.principal, tier=request.tier, after_digest=after, limit=page_size
        )
        return pb.ListLeasesResponse(leases=[lease_to_proto(a) for a in leases], next_page_token=next_key.hex())

    @_rpc
    async def Validate(self, request: pb.ValidateRequest, context: grpc.aio.ServicerContext) -> pb.ValidateResponse:
        digest = check_lease_id(request.lease_id, "lease_id")
        method = check_method(request.method)
        rule = self._policy.rule_for(method)
        lease = await self._lookup(digest)
        verdict, details = decide(lease, rule, request.caller_principal)
        response = pb.ValidateResponse(verdict=verdict, rule=rule_to_proto(rule), details=details)
        if lease.state is not LeaseState.NOT_FOUND:
            response.lease.CopyFrom(lease_to_proto(lease))
        return response

    @_stream_rpc
    async def WatchSessionEnds(
        self, request: pb.WatchSessionEndsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchSessionEndsResponse]:
        watcher = self._authenticate(context)
        if not self._admin_everyone and not self._policy.may_watch(watcher):
            held_back = self._watch_log_limit.allow()
            if held_back is not None:
                logger.warning(
                    "watch stream rejected for %s: not listed under watchers or admins in the policy%s",
                    watcher,
                    self._watch_log_limit.note(held_back),
                )
            raise PermissionDenied(
                f'principal "{watcher}" may not watch session ends, which name every principal\'s leases;'
                " list it under watchers (or admins) in the policy"
            )
        subscription, replay, reset = self._hub.subscribe(request.after_sequence, request.instance_id)
        logger.info("watch stream opened by %s (%d watching)", watcher, self._hub.subscriber_count)
        # Heartbeats carry the last sequence this stream has covered, so a
        # watcher that resumes after it misses no end. A resumed stream starts
        # from the watcher's own sequence, a new or reset one from the latest end.
        covered = request.after_sequence if request.after_sequence and not reset else self._hub.latest_sequence
        try:
            yield pb.WatchSessionEndsResponse(heartbeat=self._heartbeat(covered), reset=reset)
            for sequence, message in replay:
                yield pb.WatchSessionEndsResponse.FromString(message)
                covered = max(covered, sequence)
            queue = subscription.queue
            while True:
                try:
                    # wait_for wraps the get in a task of its own, so ends
                    # already queued (a burst of expiries) skip it.
                    if queue.qsize():
                        sequence, message = queue.get_nowait()
                    elif subscription.overflowed:
                        raise Unavailable(
                            "this watcher fell too far behind and ends were dropped after the last one sent;"
                            " reconnect with after_sequence to resume"
                        )
                    else:
                        sequence, message = await asyncio.wait_for(queue.get(), self._heartbeat_interval)
                except asyncio.TimeoutError:
                    yield pb.WatchSessionEndsResponse(heartbeat=self._heartbeat(covered))
                    continue
                yield pb.WatchSessionEndsResponse.FromString(message)
                covered = max(covered, sequence)
        finally:
            self._hub.unsubscribe(subscription)
            logger.info("watch stream closed by %s", watcher)

    def _heartbeat(self, sequence: int) -> pb.Heartbeat:
        return pb.Heartbeat(
            now=wall_to_timestamp(self._table.clock.wall()),
            sequence=sequence,
            interval=seconds_to_duration(self._heartbeat_interval),
            instance_id=self._hub.instance_id,
        )

    @_rpc
    async def Now(self, request: pb.NowRequest, context: grpc.aio.ServicerContext) -> pb.NowResponse:
        return pb.NowResponse(now=wall_to_timestamp(self._table.clock.wall()), instance_id=self._hub.instance_id)

    @_rpc
    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.GetPolicyResponse:
        tiers = [
            pb.Tier(
                name=t.name,
                idle_timeout=seconds_to_duration(t.idle_timeout_seconds),
                max_duration=seconds_to_duration(t.max_duration_seconds),
            )
            for t in self._policy.tiers.values()
        ]
        return pb.GetPolicyResponse(tiers=tiers, rules=[rule_to_proto(r) for r in self._policy.rules])


def decide(lease: LeaseSnapshot, rule: MethodRule, caller_principal: str) -> tuple[int, str]:
    """Return the verdict and details for a call under ``lease`` to a method with ``rule``."""
    if lease.state is LeaseState.NOT_FOUND:
        return pb.VERDICT_NOT_FOUND, "the lease is not known to the authority; grant a new lease"
    if lease.state is LeaseState.ENDED:
        reason = lease.end_reason.name.lower() if lease.end_reason is not None else "unknown"
        return pb.VERDICT_ENDED, f"the lease ended ({reason}); grant a new lease"
    if caller_principal and caller_principal != lease.principal:
        return (
            pb.VERDICT_PRINCIPAL_MISMATCH,
            f'the lease belongs to "{lease.principal}", not to the caller "{caller_principal}"',
        )
    if rule.tiers and lease.tier not in rule.tiers:
        return (
            pb.VERDICT_POLICY_DENIED,
            f'the method requires a lease in tier {", ".join(rule.tiers)}; this lease is in tier "{lease.tier}"',
        )
    if rule.max_session_age_seconds is not None and lease.age > rule.max_session_age_seconds:
        return (
            pb.VERDICT_POLICY_DENIED,
            f"the method requires a session younger than {rule.max_session_age_seconds:g} s;"
            f" this lease is {lease.age:.1f} s old; grant a new lease",
        )
    return pb.VERDICT_ALLOW, ""

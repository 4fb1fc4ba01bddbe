"""The lease holder: one session lease for a principal and tier, kept alive by real traffic.

Time model. The authority alone decides when a lease ends. The holder keeps a
conservative local deadline, ``sent_at + remaining - drift_margin``. Here
``sent_at`` is the local monotonic time just before the grant or renewal
request was sent. ``remaining`` is the lease's time to live from the reply,
capped by the time left before the max-duration cap. Because the authority
measured ``remaining`` no earlier than the request was sent, the local deadline
never falls after the authority's own. ``drift_margin`` covers clock rate
differences between the two machines: by default 2 % of the remaining time
plus 50 ms. When the local deadline passes without a successful renewal, the
session is over locally, without waiting to hear it from the authority.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Literal, NamedTuple

import grpc

from session_authority.clients._errors import AuthorityError, NotFound
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, LEASE_METADATA_KEY, EndReason
from session_authority.clients._types import GrantedLease, LeaseInfo, LeaseState

if TYPE_CHECKING:
    from session_authority.clients._client import AuthorityClient
    from session_authority.clients._keeper import LeaseKeeper
    from session_authority.interceptors._client import LeaseClientInterceptor
    from session_authority.interceptors._lease_channel import LeaseChannel

logger = logging.getLogger(__name__)

Clock = Callable[[], float]
EndPolicy = Literal["raise", "reauthenticate"]
EndCallback = Callable[[EndReason], Any]

DEFAULT_DRIFT_MARGIN_RATIO = 0.02
"""Share of the remaining time subtracted from every local deadline."""

DEFAULT_DRIFT_MARGIN_FIXED_SECONDS = 0.05
"""Fixed time subtracted from every local deadline, on top of the ratio."""

RETRY_BACKOFF_BASE_SECONDS = 0.05
"""Wait before the first retry of a failed renewal; it doubles with each failure."""

_END_POLICIES = ("raise", "reauthenticate")


def warn_release_skipped(fingerprint: str) -> None:
    """Log that ``close()`` cannot release a lease because its authority client is closed."""
    logger.warning(
        "lease %s not released: its authority client was closed first, so the lease ends at the"
        " authority by its idle timeout; close sessions before their authority client",
        fingerprint,
    )


class SessionEnded(Exception):
    """A call was attempted on a session whose lease has ended.

    The message ends with ``advice`` on what to do; by default, open a new
    session or switch to the ``reauthenticate`` policy.

    Attributes:
        reason: Why the lease ended.
        fingerprint: The loggable name of the ended lease, or None when the
            session never held one.
    """

    def __init__(self, reason: EndReason, fingerprint: str | None = None, advice: str | None = None) -> None:
        self.reason = reason
        self.fingerprint = fingerprint
        named = f"lease {fingerprint}" if fingerprint else "the session"
        if advice is None:
            advice = "open a new Session, or pass end_policy='reauthenticate' to grant a new lease on the next call"
        super().__init__(f"{named} ended ({reason.value}); {advice}")


class SessionState(str, enum.Enum):
    """Stage of a session's life."""

    PENDING = "pending"
    """No lease yet: the first call or ``open()`` grants one."""
    ALIVE = "alive"
    """A lease is held and its local deadline has not passed."""
    ENDED = "ended"
    """The lease ended; the end policy decides what the next call does."""
    CLOSED = "closed"
    """``close()`` was called; every later call raises :class:`SessionEnded`."""


def drift_margin_seconds(
    remaining_seconds: float,
    ratio: float = DEFAULT_DRIFT_MARGIN_RATIO,
    fixed_seconds: float = DEFAULT_DRIFT_MARGIN_FIXED_SECONDS,
) -> float:
    """Return the time subtracted from a local deadline: ``remaining * ratio + fixed``."""
    return remaining_seconds * ratio + fixed_seconds


def end_reason_from_trailer(value: str | bytes | None) -> EndReason | None:
    """Convert a ``session-end-reason`` trailer value; unknown values become ``UNKNOWN``."""
    if value is None:
        return None
    text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
    try:
        return EndReason(text)
    except ValueError:
        return EndReason.UNKNOWN


def end_reason_of_rejection(
    code: grpc.StatusCode | None, trailing_metadata: Any
) -> EndReason | None:
    """Return the end reason of a call rejected with UNAUTHENTICATED and a ``session-end-reason`` trailer.

    Returns:
        The reason, or None when the call was not such a rejection.
    """
    if code != grpc.StatusCode.UNAUTHENTICATED or not trailing_metadata:
        return None
    for key, value in trailing_metadata:
        if key == END_REASON_TRAILER_KEY:
            return end_reason_from_trailer(value)
    return None


class LeaseSnapshot(NamedTuple):
    """The parts of an alive lease that every call needs, read without a lock.

    A holder replaces its snapshot as a whole (one attribute assignment)
    when a renewal moves the local deadline, and drops it when the lease
    ends, so a reader never sees one field updated and another not.
    """

    lease_id: str
    """The lease ID, a bearer credential: never log it."""
    metadata: tuple[tuple[str, str]]
    """``((LEASE_METADATA_KEY, lease_id),)``: request metadata carrying only the lease."""
    local_deadline: float
    """Monotonic time after which the holder treats the lease as ended."""


class LeaseHolder:
    """The state of one granted lease: local deadline, activity, renewal progress and end.

    A session owns one holder per lease it grants; the keeper reads and
    updates holders from its thread. The state only moves from alive to
    ended, and the end callback runs exactly once, outside the lock, on the
    thread that observed the end.

    Threading: every method may be called from any thread. Reading
    :attr:`snapshot` and calling :meth:`mark_activity`, the two steps of
    every call, take no lock. The snapshot is one attribute holding an
    immutable tuple, replaced under the lock, so a lock-free read returns
    either the old or the new tuple. :meth:`mark_activity` writes one float,
    which the keeper reads under the lock. These reads and writes are atomic,
    and happen in program order, because CPython runs one bytecode at a time
    under the GIL.

    NOTE: free-threaded CPython builds (no GIL) were not tested. The
    ordering argument for the keeper's wake-up flag assumes the GIL.

    Args:
        granted: The grant reply.
        on_end: Called once with the holder and the reason when the lease ends.
        clock: Monotonic clock in the same time base as ``granted.sent_at_monotonic``.
        drift_margin_ratio: See :func:`drift_margin_seconds`.
        drift_margin_fixed_seconds: See :func:`drift_margin_seconds`.
    """

    def __init__(
        self,
        granted: GrantedLease,
        on_end: Callable[[LeaseHolder, EndReason], None],
        *,
        clock: Clock = time.monotonic,
        drift_margin_ratio: float = DEFAULT_DRIFT_MARGIN_RATIO,
        drift_margin_fixed_seconds: float = DEFAULT_DRIFT_MARGIN_FIXED_SECONDS,
    ) -> None:
        self.lease_id = granted.lease_id
        self.fingerprint = granted.lease.fingerprint
        self.digest = granted.lease.digest
        self.idle_timeout_seconds = granted.lease.idle_timeout_seconds
        self._on_end = on_end
        self._clock = clock
        self._margin_ratio = drift_margin_ratio
        self._margin_fixed = drift_margin_fixed_seconds
        self._lock = threading.Lock()
        self._end_reason: EndReason | None = None
        self._metadata: tuple[tuple[str, str]] = ((LEASE_METADATA_KEY, self.lease_id),)
        self._snapshot: LeaseSnapshot | None = None

        # The grant itself is activity at the authority, so the first
        # renewal is due a third of the idle timeout after it was sent.
        self._last_activity = granted.sent_at_monotonic
        self._covered_activity = granted.sent_at_monotonic
        # True while the keeper has found nothing to renew and sleeps without
        # a wake-up time for this lease, so the next activity must wake it.
        # Writers set _last_activity and then read this flag. The keeper sets
        # this flag and then reads _last_activity. Whichever runs second
        # reads the other's write, so no activity goes unnoticed.
        self._wake_on_activity = True
        self._last_renewal_sent = granted.sent_at_monotonic
        self._renewal_in_flight = False
        self._failures = 0
        self._next_retry_at = 0.0
        self._local_deadline = -math.inf
        self._deadline_is_cap = False
        if granted.lease.state is LeaseState.ALIVE:
            self._local_deadline, self._deadline_is_cap = self._deadline_from(
                granted.lease, granted.sent_at_monotonic
            )
            self._snapshot = LeaseSnapshot(self.lease_id, self._metadata, self._local_deadline)
        else:
            self._end_reason = granted.lease.end_reason or EndReason.UNKNOWN

    def _deadline_from(self, lease: LeaseInfo, sent_at: float) -> tuple[float, bool]:
        remaining = lease.ttl_seconds
        is_cap = lease.max_remaining_seconds <= remaining
        if is_cap:
            remaining = lease.max_remaining_seconds
        margin = drift_margin_seconds(remaining, self._margin_ratio, self._margin_fixed)
        return sent_at + remaining - margin, is_cap

    # -- reading -----------------------------------------------------------

    @property
    def snapshot(self) -> LeaseSnapshot | None:
        """The lease ID, its metadata and the local deadline; None once the lease has ended.

        Read without a lock. The deadline in it may have passed: compare it
        with the clock, and call :meth:`check_deadline` when it has.
        """
        return self._snapshot

    @property
    def end_reason(self) -> EndReason | None:
        """Why the lease ended, or None while it is alive."""
        with self._lock:
            return self._end_reason

    @property
    def ended(self) -> bool:
        """True once the lease has ended, locally or at the authority."""
        with self._lock:
            return self._end_reason is not None

    @property
    def local_deadline(self) -> float:
        """Monotonic time after which the holder treats the lease as ended."""
        with self._lock:
            return self._local_deadline

    @property
    def renewal_failures(self) -> int:
        """Renewals that failed in a row since the last successful one."""
        with self._lock:
            return self._failures

    def remaining_seconds(self) -> float:
        """Return the time left before the local deadline, or 0.0 once ended."""
        now = self._clock()
        self.check_deadline(now)
        with self._lock:
            if self._end_reason is not None:
                return 0.0
            return max(0.0, self._local_deadline - now)

    # -- activity and ends -------------------------------------------------------

    def mark_activity(self, now: float | None = None) -> bool:
        """Record that a call or stream message used the lease at ``now`` (default: the clock).

        Takes no lock, so every call and stream message can afford it.

        Returns:
            True when the keeper had found nothing to renew for this lease
            since this method last returned True, so it should be woken to
            look at the lease again.
        """
        if now is None:
            now = self._clock()
        # Write first, then read the flag (see _wake_on_activity in __init__).
        self._last_activity = now
        if not self._wake_on_activity:
            return False
        self._wake_on_activity = False
        return True

    def check_deadline(self, now: float | None = None) -> bool:
        """End the lease locally if its local deadline has passed.

        Returns:
            True when the lease has ended (now or before).
        """
        if now is None:
            now = self._clock()
        with self._lock:
            if self._end_reason is not None:
                return True
            if now < self._local_deadline:
                return False
            reason = self._local_end_reason()
            self._end_reason = reason
            self._snapshot = None
        self._notify_end(reason)
        return True

    def _local_end_reason(self) -> EndReason:
        if self._failures or self._renewal_in_flight:
            return EndReason.AUTHORITY_UNREACHABLE
        if self._deadline_is_cap:
            return EndReason.MAX_DURATION
        return EndReason.IDLE_TIMEOUT

    def end(self, reason: EndReason) -> bool:
        """Mark the lease ended for ``reason`` unless it already ended.

        Returns:
            True when this call ended it (and ran the end callback).
        """
        with self._lock:
            if self._end_reason is not None:
                return False
            self._end_reason = reason
            self._snapshot = None
        self._notify_end(reason)
        return True

    def _notify_end(self, reason: EndReason) -> None:
        logger.info("lease %s ended: %s", self.fingerprint, reason.value)
        try:
            self._on_end(self, reason)
        except Exception:
            logger.exception("end callback of lease %s failed", self.fingerprint)

    # -- renewal (called by the keeper) ----------------------------------------

    def renewal_due_at(self) -> float | None:
        """Return when the next renewal should be sent, or None when none is needed now.

        A renewal is needed only when activity happened since the last one
        that succeeded; it is due a third of the idle timeout after the
        previous one (the keeper may send it up to half that interval early,
        with other leases), or at the retry time after a failure. When none
        is needed, the next :meth:`mark_activity` returns True.
        """
        with self._lock:
            if self._end_reason is not None or self._renewal_in_flight:
                return None
            # Set the flag before reading _last_activity (see _wake_on_activity in __init__).
            self._wake_on_activity = True
            if self._last_activity <= self._covered_activity:
                return None
            self._wake_on_activity = False
            if self._failures:
                return self._next_retry_at
            return self._last_renewal_sent + self.idle_timeout_seconds / 3

    def begin_renewal(self, now: float) -> tuple[str, float, float] | None:
        """Mark a renewal as sent.

        Returns:
            ``(lease_id, idle_for_seconds, activity_time)`` for the batch, or
            None when the lease has ended. Pass ``activity_time`` back to
            :meth:`finish_renewal`.
        """
        with self._lock:
            if self._end_reason is not None:
                return None
            self._renewal_in_flight = True
            self._last_renewal_sent = now
            activity = self._last_activity
        return self.lease_id, max(0.0, now - activity), activity

    def finish_renewal(self, lease: LeaseInfo, sent_at: float, activity_time: float) -> None:
        """Apply the authority's reply to a renewal.

        A reply that arrives after the lease ended, or after its local
        deadline passed, changes nothing: the state never flips back to alive.
        """
        now = self._clock()
        if self.check_deadline(now):
            return
        with self._lock:
            if self._end_reason is not None:
                return
            self._renewal_in_flight = False
            if lease.state is LeaseState.ALIVE:
                self._failures = 0
                self._covered_activity = max(self._covered_activity, activity_time)
                deadline, is_cap = self._deadline_from(lease, sent_at)
                if deadline > self._local_deadline:
                    self._local_deadline, self._deadline_is_cap = deadline, is_cap
                    self._snapshot = LeaseSnapshot(self.lease_id, self._metadata, deadline)
                return
            reason = lease.end_reason or EndReason.UNKNOWN
            self._end_reason = reason
            self._snapshot = None
        self._notify_end(reason)

    def fail_renewal(self, error: BaseException) -> None:
        """Record a failed renewal and schedule a retry with exponential backoff and jitter.

        Retries go on until the local deadline passes; the keeper then ends
        the lease locally with reason ``authority_unreachable``.
        """
        now = self._clock()
        with self._lock:
            if self._end_reason is not None:
                return
            self._renewal_in_flight = False
            self._failures += 1
            cap = max(RETRY_BACKOFF_BASE_SECONDS, self.idle_timeout_seconds / 6)
            backoff = min(cap, RETRY_BACKOFF_BASE_SECONDS * 2 ** (self._failures - 1))
            self._next_retry_at = now + backoff * random.uniform(0.5, 1.0)
            failures = self._failures
        logger.debug(
            "renewal %d of lease %s failed: %s", failures, self.fingerprint, error
        )


class _SessionBase:
    """State and policy shared by :class:`Session` and ``AioSession``; only waiting differs."""

    def __init__(
        self,
        *,
        tier: str,
        principal: str,
        idle_timeout_seconds: float | None,
        on_end: EndCallback | None,
        end_policy: EndPolicy,
        watch: bool,
        keeper: LeaseKeeper | None,
        drift_margin_ratio: float,
        drift_margin_fixed_seconds: float,
        clock: Clock,
    ) -> None:
        if end_policy not in _END_POLICIES:
            raise ValueError(
                f"end_policy must be 'raise' or 'reauthenticate', got {end_policy!r}"
            )
        for name, value in (
            ("drift_margin_ratio", drift_margin_ratio),
            ("drift_margin_fixed_seconds", drift_margin_fixed_seconds),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                math.isfinite(value) and value >= 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if drift_margin_ratio >= 1:
            raise ValueError(
                f"drift_margin_ratio must be below 1 (a share of the remaining time), "
                f"got {drift_margin_ratio!r}"
            )
        if keeper is None:
            from session_authority.clients._keeper import LeaseKeeper

            keeper = LeaseKeeper.shared()
        self._tier = tier
        self._principal = principal
        self._idle_timeout_seconds = idle_timeout_seconds
        self._on_end = on_end
        self._end_policy = end_policy
        self._watch = watch
        self._keeper = keeper
        self._margin_ratio = float(drift_margin_ratio)
        self._margin_fixed = float(drift_margin_fixed_seconds)
        self._clock = clock
        self._state_lock = threading.Lock()
        self._holder: LeaseHolder | None = None
        self._closed = False
        # The holder while the session is open, None before the first grant
        # and after close. The call path reads this one attribute without the
        # state lock. Written under the state lock with _holder and _closed.
        self._open_holder: LeaseHolder | None = None

    # -- public reading ------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is in its life (see :class:`SessionState`)."""
        with self._state_lock:
            holder, closed = self._holder, self._closed
        if closed:
            return SessionState.CLOSED
        if holder is None:
            return SessionState.PENDING
        return SessionState.ENDED if holder.check_deadline() else SessionState.ALIVE

    @property
    def fingerprint(self) -> str | None:
        """The loggable name of the current (or last) lease, or None before the first grant."""
        with self._state_lock:
            return self._holder.fingerprint if self._holder is not None else None

    @property
    def lease_id(self) -> str | None:
        """The current lease ID, a bearer credential: never log it. None before the first grant."""
        with self._state_lock:
            return self._holder.lease_id if self._holder is not None else None

    @property
    def remaining_seconds(self) -> float | None:
        """Time left before the local deadline; 0.0 once ended, None before the first grant."""
        with self._state_lock:
            holder = self._holder
        return holder.remaining_seconds() if holder is not None else None

    @property
    def end_reason(self) -> EndReason | None:
        """Why the current lease ended (``released`` after close), or None while alive or pending."""
        with self._state_lock:
            holder = self._holder
        return holder.end_reason if holder is not None else None

    @property
    def keeper(self) -> LeaseKeeper:
        """The keeper that renews this session's lease."""
        return self._keeper

    def mark_activity(self) -> None:
        """Record activity without a call (the interceptors do this for every call and message).

        Takes no lock unless the keeper has to be woken.
        """
        holder = self._open_holder
        if holder is not None and holder.mark_activity():
            self._keeper.wake()

    # -- call path -----------------------------------------------------------

    def _lease_for_call_nowait(self, *, granted_for_this_call: bool = False) -> LeaseSnapshot | None:
        """Return the alive lease with activity marked, or None when a grant is needed first.

        While the lease is alive and its local deadline has not passed, this
        takes no lock: it reads the holder and its snapshot, one attribute
        each, and marks activity with one attribute write.

        Raises:
            SessionEnded: The session is closed, or the lease ended and the
                policy (or the one grant a call may make) forbids another grant.
        """
        holder = self._open_holder
        if holder is not None:
            snapshot = holder.snapshot
            if snapshot is not None:
                now = self._clock()
                if now < snapshot.local_deadline:
                    if holder.mark_activity(now):
                        self._keeper.wake()
                    return snapshot
        return self._lease_for_call_slow(granted_for_this_call)

    def _lease_for_call_slow(self, granted_for_this_call: bool) -> LeaseSnapshot | None:
        # No grant yet, the session is closed, the deadline passed or the lease ended.
        with self._state_lock:
            holder, closed = self._holder, self._closed
        if closed:
            raise SessionEnded(
                EndReason.RELEASED, holder.fingerprint if holder else None, "the session was closed; open a new Session"
            )
        if holder is None:
            return None
        if not holder.check_deadline():
            snapshot = holder.snapshot
            # None when another thread ended the lease since check_deadline().
            if snapshot is not None:
                if holder.mark_activity():
                    self._keeper.wake()
                return snapshot
        reason = holder.end_reason or EndReason.UNKNOWN
        if granted_for_this_call:
            raise SessionEnded(
                reason,
                holder.fingerprint,
                "the lease granted for this call ended before the call could use it; check the tier's idle"
                " timeout against the drift margin and the time a grant takes",
            )
        if self._end_policy == "raise":
            raise SessionEnded(reason, holder.fingerprint)
        return None

    def _needs_grant_locked(self) -> bool:
        # Called with the grant lock held: another caller may have granted already.
        with self._state_lock:
            if self._closed:
                return False
            return self._holder is None or self._holder.ended

    def _margin_error(self, granted: GrantedLease) -> ValueError | None:
        """Return the error to raise when the drift margin would end a new lease before its first use."""
        lease = granted.lease
        if lease.state is not LeaseState.ALIVE:
            return None
        remaining = min(lease.ttl_seconds, lease.max_remaining_seconds)
        margin = drift_margin_seconds(remaining, self._margin_ratio, self._margin_fixed)
        if margin < remaining:
            return None
        return ValueError(
            f"drift margin of {margin:.3f} s leaves no time of the {remaining:.3f} s lease of tier"
            f" {lease.tier!r} (drift_margin_ratio {self._margin_ratio!r} of it plus"
            f" drift_margin_fixed_seconds {self._margin_fixed!r}); lower the margin, or use a tier"
            " with a longer idle timeout"
        )

    def _install(self, granted: GrantedLease) -> LeaseHolder:
        holder = LeaseHolder(
            granted,
            self._holder_ended,
            clock=self._clock,
            drift_margin_ratio=self._margin_ratio,
            drift_margin_fixed_seconds=self._margin_fixed,
        )
        with self._state_lock:
            closed = self._closed
            if not closed:
                self._holder = holder
                self._open_holder = holder
        if closed:
            raise SessionEnded(EndReason.RELEASED, holder.fingerprint, "the session was closed; open a new Session")
        logger.debug(
            "session holds lease %s (tier %s, idle timeout %.3f s)",
            holder.fingerprint,
            granted.lease.tier,
            holder.idle_timeout_seconds,
        )
        self._register(holder)
        return holder

    def _register(self, holder: LeaseHolder) -> None:
        raise NotImplementedError

    def _holder_ended(self, holder: LeaseHolder, reason: EndReason) -> None:
        self._keeper.unregister(holder)
        self._dispatch_on_end(reason)

    def _dispatch_on_end(self, reason: EndReason) -> None:
        if self._on_end is not None:
            self._on_end(reason)

    def _report_rejection(self, lease_id: str, reason: EndReason) -> None:
        """Act on a call under ``lease_id`` rejected with a ``session-end-reason`` trailer."""
        if reason is EndReason.AUTHORITY_UNREACHABLE:
            # The enforcer could not confirm the lease; the authority may still
            # hold it, and the renewals tell the holder the truth.
            logger.debug("a call was rejected because the enforcer could not reach the authority")
            return
        with self._state_lock:
            holder = self._holder
        if holder is not None and holder.lease_id == lease_id:
            holder.end(reason)

    def _report_watched_end(self, digest: str, reason: EndReason) -> None:
        with self._state_lock:
            holder = self._holder
        if holder is not None and holder.digest == digest:
            holder.end(reason)

    def _begin_close(self) -> LeaseHolder | None:
        """Mark the session closed; return the holder whose lease must be released, if alive."""
        with self._state_lock:
            if self._closed:
                return None
            self._closed = True
            self._open_holder = None
            holder = self._holder
        if holder is None or holder.check_deadline():
            return None
        return holder

    def _grant_kwargs(self) -> dict[str, Any]:
        return {
            "tier": self._tier,
            "principal": self._principal,
            "idle_timeout_seconds": self._idle_timeout_seconds,
        }


class Session(_SessionBase):
    """Holds one session lease for a principal and tier, for blocking ``grpc`` channels.

    Use it through its interceptor::

        session = Session(AuthorityClient("authority:7000", api_key=key), tier="standard")
        channel = grpc.intercept_channel(grpc.insecure_channel(target), session.interceptor())

    The first call grants a lease (or :meth:`open` does, eagerly). Every call
    and stream message through the interceptor marks activity; the keeper
    renews in the background only while there is activity. The session learns
    of the end from the watch stream, a renewal reply, an UNAUTHENTICATED
    reply carrying ``session-end-reason``, or its own local deadline, and then
    calls ``on_end(reason)`` exactly once per lease.

    Sessions that share one :class:`AuthorityClient` share one ``KeepAlive``
    stream and one watch stream; create one client per authority and process.

    For tiers with idle timeouts of a few seconds, give the authority
    client's channel a reconnect backoff well below a third of the idle
    timeout (channel options ``grpc.initial_reconnect_backoff_ms`` and
    ``grpc.max_reconnect_backoff_ms``); gRPC's default starts at one second.

    Threading: every method and property may be used from any thread. The
    ``on_end`` callback runs on the thread that observed the end (a call's
    thread, a gRPC thread or the keeper's thread) and must not block.

    Args:
        client: The authority client used to grant, release and renew. The
            session does not close it.
        tier: The tier to ask for; empty lets the authority choose its default.
        principal: The principal to ask for, honoured only by an authority in
            insecure development mode.
        idle_timeout_seconds: Ask for a shorter idle timeout than the tier's.
        on_end: Called with the :class:`EndReason` when a lease ends, including
            ``released`` after :meth:`close`.
        end_policy: ``"raise"``: after an end, calls raise :class:`SessionEnded`.
            ``"reauthenticate"``: the next call grants a new lease (at most one
            grant per call).
        watch: Subscribe to the authority's session ends (one stream shared by
            the sessions of a client). Without it the session still learns of
            ends from renewals and rejected calls.
        keeper: The keeper that renews; defaults to the process-wide one.
        drift_margin_ratio: Share of the remaining time subtracted from each
            local deadline.
        drift_margin_fixed_seconds: Fixed time subtracted from each local deadline.
        clock: Monotonic clock; must share ``time.monotonic``'s time base,
            because grant and renewal replies carry readings of it.

    Raises:
        ValueError: ``end_policy`` or a drift margin is invalid.
        TypeError: ``client`` is an ``AioAuthorityClient``; use ``AioSession`` with it.
    """

    def __init__(
        self,
        client: AuthorityClient,
        *,
        tier: str = "",
        principal: str = "",
        idle_timeout_seconds: float | None = None,
        on_end: EndCallback | None = None,
        end_policy: EndPolicy = "raise",
        watch: bool = True,
        keeper: LeaseKeeper | None = None,
        drift_margin_ratio: float = DEFAULT_DRIFT_MARGIN_RATIO,
        drift_margin_fixed_seconds: float = DEFAULT_DRIFT_MARGIN_FIXED_SECONDS,
        clock: Clock = time.monotonic,
    ) -> None:
        from session_authority.clients._aio_client import AioAuthorityClient

        if isinstance(client, AioAuthorityClient):
            # Its methods return coroutines, which the first grant would fail on.
            raise TypeError(
                "Session needs a blocking AuthorityClient, got an AioAuthorityClient;"
                " use AioSession with an AioAuthorityClient, or Session with an AuthorityClient"
            )
        super().__init__(
            tier=tier,
            principal=principal,
            idle_timeout_seconds=idle_timeout_seconds,
            on_end=on_end,
            end_policy=end_policy,
            watch=watch,
            keeper=keeper,
            drift_margin_ratio=drift_margin_ratio,
            drift_margin_fixed_seconds=drift_margin_fixed_seconds,
            clock=clock,
        )
        self._client = client
        self._grant_lock = threading.Lock()

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Session lease={self.fingerprint} state={self.state.value}>"

    def open(self) -> Session:
        """Grant the lease now instead of on the first call; a no-op while a lease is alive.

        Raises:
            SessionEnded: The session is closed, or the lease ended under the ``raise`` policy.
            AuthorityError: The grant failed.
            ValueError: The drift margin is at least the granted lease's time
                to live; the lease was released.
        """
        self._lease_for_call()
        return self

    def interceptor(self) -> LeaseClientInterceptor:
        """Return an interceptor for ``grpc.intercept_channel`` that carries this session's lease."""
        from session_authority.interceptors._client import LeaseClientInterceptor

        return LeaseClientInterceptor(self)

    def channel(self, channel: grpc.Channel) -> LeaseChannel:
        """Return a channel over ``channel`` that carries this session's lease on every call.

        Calls behave as through ``grpc.intercept_channel(channel,
        self.interceptor())`` and cost less client CPU while the lease is
        alive (see :class:`~session_authority.interceptors.LeaseChannel`).
        Closing the returned channel closes ``channel``.
        """
        from session_authority.interceptors._lease_channel import LeaseChannel

        return LeaseChannel(channel, self)

    def _lease_for_call(self) -> LeaseSnapshot:
        snapshot = self._lease_for_call_nowait()
        if snapshot is not None:
            return snapshot
        with self._grant_lock:
            if self._needs_grant_locked():
                granted = self._client.grant(**self._grant_kwargs())
                error = self._margin_error(granted)
                if error is not None:
                    self._release_unused(granted)
                    raise error
                self._install(granted)
        snapshot = self._lease_for_call_nowait(granted_for_this_call=True)
        assert snapshot is not None
        return snapshot

    def _release_unused(self, granted: GrantedLease) -> None:
        try:
            self._client.revoke(granted.lease_id, release=True)
        except AuthorityError as exc:
            logger.warning("releasing unused lease %s failed: %s", granted.lease.fingerprint, exc)

    def _register(self, holder: LeaseHolder) -> None:
        from session_authority.clients._keeper import SyncLink

        self._keeper.register(
            holder,
            link_key=self._client,
            link_factory=lambda: SyncLink(self._client),
            on_watched_end=self._report_watched_end if self._watch else None,
        )

    def close(self) -> None:
        """Release the lease (end reason ``released``) and refuse later calls. Idempotent.

        A release the authority cannot receive is logged. So is a release not
        sent because the authority client was closed first. In both cases the
        lease ends at the authority by its idle timeout.
        """
        holder = self._begin_close()
        if holder is None:
            return
        try:
            if self._client.closed:
                warn_release_skipped(holder.fingerprint)
            else:
                self._client.revoke(holder.lease_id, release=True)
        except NotFound:
            logger.debug("lease %s was already gone at release", holder.fingerprint)
        except AuthorityError as exc:
            logger.warning("releasing lease %s failed: %s", holder.fingerprint, exc)
        finally:
            # The session is closed even when the release raised, so the lease
            # ends here too, which runs on_end and makes the keeper drop it.
            holder.end(EndReason.RELEASED)

"""The lease table: grants, renewals, ends and expiry, all by one clock."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import heapq
import logging
import math
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from ._clock import Clock

logger = logging.getLogger(__name__)

LEASE_ID_BYTES = 16
"""128 random bits per lease ID, encoded as 22 URL-safe characters."""

MAX_LEASE_ID_LENGTH = 256
"""Longer values are rejected before hashing; real lease IDs are 22 characters."""


class EndReason(enum.IntEnum):
    """Reason a lease ended; the values equal the wire enum ``EndReason``."""

    IDLE_TIMEOUT = 1
    MAX_DURATION = 2
    REVOKED = 3
    RELEASED = 4
    POLICY = 5


class LeaseState(enum.IntEnum):
    """State of a lease; the values equal the wire enum ``LeaseState``."""

    ALIVE = 1
    ENDED = 2
    NOT_FOUND = 3


def lease_digest(lease_id: str) -> bytes:
    """Return the SHA-256 of a lease ID, the only form the authority keeps."""
    return hashlib.sha256(lease_id.encode("utf-8", "surrogatepass")).digest()


def fingerprint_of(digest: bytes) -> str:
    """Return the loggable 12-hex-character name of a lease."""
    return digest[:6].hex()


class LeaseRecord:
    """One lease. Times are seconds on the table clock's monotonic scale.

    The record holds the SHA-256 of the lease ID, never the ID: a copy of the
    table or its store cannot be used to impersonate a holder.
    """

    __slots__ = (
        "digest",
        "principal",
        "tier",
        "idle_timeout",
        "max_duration",
        "granted_at",
        "granted_wall",
        "last_activity",
        "end_reason",
        "ended_at",
        "ended_wall",
        "revoked_by",
        "granted_here",
    )

    def __init__(
        self,
        digest: bytes,
        principal: str,
        tier: str,
        idle_timeout: float,
        max_duration: float,
        granted_at: float,
        granted_wall: float,
        last_activity: float,
    ) -> None:
        self.digest = digest
        self.principal = principal
        self.tier = tier
        self.idle_timeout = idle_timeout
        self.max_duration = max_duration
        self.granted_at = granted_at
        self.granted_wall = granted_wall
        self.last_activity = last_activity
        self.end_reason: EndReason | None = None
        self.ended_at: float | None = None
        self.ended_wall: float | None = None
        self.revoked_by = ""
        # False for a lease that another authority replica granted.
        self.granted_here = True

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.digest)

    @property
    def max_deadline(self) -> float:
        return self.granted_at + self.max_duration

    @property
    def idle_deadline(self) -> float:
        return self.last_activity + self.idle_timeout

    def deadline(self) -> tuple[float, EndReason]:
        """Return when the lease ends without further activity, and why."""
        idle = self.last_activity + self.idle_timeout
        cap = self.granted_at + self.max_duration
        if idle < cap:
            return idle, EndReason.IDLE_TIMEOUT
        return cap, EndReason.MAX_DURATION

    def wall_at(self, monotonic: float) -> float:
        """Convert a monotonic reading to wall time as measured from the grant."""
        return self.granted_wall + (monotonic - self.granted_at)


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseSnapshot:
    """A consistent copy of a lease at one instant, for replies and events.

    ``ttl`` and ``max_remaining`` are zero unless the lease is alive, and never
    negative.
    """

    state: LeaseState
    digest: bytes
    principal: str
    tier: str
    idle_timeout: float
    max_duration: float
    ttl: float
    max_remaining: float
    age: float
    idle_for: float
    granted_wall: float
    ended_wall: float | None
    end_reason: EndReason | None
    revoked_by: str
    # Monotonic readings of the table clock, for the store.
    granted_at: float = 0.0
    last_activity: float = 0.0

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.digest)

    @property
    def alive(self) -> bool:
        return self.state is LeaseState.ALIVE


NOT_FOUND = LeaseSnapshot(
    state=LeaseState.NOT_FOUND,
    digest=b"",
    principal="",
    tier="",
    idle_timeout=0.0,
    max_duration=0.0,
    ttl=0.0,
    max_remaining=0.0,
    age=0.0,
    idle_for=0.0,
    granted_wall=0.0,
    ended_wall=None,
    end_reason=None,
    revoked_by="",
)


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEnd:
    """A lease end as passed to listeners; ``sequence`` increases by one per end.

    Attributes:
        granted_here: False when another authority replica granted the lease.
        decided_elsewhere: True when another replica ended the lease and
            stored the end, so this replica neither stores nor audits it.
    """

    sequence: int
    lease: LeaseSnapshot
    ended_at: float
    granted_here: bool = True
    decided_elsewhere: bool = False


class TableListener(Protocol):
    """Receives grants and ends after the table lock is released.

    Calls come from whichever thread changed the table (an RPC handler, the
    expiry scheduler) and must return quickly without blocking: queue work
    elsewhere. Exceptions are logged and do not undo the change.
    """

    def on_grant(self, lease: LeaseSnapshot) -> None: ...

    def on_end(self, end: SessionEnd) -> None: ...


class LeaseTable:
    """All leases of one authority, keyed by the digest of their ID.

    Thread-safe: every method takes one lock, does dictionary and heap work
    only, and calls listeners after releasing it. Renewals never touch the
    expiry heap: each live lease has exactly one heap entry, and an entry that
    comes due early is pushed again at the lease's current deadline.

    Args:
        clock: Source of monotonic and wall time.
        ended_retention_seconds: How long an ended lease is still reported as
            ended (with its reason) before it reads as not found.
        token_bytes: Random bytes per lease ID.
    """

    def __init__(
        self,
        clock: Clock,
        *,
        ended_retention_seconds: float = 3600.0,
        token_bytes: int = LEASE_ID_BYTES,
    ) -> None:
        self.clock = clock
        self.ended_retention_seconds = ended_retention_seconds
        self._token_bytes = token_bytes
        self._lock = threading.Lock()
        self._live: dict[bytes, LeaseRecord] = {}
        # Ended records in end order, so expired tombstones pop from the front.
        self._ended: dict[bytes, LeaseRecord] = {}
        self._heap: list[tuple[float, bytes]] = []
        self._sequence = 0
        self._listeners: list[TableListener] = []
        self._deadline_changed: Callable[[float], None] | None = None
        # Leases whose idle end waits until _hold_until (see hold_idle_ends).
        self._held_digests: set[bytes] = set()
        self._hold_until = -math.inf
        # Held leases that came due while the hold had no end yet; they get heap entries when it does.
        self._held_waiting: list[bytes] = []

    # -- configuration -----------------------------------------------------

    def add_listener(self, listener: TableListener) -> None:
        """Register a listener for grants and ends (not thread-safe with calls in flight)."""
        self._listeners.append(listener)

    def on_earlier_deadline(self, callback: Callable[[float], None]) -> None:
        """Set the callback that wakes the expiry scheduler for a new earliest deadline."""
        self._deadline_changed = callback

    # -- queries -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    @property
    def sequence(self) -> int:
        """The sequence number of the latest end."""
        return self._sequence

    def next_deadline(self) -> float | None:
        """Return the earliest heap entry's time, or None when no lease lives."""
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def lookup(self, lease_id: str) -> LeaseSnapshot:
        """Describe a lease without counting as activity."""
        return self.lookup_digest(lease_digest(lease_id))

    def lookup_digest(self, digest: bytes) -> LeaseSnapshot:
        """Describe a lease by the digest of its ID."""
        with self._lock:
            now = self.clock.monotonic()
            record, ended = self._resolve(digest, now)
            snapshot = self._snapshot(record, now) if record else NOT_FOUND
        self._notify_ends(ended)
        return snapshot

    def find_by_fingerprint(self, fingerprint: str) -> list[bytes]:
        """Return the digests of live and retained leases whose fingerprint matches.

        This scans every lease: it serves operator commands, not calls.
        """
        try:
            prefix = bytes.fromhex(fingerprint)
        except ValueError:
            return []
        with self._lock:
            found = [d for d in self._live if d.startswith(prefix)]
            found += [d for d in self._ended if d.startswith(prefix)]
        return found

    def list_live(
        self,
        *,
        principal: str = "",
        tier: str = "",
        after_digest: bytes = b"",
        limit: int = 100,
    ) -> tuple[list[LeaseSnapshot], bytes]:
        """Return one page of live leases ordered by digest, and the last digest.

        The returned digest is the key to pass as ``after_digest`` for the next
        page; it is empty on the last page.
        """
        with self._lock:
            now = self.clock.monotonic()
            candidates: Iterator[LeaseRecord] = (
                r
                for d, r in self._live.items()
                if d > after_digest
                and (not principal or r.principal == principal)
                and (not tier or r.tier == tier)
            )
            page = heapq.nsmallest(limit + 1, candidates, key=lambda r: r.digest)
            more = len(page) > limit
            page = page[:limit]
            snapshots = [self._snapshot(r, now) for r in page]
        next_key = page[-1].digest if more and page else b""
        return snapshots, next_key

    # -- changes -----------------------------------------------------------

    def grant(
        self,
        principal: str,
        tier: str,
        idle_timeout: float,
        max_duration: float,
    ) -> tuple[str, LeaseSnapshot]:
        """Create a lease and return its ID and state.

        The caller has already checked the tier and bounds.
        """
        lease_id = secrets.token_urlsafe(self._token_bytes)
        digest = lease_digest(lease_id)
        with self._lock:
            now = self.clock.monotonic()
            record = LeaseRecord(
                digest=digest,
                principal=principal,
                tier=tier,
                idle_timeout=idle_timeout,
                max_duration=max_duration,
                granted_at=now,
                granted_wall=self.clock.wall(),
                last_activity=now,
            )
            self._live[digest] = record
            deadline = self._push(record)
            snapshot = self._snapshot(record, now)
        self._deadline_pushed(deadline)
        for listener in self._listeners:
            _call_listener(listener.on_grant, snapshot)
        return lease_id, snapshot

    def discard(self, digest: bytes) -> None:
        """Forget a lease whose grant was never acknowledged (its store write failed).

        No end is reported, because no holder ever received the lease ID.
        """
        with self._lock:
            self._live.pop(digest, None)

    def restore(self, record: LeaseRecord) -> None:
        """Insert a lease loaded from the store; an ended record becomes a tombstone."""
        with self._lock:
            if record.end_reason is None:
                self._live[record.digest] = record
                deadline = self._push(record)
            else:
                self._ended[record.digest] = record
                deadline = None
        if deadline is not None:
            self._deadline_pushed(deadline)

    def mirror_stored(self, record: LeaseRecord, arrived_at: float) -> bool:
        """Add or update a lease that another authority replica stored; return whether it is new and live here.

        ``record`` carries the stored times converted to this table's clock.
        The table takes the earlier of each and ``arrived_at``, so a replica
        whose clock runs ahead cannot make a lease live longer here, and last
        activity only moves forward. Listeners are not called: the grant is
        the granting replica's to report.
        """
        record.granted_at = min(record.granted_at, arrived_at)
        record.last_activity = min(record.last_activity, arrived_at)
        deadline: float | None = None
        with self._lock:
            live = self._live.get(record.digest)
            if live is not None:
                if record.last_activity > live.last_activity:
                    live.last_activity = record.last_activity
            elif record.digest not in self._ended:
                self._live[record.digest] = record
                deadline = self._push(record)
        if deadline is not None:
            self._deadline_pushed(deadline)
        return deadline is not None

    def mirror_ended(self, record: LeaseRecord, arrived_at: float) -> None:
        """End a lease because another authority replica stored its end.

        ``record`` carries the stored end, times converted to this table's
        clock. A live lease ends with that reason and revoking principal, and
        listeners receive a ``SessionEnd`` with ``decided_elsewhere`` set. A
        lease that already ended here takes the stored reason (the end that
        counts is the one in the store). An unknown lease becomes a tombstone.
        """
        assert record.end_reason is not None and record.ended_at is not None
        ended_at = min(record.ended_at, arrived_at)
        ended: list[SessionEnd] = []
        with self._lock:
            live = self._live.get(record.digest)
            tombstone = self._ended.get(record.digest)
            if live is not None:
                ended.append(
                    self._end_locked(
                        live,
                        record.end_reason,
                        ended_at,
                        record.revoked_by,
                        ended_wall=record.ended_wall,
                        decided_elsewhere=True,
                    )
                )
            elif tombstone is not None:
                tombstone.end_reason = record.end_reason
                tombstone.revoked_by = record.revoked_by
                tombstone.ended_wall = record.ended_wall
            else:
                record.ended_at = ended_at
                record.granted_at = min(record.granted_at, ended_at)
                self._ended[record.digest] = record
        self._notify_ends(ended)

    def hold_idle_ends(self) -> int:
        """Hold back the idle ends of every lease now in the table until :meth:`end_hold` gives the hold an end.

        After a restart, enforcers report the activity they saw while the
        authority was away only once they have reconnected. Until then the
        stored last activity of an active lease is too old, and the lease
        would end by idle timeout while it is in use. A held lease whose idle
        deadline has passed stays alive, with a ``ttl`` that runs to the end
        of the hold. A renewal may then record activity only from before
        that deadline: a lease cannot come back once it idled out.
        When the hold ends, each held lease that no such activity moved past
        its deadline ends, dated at its deadline. Max-duration ends, revokes
        and releases are never held.

        Returns:
            The number of leases held.
        """
        with self._lock:
            self._held_digests = set(self._live)
            self._hold_until = math.inf
            return len(self._held_digests)

    def end_hold(self, after_seconds: float) -> int:
        """End the hold of :meth:`hold_idle_ends` ``after_seconds`` from now, or at once for 0.

        Returns:
            How many held leases were past their idle deadline; with 0 they have ended on return.
        """
        with self._lock:
            now = self.clock.monotonic()
            until = now + max(0.0, after_seconds)
            self._hold_until = until
            waiting, self._held_waiting = self._held_waiting, []
            for digest in waiting:
                record = self._live.get(digest)
                if record is not None:
                    heapq.heappush(self._heap, (min(until, record.max_deadline), digest))
            due = 0
            for digest in self._held_digests:
                record = self._live.get(digest)
                if record is not None and record.deadline()[0] <= now:
                    due += 1
        self._deadline_pushed(until)
        if until <= now:
            self.expire_due()
        return due

    def renew(self, lease_id: str, idle_for: float) -> LeaseSnapshot:
        """Record activity seen ``idle_for`` seconds ago; see ``renew_digest``."""
        return self.renew_digest(lease_digest(lease_id), idle_for)

    def renew_digest(self, digest: bytes, idle_for: float) -> LeaseSnapshot:
        """Record activity on a lease seen ``idle_for`` seconds ago.

        The idle deadline becomes ``now - idle_for + idle_timeout`` unless it is
        already later; it never passes the max deadline. A lease whose deadline
        has passed ends here, before the scheduler gets to it, so a renewal
        never returns alive after the deadline.
        """
        idle_for = max(0.0, idle_for)
        with self._lock:
            now = self.clock.monotonic()
            record, ended = self._resolve(digest, now)
            if record is not None and record.end_reason is None:
                self._record_activity(record, now - idle_for, now)
            snapshot = self._snapshot(record, now) if record else NOT_FOUND
        self._notify_ends(ended)
        return snapshot

    def renew_many(self, entries: Iterable[tuple[bytes, float]]) -> list[LeaseSnapshot]:
        """Renew several leases under one lock acquisition; results are in entry order."""
        answers: list[LeaseSnapshot] = []
        ended: list[SessionEnd] = []
        with self._lock:
            now = self.clock.monotonic()
            for digest, idle_for in entries:
                record, ended_now = self._resolve(digest, now)
                ended.extend(ended_now)
                if record is not None and record.end_reason is None:
                    self._record_activity(record, now - max(0.0, idle_for), now)
                answers.append(self._snapshot(record, now) if record else NOT_FOUND)
        self._notify_ends(ended)
        return answers

    def end(
        self,
        digest: bytes,
        reason: EndReason,
        *,
        revoked_by: str = "",
    ) -> tuple[LeaseSnapshot, bool]:
        """End a lease now (revoke or release).

        Returns:
            The lease's state and whether it had already ended. An already
            ended lease keeps its first reason: a lease ends exactly once.
        """
        with self._lock:
            now = self.clock.monotonic()
            record, ended = self._resolve(digest, now)
            if record is None:
                snapshot, already = NOT_FOUND, False
            elif record.end_reason is not None:
                snapshot, already = self._snapshot(record, now), True
            else:
                ended.append(self._end_locked(record, reason, now, revoked_by))
                snapshot, already = self._snapshot(record, now), False
        self._notify_ends(ended)
        return snapshot, already

    def expire_due(self) -> int:
        """End every lease whose deadline has passed; return how many ended.

        The expiry scheduler calls this when the earliest deadline comes due;
        tests with a manual clock call it after advancing time.
        """
        ended: list[SessionEnd] = []
        with self._lock:
            now = self.clock.monotonic()
            heap = self._heap
            while heap and heap[0][0] <= now:
                _, digest = heapq.heappop(heap)
                record = self._live.get(digest)
                if record is None:
                    continue
                deadline, reason = record.deadline()
                if deadline > now:
                    heapq.heappush(heap, (deadline, digest))
                    continue
                if self._holds(record, now):
                    if self._hold_until == math.inf:
                        self._held_waiting.append(digest)
                    else:
                        heapq.heappush(heap, (min(self._hold_until, record.max_deadline), digest))
                    continue
                ended.append(self._end_locked(record, reason, deadline, ""))
            if self._held_digests and now >= self._hold_until:
                self._held_digests = set()
            self._purge_tombstones(now)
        self._notify_ends(ended)
        return len(ended)

    # -- internals (lock held) --------------------------------------------

    def _resolve(self, digest: bytes, now: float) -> tuple[LeaseRecord | None, list[SessionEnd]]:
        record = self._live.get(digest)
        if record is not None:
            deadline, reason = record.deadline()
            if deadline <= now and not self._holds(record, now):
                return record, [self._end_locked(record, reason, deadline, "")]
            return record, []
        record = self._ended.get(digest)
        if record is not None and record.ended_at is not None:
            if now - record.ended_at > self.ended_retention_seconds:
                return None, []
        return record, []

    def _holds(self, record: LeaseRecord, now: float) -> bool:
        """Tell whether the hold keeps ``record`` alive past its idle deadline, which has passed."""
        return now < self._hold_until and record.max_deadline > now and record.digest in self._held_digests

    def _record_activity(self, record: LeaseRecord, seen_at: float, now: float) -> None:
        if seen_at <= record.last_activity:
            return
        idle_deadline = record.last_activity + record.idle_timeout
        if idle_deadline <= now and seen_at > idle_deadline:
            # A held lease that idled out: only activity from before its
            # deadline counts, because nothing after it can bring it back.
            return
        record.last_activity = seen_at

    def _push(self, record: LeaseRecord) -> float:
        deadline = record.deadline()[0]
        heapq.heappush(self._heap, (deadline, record.digest))
        return deadline

    def _end_locked(
        self,
        record: LeaseRecord,
        reason: EndReason,
        at: float,
        revoked_by: str,
        *,
        ended_wall: float | None = None,
        decided_elsewhere: bool = False,
    ) -> SessionEnd:
        record.end_reason = reason
        record.ended_at = at
        record.ended_wall = ended_wall if ended_wall is not None else record.wall_at(at)
        record.revoked_by = revoked_by
        del self._live[record.digest]
        self._ended[record.digest] = record
        self._sequence += 1
        # The heap entry stays behind and is skipped when it comes due.
        return SessionEnd(
            self._sequence,
            self._snapshot(record, at),
            at,
            granted_here=record.granted_here,
            decided_elsewhere=decided_elsewhere,
        )

    def _purge_tombstones(self, now: float) -> None:
        horizon = now - self.ended_retention_seconds
        ended = self._ended
        while ended:
            digest = next(iter(ended))
            ended_at = ended[digest].ended_at
            if ended_at is not None and ended_at >= horizon:
                break
            del ended[digest]

    def _snapshot(self, record: LeaseRecord, now: float) -> LeaseSnapshot:
        if record.end_reason is None:
            deadline, _ = record.deadline()
            if deadline <= now:
                # Held past its idle deadline: alive until the hold ends at the latest.
                deadline = min(self._hold_until, record.max_deadline)
            return LeaseSnapshot(
                state=LeaseState.ALIVE,
                digest=record.digest,
                principal=record.principal,
                tier=record.tier,
                idle_timeout=record.idle_timeout,
                max_duration=record.max_duration,
                ttl=max(0.0, deadline - now),
                max_remaining=max(0.0, record.max_deadline - now),
                age=max(0.0, now - record.granted_at),
                idle_for=max(0.0, now - record.last_activity),
                granted_wall=record.granted_wall,
                ended_wall=None,
                end_reason=None,
                revoked_by="",
                granted_at=record.granted_at,
                last_activity=record.last_activity,
            )
        ended_at = record.ended_at if record.ended_at is not None else now
        return LeaseSnapshot(
            state=LeaseState.ENDED,
            digest=record.digest,
            principal=record.principal,
            tier=record.tier,
            idle_timeout=record.idle_timeout,
            max_duration=record.max_duration,
            ttl=0.0,
            max_remaining=0.0,
            age=max(0.0, ended_at - record.granted_at),
            idle_for=max(0.0, ended_at - record.last_activity),
            granted_wall=record.granted_wall,
            ended_wall=record.ended_wall,
            end_reason=record.end_reason,
            revoked_by=record.revoked_by,
            granted_at=record.granted_at,
            last_activity=record.last_activity,
        )

    # -- internals (lock released) ------------------------------------------

    def _deadline_pushed(self, deadline: float) -> None:
        callback = self._deadline_changed
        if callback is not None:
            callback(deadline)

    def _notify_ends(self, ended: list[SessionEnd]) -> None:
        for end in ended:
            logger.debug(
                "lease %s ended: %s", end.lease.fingerprint, end.lease.end_reason.name if end.lease.end_reason else "?"
            )
            for listener in self._listeners:
                _call_listener(listener.on_end, end)


def _call_listener(method: Callable[[object], None], argument: object) -> None:
    try:
        method(argument)
    except Exception:  # noqa: BLE001 - a listener must not undo a committed change
        logger.exception("lease table listener %r failed", method)

"""Lease table listener that writes grants, revokes and ends to the audit log and to OpenTelemetry."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import Callable, Container, Iterable

from opentelemetry import context as otel_context
from opentelemetry import trace

from ._audit import AuditReceipt, AuditSink, utc_isoformat
from ._etcd_store import EndClaim
from ._store import StoredLease
from ._table import EndReason, LeaseSnapshot, LeaseState, SessionEnd
from ._telemetry import SessionTelemetry, end_reason_name

logger = logging.getLogger(__name__)

WALL_CLOCK_STEP_MARGIN_SECONDS = 300.0
"""How far the wall clock may have been stepped back between an event and its record."""

_Event = tuple[str, str, dict[str, object]]
"""An audit event as ``AuditSink.submit`` takes it: event ID, type and fields."""

_Owed = tuple[_Event, Callable[[AuditReceipt], None] | None, LeaseSnapshot, float]
"""An event owed by a stored lease, its ``on_written`` callback, the lease, and the wall time of the event."""


def grant_event(lease: LeaseSnapshot) -> tuple[str, str, dict[str, object]]:
    """Return the event ID, type and fields of a lease's ``grant`` audit record."""
    return f"grant:{lease.digest.hex()}", "grant", {
        "fingerprint": lease.fingerprint,
        "principal": lease.principal,
        "tier": lease.tier,
        "granted_at": utc_isoformat(lease.granted_wall),
        "idle_timeout_seconds": lease.idle_timeout,
        "max_duration_seconds": lease.max_duration,
    }


def revoke_event(lease: LeaseSnapshot) -> tuple[str, str, dict[str, object]]:
    """Return the event ID, type and fields of a revoked lease's ``revoke`` audit record."""
    ended_wall = lease.ended_wall if lease.ended_wall is not None else lease.granted_wall + lease.age
    return f"revoke:{lease.digest.hex()}", "revoke", {
        "fingerprint": lease.fingerprint,
        "principal": lease.principal,
        "tier": lease.tier,
        "revoked_by": lease.revoked_by,
        "revoked_at": utc_isoformat(ended_wall),
    }


def end_event(lease: LeaseSnapshot) -> tuple[str, str, dict[str, object]]:
    """Return the event ID, type and fields of a lease's ``end`` audit record.

    ``duration_seconds`` is the lease's age at its end on the authority's
    monotonic clock, so a wall-clock step between grant and end does not
    change it. ``granted_at`` and ``ended_at`` are wall times for people.
    """
    ended_wall = lease.ended_wall if lease.ended_wall is not None else lease.granted_wall + lease.age
    return f"end:{lease.digest.hex()}", "end", {
        "fingerprint": lease.fingerprint,
        "principal": lease.principal,
        "tier": lease.tier,
        "reason": end_reason_name(lease),
        "granted_at": utc_isoformat(lease.granted_wall),
        "ended_at": utc_isoformat(ended_wall),
        "duration_seconds": round(lease.age, 6),
        "revoked_by": lease.revoked_by or None,
    }


def snapshot_of_stored(row: StoredLease) -> LeaseSnapshot:
    """Describe a stored row for the audit log.

    Store times are authority time, so ``age`` (the duration) is the
    difference of two readings on one monotonic scale.
    """
    ended = row.ended_at is not None
    reason: EndReason | None = None
    if ended:
        reason = EndReason(row.end_reason) if row.end_reason else EndReason.REVOKED
    age = (row.ended_at if row.ended_at is not None else row.granted_at) - row.granted_at
    return LeaseSnapshot(
        state=LeaseState.ENDED if ended else LeaseState.ALIVE,
        digest=row.digest,
        principal=row.principal,
        tier=row.tier,
        idle_timeout=row.idle_timeout,
        max_duration=row.max_duration,
        ttl=0.0,
        max_remaining=0.0,
        age=max(0.0, age),
        idle_for=0.0,
        granted_wall=row.granted_wall,
        ended_wall=row.ended_wall,
        end_reason=reason,
        revoked_by=row.revoked_by,
    )


@dataclasses.dataclass
class _PendingGrant:
    """A grant whose store write has not settled, and the ends that wait for it."""

    lease: LeaseSnapshot
    span: trace.Span | None
    waiting_ends: list[_SeenEnd] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _SeenEnd:
    end: SessionEnd
    parent: otel_context.Context
    seen_ns: int


class SessionRecorder:
    """Turns lease table events into audit records and OpenTelemetry spans and metrics.

    Audit: a ``grant`` record once the grant is stored, a ``revoke`` record
    for a revoke, and exactly one ``end`` record per end, queued on the
    :class:`AuditSink`, which retries a failed write until it lands. Ends are
    queued in the table's end order (``SessionEnd.sequence``), whichever
    threads report them. An end of a lease whose grant write has not settled
    waits for it, so the grant record comes first. With
    ``ends_wait_for_store`` an end's records also wait until the lease
    store's write of that end has settled (:meth:`end_settled`), so a crash
    cannot leave an ``end`` record for a lease that the store still has as
    live. Nothing here waits for the disk, so leases end on time while the
    audit log is failing.

    Telemetry: the ``session.end`` span is emitted from the sink's
    ``on_written`` callback, so it carries the record's seq and hash. Without
    a sink it is emitted at once.

    Threading: ``on_grant`` and ``on_end`` come from whichever thread changed
    the table, ``grant_settled`` from the thread that completes the store
    write. All return without blocking on I/O.

    Args:
        sink: The audit sink, or None to keep no audit log.
        telemetry: Spans and metrics.
        first_sequence: Sequence number of the next end the table reports
            (``table.sequence + 1`` when the recorder is attached).
        ends_wait_for_store: Hold each end's records until
            :meth:`end_settled` reports the store write of that end. Set it
            only when the store calls :meth:`end_settled` for every end;
            otherwise end records are never written.
    """

    def __init__(
        self,
        sink: AuditSink | None,
        telemetry: SessionTelemetry,
        first_sequence: int,
        *,
        ends_wait_for_store: bool = False,
    ) -> None:
        self.sink = sink
        self.telemetry = telemetry
        self._lock = threading.Lock()
        self._next_sequence = first_sequence
        self._out_of_order: dict[int, _SeenEnd] = {}
        self._pending_grants: dict[bytes, _PendingGrant] = {}
        self._ends_wait_for_store = ends_wait_for_store
        # Ends in the order they were released, waiting for their store write.
        self._awaiting_store: collections.deque[_SeenEnd] = collections.deque()
        # Digests whose end write settled before or after the end was released.
        self._store_settled: set[bytes] = set()
        # Digests whose end another replica claimed in the shared store first.
        self._claims_lost: set[bytes] = set()
        self.end_recorded: Callable[[bytes], None] | None = None
        """Called with a lease's digest once its end record is durable (or at once without an audit log)."""

    # -- start-up ---------------------------------------------------------

    def resubmit_stored(
        self,
        rows: Iterable[StoredLease],
        *,
        skip_grant_records: Container[bytes] = (),
        chain_start_time: float | None = None,
    ) -> int:
        """Queue the grant, revoke and end records of leases loaded from the store.

        A crash can lose records that were queued but not written, while the
        store already contains the grant or end. The log skips event IDs it
        already contains, so only the missing records are written. An ``end`` record
        written now gets its ``session.end`` span now, without a link. Call
        before the table reports any end, so these records come first.

        A lease granted before the current chain started has its grant
        record in an earlier chain (or in none, if the log was off), so it
        gets none here. Its end records are still written, because the store
        cannot show whether the earlier chain got them before it was closed,
        and an end must never be lost. ``audit verify OLD NEW`` lists an end
        found in both chains.

        Args:
            rows: Leases whose records this authority owes: a live row gets
                its grant record, an ended row its end records as well.
            skip_grant_records: Digests whose grant record another replica
                owes, because it granted the lease.
            chain_start_time: Authority time at which the audit chain
                started (:meth:`AuditLog.chain_start_time`), or None when it
                is unknown and every row gets its grant record.

        Returns:
            The number of rows whose records were queued.
        """
        if self.sink is None:
            return 0
        count = earlier_grants = earlier_ends = 0
        owed: list[_Owed] = []
        for row in rows:
            lease = snapshot_of_stored(row)
            granted_earlier = chain_start_time is not None and row.granted_at < chain_start_time
            if row.digest in skip_grant_records:
                pass
            elif granted_earlier:
                earlier_grants += 1
                if row.ended_at is not None and chain_start_time is not None and row.ended_at < chain_start_time:
                    earlier_ends += 1
            else:
                owed.append((grant_event(lease), None, lease, row.granted_wall))
            if lease.end_reason is not None:
                ended_wall = row.ended_wall if row.ended_wall is not None else row.granted_wall
                if lease.end_reason is EndReason.REVOKED:
                    owed.append((revoke_event(lease), None, lease, ended_wall))
                end_written = functools.partial(self._restored_end_written, lease)
                owed.append((end_event(lease), end_written, lease, ended_wall))
            count += 1
        written = self._find_written(owed)
        for event, on_written, lease, _ in owed:
            if event[0] not in written:
                self._submit(*event, on_written)
            elif on_written is not None:
                self._report_end_recorded(lease.digest)
        if earlier_grants:
            logger.warning(
                "%d stored leases were granted before the audit chain in %s started. Their grant records"
                " belong to an earlier chain (or to none, if the audit log was off), so they are not written"
                " again. %d of them ended before this chain started. Their end records are written here unless"
                " this chain has them, because the store cannot show whether the earlier chain got them. Keep"
                " the earlier audit directory and run 'session-authority audit verify OLD NEW', which lists"
                " each event that both chains record",
                earlier_grants,
                self.sink.log.directory,
                earlier_ends,
            )
        return count

    def _find_written(self, owed: list[_Owed]) -> set[str]:
        """Return the owed events that the audit log already contains, in any of its files.

        Events of the current and the previous file are looked up before any
        record is written, because the writes that follow may rotate the log
        and drop the previous file from its index. With small files, or
        leases that ended long ago, a record can be older still, so the log
        also reads older files for the rest.
        """
        assert self.sink is not None
        log = self.sink.log
        written = {event[0] for event, _, _, _ in owed if log.contains(event[0])}
        missing = [event[0] for event, _, _, _ in owed if event[0] not in written]
        if not missing:
            return written
        # A record is written after its event, and the margin covers wall clock steps.
        since = min(wall for _, _, _, wall in owed) - WALL_CLOCK_STEP_MARGIN_SECONDS
        found = log.find_in_older_files(missing, written_since=since)
        if found:
            logger.info("%d audit records owed by stored leases are in older audit files already", len(found))
        return written | found

    def _restored_end_written(self, lease: LeaseSnapshot, receipt: AuditReceipt) -> None:
        self._report_end_recorded(lease.digest)
        if receipt.duplicate:
            return
        logger.info("audit end record of lease %s written after restart", lease.fingerprint)
        self.telemetry.record_end(
            lease, grant_context=None, parent=None, start_time_ns=time.time_ns(), receipt=receipt
        )

    # -- table listener --------------------------------------------------

    def on_grant(self, lease: LeaseSnapshot) -> None:
        span = self.telemetry.start_grant(lease)
        with self._lock:
            self._pending_grants[lease.digest] = _PendingGrant(lease, span)

    def grant_settled(self, lease: LeaseSnapshot, future: concurrent.futures.Future[None]) -> None:
        """Record a grant once its store write has settled; a failed write leaves no record."""
        error: BaseException | None
        if future.cancelled():
            error = concurrent.futures.CancelledError()
        else:
            error = future.exception()
        with self._lock:
            pending = self._pending_grants.pop(lease.digest, None)
            if pending is None:
                logger.warning("grant of lease %s settled but was never reported by the table", lease.fingerprint)
                return
            self.telemetry.finish_grant(lease, pending.span, error)
            if error is not None:
                if pending.waiting_ends:
                    logger.warning(
                        "lease %s ended before its grant failed to be stored; it was never handed out,"
                        " so no audit record is written",
                        lease.fingerprint,
                    )
                return
            if self.sink is not None:
                self._submit(*grant_event(lease), None)
            for seen in pending.waiting_ends:
                self._release_end_locked(seen)

    def end_settled(self, digest: bytes, future: concurrent.futures.Future[None]) -> None:
        """Release the records of a lease's end once the store write of that end has settled.

        Called from the thread that completes the store write, possibly
        before :meth:`on_end` reports the same end. A shared store's write
        returns an ``EndClaim``; when another replica won the claim, that
        replica writes the records and this one writes none.
        """
        claim = None if future.cancelled() or future.exception() is not None else future.result()
        if isinstance(claim, EndClaim) and not claim.won:
            with self._lock:
                self._claims_lost.add(digest)
        if not future.cancelled() and future.exception() is not None:
            # NOTE: the store retries a failed end write for as long as the
            # authority runs. If the authority crashes before that write
            # lands, the audit log contains an end that the store does not.
            logger.warning(
                "end of lease %s not yet stored (%s); its audit records are written anyway",
                digest[:6].hex(),
                future.exception(),
            )
        with self._lock:
            self._store_settled.add(digest)
            self._drain_awaiting_store_locked()

    def on_end(self, end: SessionEnd) -> None:
        seen = _SeenEnd(end, otel_context.get_current(), time.time_ns())
        with self._lock:
            self._out_of_order[end.sequence] = seen
            # Two threads can end leases at once and report them in either
            # order; records go out in sequence order.
            while self._next_sequence in self._out_of_order:
                ready = self._out_of_order.pop(self._next_sequence)
                self._next_sequence += 1
                if ready.end.decided_elsewhere:
                    # The replica that stored the end writes its records.
                    self._forget_end(ready.end)
                    continue
                pending = self._pending_grants.get(ready.end.lease.digest)
                if pending is not None:
                    pending.waiting_ends.append(ready)
                else:
                    self._release_end_locked(ready)
            if len(self._out_of_order) > 1000:
                logger.error(
                    "%d lease ends wait for end %d, which was never reported; audit records are delayed",
                    len(self._out_of_order),
                    self._next_sequence,
                )

    # -- internals (lock held) --------------------------------------------

    def _release_end_locked(self, seen: _SeenEnd) -> None:
        if not self._ends_wait_for_store:
            self._record_end_locked(seen)
            return
        self._awaiting_store.append(seen)
        self._drain_awaiting_store_locked()

    def _drain_awaiting_store_locked(self) -> None:
        # Waiting at the head keeps the records in end order; an end whose
        # write settled first waits behind it.
        while self._awaiting_store:
            digest = self._awaiting_store[0].end.lease.digest
            if digest not in self._store_settled:
                return
            self._store_settled.discard(digest)
            seen = self._awaiting_store.popleft()
            if digest in self._claims_lost:
                self._claims_lost.discard(digest)
                self._forget_end(seen.end)
                continue
            self._record_end_locked(seen)

    def _forget_end(self, end: SessionEnd) -> None:
        """Drop an end that another replica records; only the telemetry of a grant made here is closed."""
        if end.granted_here:
            self.telemetry.lease_ended(end)

    def _record_end_locked(self, seen: _SeenEnd) -> None:
        lease = seen.end.lease
        # The ends metric counts each end once in a fleet: on the replica that granted the lease.
        grant_context = self.telemetry.lease_ended(seen.end) if seen.end.granted_here else None
        emit = functools.partial(self._emit_end_span, lease, grant_context, seen.parent, seen.seen_ns)
        if self.sink is None:
            emit(None)
            return
        if lease.end_reason is EndReason.REVOKED:
            self._submit(*revoke_event(lease), None)
        self._submit(*end_event(lease), emit)

    def _emit_end_span(
        self,
        lease: LeaseSnapshot,
        grant_context: trace.SpanContext | None,
        parent: otel_context.Context,
        seen_ns: int,
        receipt: AuditReceipt | None,
    ) -> None:
        self._report_end_recorded(lease.digest)
        if receipt is not None and receipt.duplicate:
            return
        self.telemetry.record_end(
            lease, grant_context=grant_context, parent=parent, start_time_ns=seen_ns, receipt=receipt
        )

    def _report_end_recorded(self, digest: bytes) -> None:
        callback = self.end_recorded
        if callback is None:
            return
        try:
            callback(digest)
        except Exception:  # noqa: BLE001 - a written record stands whatever the callback does
            logger.exception("end_recorded callback failed for lease %s", digest[:6].hex())

    def _submit(
        self,
        event_id: str,
        type: str,
        fields: dict[str, object],
        on_written: Callable[[AuditReceipt], None] | None,
    ) -> None:
        assert self.sink is not None
        try:
            self.sink.submit(event_id, type, fields, on_written)
        except Exception:  # noqa: BLE001 - the table change stands even when its record cannot be queued
            logger.exception(
                "audit %s record of lease %s not queued; a restart resubmits it from the store",
                type,
                fields.get("fingerprint"),
            )

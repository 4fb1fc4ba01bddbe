"""OpenTelemetry spans and metrics for lease grants, renewals and ends.

:class:`SessionTelemetry` uses only ``opentelemetry-api``: it reports to the
providers it is given, or to the global ones, which stay no-ops until a
process installs the SDK. ``serve`` installs the SDK with
:func:`configure_sdk` (see ``_telemetry_sdk``).

Every public method catches and logs its own errors, so a telemetry error
never fails a grant, a renewal or an end. With the batch span processor that
``serve`` installs, exporting happens on another thread and delays none of them.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Iterable

from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from ._audit import AuditReceipt
from ._table import LeaseSnapshot, SessionEnd

logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME = "session_authority.server"
"""Name of the tracer and meter of the authority."""

GRANT_SPAN = "session.grant"
END_SPAN = "session.end"
AUDIT_EVENT = "audit.record"
"""Span event on ``session.end`` that carries the audit record's ``audit.seq`` and ``audit.hash``."""

# Attribute names. ``session.lease.fingerprint`` and ``session.end_reason``
# match the span events that the interceptors add. Durations are float
# seconds with the unit in the name, because attribute values carry no unit.
FINGERPRINT = "session.lease.fingerprint"
PRINCIPAL = "session.principal"
TIER = "session.tier"
END_REASON = "session.end_reason"
DURATION = "session.duration_s"
REVOKED_BY = "session.revoked_by"
IDLE_TIMEOUT = "session.idle_timeout_s"
MAX_DURATION = "session.max_duration_s"
AUDIT_SEQ = "audit.seq"
AUDIT_HASH = "audit.hash"


def end_reason_name(lease: LeaseSnapshot) -> str:
    """Return the lower-case end reason of a lease (``idle_timeout``), or ``unknown``."""
    return lease.end_reason.name.lower() if lease.end_reason is not None else "unknown"


class SessionTelemetry:
    """The authority's spans and metrics.

    Spans: a short ``session.grant`` span per grant, from the grant until its
    store write settles, and one ``session.end`` span per end, linked to the
    grant's span. The authority keeps the grant's span context only while the
    lease lives in this process, so a lease restored after a restart ends with
    an unlinked span.

    Metrics: ``session_authority.leases.active`` (observable gauge by
    ``session.tier``), ``session_authority.grants`` (by tier),
    ``session_authority.renewals`` and ``session_authority.ends`` (by
    ``session.end_reason`` and tier).

    Threading: every method may be called from any thread and returns without
    waiting for an exporter. The span processor that the operator configured
    decides when spans leave the process.

    Args:
        tracer_provider: Provider of the tracer; None uses the global one.
        meter_provider: Provider of the meter; None uses the global one.
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
    ) -> None:
        self._tracer = trace.get_tracer(INSTRUMENTATION_NAME, tracer_provider=tracer_provider)
        meter = metrics.get_meter(INSTRUMENTATION_NAME, meter_provider=meter_provider)
        self._grants = meter.create_counter(
            "session_authority.grants", unit="{lease}", description="Leases granted and stored."
        )
        self._renewals = meter.create_counter(
            "session_authority.renewals",
            unit="{renewal}",
            description="Renewal entries (Renew and KeepAlive) that found their lease alive.",
        )
        self._ends = meter.create_counter(
            "session_authority.ends", unit="{lease}", description="Lease ends, by end reason."
        )
        meter.create_observable_gauge(
            "session_authority.leases.active",
            callbacks=[self._observe_active],
            unit="{lease}",
            description="Live leases, by tier.",
        )
        self._lock = threading.Lock()
        self._active: collections.Counter[str] = collections.Counter()
        self._grant_contexts: dict[bytes, trace.SpanContext] = {}

    # -- grants ----------------------------------------------------------------

    def start_grant(self, lease: LeaseSnapshot) -> trace.Span | None:
        """Start the ``session.grant`` span of a new lease, as a child of the current span if any."""
        try:
            span = self._tracer.start_span(
                GRANT_SPAN,
                kind=trace.SpanKind.INTERNAL,
                attributes={
                    FINGERPRINT: lease.fingerprint,
                    PRINCIPAL: lease.principal,
                    TIER: lease.tier,
                    IDLE_TIMEOUT: lease.idle_timeout,
                    MAX_DURATION: lease.max_duration,
                },
            )
            grant_context = span.get_span_context()
            # An invalid context (no SDK installed and no incoming trace) cannot be linked, so it is not kept.
            if grant_context.is_valid:
                with self._lock:
                    self._grant_contexts[lease.digest] = grant_context
            return span
        except Exception:  # noqa: BLE001 - telemetry must not fail a grant
            logger.exception("could not start the grant span of lease %s", lease.fingerprint)
            return None

    def finish_grant(self, lease: LeaseSnapshot, span: trace.Span | None, error: BaseException | None) -> None:
        """End the grant span once the grant is stored (or failed to be), and count it."""
        try:
            if error is None:
                self._grants.add(1, {TIER: lease.tier})
                with self._lock:
                    self._active[lease.tier] += 1
            else:
                with self._lock:
                    self._grant_contexts.pop(lease.digest, None)
            if span is not None:
                if error is not None:
                    span.set_status(trace.Status(trace.StatusCode.ERROR, f"grant not stored: {error}"))
                span.end()
        except Exception:  # noqa: BLE001 - telemetry must not fail a grant
            logger.exception("could not finish the grant span of lease %s", lease.fingerprint)

    def grant_traceparent(self, digest: bytes) -> str:
        """Return the grant span's context of a lease as a W3C ``traceparent`` value, or "" without one.

        The store keeps it, so that the end of a lease granted before a
        restart can still link to its grant span.
        """
        with self._lock:
            grant_context = self._grant_contexts.get(digest)
        if grant_context is None:
            return ""
        return f"00-{grant_context.trace_id:032x}-{grant_context.span_id:016x}-{int(grant_context.trace_flags):02x}"

    def restore_grant_contexts(self, stored: Iterable[tuple[bytes, str]]) -> None:
        """Keep the grant span contexts of leases restored at start-up, from ``(digest, traceparent)`` pairs."""
        restored = {}
        for digest, traceparent in stored:
            grant_context = _parse_traceparent(traceparent)
            if grant_context is not None:
                restored[digest] = grant_context
        with self._lock:
            self._grant_contexts.update(restored)

    def lease_restored(self, tiers: Iterable[str]) -> None:
        """Count live leases loaded from the store at start-up as active."""
        try:
            with self._lock:
                self._active.update(tiers)
        except Exception:  # noqa: BLE001 - telemetry must not fail a start
            logger.exception("could not count the restored leases")

    # -- renewals and ends ---------------------------------------------------

    def renewed(self, count: int) -> None:
        """Count ``count`` renewal entries that found their lease alive."""
        if count <= 0:
            return
        try:
            self._renewals.add(count)
        except Exception:  # noqa: BLE001 - telemetry must not fail a renewal
            logger.exception("could not count %d renewals", count)

    def lease_ended(self, end: SessionEnd) -> trace.SpanContext | None:
        """Count an end and return the grant's span context, or None when the grant had none."""
        lease = end.lease
        try:
            with self._lock:
                grant_context = self._grant_contexts.pop(lease.digest, None)
                if self._active[lease.tier] > 0:
                    self._active[lease.tier] -= 1
            self._ends.add(1, {END_REASON: end_reason_name(lease), TIER: lease.tier})
            return grant_context
        except Exception:  # noqa: BLE001 - telemetry must not delay an end
            logger.exception("could not count the end of lease %s", lease.fingerprint)
            return None

    def record_end(
        self,
        lease: LeaseSnapshot,
        *,
        grant_context: trace.SpanContext | None,
        parent: otel_context.Context | None,
        start_time_ns: int,
        receipt: AuditReceipt | None,
    ) -> None:
        """Emit the ``session.end`` span of a lease end.

        The span starts when the authority saw the end and ends now, which is
        when its audit record was written (or at once without an audit log).

        Args:
            lease: The ended lease.
            grant_context: Span context of the grant, linked when present.
            parent: Context that was current when the lease ended, such as a
                ``Revoke`` RPC's span; None makes the span a root.
            start_time_ns: When the end was seen, in ``time.time_ns`` units.
            receipt: The audit record, added as the ``audit.record`` event.
        """
        try:
            attributes: dict[str, str | float] = {
                FINGERPRINT: lease.fingerprint,
                PRINCIPAL: lease.principal,
                TIER: lease.tier,
                END_REASON: end_reason_name(lease),
                DURATION: lease.age,
            }
            if lease.revoked_by:
                attributes[REVOKED_BY] = lease.revoked_by
            links = [trace.Link(grant_context)] if grant_context is not None and grant_context.is_valid else []
            span = self._tracer.start_span(
                END_SPAN,
                context=parent if parent is not None else otel_context.Context(),
                kind=trace.SpanKind.INTERNAL,
                attributes=attributes,
                links=links,
                start_time=start_time_ns,
            )
            if receipt is not None:
                span.add_event(AUDIT_EVENT, {AUDIT_SEQ: receipt.seq, AUDIT_HASH: receipt.hash})
            span.end(end_time=max(start_time_ns, time.time_ns()))
        except Exception:  # noqa: BLE001 - telemetry must not delay an end
            logger.exception("could not record the end span of lease %s", lease.fingerprint)

    # -- metrics callbacks -----------------------------------------------------

    def _observe_active(self, options: CallbackOptions) -> Iterable[Observation]:
        with self._lock:
            counts = list(self._active.items())
        return [Observation(count, {TIER: tier}) for tier, count in counts]


def _parse_traceparent(text: str) -> trace.SpanContext | None:
    """Return the span context of a stored W3C ``traceparent`` value, or None for "" or a malformed one."""
    parts = text.split("-")
    if len(parts) != 4 or parts[0] != "00" or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    grant_context = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))
    return grant_context if grant_context.is_valid else None

"""Span events and metrics for refused and cut-off calls; telemetry failures never reach the call."""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import metrics, trace

from session_authority.interceptors._errors import LeaseRefused

logger = logging.getLogger(__name__)

REFUSED_EVENT = "session.call_refused"
"""Span event added when a call is refused before its handler runs."""

CUT_OFF_EVENT = "session.call_cut_off"
"""Span event added when a call in flight is ended because its lease ended."""

CUTOFF_DELAY_METRIC = "session_authority.enforcer.cutoff_delay"
"""Histogram, in seconds, from the lease end as this enforcer learned it to the cut-off of each call.

The lease end is when the news reached the enforcer (watch stream, renewal or
``Validate`` reply) or the local deadline that passed. The cut-off is when
the enforcer's thread issued it: on a sync server the status is sent by then,
on an aio server it is scheduled on the event loop.
"""

REFUSED_CALLS_METRIC = "session_authority.enforcer.refused_calls"
"""Counter of calls refused before their handler ran, by end reason and status code."""

CUT_OFF_CALLS_METRIC = "session_authority.enforcer.cut_off_calls"
"""Counter of calls in flight ended because their lease ended, by end reason and status code."""


def current_span() -> trace.Span:
    """Return the span active on this thread or task (a no-op span when there is none)."""
    try:
        return trace.get_current_span()
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not read the active span")
        return trace.INVALID_SPAN


def add_refusal_event(span: trace.Span, name: str, refusal: LeaseRefused, method: str) -> None:
    """Add a span event naming the lease fingerprint, the reason and the status code."""
    service, _, method_name = method.lstrip("/").partition("/")
    try:
        span.add_event(
            name,
            {
                "session.lease.fingerprint": refusal.fingerprint,
                "session.end_reason": refusal.reason.value,
                "rpc.grpc.status_code": refusal.code.value[0],
                "rpc.service": service,
                "rpc.method": method_name,
            },
        )
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not add span event %s", name)


def report_status(context: Any, refusal: LeaseRefused) -> None:
    """Tell the servicer context the status a cut-off sent, through ``set_code`` and ``set_details``.

    A cut-off sends the status from outside the handler, so interceptors
    wrapped around ours (``opentelemetry-instrumentation-grpc`` among them)
    learn the code only through these calls on the context they passed in.
    Call it only after the status went out: the values then change nothing
    on the wire.

    NOTE: an interceptor placed after ours (inside it) wraps the context the
    handler gets, not this one, so it never learns the code of a cut-off. The
    instrumentation's span then keeps ``rpc.grpc.status_code`` 0.
    """
    try:
        context.set_code(refusal.code)
        context.set_details(refusal.details)
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not report the cut-off status to the servicer context")


class EnforcerMetrics:
    """The enforcer's instruments, created from ``opentelemetry-api`` only.

    Threading: every method may be called from any thread; each catches and
    logs its own failures, so a broken meter never reaches a call.

    Args:
        meter_provider: Where the instruments come from; None means the
            global meter provider (a no-op one until an SDK is configured).
    """

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        self._cutoff_delay: Any = None
        self._refused: Any = None
        self._cut_off: Any = None
        try:
            meter = metrics.get_meter(__name__, meter_provider=meter_provider)
            self._cutoff_delay = meter.create_histogram(
                CUTOFF_DELAY_METRIC,
                unit="s",
                description="Delay from the lease end as this enforcer learned it to the cut-off of a call",
            )
            self._refused = meter.create_counter(
                REFUSED_CALLS_METRIC, unit="{call}", description="Calls refused before their handler ran"
            )
            self._cut_off = meter.create_counter(
                CUT_OFF_CALLS_METRIC, unit="{call}", description="Calls in flight ended because their lease ended"
            )
        except Exception:  # noqa: BLE001 - telemetry must never break the enforcer
            logger.exception("could not create the enforcer's metric instruments; metrics are off")

    def record_refusal(self, refusal: LeaseRefused) -> None:
        """Count one refused call."""
        if self._refused is None:
            return
        try:
            self._refused.add(1, _attributes(refusal))
        except Exception:  # noqa: BLE001 - telemetry must never break the call
            logger.exception("could not record a refused call")

    def record_cut_off(self, refusal: LeaseRefused, delay_seconds: float) -> None:
        """Count one cut-off call and record its delay after the lease end."""
        if self._cut_off is None or self._cutoff_delay is None:
            return
        try:
            attributes = _attributes(refusal)
            self._cut_off.add(1, attributes)
            self._cutoff_delay.record(max(0.0, delay_seconds), attributes)
        except Exception:  # noqa: BLE001 - telemetry must never break the call
            logger.exception("could not record a cut-off call")


def _attributes(refusal: LeaseRefused) -> dict[str, Any]:
    return {"session.end_reason": refusal.reason.value, "rpc.grpc.status_code": refusal.code.value[0]}

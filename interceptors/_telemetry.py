"""Span events and metrics for refused and cut-off calls; telemetry failures never reach the call."""

from __future__ import annotations

import contextvars
import functools
import logging
from typing import Any

from opentelemetry import context as otel_context
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

_GRPC_STATUS_CODE_ATTRIBUTE = "rpc.grpc.status_code"


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
                _GRPC_STATUS_CODE_ATTRIBUTE: refusal.code.value[0],
                "rpc.service": service,
                "rpc.method": method_name,
            },
        )
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not add span event %s", name)


_PROBE_KEY = otel_context.create_key("session_authority_probe")


@functools.cache
def _otel_context_variable() -> contextvars.ContextVar[Any] | None:
    # OpenTelemetry keeps the active context in one ContextVar of its runtime
    # context, which it does not name publicly. Attaching a marked context in
    # an empty contextvars.Context and looking for it finds that variable
    # through public APIs only. None means the runtime context is not built on
    # contextvars, and spans opened inside a handler stay unknown.
    probe = contextvars.Context()
    try:
        probe.run(otel_context.attach, otel_context.set_value(_PROBE_KEY, True))
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not probe OpenTelemetry's runtime context")
        return None
    for variable, value in probe.items():
        if isinstance(value, otel_context.Context) and value.get(_PROBE_KEY) is True:
            return variable
    logger.debug("OpenTelemetry's runtime context is not a ContextVar; cut-off events stay on the admission span")
    return None


def _rpc_span_in(handler_context: contextvars.Context | None) -> trace.Span | None:
    """Return the server span active in a handler's context, or None.

    Safe from any thread, also while the handler runs in that context.
    """
    if handler_context is None:
        return None
    variable = _otel_context_variable()
    if variable is None:
        return None
    active = handler_context.get(variable)
    if active is None:
        return None
    span = trace.get_current_span(active)
    # Only SDK spans expose their kind. The RPC span of an instrumentation
    # is a SERVER span, and a span the handler opened itself usually is not.
    if getattr(span, "kind", None) is not trace.SpanKind.SERVER or not span.is_recording():
        return None
    return span


def add_cut_off_event(
    admission_context: contextvars.Context,
    handler_context: contextvars.Context | None,
    refusal: LeaseRefused,
    method: str,
) -> None:
    """Add the cut-off event to the call's RPC span, and the status code when that span is inside ours.

    The event goes to the span active at admission, unless an instrumentation
    placed after our interceptor (such as ``opentelemetry-instrumentation-grpc``)
    opened the RPC span inside the handler call. That span is found in the
    handler's context and gets the event and ``rpc.grpc.status_code``, as the
    instrumentation's own ``set_code`` would set it (checked with 0.66b2).
    For ``UNAUTHENTICATED`` and ``PERMISSION_DENIED`` the RPC conventions
    leave a server span's status unset, so only the attribute changes.

    NOTE: the inner RPC span is missed, and keeps status code 0, when the
    handler has a span of its own open at the cut-off, or when the cut-off
    comes before the instrumentation opened its span.

    Safe from any thread; failures are logged and never reach the call.

    Args:
        admission_context: A copy of the context the call was admitted in,
            which no thread has entered.
        handler_context: The context the handler runs in, or None before it started.
        refusal: Why the call was cut off.
        method: The full method name.
    """
    span: trace.Span = trace.INVALID_SPAN
    try:
        span = admission_context.run(trace.get_current_span)
        rpc_span = _rpc_span_in(handler_context)
        if rpc_span is not None and rpc_span is not span:
            rpc_span.set_attribute(_GRPC_STATUS_CODE_ATTRIBUTE, refusal.code.value[0])
            span = rpc_span
    except Exception:  # noqa: BLE001 - telemetry must never break the call
        logger.exception("could not find the RPC span of a cut-off call")
    add_refusal_event(span, CUT_OFF_EVENT, refusal, method)


def report_status(context: Any, refusal: LeaseRefused) -> None:
    """Tell the servicer context the status a cut-off sent, through ``set_code`` and ``set_details``.

    A cut-off sends the status from outside the handler, so interceptors
    wrapped around ours (``opentelemetry-instrumentation-grpc`` among them)
    learn the code only through these calls on the context they passed in.
    Call it only after the status went out: the values then change nothing
    on the wire. An interceptor placed after ours wraps the context the
    handler gets, not this one, so :func:`add_cut_off_event` covers its span.
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

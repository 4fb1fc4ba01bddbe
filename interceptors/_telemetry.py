"""Span events for refused and cut-off calls; telemetry failures never reach the call."""

from __future__ import annotations

import logging

from opentelemetry import trace

from session_authority.interceptors._errors import LeaseRefused

logger = logging.getLogger(__name__)

REFUSED_EVENT = "session.call_refused"
"""Span event added when a call is refused before its handler runs."""

CUT_OFF_EVENT = "session.call_cut_off"
"""Span event added when a call in flight is ended because its lease ended."""


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

"""Reasons an enforcer refuses or cuts off a call, each mapped to one gRPC status in one place."""

from __future__ import annotations

import grpc

from session_authority.clients._metadata import END_REASON_TRAILER_KEY, EndReason


class LeaseRefused(Exception):
    """A call may not run, or may not go on, under the lease it carries.

    Every subclass fixes the status code and the ``session-end-reason``
    trailer value. ``UNAUTHENTICATED`` means the call has no usable lease
    (missing, malformed, unknown or ended): the holder must grant a new one.
    ``PERMISSION_DENIED`` means the lease lives but may not be used for this
    call (principal mismatch or method policy).

    Attributes:
        details: The status details sent to the caller. They name what was
            wrong and never contain the lease ID.
        reason: The value of the ``session-end-reason`` trailer.
        fingerprint: The lease's fingerprint, or empty when the call carried
            no readable lease.
    """

    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED
    reason: EndReason = EndReason.UNKNOWN

    def __init__(self, details: str, *, fingerprint: str = "", reason: EndReason | None = None) -> None:
        super().__init__(details)
        self.details = details
        self.fingerprint = fingerprint
        if reason is not None:
            self.reason = reason

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """Return the trailing metadata that names the reason to the caller."""
        return ((END_REASON_TRAILER_KEY, self.reason.value),)


class LeaseMissing(LeaseRefused):
    """The call carries no lease metadata."""


class LeaseMalformed(LeaseRefused):
    """The lease metadata is empty, too long, not ASCII, binary or repeated."""


class LeaseNotFound(LeaseRefused):
    """The authority has no record of the lease."""


class LeaseEnded(LeaseRefused):
    """The lease ended (idle timeout, max duration, revoke, release or policy)."""


class AuthorityUnreachable(LeaseRefused):
    """The enforcer cannot confirm the lease because the authority is out of reach."""

    reason = EndReason.AUTHORITY_UNREACHABLE


class PrincipalMismatch(LeaseRefused):
    """The caller's identity differs from the lease's principal."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = EndReason.POLICY


class PolicyDenied(LeaseRefused):
    """The method requires another tier or a younger session than this lease has."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = EndReason.POLICY


def ended(reason: EndReason, fingerprint: str) -> LeaseEnded:
    """Build the refusal for a lease that ended for ``reason``."""
    return LeaseEnded(
        f"session lease {fingerprint} ended ({reason.value}); grant a new lease",
        fingerprint=fingerprint,
        reason=reason,
    )


def unreachable(fingerprint: str, cause: str) -> AuthorityUnreachable:
    """Build the refusal used when the lease cannot be confirmed with the authority."""
    return AuthorityUnreachable(
        f"session lease {fingerprint or '(none)'} cannot be confirmed ({EndReason.AUTHORITY_UNREACHABLE.value}):"
        f" {cause}; retry when the session authority is reachable",
        fingerprint=fingerprint,
    )

"""Exceptions raised by the authority clients, converted from gRPC status codes in one place."""

from __future__ import annotations

import logging
import math
from typing import Iterable

import grpc

logger = logging.getLogger(__name__)

RETRY_AFTER_METADATA_KEY = "retry-after-ms"
"""Trailing metadata key in which the authority may suggest a back-off, in milliseconds."""


class AuthorityError(Exception):
    """A call to the session authority failed.

    Attributes:
        code: The gRPC status code the call ended with.
        details: The status details the authority (or the gRPC runtime) sent.
        operation: The RPC that failed, such as ``"Grant"``.
        retryable: True when the same request may succeed if sent again later
            (the authority was unreachable, timed out or asked for a back-off).
    """

    retryable: bool = False

    def __init__(self, code: grpc.StatusCode, details: str, *, operation: str = "Call") -> None:
        self.code = code
        self.details = details
        self.operation = operation
        super().__init__(f"{operation} failed: {code.name}: {details}")


class AuthorityUnavailable(AuthorityError):
    """The authority could not be reached or did not reply in time (UNAVAILABLE, DEADLINE_EXCEEDED)."""

    retryable = True


class InvalidArgument(AuthorityError):
    """The authority rejected a field of the request (INVALID_ARGUMENT)."""


class Unauthenticated(AuthorityError):
    """The authority could not identify the caller (UNAUTHENTICATED): check the API key."""


class PermissionDenied(AuthorityError):
    """The caller is known but may not do this (PERMISSION_DENIED)."""


class NotFound(AuthorityError):
    """The lease or other object named in the request does not exist (NOT_FOUND)."""


class ResourceExhausted(AuthorityError):
    """The authority is rate-limiting the caller or is out of capacity (RESOURCE_EXHAUSTED).

    Attributes:
        retry_after_seconds: The back-off the authority suggested in the
            ``retry-after-ms`` trailer, or None when it sent none.
    """

    retryable = True

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        operation: str = "Call",
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(code, details, operation=operation)
        self.retry_after_seconds = retry_after_seconds


class FailedPrecondition(AuthorityError):
    """The request is valid but the authority's state does not allow it now (FAILED_PRECONDITION)."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[AuthorityError]] = {
    grpc.StatusCode.UNAVAILABLE: AuthorityUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AuthorityUnavailable,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
}


def translate_rpc_error(exc: grpc.RpcError, operation: str = "Call") -> AuthorityError:
    """Convert a gRPC error into the matching :class:`AuthorityError` subclass.

    Use it as ``raise translate_rpc_error(exc, "Grant") from exc`` so the
    original error stays attached as the cause. Works for errors from both
    ``grpc`` and ``grpc.aio`` calls.

    Args:
        exc: The error a stub call raised.
        operation: The RPC name used in the message, such as ``"Grant"``.

    Returns:
        The exception to raise. Status codes without a dedicated class (for
        example INTERNAL or CANCELLED) become a plain :class:`AuthorityError`.
    """
    code, details = _status_of(exc)
    error_class = _ERROR_CLASSES.get(code, AuthorityError)
    if error_class is ResourceExhausted:
        retry_after_seconds = _retry_after_seconds(_trailing_metadata_of(exc))
        return ResourceExhausted(
            code, details, operation=operation, retry_after_seconds=retry_after_seconds
        )
    return error_class(code, details, operation=operation)


def _status_of(exc: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    # grpc.RpcError itself has no accessors; the errors that stubs raise are
    # also grpc.Call objects that do. Anything else is reported as UNKNOWN.
    code_method = getattr(exc, "code", None)
    details_method = getattr(exc, "details", None)
    code = code_method() if callable(code_method) else None
    details = details_method() if callable(details_method) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    if not details:
        details = str(exc) or "no details"
    return code, details


def _trailing_metadata_of(exc: grpc.RpcError) -> Iterable[tuple[str, str | bytes]]:
    trailing_metadata_method = getattr(exc, "trailing_metadata", None)
    if not callable(trailing_metadata_method):
        return ()
    return trailing_metadata_method() or ()


def _retry_after_seconds(metadata: Iterable[tuple[str, str | bytes]]) -> float | None:
    for key, value in metadata:
        if key != RETRY_AFTER_METADATA_KEY:
            continue
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        try:
            milliseconds = float(text)
        except ValueError:
            logger.debug("ignoring %s trailer that is not a number: %r", key, text)
            return None
        if not math.isfinite(milliseconds) or milliseconds < 0:
            logger.debug("ignoring %s trailer outside [0, inf): %r", key, text)
            return None
        return milliseconds / 1000.0
    return None

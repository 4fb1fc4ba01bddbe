"""Errors the authority returns, each with its status code, mapped in one place."""

from __future__ import annotations

import grpc


class AuthorityError(Exception):
    """A request the authority refuses; ``str(self)`` becomes the status details.

    Subclasses fix the status code. The details must name the field or value
    and the fix, and must never contain a lease ID or a key.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, details: str, *, trailing_metadata: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(details)
        self.details = details
        self.trailing_metadata = trailing_metadata


class InvalidArgument(AuthorityError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class Unauthenticated(AuthorityError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AuthorityError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(AuthorityError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(AuthorityError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(AuthorityError):
    code = grpc.StatusCode.UNAVAILABLE

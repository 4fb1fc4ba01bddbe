"""Metadata keys, end reasons and lease fingerprints shared by holders and enforcers."""

from __future__ import annotations

import enum
import hashlib

from session_authority.v1.identity import SPIFFE_SCHEME, peer_identity

LEASE_METADATA_KEY = "session-lease"
"""Request metadata key that carries the lease ID."""

END_REASON_TRAILER_KEY = "session-end-reason"
"""Trailing metadata key naming why a call was refused or cut off."""

FINGERPRINT_LENGTH = 12
"""Hex characters of the lease ID's SHA-256 used to name it in logs and spans."""



class EndReason(str, enum.Enum):
    """Reason a session ended, as it appears in the ``session-end-reason`` trailer."""

    IDLE_TIMEOUT = "idle_timeout"
    MAX_DURATION = "max_duration"
    REVOKED = "revoked"
    RELEASED = "released"
    POLICY = "policy"
    # Only enforcers and holders use the next two: the authority never ends a
    # lease for them, but a call can still be cut off for them.
    AUTHORITY_UNREACHABLE = "authority_unreachable"
    UNKNOWN = "unknown"


def lease_digest(lease_id: str) -> str:
    """Return the full SHA-256 of a lease ID as lower-case hex."""
    return hashlib.sha256(lease_id.encode("utf-8")).hexdigest()


def fingerprint(lease_id: str) -> str:
    """Return the short, loggable name of a lease ID (never log the ID itself)."""
    return lease_digest(lease_id)[:FINGERPRINT_LENGTH]


__all__ = [
    "END_REASON_TRAILER_KEY",
    "FINGERPRINT_LENGTH",
    "LEASE_METADATA_KEY",
    "SPIFFE_SCHEME",
    "EndReason",
    "fingerprint",
    "lease_digest",
    "peer_identity",
]

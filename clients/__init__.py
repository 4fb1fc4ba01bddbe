"""Typed clients of the session authority, the lease holder and the operator CLI."""

from ._aio_client import AioAuthorityClient
from ._aio_client import AioKeepAliveStream
from ._aio_client import AioWatchStream
from ._aio_session import AioSession
from ._client import AuthorityClient
from ._client import KeepAliveStream
from ._client import WatchStream
from ._common import load_channel_credentials
from ._errors import AuthorityError
from ._errors import AuthorityUnavailable
from ._errors import FailedPrecondition
from ._errors import InvalidArgument
from ._errors import NotFound
from ._errors import PermissionDenied
from ._errors import ResourceExhausted
from ._errors import Unauthenticated
from ._errors import translate_rpc_error
from ._keeper import KeeperStats
from ._keeper import LeaseKeeper
from ._metadata import END_REASON_TRAILER_KEY
from ._metadata import EndReason
from ._metadata import LEASE_METADATA_KEY
from ._metadata import fingerprint
from ._metadata import lease_digest
from ._metadata import peer_identity
from ._session import Session
from ._session import SessionEnded
from ._session import SessionState
from ._types import GrantedLease
from ._types import HeartbeatEvent
from ._types import LeaseInfo
from ._types import LeaseState
from ._types import MethodRuleInfo
from ._types import PolicyInfo
from ._types import RenewResult
from ._types import RevokeResult
from ._types import SessionEndEvent
from ._types import TierInfo
from ._types import ValidateResult
from ._types import Verdict
from ._types import WatchEvent
from ._types import duration_to_seconds
from ._types import seconds_to_duration

__all__ = [
    "AioAuthorityClient",
    "AioKeepAliveStream",
    "AioSession",
    "AioWatchStream",
    "AuthorityClient",
    "AuthorityError",
    "AuthorityUnavailable",
    "END_REASON_TRAILER_KEY",
    "EndReason",
    "FailedPrecondition",
    "GrantedLease",
    "HeartbeatEvent",
    "InvalidArgument",
    "KeepAliveStream",
    "KeeperStats",
    "LEASE_METADATA_KEY",
    "LeaseInfo",
    "LeaseKeeper",
    "LeaseState",
    "MethodRuleInfo",
    "NotFound",
    "PermissionDenied",
    "PolicyInfo",
    "RenewResult",
    "ResourceExhausted",
    "RevokeResult",
    "Session",
    "SessionEndEvent",
    "SessionEnded",
    "SessionState",
    "TierInfo",
    "Unauthenticated",
    "ValidateResult",
    "Verdict",
    "WatchEvent",
    "WatchStream",
    "duration_to_seconds",
    "fingerprint",
    "lease_digest",
    "load_channel_credentials",
    "peer_identity",
    "seconds_to_duration",
    "translate_rpc_error",
]

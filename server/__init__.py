"""The session authority: lease table, expiry, stores, policy and the gRPC servicer."""

from ._auth import ApiKeyAuthenticator
from ._auth import AuthenticationError
from ._auth import Authenticator
from ._auth import CallerInfo
from ._auth import InsecureDevAuthenticator
from ._authority import Authority
from ._authority import AuthorityConfig
from ._authority import AuthorityThread
from ._clock import Clock
from ._clock import ManualClock
from ._clock import SystemClock
from ._policy import MethodRule
from ._policy import Policy
from ._policy import PolicyError
from ._policy import Tier
from ._policy import load_policy
from ._policy import parse_policy
from ._store import LeaseStore
from ._store import SqliteLeaseStore
from ._store import StoreError
from ._table import EndReason
from ._table import LeaseSnapshot
from ._table import LeaseState
from ._table import LeaseTable

__all__ = [
    "ApiKeyAuthenticator",
    "AuthenticationError",
    "Authenticator",
    "Authority",
    "AuthorityConfig",
    "AuthorityThread",
    "CallerInfo",
    "Clock",
    "EndReason",
    "InsecureDevAuthenticator",
    "LeaseSnapshot",
    "LeaseState",
    "LeaseStore",
    "LeaseTable",
    "ManualClock",
    "MethodRule",
    "Policy",
    "PolicyError",
    "SqliteLeaseStore",
    "StoreError",
    "SystemClock",
    "Tier",
    "load_policy",
    "parse_policy",
]

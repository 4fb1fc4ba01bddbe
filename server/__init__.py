"""The session authority: lease table, expiry, stores, policy and the gRPC servicer."""

from ._audit import AuditLog
from ._audit import AuditReceipt
from ._audit import AuditSink
from ._audit import AuditWriteError
from ._audit import DuplicateEvent as AuditDuplicateEvent
from ._audit import LastHash as AuditLastHash
from ._audit import ReplicaVerifyResult as AuditReplicaVerifyResult
from ._audit import VerifyError as AuditVerifyError
from ._audit import VerifyResult as AuditVerifyResult
from ._audit import tail as tail_audit_log
from ._audit import read_last_hash as read_audit_last_hash
from ._audit import verify as verify_audit_log
from ._audit import verify_replicas as verify_audit_replicas
from ._auth import ApiKeyAuthenticator
from ._auth import AuthenticationError
from ._auth import Authenticator
from ._auth import CallerInfo
from ._auth import InsecureDevAuthenticator
from ._auth import MtlsAuthenticator
from ._auth import append_api_key
from ._auth import hash_api_key
from ._authority import Authority
from ._authority import AuthorityConfig
from ._authority import AuthorityThread
from ._clock import Clock
from ._clock import ManualClock
from ._clock import SystemClock
from ._limits import LimitExceeded
from ._limits import PrincipalLimiter
from ._policy import Bounds
from ._policy import Limits
from ._policy import MethodRule
from ._policy import Policy
from ._policy import PolicyError
from ._policy import Tier
from ._policy import UnknownTierError
from ._policy import load_policy
from ._policy import parse_duration
from ._policy import parse_policy
from ._etcd_store import EndClaim
from ._etcd_store import EtcdLeaseStore
from ._store import ClockAnchor
from ._store import ClockAnchorStore
from ._store import LeaseStore
from ._store import SqliteLeaseStore
from ._store import StoreError
from ._table import EndReason
from ._table import LeaseSnapshot
from ._table import LeaseState
from ._table import LeaseTable
from ._tls import TlsConfigError
from ._tls import server_credentials as load_server_credentials

__all__ = [
    "ApiKeyAuthenticator",
    "AuditDuplicateEvent",
    "AuditLastHash",
    "AuditLog",
    "AuditReceipt",
    "AuditReplicaVerifyResult",
    "AuditSink",
    "AuditVerifyError",
    "AuditVerifyResult",
    "AuditWriteError",
    "AuthenticationError",
    "Authenticator",
    "Authority",
    "AuthorityConfig",
    "AuthorityThread",
    "Bounds",
    "CallerInfo",
    "Clock",
    "ClockAnchor",
    "ClockAnchorStore",
    "EndClaim",
    "EndReason",
    "EtcdLeaseStore",
    "InsecureDevAuthenticator",
    "LeaseSnapshot",
    "LeaseState",
    "LeaseStore",
    "LeaseTable",
    "LimitExceeded",
    "Limits",
    "ManualClock",
    "MethodRule",
    "MtlsAuthenticator",
    "Policy",
    "PolicyError",
    "PrincipalLimiter",
    "SqliteLeaseStore",
    "StoreError",
    "SystemClock",
    "Tier",
    "TlsConfigError",
    "UnknownTierError",
    "append_api_key",
    "hash_api_key",
    "load_policy",
    "load_server_credentials",
    "parse_duration",
    "parse_policy",
    "read_audit_last_hash",
    "tail_audit_log",
    "verify_audit_log",
    "verify_audit_replicas",
]

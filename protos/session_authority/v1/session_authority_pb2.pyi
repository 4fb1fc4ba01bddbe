import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EndReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    END_REASON_UNSPECIFIED: _ClassVar[EndReason]
    END_REASON_IDLE_TIMEOUT: _ClassVar[EndReason]
    END_REASON_MAX_DURATION: _ClassVar[EndReason]
    END_REASON_REVOKED: _ClassVar[EndReason]
    END_REASON_RELEASED: _ClassVar[EndReason]
    END_REASON_POLICY: _ClassVar[EndReason]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    LEASE_STATE_ALIVE: _ClassVar[LeaseState]
    LEASE_STATE_ENDED: _ClassVar[LeaseState]
    LEASE_STATE_NOT_FOUND: _ClassVar[LeaseState]

class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    VERDICT_UNSPECIFIED: _ClassVar[Verdict]
    VERDICT_ALLOW: _ClassVar[Verdict]
    VERDICT_ENDED: _ClassVar[Verdict]
    VERDICT_NOT_FOUND: _ClassVar[Verdict]
    VERDICT_PRINCIPAL_MISMATCH: _ClassVar[Verdict]
    VERDICT_POLICY_DENIED: _ClassVar[Verdict]
END_REASON_UNSPECIFIED: EndReason
END_REASON_IDLE_TIMEOUT: EndReason
END_REASON_MAX_DURATION: EndReason
END_REASON_REVOKED: EndReason
END_REASON_RELEASED: EndReason
END_REASON_POLICY: EndReason
LEASE_STATE_UNSPECIFIED: LeaseState
LEASE_STATE_ALIVE: LeaseState
LEASE_STATE_ENDED: LeaseState
LEASE_STATE_NOT_FOUND: LeaseState
VERDICT_UNSPECIFIED: Verdict
VERDICT_ALLOW: Verdict
VERDICT_ENDED: Verdict
VERDICT_NOT_FOUND: Verdict
VERDICT_PRINCIPAL_MISMATCH: Verdict
VERDICT_POLICY_DENIED: Verdict

class Lease(_message.Message):
    __slots__ = ("fingerprint", "principal", "tier", "state", "end_reason", "idle_timeout", "max_duration", "ttl", "max_remaining", "age", "idle_for", "granted_at", "ended_at", "digest")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    END_REASON_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    MAX_REMAINING_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    IDLE_FOR_FIELD_NUMBER: _ClassVar[int]
    GRANTED_AT_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    principal: str
    tier: str
    state: LeaseState
    end_reason: EndReason
    idle_timeout: _duration_pb2.Duration
    max_duration: _duration_pb2.Duration
    ttl: _duration_pb2.Duration
    max_remaining: _duration_pb2.Duration
    age: _duration_pb2.Duration
    idle_for: _duration_pb2.Duration
    granted_at: _timestamp_pb2.Timestamp
    ended_at: _timestamp_pb2.Timestamp
    digest: str
    def __init__(self, fingerprint: _Optional[str] = ..., principal: _Optional[str] = ..., tier: _Optional[str] = ..., state: _Optional[_Union[LeaseState, str]] = ..., end_reason: _Optional[_Union[EndReason, str]] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_remaining: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., idle_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., granted_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., digest: _Optional[str] = ...) -> None: ...

class GrantRequest(_message.Message):
    __slots__ = ("principal", "tier", "idle_timeout")
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    principal: str
    tier: str
    idle_timeout: _duration_pb2.Duration
    def __init__(self, principal: _Optional[str] = ..., tier: _Optional[str] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GrantResponse(_message.Message):
    __slots__ = ("lease_id", "lease")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    lease: Lease
    def __init__(self, lease_id: _Optional[str] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class RenewEntry(_message.Message):
    __slots__ = ("lease_id", "idle_for")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    IDLE_FOR_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    idle_for: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., idle_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewRequest(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[RenewEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[RenewEntry, _Mapping]]] = ...) -> None: ...

class RenewResponse(_message.Message):
    __slots__ = ("leases",)
    LEASES_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("sequence", "entries")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    entries: _containers.RepeatedCompositeFieldContainer[RenewEntry]
    def __init__(self, sequence: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[RenewEntry, _Mapping]]] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("sequence", "leases")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    def __init__(self, sequence: _Optional[int] = ..., leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("lease_id", "fingerprint", "release")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    RELEASE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    fingerprint: str
    release: bool
    def __init__(self, lease_id: _Optional[str] = ..., fingerprint: _Optional[str] = ..., release: _Optional[bool] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("lease", "already_ended")
    LEASE_FIELD_NUMBER: _ClassVar[int]
    ALREADY_ENDED_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    already_ended: bool
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ..., already_ended: _Optional[bool] = ...) -> None: ...

class TimeToLiveRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class TimeToLiveResponse(_message.Message):
    __slots__ = ("lease",)
    LEASE_FIELD_NUMBER: _ClassVar[int]
    lease: Lease
    def __init__(self, lease: _Optional[_Union[Lease, _Mapping]] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "principal", "tier")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    principal: str
    tier: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., principal: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ValidateRequest(_message.Message):
    __slots__ = ("lease_id", "caller_principal", "method")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_PRINCIPAL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    caller_principal: str
    method: str
    def __init__(self, lease_id: _Optional[str] = ..., caller_principal: _Optional[str] = ..., method: _Optional[str] = ...) -> None: ...

class ValidateResponse(_message.Message):
    __slots__ = ("verdict", "lease", "rule", "details")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RULE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    lease: Lease
    rule: MethodRule
    details: str
    def __init__(self, verdict: _Optional[_Union[Verdict, str]] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., rule: _Optional[_Union[MethodRule, _Mapping]] = ..., details: _Optional[str] = ...) -> None: ...

class WatchSessionEndsRequest(_message.Message):
    __slots__ = ("after_sequence", "instance_id")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    instance_id: str
    def __init__(self, after_sequence: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class SessionEnd(_message.Message):
    __slots__ = ("sequence", "lease", "revoked_by")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    lease: Lease
    revoked_by: str
    def __init__(self, sequence: _Optional[int] = ..., lease: _Optional[_Union[Lease, _Mapping]] = ..., revoked_by: _Optional[str] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("now", "sequence", "interval", "instance_id")
    NOW_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    now: _timestamp_pb2.Timestamp
    sequence: int
    interval: _duration_pb2.Duration
    instance_id: str
    def __init__(self, now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sequence: _Optional[int] = ..., interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class WatchSessionEndsResponse(_message.Message):
    __slots__ = ("end", "heartbeat", "reset")
    END_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    RESET_FIELD_NUMBER: _ClassVar[int]
    end: SessionEnd
    heartbeat: Heartbeat
    reset: bool
    def __init__(self, end: _Optional[_Union[SessionEnd, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., reset: _Optional[bool] = ...) -> None: ...

class NowRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class NowResponse(_message.Message):
    __slots__ = ("now", "instance_id")
    NOW_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    now: _timestamp_pb2.Timestamp
    instance_id: str
    def __init__(self, now: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., instance_id: _Optional[str] = ...) -> None: ...

class Tier(_message.Message):
    __slots__ = ("name", "idle_timeout", "max_duration")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    MAX_DURATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    idle_timeout: _duration_pb2.Duration
    max_duration: _duration_pb2.Duration
    def __init__(self, name: _Optional[str] = ..., idle_timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., max_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class MethodRule(_message.Message):
    __slots__ = ("pattern", "tiers", "max_session_age", "exempt")
    PATTERN_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_AGE_FIELD_NUMBER: _ClassVar[int]
    EXEMPT_FIELD_NUMBER: _ClassVar[int]
    pattern: str
    tiers: _containers.RepeatedScalarFieldContainer[str]
    max_session_age: _duration_pb2.Duration
    exempt: bool
    def __init__(self, pattern: _Optional[str] = ..., tiers: _Optional[_Iterable[str]] = ..., max_session_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., exempt: _Optional[bool] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetPolicyResponse(_message.Message):
    __slots__ = ("tiers", "rules")
    TIERS_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    tiers: _containers.RepeatedCompositeFieldContainer[Tier]
    rules: _containers.RepeatedCompositeFieldContainer[MethodRule]
    def __init__(self, tiers: _Optional[_Iterable[_Union[Tier, _Mapping]]] = ..., rules: _Optional[_Iterable[_Union[MethodRule, _Mapping]]] = ...) -> None: ...

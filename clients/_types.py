"""Typed, immutable views of the authority's protobuf messages, with durations in float seconds."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from typing import Union

from google.protobuf import duration_pb2, timestamp_pb2

from session_authority.clients._metadata import EndReason
from session_authority.v1 import session_authority_pb2 as pb

MAX_DURATION_SECONDS = 315_576_000_000
"""Largest value a ``google.protobuf.Duration`` can hold (about 10,000 years)."""


def duration_to_seconds(duration: duration_pb2.Duration) -> float:
    """Convert a protobuf Duration to float seconds."""
    return duration.seconds + duration.nanos / 1e9


def seconds_to_duration(seconds: float, *, field: str = "duration") -> duration_pb2.Duration:
    """Convert float seconds to a protobuf Duration.

    Args:
        seconds: A finite, non-negative number of seconds.
        field: The name used in the error message, such as ``"idle_timeout_seconds"``.

    Raises:
        ValueError: ``seconds`` is not a number, is negative, NaN, infinite or
            larger than a Duration can hold.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise ValueError(f"{field} must be a number of seconds, got {seconds!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{field} must be a finite number of seconds >= 0, got {seconds!r}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(
            f"{field} must be at most {MAX_DURATION_SECONDS} seconds "
            f"(the protobuf Duration limit), got {seconds!r}"
        )
    whole_seconds = int(seconds)
    nanos = round((seconds - whole_seconds) * 1e9)
    if nanos >= 1_000_000_000:
        whole_seconds += 1
        nanos -= 1_000_000_000
    return duration_pb2.Duration(seconds=whole_seconds, nanos=nanos)


def timestamp_to_datetime(timestamp: timestamp_pb2.Timestamp) -> datetime.datetime:
    """Convert a protobuf Timestamp to a UTC-aware datetime."""
    return timestamp.ToDatetime(tzinfo=datetime.timezone.utc)


class LeaseState(str, enum.Enum):
    """Whether the authority considers a lease alive."""

    ALIVE = "alive"
    ENDED = "ended"
    NOT_FOUND = "not_found"


class Verdict(str, enum.Enum):
    """The authority's decision on one call under one lease (from ``Validate``)."""

    ALLOW = "allow"
    ENDED = "ended"
    NOT_FOUND = "not_found"
    PRINCIPAL_MISMATCH = "principal_mismatch"
    POLICY_DENIED = "policy_denied"


_LEASE_STATES = {
    pb.LEASE_STATE_ALIVE: LeaseState.ALIVE,
    pb.LEASE_STATE_ENDED: LeaseState.ENDED,
    pb.LEASE_STATE_NOT_FOUND: LeaseState.NOT_FOUND,
}

_END_REASONS = {
    pb.END_REASON_IDLE_TIMEOUT: EndReason.IDLE_TIMEOUT,
    pb.END_REASON_MAX_DURATION: EndReason.MAX_DURATION,
    pb.END_REASON_REVOKED: EndReason.REVOKED,
    pb.END_REASON_RELEASED: EndReason.RELEASED,
    pb.END_REASON_POLICY: EndReason.POLICY,
}

_VERDICTS = {
    pb.VERDICT_ALLOW: Verdict.ALLOW,
    pb.VERDICT_ENDED: Verdict.ENDED,
    pb.VERDICT_NOT_FOUND: Verdict.NOT_FOUND,
    pb.VERDICT_PRINCIPAL_MISMATCH: Verdict.PRINCIPAL_MISMATCH,
    pb.VERDICT_POLICY_DENIED: Verdict.POLICY_DENIED,
}


def lease_state_from_proto(value: int) -> LeaseState:
    """Convert a ``LeaseState`` enum number from the wire.

    Raises:
        ValueError: The number is UNSPECIFIED or newer than this client. A
            client that guessed here could mistake an ended lease for a live one.
    """
    try:
        return _LEASE_STATES[value]
    except KeyError:
        raise ValueError(
            f"the authority sent lease state {value}, which this client does not know; "
            "upgrade grpc-session-authority"
        ) from None


def end_reason_from_proto(value: int) -> EndReason | None:
    """Convert an ``EndReason`` enum number: None for UNSPECIFIED, ``UNKNOWN`` for newer values."""
    if value == pb.END_REASON_UNSPECIFIED:
        return None
    return _END_REASONS.get(value, EndReason.UNKNOWN)


def verdict_from_proto(value: int) -> Verdict:
    """Convert a ``Verdict`` enum number from the wire.

    Raises:
        ValueError: The number is UNSPECIFIED or newer than this client.
    """
    try:
        return _VERDICTS[value]
    except KeyError:
        raise ValueError(
            f"the authority sent verdict {value}, which this client does not know; "
            "upgrade grpc-session-authority"
        ) from None


@dataclasses.dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A lease as the authority described it, without its ID.

    Durations are float seconds measured by the authority when it sent the
    reply. ``ttl_seconds`` and ``max_remaining_seconds`` are zero unless the
    lease is alive.
    """

    fingerprint: str
    digest: str
    principal: str
    tier: str
    state: LeaseState
    end_reason: EndReason | None
    idle_timeout_seconds: float
    max_duration_seconds: float
    ttl_seconds: float
    max_remaining_seconds: float
    age_seconds: float
    idle_for_seconds: float
    granted_at: datetime.datetime | None
    ended_at: datetime.datetime | None

    @property
    def alive(self) -> bool:
        """True when the authority considered the lease alive when it sent the reply."""
        return self.state is LeaseState.ALIVE

    @classmethod
    def from_proto(cls, message: pb.Lease) -> LeaseInfo:
        """Convert a ``session_authority.v1.Lease`` message.

        Raises:
            ValueError: The message carries a lease state this client does not know.
        """
        return cls(
            fingerprint=message.fingerprint,
            digest=message.digest,
            principal=message.principal,
            tier=message.tier,
            state=lease_state_from_proto(message.state),
            end_reason=end_reason_from_proto(message.end_reason),
            idle_timeout_seconds=duration_to_seconds(message.idle_timeout),
            max_duration_seconds=duration_to_seconds(message.max_duration),
            ttl_seconds=duration_to_seconds(message.ttl),
            max_remaining_seconds=duration_to_seconds(message.max_remaining),
            age_seconds=duration_to_seconds(message.age),
            idle_for_seconds=duration_to_seconds(message.idle_for),
            granted_at=(
                timestamp_to_datetime(message.granted_at) if message.HasField("granted_at") else None
            ),
            ended_at=(
                timestamp_to_datetime(message.ended_at) if message.HasField("ended_at") else None
            ),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class GrantedLease:
    """A newly granted lease with its ID, the bearer credential.

    The ID is left out of ``repr()`` so that logging this object never leaks
    it; the repr shows the lease's fingerprint instead.

    Attributes:
        lease_id: The credential to send in the ``session-lease`` metadata key.
        lease: The lease as the authority described it in the grant reply.
        sent_at_monotonic: The local ``time.monotonic()`` reading taken just
            before the grant request was sent.
    """

    lease_id: str = dataclasses.field(repr=False)
    lease: LeaseInfo
    sent_at_monotonic: float

    @property
    def fingerprint(self) -> str:
        """The loggable name of the lease."""
        return self.lease.fingerprint

    def local_deadline(self, drift_margin_seconds: float = 0.0) -> float:
        """Return the local monotonic time by which the holder must treat the lease as ended.

        The authority measured ``ttl`` no earlier than the request was sent, so
        ``sent_at_monotonic + ttl`` is never later than the authority's own
        deadline (ignoring clock rate drift, which ``drift_margin_seconds``
        covers).
        """
        return self.sent_at_monotonic + self.lease.ttl_seconds - drift_margin_seconds


@dataclasses.dataclass(frozen=True, slots=True)
class RenewResult:
    """The authority's reply to one renewal batch.

    Attributes:
        leases: One entry per renewal entry, in request order. A lease the
            authority has no record of comes back with state ``not_found``.
        sent_at_monotonic: The local ``time.monotonic()`` reading taken just
            before the batch was sent; each lease's conservative local deadline
            is ``sent_at_monotonic + ttl_seconds - drift margin``.
    """

    leases: list[LeaseInfo]
    sent_at_monotonic: float


@dataclasses.dataclass(frozen=True, slots=True)
class RevokeResult:
    """The authority's reply to a revoke or release.

    Attributes:
        lease: The lease after the request, now ended.
        already_ended: True when the lease had ended before the request;
            ``lease.end_reason`` is then the original reason.
    """

    lease: LeaseInfo
    already_ended: bool


@dataclasses.dataclass(frozen=True, slots=True)
class MethodRuleInfo:
    """A per-method rule of the policy.

    Attributes:
        pattern: ``/package.Service/Method`` or ``/package.Service/*``; empty
            for the default rule that applies when no pattern matches.
        tiers: When non-empty, the tiers a lease must be in.
        max_session_age_seconds: When set, leases older than this are refused.
        exempt: True when matching calls need no lease and are not activity.
    """

    pattern: str
    tiers: tuple[str, ...]
    max_session_age_seconds: float | None
    exempt: bool

    @classmethod
    def from_proto(cls, message: pb.MethodRule) -> MethodRuleInfo:
        """Convert a ``session_authority.v1.MethodRule`` message."""
        return cls(
            pattern=message.pattern,
            tiers=tuple(message.tiers),
            max_session_age_seconds=(
                duration_to_seconds(message.max_session_age)
                if message.HasField("max_session_age")
                else None
            ),
            exempt=message.exempt,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class ValidateResult:
    """The authority's decision on one call.

    Attributes:
        verdict: Whether the call may proceed, and if not, why.
        lease: The lease, or None when the verdict is ``not_found``.
        rule: The rule that applies to the method, for an enforcer's cache.
        details: Why the call is refused, for the status details; empty when allowed.
    """

    verdict: Verdict
    lease: LeaseInfo | None
    rule: MethodRuleInfo
    details: str

    @property
    def allowed(self) -> bool:
        """True when the verdict is ``allow``."""
        return self.verdict is Verdict.ALLOW

    @classmethod
    def from_proto(cls, message: pb.ValidateResponse) -> ValidateResult:
        """Convert a ``ValidateResponse``.

        Raises:
            ValueError: The message carries a verdict or lease state this client does not know.
        """
        return cls(
            verdict=verdict_from_proto(message.verdict),
            lease=LeaseInfo.from_proto(message.lease) if message.HasField("lease") else None,
            rule=MethodRuleInfo.from_proto(message.rule),
            details=message.details,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class TierInfo:
    """A risk tier of the policy, fixing the timeouts of the leases granted in it."""

    name: str
    idle_timeout_seconds: float
    max_duration_seconds: float

    @classmethod
    def from_proto(cls, message: pb.Tier) -> TierInfo:
        """Convert a ``session_authority.v1.Tier`` message."""
        return cls(
            name=message.name,
            idle_timeout_seconds=duration_to_seconds(message.idle_timeout),
            max_duration_seconds=duration_to_seconds(message.max_duration),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyInfo:
    """The tiers and method rules the authority enforces."""

    tiers: list[TierInfo]
    rules: list[MethodRuleInfo]

    def tier(self, name: str) -> TierInfo | None:
        """Return the tier called ``name``, or None when the policy has none by that name."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        return None

    @classmethod
    def from_proto(cls, message: pb.GetPolicyResponse) -> PolicyInfo:
        """Convert a ``GetPolicyResponse``."""
        return cls(
            tiers=[TierInfo.from_proto(tier) for tier in message.tiers],
            rules=[MethodRuleInfo.from_proto(rule) for rule in message.rules],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEndEvent:
    """A lease ended (from the ``WatchSessionEnds`` stream).

    Attributes:
        sequence: Strictly increasing per authority instance; pass the last one
            seen as ``after_sequence`` to resume.
        lease: The ended lease.
        revoked_by: The principal that revoked it, for reason ``revoked``; else empty.
        reset: True when the authority could not replay every end after the
            requested sequence, so the watcher must drop everything it cached.
    """

    sequence: int
    lease: LeaseInfo
    revoked_by: str
    reset: bool


@dataclasses.dataclass(frozen=True, slots=True)
class HeartbeatEvent:
    """A sign of life on the ``WatchSessionEnds`` stream.

    Attributes:
        sequence: The sequence number of the latest end sent so far.
        now: The authority's wall time (UTC).
        interval_seconds: The next heartbeat is due within this many seconds.
        instance_id: Identifies the authority's run; a change means sequences restarted.
        reset: Same meaning as :attr:`SessionEndEvent.reset`.
    """

    sequence: int
    now: datetime.datetime
    interval_seconds: float
    instance_id: str
    reset: bool


WatchEvent = Union[SessionEndEvent, HeartbeatEvent]
"""One item of the ``WatchSessionEnds`` stream."""


def watch_event_from_proto(message: pb.WatchSessionEndsResponse) -> WatchEvent | None:
    """Convert one ``WatchSessionEndsResponse``.

    Returns:
        The event, or None when the message carries an event kind that this
        client does not know (from a newer authority); callers skip those.
    """
    kind = message.WhichOneof("event")
    if kind == "end":
        return SessionEndEvent(
            sequence=message.end.sequence,
            lease=LeaseInfo.from_proto(message.end.lease),
            revoked_by=message.end.revoked_by,
            reset=message.reset,
        )
    if kind == "heartbeat":
        heartbeat = message.heartbeat
        return HeartbeatEvent(
            sequence=heartbeat.sequence,
            now=timestamp_to_datetime(heartbeat.now),
            interval_seconds=duration_to_seconds(heartbeat.interval),
            instance_id=heartbeat.instance_id,
            reset=message.reset,
        )
    return None

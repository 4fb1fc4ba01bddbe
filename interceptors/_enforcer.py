"""The enforcement core shared by the sync and aio server interceptors.

The core decides whether a call may run under its lease from a local cache,
asks the authority (``Validate``) only on a miss, keeps the set of calls in
flight per lease, and ends those calls when the lease ends. Only the waiting
parts (blocking or awaiting, how a call is cut off) live in the sync and aio
interceptor modules.

Time model: every local deadline is ``local_monotonic_at_send + ttl -
drift_margin``, so this server's view of a lease ends no later than the
authority's. A cached entry whose deadline passed without a renewal answer is
never trusted again without asking the authority.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import logging
import math
import re
import threading
import time
from typing import Any, Callable, Protocol, Sequence

import grpc

from session_authority.clients._errors import AuthorityError, AuthorityUnavailable
from session_authority.clients._metadata import LEASE_METADATA_KEY, EndReason, fingerprint, lease_digest, peer_identity
from session_authority.clients._types import (
    LeaseInfo,
    LeaseState,
    MethodRuleInfo,
    PolicyInfo,
    RenewResult,
    SessionEndEvent,
    ValidateResult,
)
from session_authority.interceptors import _errors
from session_authority.interceptors._authority_link import AuthorityLink
from session_authority.interceptors._cache import ExpiringLru
from session_authority.interceptors._errors import LeaseRefused
from session_authority.interceptors._telemetry import EnforcerMetrics
from session_authority.interceptors._timer import Timer, TimerHandle

logger = logging.getLogger(__name__)

DEFAULT_EXEMPT_PATTERNS: tuple[str, ...] = (
    "/grpc.health.v1.Health/*",
    "/grpc.reflection.v1.ServerReflection/*",
    "/grpc.reflection.v1alpha.ServerReflection/*",
)
"""Methods that pass without a lease even when the authority's policy cannot be fetched."""

MAX_LEASE_METADATA_LENGTH = 256
"""Maximum length of a lease metadata value; the authority rejects longer lease IDs too."""

DEFAULT_HEARTBEAT_INTERVAL_SECONDS = 1.0
"""Heartbeat interval assumed until the watch stream reports the authority's own."""

STALENESS_HEARTBEATS = 3
"""The default staleness bound, in heartbeat intervals."""

MIN_STALENESS_HEARTBEATS = 2
"""A configured staleness bound is raised to this many heartbeat intervals once the authority reports its interval.

A shorter bound runs out between two heartbeats of a healthy stream, so the
enforcer would refuse calls about once per heartbeat interval.
"""

RECONNECTS_PER_STALENESS_BOUND = 4
"""The watch stream's reconnect delay stays under the staleness bound divided by this.

The bound runs from the last message before an outage, so the rest of the
heartbeat interval, the outage, the authority's start-up and the reconnect
must all fit in it. Without this cap the reconnect delay alone could grow to
``reconnect_backoff_max_seconds`` (2 s by default) of the default 3 s bound.
"""

_MIN_PROBE_INTERVAL_SECONDS = 0.02

UNCONFIRMED_ACTIVITY_SPACING_SECONDS = 0.2
"""Minimum time between two kept reports of activity that the authority did not receive.

The authority applies a lease's reports in order. After a restart it takes
a report only if it comes before the idle deadline that the report before it
set. Reports this close together therefore chain for any idle timeout of 1 s
or more, the default lower bound of a policy's idle timeouts.
"""

MAX_UNCONFIRMED_ACTIVITY = 150
"""Reports kept per lease while the authority is unreachable: 30 s of activity at the spacing above."""

MAX_ORPHAN_REPORT_AGE_SECONDS = 30.0
"""How long the activity of a lease dropped from the cache is still sent after failures."""
_MAX_VALIDATION_ROUNDS = 3
_MAX_WRAPPED_HANDLERS = 1024
_WATCH_REJECTED_DETAILS = (
    "the authority rejected this enforcer's watch stream; fix its credentials or the policy's watchers"
)
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")


@dataclasses.dataclass(frozen=True)

class EnforcerConfig:
    """Settings of a server interceptor's enforcer.

    Attributes:
        authority_target: ``host:port`` of the authority; the enforcer opens
            and closes its own channel. Give this or ``authority_channel``.
        authority_channel: An existing channel to the authority; the caller
            keeps ownership.
        authority_credentials: TLS credentials for the channel opened to
            ``authority_target``.
        api_key: Sent to the authority as ``authorization: Bearer <key>``.
        metadata_key: Request metadata key that carries the lease. It is
            normalised to lower case; a ``-bin`` or ``grpc-`` key, or one with
            characters gRPC does not allow in keys, raises ``ValueError``.
        staleness_bound_seconds: After this long without any message on the
            watch stream (heartbeats included) cached leases are no longer
            trusted. None means three heartbeat intervals as the authority
            reports them (3 s until the first heartbeat). A value under two
            heartbeat intervals is raised to two, with a warning, once the
            authority reports its interval.
        fail_open: When the watch stream is stale, keep admitting calls on
            cached leases until their max duration, instead of refusing and
            cutting off calls with reason ``authority_unreachable``.
        drift_margin_seconds: Subtracted from every local deadline to cover
            clock rate differences between this host and the authority.
        negative_cache_size: Unknown lease IDs remembered, so that repeated
            garbage costs the authority nothing.
        negative_cache_ttl_seconds: How long an unknown lease ID is remembered.
        ended_cache_size: Ended lease IDs remembered with their end reason.
        activity_batch_interval_seconds: Pause between two activity reports.
        validate_timeout_seconds: Deadline of each ``Validate`` on a cache miss.
            A call waits up to twice this long for its lease's ``Validate``,
            time in the queue included. A ``Validate`` that every waiting
            call gave up on is not sent.
        max_pending_validations: Maximum number of leases whose ``Validate``
            may be queued or in flight at once. A cache miss beyond it is refused at once
            as ``authority_unreachable``, so a slow authority cannot make
            the queue, and the calls waiting on it, grow without bound.
        policy_timeout_seconds: Deadline of the ``GetPolicy`` call at start.
        caller_identity: Returns the caller's principal from a servicer
            context, or None to skip the principal check for that call. By
            default it is the first TLS peer identity when the transport
            authenticated one, else None.
        exempt_patterns: Method patterns that need no lease in addition to
            the exempt patterns of the authority's policy.
        reconnect_backoff_initial_seconds: First delay before reconnecting a
            broken watch stream; it doubles up to the maximum, with jitter.
        reconnect_backoff_max_seconds: Largest reconnect delay. The delay
            also stays under a quarter of the staleness bound, so a short
            bound sets the retry rate. While the authority cannot be
            reached, a retry waits for the channel to connect rather than
            failing at once.
        meter_provider: An ``opentelemetry.metrics.MeterProvider`` for the
            enforcer's metrics; None means the global meter provider.
    """

    authority_target: str | None = None
    authority_channel: grpc.Channel | None = None
    authority_credentials: grpc.ChannelCredentials | None = None
    api_key: str | None = dataclasses.field(default=None, repr=False)
    metadata_key: str = LEASE_METADATA_KEY
    staleness_bound_seconds: float | None = None
    fail_open: bool = False
    drift_margin_seconds: float = 0.05
    negative_cache_size: int = 10_000
    negative_cache_ttl_seconds: float = 30.0
    ended_cache_size: int = 10_000
    activity_batch_interval_seconds: float = 0.1
    validate_timeout_seconds: float = 2.0
    max_pending_validations: int = 1024
    policy_timeout_seconds: float = 5.0
    caller_identity: Callable[[Any], str | None] | None = None
    exempt_patterns: tuple[str, ...] = DEFAULT_EXEMPT_PATTERNS
    reconnect_backoff_initial_seconds: float = 0.05
    reconnect_backoff_max_seconds: float = 2.0
    meter_provider: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if (self.authority_target is None) == (self.authority_channel is None):
            raise ValueError(
                "EnforcerConfig needs exactly one of authority_target='host:port' or authority_channel="
            )
        if self.authority_channel is not None and self.authority_credentials is not None:
            raise ValueError("authority_credentials apply only to authority_target; configure your channel yourself")
        object.__setattr__(self, "metadata_key", normalize_metadata_key(self.metadata_key))
        _check_positive("drift_margin_seconds", self.drift_margin_seconds, allow_zero=True)
        _check_positive("negative_cache_ttl_seconds", self.negative_cache_ttl_seconds)
        _check_positive("activity_batch_interval_seconds", self.activity_batch_interval_seconds)
        _check_positive("validate_timeout_seconds", self.validate_timeout_seconds)
        _check_positive("policy_timeout_seconds", self.policy_timeout_seconds)
        _check_positive("reconnect_backoff_initial_seconds", self.reconnect_backoff_initial_seconds)
        _check_positive("reconnect_backoff_max_seconds", self.reconnect_backoff_max_seconds)
        if self.staleness_bound_seconds is not None:
            _check_positive("staleness_bound_seconds", self.staleness_bound_seconds)
        for name in ("negative_cache_size", "ended_cache_size", "max_pending_validations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "exempt_patterns", tuple(self.exempt_patterns))
        for pattern in self.exempt_patterns:
            if not _is_method_pattern(pattern):
                raise ValueError(
                    f"exempt pattern {pattern!r} is not '/package.Service/Method' or '/package.Service/*'"
                )


def _check_positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {value!r}")


def _is_method_pattern(pattern: str) -> bool:
    return isinstance(pattern, str) and pattern.startswith("/") and pattern.count("/") == 2 and not pattern.endswith("/")


def normalize_metadata_key(key: str) -> str:
    """Return the lease metadata key in lower case.

    Raises:
        ValueError: The key is empty, ends in ``-bin`` (binary values cannot
            carry a lease ID), starts with the reserved ``grpc-`` prefix, or
            has characters other than ``0-9 a-z _ . -``.
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"metadata_key must be a non-empty string, got {key!r}; the default is {LEASE_METADATA_KEY!r}")
    normalized = key.lower()
    if not _METADATA_KEY.fullmatch(normalized):
        raise ValueError(
            f"metadata_key {key!r} has characters gRPC does not allow in metadata keys;"
            " use only letters, digits, '-', '_' and '.'"
        )
    if normalized.endswith("-bin"):
        raise ValueError(f"metadata_key {key!r} ends in '-bin', which marks binary metadata; a lease ID is text")
    if normalized.startswith("grpc-"):
        raise ValueError(f"metadata_key {key!r} starts with 'grpc-', which gRPC reserves for itself")
    return normalized


def read_lease_id(metadata: Sequence[tuple[str, str | bytes]] | None, key: str) -> str:
    """Return the lease ID of a call, checked without contacting anyone.

    Args:
        metadata: The call's invocation metadata.
        key: The normalised lease metadata key.

    Raises:
        LeaseMissing: The key is absent.
        LeaseMalformed: The key is repeated, sent as binary, or its value is
            empty, longer than 256 characters or not printable ASCII.
    """
    values: list[str | bytes] = []
    binary_key = key + "-bin"
    binary_sent = False
    for name, value in metadata or ():
        if name == key:
            values.append(value)
        elif name == binary_key:
            binary_sent = True
    if binary_sent:
        raise _errors.LeaseMalformed(
            f"the lease was sent as binary metadata {binary_key!r}; send it as text under {key!r}"
        )
    if not values:
        raise _errors.LeaseMissing(f"the call carries no session lease; send a lease from Grant in the {key!r} metadata key")
    if len(values) > 1:
        raise _errors.LeaseMalformed(f"the {key!r} metadata key is repeated {len(values)} times; send exactly one lease")
    value = values[0]
    if isinstance(value, bytes):
        raise _errors.LeaseMalformed(f"the {key!r} metadata value is binary; send the lease ID as text")
    if not value:
        raise _errors.LeaseMalformed(f"the {key!r} metadata value is empty; send the lease ID from Grant")
    if len(value) > MAX_LEASE_METADATA_LENGTH:
        raise _errors.LeaseMalformed(
            f"the {key!r} metadata value is {len(value)} characters long, over the maximum"
            f" {MAX_LEASE_METADATA_LENGTH}; send the lease ID from Grant"
        )
    if not value.isascii() or not value.isprintable():
        raise _errors.LeaseMalformed(
            f"the {key!r} metadata value is not printable ASCII; send the lease ID from Grant"
        )
    return value


def default_caller_identity(context: Any) -> str | None:
    """Return the TLS peer's certificate identity (SPIFFE ID, else common name), or None without one.

    The authority derives a grant's principal by the same rule, so the
    rightful holder of a lease always passes this check.
    """
    try:
        return peer_identity(context.auth_context() or {})
    except ValueError as exc:
        # Principals never contain spaces, so this matches no lease and the
        # call is refused as a principal mismatch that names the problem.
        return f"invalid client certificate: {exc}"


@dataclasses.dataclass(frozen=True, slots=True)
class SessionEndInfo:
    """A lease that had calls on this server ended.

    Attributes:
        principal: The lease's principal.
        tier: The lease's tier.
        fingerprint: The loggable name of the lease.
        reason: Why it ended.
    """

    principal: str
    tier: str
    fingerprint: str
    reason: EndReason


SessionEndCallback = Callable[[SessionEndInfo], None]


class CallHandle(Protocol):
    """A call in flight, as the core tracks it; the sync and aio interceptors implement it."""

    def cut_off(self, refusal: LeaseRefused) -> None:
        """End the call with the refusal's status, details and trailer.

        Called from any thread, never under the enforcer's lock; must not block.
        """


class _Report:
    """One reported time of activity on a lease: a renewal's token.

    The token keeps the time it reported, so that a failed batch puts back
    its own time even when a later batch has reported the lease again.
    """

    __slots__ = ("entry", "at")

    def __init__(self, entry: _Entry, at: float) -> None:
        self.entry = entry
        self.at = at


def _add_unconfirmed(entry: _Entry, at: float) -> bool:
    """Keep ``at`` among the entry's undelivered activity, thinned to the spacing and bounded.

    Returns:
        Whether ``at`` was kept.
    """
    if not math.isfinite(at):
        return False
    points = entry.unconfirmed
    if points is None:
        entry.unconfirmed = [at]
        return True
    if points and abs(at - points[-1]) < UNCONFIRMED_ACTIVITY_SPACING_SECONDS:
        return False
    points.append(at)
    points.sort()
    if len(points) > MAX_UNCONFIRMED_ACTIVITY:
        # The oldest reports matter most after a long outage, so the newest go.
        del points[MAX_UNCONFIRMED_ACTIVITY:]
        return at in points
    return True


class _Entry:
    """A cached live lease. Fields change only under the enforcer's lock."""

    __slots__ = (
        "lease_id",
        "digest",
        "fingerprint",
        "principal",
        "tier",
        "granted_at",
        "deadline",
        "max_deadline",
        "last_activity",
        "reported_activity",
        "unconfirmed",
        "probe_requested",
        "calls",
        "had_calls",
        "timer",
        "ended",
        "view",
    )

    def __init__(self, lease_id: str, lease: LeaseInfo, sent_at: float, drift: float) -> None:
        self.lease_id = lease_id
        self.digest = lease.digest or lease_digest(lease_id)
        self.fingerprint = lease.fingerprint or fingerprint(lease_id)
        self.principal = lease.principal
        self.tier = lease.tier
        # The authority measured age no earlier than ``sent_at``, so this
        # estimate of the grant time is never later than the true one.
        self.granted_at = sent_at - lease.age_seconds
        self.deadline = sent_at + lease.ttl_seconds - drift
        self.max_deadline = sent_at + lease.max_remaining_seconds - drift
        self.last_activity = sent_at - lease.idle_for_seconds
        self.reported_activity = self.last_activity
        # Times of activity whose report failed, oldest first, or None.
        self.unconfirmed: list[float] | None = None
        self.probe_requested = False
        self.calls: set[CallHandle] = set()
        self.had_calls = False
        # The handle of the armed check, or None while none is armed; an end cancels it.
        self.timer: TimerHandle | None = None
        self.ended = False
        # The LeaseContext that handlers of this lease get, built on first use.
        self.view: LeaseContext | None = None

    def refresh(self, lease: LeaseInfo, sent_at: float, drift: float) -> None:
        # Answers may be applied out of order (a Validate racing a KeepAlive),
        # and every estimate is conservative, so the latest deadline wins.
        self.deadline = max(self.deadline, sent_at + lease.ttl_seconds - drift)
        self.max_deadline = max(self.max_deadline, sent_at + lease.max_remaining_seconds - drift)
        self.principal = lease.principal
        self.tier = lease.tier


class LeaseContext:
    """The lease of the call being handled, as :func:`current_lease` returns it.

    Attributes:
        principal: The lease's principal.
        tier: The lease's tier.
        fingerprint: The loggable name of the lease.
    """

    __slots__ = ("_entry", "_clock")

    def __init__(self, entry: _Entry, clock: Callable[[], float]) -> None:
        self._entry = entry
        self._clock = clock

    @property
    def principal(self) -> str:
        return self._entry.principal

    @property
    def tier(self) -> str:
        return self._entry.tier

    @property
    def fingerprint(self) -> str:
        return self._entry.fingerprint

    @property
    def remaining_seconds(self) -> float:
        """Seconds until this server treats the lease as ended unless activity renews it."""
        entry = self._entry
        return max(0.0, min(entry.deadline, entry.max_deadline) - self._clock())

    @property
    def max_remaining_seconds(self) -> float:
        """Seconds until the lease's max duration, which no renewal extends."""
        return max(0.0, self._entry.max_deadline - self._clock())

    def __repr__(self) -> str:
        return f"LeaseContext(fingerprint={self.fingerprint!r}, principal={self.principal!r}, tier={self.tier!r})"


_current_lease: contextvars.ContextVar[LeaseContext | None] = contextvars.ContextVar(
    "session_authority_current_lease", default=None
)


def current_lease() -> LeaseContext | None:
    """Return the lease of the call the current handler serves, or None outside an enforced call."""
    return _current_lease.get()


def set_current_lease(context: LeaseContext | None) -> contextvars.Token[LeaseContext | None]:
    """Set the value :func:`current_lease` returns; reset it with the returned token."""
    return _current_lease.set(context)


def reset_current_lease(token: contextvars.Token[LeaseContext | None]) -> None:
    """Undo :func:`set_current_lease`."""
    _current_lease.reset(token)


def close_responses(responses: Any) -> None:
    """Close a handler's response generator on its own thread; errors in its cleanup are logged, not raised.

    A cut-off leaves the generator suspended; closing it runs its cleanup now
    instead of at garbage collection.
    """
    close = getattr(responses, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception:  # noqa: BLE001 - the call already has its status
        logger.exception("closing the handler's response generator raised")


class _RuleBook:
    """Method rules: from the authority's policy when it could be fetched, else learned per method."""

    def __init__(self, exempt_patterns: Sequence[str]) -> None:
        self._local_exempt = tuple(MethodRuleInfo(p, (), None, True) for p in exempt_patterns)
        self._exact: dict[str, MethodRuleInfo] = {}
        self._service: dict[str, MethodRuleInfo] = {}
        self._learned: dict[str, MethodRuleInfo] = {}
        self.complete = False
        self._load(self._local_exempt)

    def load_policy(self, policy: PolicyInfo) -> None:
        # Build new maps and swap them in: gRPC's polling thread reads them
        # without the enforcer's lock.
        exact: dict[str, MethodRuleInfo] = {}
        service: dict[str, MethodRuleInfo] = {}
        self._fill(exact, service, policy.rules)
        self._fill(exact, service, self._local_exempt)
        self._exact, self._service = exact, service
        self.complete = True

    def _load(self, rules: Sequence[MethodRuleInfo]) -> None:
        self._fill(self._exact, self._service, rules)

    @staticmethod
    def _fill(
        exact: dict[str, MethodRuleInfo], service: dict[str, MethodRuleInfo], rules: Sequence[MethodRuleInfo]
    ) -> None:
        for rule in rules:
            if rule.pattern.endswith("/*"):
                service[rule.pattern[:-2]] = rule
            elif rule.pattern:
                exact[rule.pattern] = rule

    def learn(self, method: str, rule: MethodRuleInfo) -> None:
        if len(self._learned) >= 10_000:
            self._learned.clear()
        self._learned[method] = rule

    def rule_for(self, method: str) -> MethodRuleInfo | None:
        # The same precedence as the authority: an exact pattern, then the
        # service's wildcard, then the default rule that restricts nothing.
        rule = self._exact.get(method)
        if rule is not None:
            return rule
        rule = self._service.get(method.rpartition("/")[0])
        if rule is not None:
            return rule
        if self.complete:
            return _DEFAULT_RULE
        return self._learned.get(method)

    def is_exempt(self, method: str) -> bool:
        rule = self.rule_for(method)
        return rule is not None and rule.exempt


_DEFAULT_RULE = MethodRuleInfo(pattern="", tiers=(), max_session_age_seconds=None, exempt=False)

EXEMPT = object()
"""Returned by admission for a method that needs no lease."""


class _Validation:
    """A ``Validate`` queued or in flight, shared by every call that missed the cache on its lease."""

    __slots__ = ("lease_id", "digest", "future", "waited_until")

    def __init__(self, lease_id: str, waited_until: float) -> None:
        self.lease_id = lease_id
        self.digest = lease_digest(lease_id)
        self.future: concurrent.futures.Future[None] = concurrent.futures.Future()
        # Enforcer clock time at which the last waiting call gives up. A
        # later call on the same lease moves it later.
        self.waited_until = waited_until


class Enforcer:
    """Lease cache, admission decisions and the registry of calls in flight, for one server.

    Threading: every public method may be called from any thread (gRPC worker
    threads or an event loop thread) and returns quickly, except
    :meth:`admit`, which blocks for one ``Validate`` on a cache miss. Ends
    arrive on the link's threads and the timer thread; calls are cut off from
    there through :meth:`CallHandle.cut_off`. Session-end callbacks run on a
    dedicated thread, one at a time.

    Args:
        config: The settings.
        clock: Monotonic clock in seconds.
    """

    def __init__(self, config: EnforcerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._caller_identity = config.caller_identity or default_caller_identity
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._by_digest: dict[str, _Entry] = {}
        self._negative: ExpiringLru[str, bool] = ExpiringLru(config.negative_cache_size, config.negative_cache_ttl_seconds)
        self._ended: ExpiringLru[str, tuple[EndReason, str]] = ExpiringLru(config.ended_cache_size, None)
        self._rules = _RuleBook(config.exempt_patterns)
        self._pending: dict[str, _Validation] = {}
        # The same validations by lease digest, so an end pushed while one is
        # pending is not lost (see session_ended).
        self._pending_by_digest: dict[str, _Validation] = {}
        self._validate_log_at = -math.inf
        self._validate_log_suppressed = 0
        self._dirty: set[_Entry] = set()
        # Undelivered activity of leases dropped from the cache without an
        # end (watch reset, staleness): a restarted authority may need it.
        self._orphan_reports: list[_Report] = []
        self._callbacks: list[SessionEndCallback] = []
        self._callback_executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._validation_executor: concurrent.futures.ThreadPoolExecutor | None = None

        self._heartbeat_interval = DEFAULT_HEARTBEAT_INTERVAL_SECONDS
        # Set once a heartbeat has reported the authority's interval.
        self._heartbeat_reported = False
        self._last_heard = clock()
        self._stale = False
        # The details of every refusal while stale: why the cache is not trusted.
        self._stale_details = ""
        self._closed = False
        self._started = False

        client, stub, metadata, owned_channel = AuthorityLink.open_client(
            config.authority_target,
            config.authority_channel,
            config.authority_credentials,
            config.api_key,
            config.validate_timeout_seconds,
        )
        self._client = client
        self._owned_channel = owned_channel
        self._link = AuthorityLink(
            self,
            client,
            stub,
            metadata,
            batch_interval_seconds=config.activity_batch_interval_seconds,
            backoff_initial_seconds=config.reconnect_backoff_initial_seconds,
            backoff_max_seconds=config.reconnect_backoff_max_seconds,
            backoff_cap=lambda: self._staleness_bound() / RECONNECTS_PER_STALENESS_BOUND,
            clock=clock,
        )
        self._timer = Timer(clock)
        self.metrics = EnforcerMetrics(config.meter_provider)

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> Enforcer:
        """Fetch the policy and start the background threads; idempotent.

        A failed ``GetPolicy`` is logged and does not raise: the enforcer then
        exempts only its local exempt patterns and learns each method's rule
        from ``Validate``.
        """
        with self._lock:
            if self._started:
                return self
            self._started = True
        if self.config.fail_open:
            logger.warning(
                "fail-open is on: when the authority is unreachable, calls on cached leases keep being"
                " admitted until their max duration"
            )
        else:
            logger.info(
                "fail-closed: calls are refused and cut off when the authority's watch stream is silent for %s",
                "%.3g s" % self.config.staleness_bound_seconds
                if self.config.staleness_bound_seconds is not None
                else f"{STALENESS_HEARTBEATS} heartbeat intervals",
            )
        self._fetch_policy()
        self._last_heard = self._clock()
        self._timer.start()
        self._link.start()
        self._arm_staleness_check()
        return self

    def _fetch_policy(self) -> None:
        try:
            policy = self._link.get_policy(self.config.policy_timeout_seconds)
        except AuthorityError as exc:
            logger.warning(
                "could not fetch the policy from the authority (%s); exempting only %s and learning each method's rule from Validate",
                exc,
                ", ".join(self.config.exempt_patterns) or "nothing",
            )
            return
        with self._lock:
            self._rules.load_policy(policy)
        logger.debug("loaded %d method rules from the authority", len(policy.rules))

    def close(self) -> None:
        """Stop the background threads and close the channel the enforcer opened; idempotent.

        Calls in flight are left alone; calls admitted afterwards are refused
        with reason ``authority_unreachable``.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._link.close()
        self._timer.close()
        for executor in (self._validation_executor, self._callback_executor):
            if executor is not None:
                executor.shutdown(wait=True)
        self._client.close()
        if self._owned_channel is not None:
            self._owned_channel.close()

    def on_session_end(self, callback: SessionEndCallback) -> SessionEndCallback:
        """Register ``callback`` to run once per lease that had calls here, when it ends.

        It runs on the enforcer's callback thread, one callback at a time;
        exceptions are logged. Ends seen only as ``authority_unreachable``
        are not session ends and do not trigger it.

        Returns:
            ``callback`` itself, so this method can decorate a function.
        """
        with self._lock:
            self._callbacks.append(callback)
        return callback

    # -- per call --------------------------------------------------------------

    def is_exempt(self, method: str) -> bool:
        """Return whether ``method`` needs no lease (and is not activity)."""
        return self._rules.is_exempt(method)

    def read_lease_id(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
        """Return the lease ID of a call; see :func:`read_lease_id`."""
        return read_lease_id(metadata, self.config.metadata_key)

    def caller_principal(self, context: Any) -> str:
        """Return the caller's identity for the principal check, or empty to skip it.

        An identity function that raises is logged and treated as "no identity".
        """
        try:
            return self._caller_identity(context) or ""
        except Exception:  # noqa: BLE001 - a broken identity hook must not crash calls
            logger.exception("caller_identity raised; skipping the principal check for this call")
            return ""

    def admit(self, lease_id: str, method: str, caller: str, call: CallHandle) -> _Entry | object:
        """Decide a call and register it as in flight, blocking for ``Validate`` on a miss.

        Returns:
            The lease's entry, or :data:`EXEMPT` when the method needs no lease.

        Raises:
            LeaseRefused: The call may not run.
        """
        fresh = False
        for _ in range(_MAX_VALIDATION_ROUNDS):
            future, owner = self._try_admit(lease_id, method, caller, call, fresh)
            if future is None:
                return owner
            if owner is True:
                self._validate(lease_id, method, caller, future)
            try:
                future.result(timeout=self.config.validate_timeout_seconds * 2)
            except concurrent.futures.TimeoutError:
                raise _errors.unreachable(fingerprint(lease_id), "Validate timed out") from None
            fresh = True
        raise _errors.unreachable(fingerprint(lease_id), "the authority's responses kept changing")

    def admit_cached(self, lease_id: str, method: str, caller: str, call: CallHandle) -> _Entry | object | None:
        """Decide a call from the cache alone and register it as in flight.

        It waits for nothing but the enforcer's lock, so the event loop may call it.

        Returns:
            The lease's entry, :data:`EXEMPT` when the method needs no lease,
            or None on a cache miss, which :meth:`admit` or
            :meth:`admit_async` resolves. A miss registers nothing and starts no ``Validate``.

        Raises:
            LeaseRefused: The call may not run.
        """
        with self._lock:
            return self._admit_from_cache(lease_id, method, caller, call, False)

    async def admit_async(self, lease_id: str, method: str, caller: str, call: CallHandle) -> _Entry | object:
        """Like :meth:`admit` for the event loop: ``Validate`` runs on a worker thread."""
        fresh = False
        for _ in range(_MAX_VALIDATION_ROUNDS):
            future, owner = self._try_admit(lease_id, method, caller, call, fresh)
            if future is None:
                return owner
            if owner is True:
                self._validation_pool().submit(self._validate, lease_id, method, caller, future)
            try:
                await asyncio.wait_for(asyncio.wrap_future(future), self.config.validate_timeout_seconds * 2)
            except asyncio.TimeoutError:
                raise _errors.unreachable(fingerprint(lease_id), "Validate timed out") from None
            fresh = True
        raise _errors.unreachable(fingerprint(lease_id), "the authority's responses kept changing")

    def release(self, entry: _Entry, call: CallHandle) -> None:
        """Remove a finished or cancelled call from its lease's in-flight set; idempotent."""
        with self._lock:
            entry.calls.discard(call)

    def touch(self, entry: _Entry) -> None:
        """Record activity on a lease (a call or a stream message); reported later in a batch."""
        entry.last_activity = self._clock()
        # Every stream message lands here, so the common case takes no lock.
        # When the entry is in the current batch, the reporter reads
        # last_activity only after swapping that set out (collect_renewals),
        # so it reads the value written above.
        # NOTE: this ordering argument relies on the GIL running the attribute
        # write and the set lookup one at a time; free-threaded builds are unchecked.
        if entry in self._dirty:
            return
        with self._lock:
            self._dirty.add(entry)

    def lease_context(self, entry: _Entry) -> LeaseContext:
        """Return the view of ``entry`` that handlers get from :func:`current_lease`."""
        view = entry.view
        if view is None:
            # Two threads may both build one, which is harmless because the view is read-only.
            view = entry.view = LeaseContext(entry, self._clock)
        return view

    # -- admission internals ---------------------------------------------------

    def _try_admit(
        self, lease_id: str, method: str, caller: str, call: CallHandle, fresh: bool
    ) -> tuple[concurrent.futures.Future[None] | None, Any]:
        # Returns (None, entry-or-EXEMPT) when decided, or (future, owner) on a
        # miss, where owner is True when this caller must run the Validate.
        with self._lock:
            decided = self._admit_from_cache(lease_id, method, caller, call, fresh)
            if decided is not None:
                return None, decided
            # A caller waits up to twice the Validate timeout (see admit).
            waits_until = self._clock() + 2 * self.config.validate_timeout_seconds
            validation = self._pending.get(lease_id)
            if validation is not None:
                validation.waited_until = max(validation.waited_until, waits_until)
                return validation.future, False
            if len(self._pending) >= self.config.max_pending_validations:
                raise _errors.unreachable(
                    fingerprint(lease_id),
                    f"{len(self._pending)} Validate calls are already waiting for the authority"
                    " (max_pending_validations); retry later",
                )
            validation = _Validation(lease_id, waits_until)
            self._pending[lease_id] = validation
            self._pending_by_digest[validation.digest] = validation
            return validation.future, True

    def _admit_from_cache(
        self, lease_id: str, method: str, caller: str, call: CallHandle, fresh: bool
    ) -> _Entry | object | None:
        # Under the lock: the entry or EXEMPT when decided, None on a miss.
        # ``fresh`` means a Validate reply arrived for this call, so an entry
        # past its local deadline is trusted once more.
        now = self._clock()
        stale_open = self._stale and self.config.fail_open
        if self._closed:
            raise _errors.unreachable(fingerprint(lease_id), "the enforcer is closed")
        if self._stale and not self.config.fail_open:
            raise _errors.unreachable(fingerprint(lease_id), self._stale_details)
        tombstone = self._ended.get(lease_id, now)
        if tombstone is not None:
            raise _errors.ended(*tombstone)
        if self._negative.get(lease_id, now):
            fp = fingerprint(lease_id)
            raise _errors.LeaseNotFound(
                f"session lease {fp} is not known to the authority; grant a new lease", fingerprint=fp
            )

        rule = self._rules.rule_for(method)
        if rule is not None and rule.exempt:
            return EXEMPT
        entry = self._entries.get(lease_id)
        if entry is not None and rule is not None:
            expired = now >= entry.max_deadline or (now >= entry.deadline and not stale_open)
            if fresh or not expired:
                refusal = self._decide(entry, rule, caller, now)
                if refusal is not None:
                    raise refusal
                self._register(entry, call, now)
                return entry
        return None

    def _decide(self, entry: _Entry, rule: MethodRuleInfo, caller: str, now: float) -> LeaseRefused | None:
        # The same checks, in the same order, as the authority's Validate.
        if caller and caller != entry.principal:
            return _errors.PrincipalMismatch(
                f'session lease {entry.fingerprint} belongs to "{entry.principal}", not to the caller "{caller}"',
                fingerprint=entry.fingerprint,
            )
        if rule.tiers and entry.tier not in rule.tiers:
            return _errors.PolicyDenied(
                f"the method requires a lease in tier {', '.join(rule.tiers)};"
                f' session lease {entry.fingerprint} is in tier "{entry.tier}"',
                fingerprint=entry.fingerprint,
            )
        if rule.max_session_age_seconds is not None:
            age = now - entry.granted_at
            if age > rule.max_session_age_seconds:
                return _errors.PolicyDenied(
                    f"the method requires a session younger than {rule.max_session_age_seconds:g} s;"
                    f" session lease {entry.fingerprint} is {age:.1f} s old; grant a new lease",
                    fingerprint=entry.fingerprint,
                )
        return None

    def _register(self, entry: _Entry, call: CallHandle, now: float) -> None:
        entry.calls.add(call)
        entry.had_calls = True
        entry.last_activity = now
        self._dirty.add(entry)
        if entry.timer is None:
            entry.timer = self._timer.schedule(min(entry.deadline, entry.max_deadline), lambda: self._check_entry(entry))

    def _validation_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._validation_executor is None:
                self._validation_executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="session-lease-validate"
                )
            return self._validation_executor

    def _validate(self, lease_id: str, method: str, caller: str, future: concurrent.futures.Future[None]) -> None:
        sent_at = self._clock()
        with self._lock:
            validation = self._pending.get(lease_id)
            waited_until = validation.waited_until if validation is not None and validation.future is future else None
            if waited_until is not None and waited_until - sent_at < self.config.validate_timeout_seconds / 4:
                # It waited in the queue until every call waiting for it gave
                # up, or nearly. With less than a quarter of its deadline left,
                # sending it would only delay the Validates queued behind it.
                self._pop_pending(lease_id)
                waited_until = None
                dropped = True
            else:
                dropped = False
        if dropped:
            logger.debug("Validate of lease %s not sent: every call waiting for it gave up", fingerprint(lease_id))
            future.set_exception(_errors.unreachable(fingerprint(lease_id), "Validate timed out in the queue"))
            return
        timeout = self.config.validate_timeout_seconds
        if waited_until is not None:
            timeout = min(timeout, waited_until - sent_at)
        try:
            result = self._link.validate(lease_id, method, caller, timeout)
            answered_at = self._clock()
        except (AuthorityError, ValueError) as exc:
            with self._lock:
                self._pop_pending(lease_id)
                if isinstance(exc, AuthorityUnavailable):
                    self._count_refused_call(lease_id, method, caller, sent_at)
                # At most one line per second, because during an outage every
                # lease that misses the cache fails the same way.
                now = time.monotonic()
                held_back = -1
                if now - self._validate_log_at >= 1.0:
                    held_back, self._validate_log_suppressed, self._validate_log_at = self._validate_log_suppressed, 0, now
                else:
                    self._validate_log_suppressed += 1
            # An AuthorityError names the RPC already ("Validate failed: ...").
            failure = str(exc) if isinstance(exc, AuthorityError) else f"the Validate response is invalid: {exc}"
            if held_back > 0:
                logger.warning(
                    "could not validate lease %s: %s (%d more failures in the previous second not logged)",
                    fingerprint(lease_id),
                    failure,
                    held_back,
                )
            elif held_back == 0:
                logger.warning("could not validate lease %s: %s", fingerprint(lease_id), failure)
            future.set_exception(_errors.unreachable(fingerprint(lease_id), failure))
            return
        except BaseException as exc:
            with self._lock:
                self._pop_pending(lease_id)
            future.set_exception(exc)
            raise
        with self._lock:
            self._pop_pending(lease_id)
            cut = self._apply_validation(lease_id, method, result, sent_at)
        self._run_cut_offs(cut, answered_at)
        future.set_result(None)

    def _count_refused_call(self, lease_id: str, method: str, caller: str, at: float) -> None:
        # Under the lock, after a Validate failed because the authority was
        # out of reach or too slow. A cached lease whose last reply ran out
        # is refused for that reason alone, not because of the lease. Its holder is still using it, so
        # the call counts as activity. After a restart the authority takes
        # activity only from before the lease's idle deadline, so this cannot
        # bring back a lease that idled out.
        entry = self._entries.get(lease_id)
        rule = self._rules.rule_for(method)
        if entry is None or entry.ended or rule is None or rule.exempt or at >= entry.max_deadline:
            return
        if self._decide(entry, rule, caller, at) is not None or at <= entry.last_activity:
            return
        entry.last_activity = at
        self._dirty.add(entry)

    def _pop_pending(self, lease_id: str) -> None:
        # Under the lock.
        validation = self._pending.pop(lease_id, None)
        if validation is not None and self._pending_by_digest.get(validation.digest) is validation:
            del self._pending_by_digest[validation.digest]

    def _apply_validation(
        self, lease_id: str, method: str, result: ValidateResult, sent_at: float
    ) -> list[tuple[CallHandle, LeaseRefused]]:
        now = self._clock()
        self._rules.learn(method, result.rule)
        lease = result.lease
        entry = self._entries.get(lease_id)
        if lease is None or lease.state is LeaseState.NOT_FOUND:
            self._negative.put(lease_id, True, now)
            if entry is not None:
                fp = entry.fingerprint
                refusal = _errors.LeaseNotFound(f"session lease {fp} is not known to the authority", fingerprint=fp)
                return self._finish_entry(entry, refusal, session_end=False)
            return []
        if lease.state is LeaseState.ENDED:
            reason = lease.end_reason or EndReason.UNKNOWN
            self._ended.put(lease_id, (reason, lease.fingerprint or fingerprint(lease_id)), now)
            if entry is not None:
                return self._finish_entry(entry, _errors.ended(reason, entry.fingerprint), session_end=True)
            return []
        tombstone = self._ended.get(lease_id, now)
        if tombstone is not None:
            # The watch stream reported the end while this Validate was in
            # flight. Its reply predates the end and must not revive the lease.
            if entry is not None:
                return self._finish_entry(entry, _errors.ended(*tombstone), session_end=True)
            return []
        if entry is None:
            entry = _Entry(lease_id, lease, sent_at, self.config.drift_margin_seconds)
            self._entries[lease_id] = entry
            self._by_digest[entry.digest] = entry
        else:
            entry.refresh(lease, sent_at, self.config.drift_margin_seconds)
        return []

    # -- ends --------------------------------------------------------------------

    def _finish_entry(
        self, entry: _Entry, refusal: LeaseRefused, *, session_end: bool
    ) -> list[tuple[CallHandle, LeaseRefused]]:
        # Under the lock: forget the entry and return the calls to cut off,
        # which the caller does after releasing the lock.
        if entry.ended:
            return []
        entry.ended = True
        if entry.timer is not None:
            # The check would find the entry ended; cancelling it frees the
            # entry now rather than at its deadline, which may be hours away.
            self._timer.cancel(entry.timer)
            entry.timer = None
        if self._entries.get(entry.lease_id) is entry:
            del self._entries[entry.lease_id]
        if self._by_digest.get(entry.digest) is entry:
            del self._by_digest[entry.digest]
        self._dirty.discard(entry)
        calls = list(entry.calls)
        entry.calls.clear()
        if calls:
            logger.info(
                "cutting off %d call(s) on lease %s: %s", len(calls), entry.fingerprint, refusal.reason.value
            )
        if session_end and entry.had_calls and self._callbacks:
            info = SessionEndInfo(entry.principal, entry.tier, entry.fingerprint, refusal.reason)
            self._schedule_callbacks(list(self._callbacks), info)
        return [(call, refusal) for call in calls]

    def _run_cut_offs(self, cut: list[tuple[CallHandle, LeaseRefused]], ended_at: float) -> None:
        # ended_at is the lease end as this enforcer learned it: when the news
        # arrived (watch, renewal or Validate reply) or the local deadline.
        for call, refusal in cut:
            try:
                call.cut_off(refusal)
            except Exception:  # noqa: BLE001 - one call failing to end must not spare the others
                logger.exception("could not cut off a call on lease %s", refusal.fingerprint)
                continue
            self.metrics.record_cut_off(refusal, self._clock() - ended_at)

    def _schedule_callbacks(self, callbacks: list[SessionEndCallback], info: SessionEndInfo) -> None:
        if self._closed:
            return
        if self._callback_executor is None:
            self._callback_executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="session-lease-callbacks"
            )
        self._callback_executor.submit(self._run_callbacks, callbacks, info)

    @staticmethod
    def _run_callbacks(callbacks: list[SessionEndCallback], info: SessionEndInfo) -> None:
        for callback in callbacks:
            try:
                callback(info)
            except Exception:  # noqa: BLE001 - the service's callback must not stop the others
                logger.exception("on_session_end callback %r failed for lease %s", callback, info.fingerprint)

    def _check_entry(self, entry: _Entry) -> None:
        # Timer thread: the entry's local deadline or max deadline came due.
        with self._lock:
            entry.timer = None
            if entry.ended or not entry.calls:
                return
            now = self._clock()
            cut: list[tuple[CallHandle, LeaseRefused]] = []
            ended_at = now
            flush = False
            next_check: float | None = None
            if now >= entry.max_deadline:
                ended_at = entry.max_deadline
                # No renewal moves the max-duration cap, so this end is final.
                self._ended.put(entry.lease_id, (EndReason.MAX_DURATION, entry.fingerprint), now)
                cut = self._finish_entry(entry, _errors.ended(EndReason.MAX_DURATION, entry.fingerprint), session_end=True)
            elif self._stale and self.config.fail_open:
                next_check = entry.max_deadline
            elif now >= entry.deadline:
                if now >= entry.deadline + self._staleness_bound():
                    ended_at = entry.deadline + self._staleness_bound()
                    refusal = _errors.unreachable(entry.fingerprint, "no renewal answer from the authority")
                    cut = self._finish_entry(entry, refusal, session_end=False)
                    self._keep_unreported(entry)
                else:
                    # Ask the authority with the true idle time: the answer either
                    # moves the deadline or reports the end.
                    entry.probe_requested = True
                    self._dirty.add(entry)
                    flush = True
                    next_check = now + max(self.config.drift_margin_seconds, _MIN_PROBE_INTERVAL_SECONDS)
            else:
                next_check = min(entry.deadline, entry.max_deadline)
            if next_check is not None:
                entry.timer = self._timer.schedule(next_check, lambda: self._check_entry(entry))
        if flush:
            self._link.request_flush()
        self._run_cut_offs(cut, ended_at)

    # -- staleness ---------------------------------------------------------------

    def _staleness_bound(self) -> float:
        configured = self.config.staleness_bound_seconds
        if configured is None:
            return STALENESS_HEARTBEATS * self._heartbeat_interval
        if self._heartbeat_reported:
            return max(configured, MIN_STALENESS_HEARTBEATS * self._heartbeat_interval)
        return configured

    def _warn_if_bound_too_short(self) -> None:
        # Under the lock, when the authority reports a heartbeat interval.
        configured = self.config.staleness_bound_seconds
        floor = MIN_STALENESS_HEARTBEATS * self._heartbeat_interval
        if configured is None or configured >= floor:
            return
        logger.warning(
            "staleness_bound_seconds %.3g s is less than %d of the authority's heartbeat intervals (%.3g s),"
            " so the watch stream would look silent between heartbeats; using %.3g s. Set"
            " staleness_bound_seconds to at least %.3g s, or lower the authority's --heartbeat-interval",
            configured,
            MIN_STALENESS_HEARTBEATS,
            self._heartbeat_interval,
            floor,
            floor,
        )

    def _arm_staleness_check(self) -> None:
        self._timer.schedule(self._last_heard + self._staleness_bound(), self._check_staleness)

    def _check_staleness(self) -> None:
        with self._lock:
            if self._closed or self._stale:
                return
            now = self._clock()
            due = self._last_heard + self._staleness_bound()
            if now < due:
                self._timer.schedule(due, self._check_staleness)
                return
            cut = self._go_stale_locked(
                f"no word from the authority for {now - self._last_heard:.2f} s",
                "no word from the authority within the staleness bound",
            )
        self._link.cancel_watch()
        self._run_cut_offs(cut, due)

    def _go_stale_locked(self, cause: str, refusal_details: str) -> list[tuple[CallHandle, LeaseRefused]]:
        """Stop trusting the cache: refuse calls and return the cut-offs to run, unless ``fail_open``."""
        self._stale = True
        self._stale_details = refusal_details
        cut: list[tuple[CallHandle, LeaseRefused]] = []
        if self.config.fail_open:
            logger.warning("%s; fail-open: serving cached leases until their max duration", cause)
            return cut
        logger.warning("%s; refusing calls and cutting off %d cached lease(s)", cause, len(self._entries))
        for entry in list(self._entries.values()):
            refusal = _errors.unreachable(entry.fingerprint, refusal_details)
            cut.extend(self._finish_entry(entry, refusal, session_end=False))
            self._keep_unreported(entry)
        return cut

    # -- LinkListener ------------------------------------------------------------

    def watch_message_received(self, instance_id: str, interval_seconds: float | None) -> None:
        """Mark the watch stream alive (link's watch thread)."""
        with self._lock:
            self._last_heard = self._clock()
            if interval_seconds and (interval_seconds != self._heartbeat_interval or not self._heartbeat_reported):
                self._heartbeat_interval = interval_seconds
                self._heartbeat_reported = True
                self._warn_if_bound_too_short()
            if not self._stale:
                return
            self._stale = False
        logger.info("the authority's watch stream is back (instance %s); admitting calls again", instance_id)
        self._arm_staleness_check()

    def watch_rejected(self, error: AuthorityError) -> None:
        """Go stale at once when the authority refuses the watch stream (link's watch thread).

        Without the stream the enforcer learns of no revoke, so waiting for the
        staleness bound would only admit calls that it cannot cut off in time.
        The stream is retried, and its first message makes the enforcer admit
        calls again.
        """
        cause = f"the authority rejected this enforcer's watch stream ({error})"
        with self._lock:
            if self._closed or (self._stale and self._stale_details == _WATCH_REJECTED_DETAILS):
                return
            if self._stale:
                # Stale from silence, but the authority responds now, so the
                # refusals must name the rejection rather than the silence.
                self._stale_details = _WATCH_REJECTED_DETAILS
                logger.warning("%s; calls are still rejected", cause)
                return
            cut = self._go_stale_locked(cause, _WATCH_REJECTED_DETAILS)
        self._run_cut_offs(cut, self._clock())

    def watch_reset(self) -> None:
        """Stop trusting every cached lease: ends may have been missed (link's watch thread).

        Leases with no call in flight are dropped, so their next call asks
        ``Validate``. Leases with calls in flight keep their entry, which holds
        the calls, but are confirmed with the authority at once; an end it
        reports cuts those calls off. Unknown and ended IDs stay cached: no
        restart makes them live again.
        """
        with self._lock:
            now = self._clock()
            dropped = 0
            for entry in list(self._entries.values()):
                if not entry.calls:
                    entry.ended = True
                    del self._entries[entry.lease_id]
                    if self._by_digest.get(entry.digest) is entry:
                        del self._by_digest[entry.digest]
                    self._dirty.discard(entry)
                    self._keep_unreported(entry)
                    dropped += 1
                    continue
                entry.deadline = min(entry.deadline, now)
                if entry.timer is None:
                    entry.timer = self._timer.schedule(now, lambda entry=entry: self._check_entry(entry))
            kept = len(self._entries)
        logger.info("watch reset: dropped %d cached lease(s), confirming %d with calls in flight", dropped, kept)

    def session_ended(self, event: SessionEndEvent) -> None:
        """Apply an end pushed by the authority (link's watch thread)."""
        reason = event.lease.end_reason or EndReason.UNKNOWN
        with self._lock:
            entry = self._by_digest.get(event.lease.digest)
            if entry is None:
                validation = self._pending_by_digest.get(event.lease.digest)
                if validation is not None:
                    # The authority may have replied to its Validate before the
                    # end, and the tombstone keeps that reply from caching the lease as live.
                    fp = event.lease.fingerprint or fingerprint(validation.lease_id)
                    self._ended.put(validation.lease_id, (reason, fp), self._clock())
                return
            received_at = self._clock()
            self._ended.put(entry.lease_id, (reason, entry.fingerprint), received_at)
            cut = self._finish_entry(entry, _errors.ended(reason, entry.fingerprint), session_end=True)
        self._run_cut_offs(cut, received_at)

    def collect_renewals(self, now: float) -> list[tuple[object, str, float]]:
        """Return the leases with activity not yet reported, or with a probe requested (reporter thread)."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            orphans, self._orphan_reports = self._orphan_reports, []
            batch: list[tuple[object, str, float]] = [
                (orphan, orphan.entry.lease_id, max(0.0, now - orphan.at)) for orphan in orphans
            ]
            for entry in dirty:
                if entry.ended:
                    continue
                # Activity that earlier batches failed to deliver goes first,
                # oldest first: after a restart, the authority extends an idle
                # deadline only by activity from before it.
                if entry.unconfirmed:
                    batch.extend(
                        (_Report(entry, at), entry.lease_id, max(0.0, now - at)) for at in entry.unconfirmed
                    )
                entry.unconfirmed = None
                # touch() writes last_activity without the lock, so it is read
                # once here. A later touch finds the entry missing from the new
                # set and adds it, so its activity goes in the next batch.
                last_activity = entry.last_activity
                if last_activity > entry.reported_activity or entry.probe_requested:
                    entry.reported_activity = last_activity
                    entry.probe_requested = False
                    batch.append((_Report(entry, last_activity), entry.lease_id, max(0.0, now - last_activity)))
            return batch

    def renewals_answered(self, tokens: Sequence[object], sent_at: float, result: RenewResult) -> None:
        """Move local deadlines forward, or end leases the authority reports ended (KeepAlive reader thread)."""
        cut: list[tuple[CallHandle, LeaseRefused]] = []
        with self._lock:
            now = self._clock()
            for token, lease in zip(tokens, result.leases):
                assert isinstance(token, _Report)
                entry = token.entry
                if entry.ended:
                    continue
                if lease.state is LeaseState.ALIVE:
                    entry.refresh(lease, sent_at, self.config.drift_margin_seconds)
                elif lease.state is LeaseState.ENDED:
                    reason = lease.end_reason or EndReason.UNKNOWN
                    self._ended.put(entry.lease_id, (reason, entry.fingerprint), now)
                    cut.extend(self._finish_entry(entry, _errors.ended(reason, entry.fingerprint), session_end=True))
                else:
                    self._negative.put(entry.lease_id, True, now)
                    refusal = _errors.LeaseNotFound(
                        f"session lease {entry.fingerprint} is not known to the authority", fingerprint=entry.fingerprint
                    )
                    cut.extend(self._finish_entry(entry, refusal, session_end=False))
        self._run_cut_offs(cut, now)

    def renewals_failed(self, tokens: Sequence[object], error: BaseException) -> None:
        """Queue the reports of a failed batch again (KeepAlive reader or reporter thread)."""
        with self._lock:
            now = self._clock()
            for token in tokens:
                assert isinstance(token, _Report)
                entry = token.entry
                if not entry.ended:
                    point_kept = _add_unconfirmed(entry, token.at)
                    if not point_kept and entry.reported_activity == token.at:
                        # No later batch carries this lease, and the thinning
                        # dropped this time: report the latest activity again.
                        entry.reported_activity = -math.inf
                    self._dirty.add(entry)
                elif now - token.at < MAX_ORPHAN_REPORT_AGE_SECONDS:
                    # The entry left the cache while the report was on its way.
                    self._orphan_reports.append(token)

    def _keep_unreported(self, entry: _Entry) -> None:
        # Under the lock, for an entry leaving the cache without an end: a
        # restarted authority may still need its activity to keep the lease.
        points = list(entry.unconfirmed or ())
        entry.unconfirmed = None
        if entry.last_activity > entry.reported_activity:
            points.append(entry.last_activity)
            entry.reported_activity = entry.last_activity
        self._orphan_reports.extend(_Report(entry, at) for at in points)

    # -- introspection for tests and operators -------------------------------------

    def cached_lease_count(self) -> int:
        """Return how many live leases the cache holds."""
        with self._lock:
            return len(self._entries)

    def in_flight_count(self) -> int:
        """Return how many admitted calls are registered as in flight."""
        with self._lock:
            return sum(len(entry.calls) for entry in self._entries.values())

    @property
    def validate_calls(self) -> int:
        """How many ``Validate`` calls this enforcer has sent to the authority."""
        return self._link.validate_calls

    @property
    def pending_validations(self) -> int:
        """How many leases have a ``Validate`` queued or in flight (see ``max_pending_validations``)."""
        with self._lock:
            return len(self._pending)

    @property
    def stale(self) -> bool:
        """True while the watch stream has been silent past the staleness bound."""
        with self._lock:
            return self._stale


class EnforcingInterceptor:
    """Surface shared by the sync and aio server interceptors: one started ``Enforcer``.

    Args:
        config: The enforcer's settings; or pass them as keyword arguments.

    Raises:
        TypeError: Both ``config`` and keyword settings were given.
    """

    def __init__(self, config: EnforcerConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = EnforcerConfig(**settings)
        elif settings:
            raise TypeError("pass either config= or keyword settings, not both")
        self._enforcer = Enforcer(config).start()
        self._wrapped_handlers: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def _enforced_handler(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        wrap: Callable[[grpc.RpcMethodHandler, str], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        """Return ``wrap(handler, method)``, built once per method and handler.

        A generic handler returns the same handler object for a method on
        every call, so its wrapper is reused. An interceptor after ours that
        builds a new handler per call replaces the entry each time. Safe from
        any thread: a race builds one wrapper twice.
        """
        cached = self._wrapped_handlers.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = wrap(handler, method)
        if len(self._wrapped_handlers) >= _MAX_WRAPPED_HANDLERS:
            # A catch-all generic handler serves any method name a client sends.
            self._wrapped_handlers.clear()
        self._wrapped_handlers[method] = (handler, wrapped)
        return wrapped

    @property
    def enforcer(self) -> Enforcer:
        """The enforcement core (cache, registry, link to the authority)."""
        return self._enforcer

    def on_session_end(self, callback: SessionEndCallback) -> SessionEndCallback:
        """Register a callback for leases that had calls here and ended; see :meth:`Enforcer.on_session_end`."""
        return self._enforcer.on_session_end(callback)

    def close(self) -> None:
        """Stop the enforcer's background threads (blocks); call after the server stopped."""
        self._enforcer.close()

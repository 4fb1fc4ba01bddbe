"""Per-principal limits on live leases and grant rate."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from ._clock import Clock
from ._policy import Limits
from ._table import LeaseSnapshot, SessionEnd

logger = logging.getLogger(__name__)

LIVE_LEASES_RETRY_AFTER_SECONDS = 1.0
"""Back-off suggested when a principal holds its maximum of live leases.

NOTE: this is a fixed hint. The limiter does not know when the principal's next lease ends,
because finding that out would cost more than O(1) per grant.
"""

_SWEEP_THRESHOLD = 10_000
"""Buckets kept before full buckets (which equal no bucket) are dropped."""


class LimitExceeded(Exception):
    """A grant was rejected by a per-principal limit.

    Attributes:
        details: The message for the caller, naming the limit and its value.
        retry_after_seconds: How long the caller should wait before trying again.
    """

    def __init__(self, details: str, retry_after_seconds: float) -> None:
        super().__init__(details)
        self.details = details
        self.retry_after_seconds = retry_after_seconds


class _Bucket:
    __slots__ = ("tokens", "updated_at")

    def __init__(self, tokens: float, updated_at: float) -> None:
        self.tokens = tokens
        self.updated_at = updated_at


class PrincipalLimiter:
    """Counts live leases per principal and meters grants with a token bucket per principal.

    Each principal's bucket holds up to ``max(1, rate)`` tokens and refills at ``rate``
    tokens per second of the clock's monotonic time, so a principal may burst one second's
    worth of grants. A grant first calls :meth:`acquire`, which reserves a live-lease slot.
    The slot is freed by :meth:`on_end` when the lease ends, or by :meth:`release` when the
    grant is abandoned before anyone held the lease. Every operation is O(1) amortized.

    Thread-safe: one lock guards the counts and buckets, and no method blocks. The lease
    table calls ``on_grant`` and ``on_end`` as a table listener from whichever thread changed
    the table.

    Args:
        limits: The policy's limits. A limit of 0 means unlimited.
        clock: The lease table's clock.
    """

    def __init__(self, limits: Limits, clock: Clock) -> None:
        self._limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, int] = {}
        self._buckets: dict[str, _Bucket] = {}
        rate = limits.grants_per_second_per_principal
        self._capacity = max(1.0, rate)

    @property
    def limits(self) -> Limits:
        return self._limits

    def live_count(self, principal: str) -> int:
        """Return the number of live leases counted for ``principal``."""
        with self._lock:
            return self._live.get(principal, 0)

    def load(self, principals: Iterable[str]) -> None:
        """Count one live lease per item, for leases restored from the store at start-up."""
        with self._lock:
            for principal in principals:
                self._live[principal] = self._live.get(principal, 0) + 1

    def acquire(self, principal: str) -> None:
        """Reserve a live-lease slot and a grant token for ``principal``.

        Raises:
            LimitExceeded: The principal holds its maximum of live leases, or has used up
                its grant rate. Nothing is reserved then.
        """
        max_live = self._limits.max_live_leases_per_principal
        rate = self._limits.grants_per_second_per_principal
        with self._lock:
            live = self._live.get(principal, 0)
            if max_live and live >= max_live:
                raise LimitExceeded(
                    f'principal "{principal}" has {live} live leases, the maximum'
                    f" (limits.max_live_leases_per_principal = {max_live}); release or revoke"
                    " a lease, or wait for one to end, before granting another",
                    LIVE_LEASES_RETRY_AFTER_SECONDS,
                )
            if rate:
                bucket = self._refilled_bucket(principal, rate)
                if bucket.tokens < 1.0:
                    wait = (1.0 - bucket.tokens) / rate
                    raise LimitExceeded(
                        f'principal "{principal}" exceeded its grant rate'
                        f" (limits.grants_per_second_per_principal = {rate:g});"
                        f" retry in {wait:.3f} s",
                        wait,
                    )
                bucket.tokens -= 1.0
            self._live[principal] = live + 1

    def release(self, principal: str) -> None:
        """Free the slot of a grant that was abandoned before the lease was handed out."""
        with self._lock:
            self._decrement(principal)

    # Table listener interface.

    def on_grant(self, lease: LeaseSnapshot) -> None:
        """Grants are counted by :meth:`acquire`, before the table creates the lease."""

    def on_end(self, end: SessionEnd) -> None:
        with self._lock:
            self._decrement(end.lease.principal)

    # -- internals (lock held) --------------------------------------------

    def _refilled_bucket(self, principal: str, rate: float) -> _Bucket:
        now = self._clock.monotonic()
        bucket = self._buckets.get(principal)
        if bucket is None:
            if len(self._buckets) >= _SWEEP_THRESHOLD:
                self._drop_full_buckets(now, rate)
            bucket = _Bucket(self._capacity, now)
            self._buckets[principal] = bucket
            return bucket
        elapsed = max(0.0, now - bucket.updated_at)
        bucket.tokens = min(self._capacity, bucket.tokens + elapsed * rate)
        bucket.updated_at = now
        return bucket

    def _drop_full_buckets(self, now: float, rate: float) -> None:
        # A bucket that has refilled to capacity behaves exactly like a new one. The sweep
        # runs only when the dictionary reaches the threshold, so its cost is amortized.
        refill_seconds = self._capacity / rate
        full = [name for name, bucket in self._buckets.items() if now - bucket.updated_at >= refill_seconds]
        for name in full:
            del self._buckets[name]
        logger.debug("dropped %d full grant-rate buckets, %d remain", len(full), len(self._buckets))

    def _decrement(self, principal: str) -> None:
        count = self._live.get(principal, 0)
        if count <= 1:
            if count == 0:
                logger.warning("live lease count of %s would go below zero; the limiter missed a grant", principal)
            self._live.pop(principal, None)
        else:
            self._live[principal] = count - 1

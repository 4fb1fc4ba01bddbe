"""The enforcer's link to the authority, against a real authority."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from session_authority.clients._keeper import MAX_BATCH_ENTRIES
from session_authority.clients._types import LeaseInfo, LeaseState, RenewResult
from session_authority.interceptors import EnforcerConfig
from session_authority.interceptors._authority_link import AuthorityLink
from session_authority.interceptors._enforcer import Enforcer, _Entry
from session_authority.server import ManualClock
from session_authority.server._servicer import MAX_RENEW_ENTRIES


class _RecordingListener:
    """A link listener that hands out one large batch of reports and records the replies."""

    def __init__(self, reports: list[tuple[object, str, float]]) -> None:
        self._reports = reports
        self.answered: list[int] = []
        self.failed: list[BaseException] = []
        self.done = threading.Event()
        self._expected = len(reports)

    def watch_message_received(self, instance_id: str, interval_seconds: float | None) -> None:
        pass

    def watch_reset(self) -> None:
        pass

    def watch_rejected(self, error: object) -> None:
        pass

    def session_ended(self, event: object) -> None:
        pass

    def collect_renewals(self, now: float) -> list[tuple[object, str, float]]:
        reports, self._reports = self._reports, []
        return reports

    def renewals_answered(self, tokens: Sequence[object], sent_at: float, result: RenewResult) -> None:
        self.answered.append(len(result.leases))
        if sum(self.answered) >= self._expected:
            self.done.set()

    def renewals_failed(self, tokens: Sequence[object], error: BaseException) -> None:
        self.failed.append(error)
        self.done.set()


def test_link_splits_report_over_message_limit(authority) -> None:  # type: ignore[no-untyped-def]
    """More reports than the authority takes in one KeepAlive message go out in several, in order."""
    client, stub, metadata, channel = AuthorityLink.open_client(authority.target, None, None, None, 5.0)
    lease_id = client.grant("standard", principal="svc").lease_id
    # One lease's activity after an outage: many reports, oldest first.
    count = MAX_RENEW_ENTRIES + 500
    listener = _RecordingListener([(index, lease_id, (count - index) * 0.001) for index in range(count)])
    link = AuthorityLink(
        listener, client, stub, metadata, batch_interval_seconds=0.05, backoff_initial_seconds=0.05, backoff_max_seconds=0.5
    )
    try:
        link.start()
        assert listener.done.wait(10)
    finally:
        link.close()
        client.close()
        if channel is not None:
            channel.close()

    assert listener.failed == []
    assert sum(listener.answered) == count
    assert max(listener.answered) <= MAX_BATCH_ENTRIES


def _cached_entry(enforcer: Enforcer, clock: ManualClock, lease_id: str) -> _Entry:
    """Put a live lease with a 2 s idle timeout in the enforcer's cache, as a Validate reply would."""
    lease = LeaseInfo(
        fingerprint="", digest="", principal="svc", tier="standard", state=LeaseState.ALIVE, end_reason=None,
        idle_timeout_seconds=2.0, max_duration_seconds=60.0, ttl_seconds=2.0, max_remaining_seconds=60.0,
        age_seconds=0.0, idle_for_seconds=0.0, granted_at=None, ended_at=None,
    )  # fmt: skip
    entry = _Entry(lease_id, lease, clock.monotonic(), 0.05)
    enforcer._entries[lease_id] = entry
    enforcer._by_digest[entry.digest] = entry
    return entry


def test_failed_report_of_dropped_lease_resent(authority) -> None:  # type: ignore[no-untyped-def]
    """A report that fails after a watch reset dropped its lease from the cache is sent again."""
    clock = ManualClock()
    enforcer = Enforcer(EnforcerConfig(authority_target=authority.target), clock=clock.monotonic)
    try:
        lease_id = "lease-in-use"
        entry = _cached_entry(enforcer, clock, lease_id)
        clock.advance(0.5)
        enforcer.touch(entry)
        in_flight = enforcer.collect_renewals(clock.monotonic())
        enforcer.watch_reset()
        clock.advance(1.0)
        enforcer.renewals_failed([token for token, _, _ in in_flight], RuntimeError("stream broke"))
        resent = enforcer.collect_renewals(clock.monotonic())
    finally:
        enforcer.close()

    assert [(lease, round(idle_for, 3)) for _, lease, idle_for in in_flight] == [(lease_id, 0.0)]
    assert [(lease, round(idle_for, 3)) for _, lease, idle_for in resent] == [(lease_id, 1.0)]


def test_two_failed_batches_resend_both_times(authority) -> None:  # type: ignore[no-untyped-def]
    """When two batches carrying one lease fail together, the activity of each is sent again.

    A stream that stalls before it breaks fails every batch sent on it at
    once. The earlier activity must survive the later report, because after
    a restart the authority keeps a lease only by activity from before its
    idle deadline.
    """
    clock = ManualClock()
    enforcer = Enforcer(EnforcerConfig(authority_target=authority.target), clock=clock.monotonic)
    try:
        entry = _cached_entry(enforcer, clock, "lease-in-use")
        clock.advance(0.5)
        enforcer.touch(entry)
        first = enforcer.collect_renewals(clock.monotonic())
        clock.advance(0.5)
        enforcer.touch(entry)
        second = enforcer.collect_renewals(clock.monotonic())
        clock.advance(0.5)
        enforcer.renewals_failed([token for token, _, _ in first], RuntimeError("stream broke"))
        enforcer.renewals_failed([token for token, _, _ in second], RuntimeError("stream broke"))
        resent = enforcer.collect_renewals(clock.monotonic())
    finally:
        enforcer.close()

    assert [round(idle_for, 3) for _, _, idle_for in resent] == [1.0, 0.5]


def test_staleness_cut_off_keeps_unreported_activity(authority) -> None:  # type: ignore[no-untyped-def]
    """Leases dropped for a silent authority still have their undelivered activity sent, oldest first."""
    clock = ManualClock()
    enforcer = Enforcer(
        EnforcerConfig(authority_target=authority.target, staleness_bound_seconds=1.0), clock=clock.monotonic
    )
    try:
        entry = _cached_entry(enforcer, clock, "lease-in-use")
        clock.advance(0.3)
        enforcer.touch(entry)
        failed = enforcer.collect_renewals(clock.monotonic())
        enforcer.renewals_failed([token for token, _, _ in failed], RuntimeError("stream broke"))
        clock.advance(0.3)
        enforcer.touch(entry)
        enforcer._last_heard = clock.monotonic() - 2.0
        enforcer._check_staleness()
        dropped = enforcer.cached_lease_count()
        clock.advance(1.0)
        resent = enforcer.collect_renewals(clock.monotonic())
    finally:
        enforcer.close()

    assert dropped == 0
    assert [(lease, round(idle_for, 3)) for _, lease, idle_for in resent] == [("lease-in-use", 1.3), ("lease-in-use", 1.0)]

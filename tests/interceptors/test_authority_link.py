"""The enforcer's link to the authority, against a real authority."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from session_authority.clients._keeper import MAX_BATCH_ENTRIES
from session_authority.clients._types import RenewResult
from session_authority.interceptors._authority_link import AuthorityLink
from session_authority.server._servicer import MAX_RENEW_ENTRIES


class _RecordingListener:
    """A link listener that hands out one large batch of reports and records the answers."""

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

"""Tests of the lease holder: the holder core with an injected clock, and Session against a real authority."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from session_authority.clients._aio_client import AioAuthorityClient
from session_authority.clients._aio_session import AioSession
from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import InvalidArgument
from session_authority.clients._keeper import LeaseKeeper
from session_authority.clients._metadata import END_REASON_TRAILER_KEY, EndReason
from session_authority.clients._session import (
    LeaseHolder,
    Session,
    SessionEnded,
    SessionState,
    drift_margin_seconds,
    end_reason_of_rejection,
)
from session_authority.clients._types import GrantedLease, LeaseInfo, LeaseState
from client_support import FAST_RECONNECT_OPTIONS, TcpProxy



class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def lease_info(
    *,
    ttl: float = 1.0,
    max_remaining: float = 60.0,
    idle: float = 1.0,
    state: LeaseState = LeaseState.ALIVE,
    end_reason: EndReason | None = None,
) -> LeaseInfo:
    return LeaseInfo(
        fingerprint="0123456789ab",
        digest="0123456789ab" + "0" * 52,
        principal="svc",
        tier="short",
        state=state,
        end_reason=end_reason,
        idle_timeout_seconds=idle,
        max_duration_seconds=60.0,
        ttl_seconds=ttl,
        max_remaining_seconds=max_remaining,
        age_seconds=0.0,
        idle_for_seconds=0.0,
        granted_at=None,
        ended_at=None,
    )


class Recorder:
    def __init__(self) -> None:
        self.reasons: list[EndReason] = []

    def __call__(self, holder: LeaseHolder, reason: EndReason) -> None:
        self.reasons.append(reason)


def make_holder(clock: FakeClock, **lease_fields: float) -> tuple[LeaseHolder, Recorder]:
    recorder = Recorder()
    granted = GrantedLease(lease_id="lease-id", lease=lease_info(**lease_fields), sent_at_monotonic=clock.now)
    return LeaseHolder(granted, recorder, clock=clock), recorder


# -- holder core, injected clock -------------------------------------------------


def test_drift_margin_default() -> None:
    assert drift_margin_seconds(10.0) == pytest.approx(0.25)


def test_holder_deadline_is_conservative() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)

    assert holder.local_deadline == pytest.approx(100.0 + 1.0 - drift_margin_seconds(1.0))


def test_holder_idles_out_locally() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock, ttl=1.0)

    clock.now += 0.9
    assert not holder.check_deadline()
    clock.now += 0.1

    assert holder.check_deadline()
    assert recorder.reasons == [EndReason.IDLE_TIMEOUT]
    assert holder.remaining_seconds() == 0.0


def test_holder_max_duration_cap() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock, ttl=1.0, max_remaining=0.5)

    clock.now += 0.5

    assert holder.check_deadline()
    assert recorder.reasons == [EndReason.MAX_DURATION]


def test_holder_unreachable_after_failed_renewals() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock, ttl=1.0)
    holder.mark_activity()
    clock.now += 0.4
    holder.begin_renewal(clock.now)
    holder.fail_renewal(ConnectionError("down"))

    clock.now += 1.0

    assert holder.check_deadline()
    assert recorder.reasons == [EndReason.AUTHORITY_UNREACHABLE]


def test_holder_renewal_extends_deadline() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)
    clock.now += 0.5
    holder.mark_activity()
    renewal = holder.begin_renewal(clock.now)
    assert renewal is not None
    _, idle_for, activity = renewal

    holder.finish_renewal(lease_info(ttl=1.0), sent_at=clock.now, activity_time=activity)

    assert idle_for == 0.0
    assert holder.local_deadline == pytest.approx(100.5 + 1.0 - drift_margin_seconds(1.0))


def test_holder_idle_for_counts_from_activity() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)
    clock.now += 0.1
    holder.mark_activity()
    clock.now += 0.3

    renewal = holder.begin_renewal(clock.now)

    assert renewal is not None
    assert renewal[1] == pytest.approx(0.3)


def test_holder_renewal_needs_activity() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0, idle=1.0)

    assert holder.renewal_due_at() is None
    clock.now += 0.1
    holder.mark_activity()

    assert holder.renewal_due_at() == pytest.approx(100.0 + 1.0 / 3)


def test_holder_mark_activity_reports_new_need() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock)
    clock.now += 0.1

    assert holder.mark_activity() is True
    assert holder.mark_activity() is False


def test_holder_activity_after_idle_scan_wakes() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock)
    holder.mark_activity()
    renewal = holder.begin_renewal(clock.now)
    assert renewal is not None
    holder.finish_renewal(lease_info(ttl=1.0), sent_at=clock.now, activity_time=renewal[2])

    assert holder.renewal_due_at() is None
    clock.now += 0.1

    assert holder.mark_activity() is True
    assert holder.mark_activity() is False


def test_holder_activity_while_renewal_due_no_wake() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, idle=1.0)
    clock.now += 0.1
    holder.mark_activity()

    assert holder.renewal_due_at() is not None
    clock.now += 0.1

    assert holder.mark_activity() is False


def test_holder_snapshot_carries_lease() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)

    snapshot = holder.snapshot

    assert snapshot is not None
    assert snapshot.lease_id == "lease-id"
    assert snapshot.metadata == (("session-lease", "lease-id"),)
    assert snapshot.local_deadline == holder.local_deadline


def test_holder_snapshot_follows_renewal() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)
    before = holder.snapshot
    clock.now += 0.5
    holder.mark_activity()
    renewal = holder.begin_renewal(clock.now)
    assert renewal is not None

    holder.finish_renewal(lease_info(ttl=1.0), sent_at=clock.now, activity_time=renewal[2])

    after = holder.snapshot
    assert before is not None
    assert after is not None
    assert after.local_deadline == holder.local_deadline
    assert after.local_deadline > before.local_deadline
    assert after.metadata == before.metadata


@pytest.mark.parametrize("ending", ["end", "deadline", "renewal_reply"])
def test_holder_snapshot_cleared_on_end(ending: str) -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0)

    if ending == "end":
        holder.end(EndReason.REVOKED)
    elif ending == "deadline":
        clock.now += 1.0
        holder.check_deadline()
    else:
        holder.begin_renewal(clock.now)
        holder.finish_renewal(
            lease_info(ttl=0.0, state=LeaseState.ENDED, end_reason=EndReason.REVOKED), clock.now, clock.now
        )

    assert holder.ended
    assert holder.snapshot is None


def test_holder_retry_backoff_before_deadline() -> None:
    clock = FakeClock()
    holder, _ = make_holder(clock, ttl=1.0, idle=1.0)
    clock.now += 0.1
    holder.mark_activity()
    holder.begin_renewal(clock.now)

    holder.fail_renewal(ConnectionError("down"))
    due = holder.renewal_due_at()

    assert due is not None
    assert clock.now < due <= clock.now + 0.05
    assert holder.renewal_failures == 1


def test_holder_late_reply_never_revives() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock, ttl=1.0)
    holder.mark_activity()
    renewal = holder.begin_renewal(clock.now + 0.3)
    assert renewal is not None
    clock.now += 1.0
    assert holder.check_deadline()

    holder.finish_renewal(lease_info(ttl=1.0), sent_at=100.3, activity_time=renewal[2])

    assert holder.ended
    assert holder.remaining_seconds() == 0.0
    assert len(recorder.reasons) == 1


def test_holder_renewal_reply_ended() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock)
    holder.begin_renewal(clock.now)

    holder.finish_renewal(
        lease_info(ttl=0.0, state=LeaseState.ENDED, end_reason=EndReason.REVOKED), clock.now, clock.now
    )

    assert recorder.reasons == [EndReason.REVOKED]


def test_holder_renewal_reply_not_found() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock)
    holder.begin_renewal(clock.now)

    holder.finish_renewal(lease_info(ttl=0.0, state=LeaseState.NOT_FOUND), clock.now, clock.now)

    assert recorder.reasons == [EndReason.UNKNOWN]


def test_holder_ends_once() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock)

    assert holder.end(EndReason.REVOKED) is True
    assert holder.end(EndReason.IDLE_TIMEOUT) is False
    clock.now += 10
    holder.check_deadline()

    assert recorder.reasons == [EndReason.REVOKED]
    assert holder.end_reason is EndReason.REVOKED


def test_holder_end_callback_concurrent_once() -> None:
    clock = FakeClock()
    holder, recorder = make_holder(clock)
    threads = [threading.Thread(target=holder.end, args=(EndReason.REVOKED,)) for _ in range(8)]

    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert recorder.reasons == [EndReason.REVOKED]


def test_rejection_reason_from_trailer() -> None:
    trailer = ((END_REASON_TRAILER_KEY, "revoked"),)

    assert end_reason_of_rejection(grpc.StatusCode.UNAUTHENTICATED, trailer) is EndReason.REVOKED
    assert end_reason_of_rejection(grpc.StatusCode.PERMISSION_DENIED, trailer) is None
    assert end_reason_of_rejection(grpc.StatusCode.UNAUTHENTICATED, ()) is None
    assert end_reason_of_rejection(
        grpc.StatusCode.UNAUTHENTICATED, ((END_REASON_TRAILER_KEY, b"from-the-future"),)
    ) is EndReason.UNKNOWN


def test_session_ended_carries_reason() -> None:
    error = SessionEnded(EndReason.IDLE_TIMEOUT, "0123456789ab")

    assert error.reason is EndReason.IDLE_TIMEOUT
    assert "0123456789ab" in str(error)
    assert "reauthenticate" in str(error)


def test_session_rejects_unknown_policy() -> None:
    with pytest.raises(ValueError, match=r"^end_policy must be 'raise' or 'reauthenticate', got 'retry'$"):
        Session(AuthorityClient("127.0.0.1:1"), end_policy="retry")  # type: ignore[arg-type]


def test_session_rejects_negative_margin() -> None:
    with pytest.raises(ValueError, match=r"^drift_margin_fixed_seconds must be a finite number >= 0"):
        Session(AuthorityClient("127.0.0.1:1"), drift_margin_fixed_seconds=-1.0)


# -- Session against a real authority -------------------------------------------


@pytest.fixture
def client(authority) -> Iterator[AuthorityClient]:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc") as opened:
        yield opened


def wait_for(condition, timeout_seconds: float = 2.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return bool(condition())


def test_session_grants_lazily(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    session = Session(client, tier="standard", keeper=keeper)

    assert session.state is SessionState.PENDING
    assert session.remaining_seconds is None
    session.open()

    assert session.state is SessionState.ALIVE
    assert session.fingerprint is not None
    assert 290 < (session.remaining_seconds or 0) <= 300


def test_session_open_unknown_tier(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    session = Session(client, tier="no-such-tier", keeper=keeper)

    with pytest.raises(InvalidArgument):
        session.open()


def test_session_close_releases(client: AuthorityClient, admin: AuthorityClient, keeper: LeaseKeeper) -> None:
    ends: list[EndReason] = []
    with Session(client, tier="standard", keeper=keeper, on_end=ends.append) as session:
        session.open()
        lease_id = session.lease_id
    assert lease_id is not None

    lease = admin.time_to_live(lease_id)

    assert lease.state is LeaseState.ENDED
    assert lease.end_reason is EndReason.RELEASED
    assert ends == [EndReason.RELEASED]
    assert session.state is SessionState.CLOSED
    with pytest.raises(SessionEnded) as raised:
        session.open()
    assert raised.value.reason is EndReason.RELEASED
    assert str(raised.value).endswith("ended (released); the session was closed; open a new Session")


class _SlowGrantClient(AuthorityClient):
    """A real client whose grants reach the session only after the session's clock has moved on."""

    def __init__(self, target: str, clock: FakeClock) -> None:
        super().__init__(target, principal="svc")
        self._clock = clock

    def grant(self, *args: object, **kwargs: object) -> GrantedLease:  # type: ignore[override]
        granted = super().grant(*args, **kwargs)  # type: ignore[arg-type]
        self._clock.now += 10.0
        return granted


def test_lease_ended_before_first_use_explains(authority, keeper: LeaseKeeper) -> None:  # type: ignore[no-untyped-def]
    clock = FakeClock(time.monotonic())
    with _SlowGrantClient(authority.target, clock) as client:
        session = Session(client, tier="short", keeper=keeper, end_policy="reauthenticate", clock=clock)

        with pytest.raises(SessionEnded) as raised:
            session.open()

    assert "the lease granted for this call ended before the call could use it" in str(raised.value)
    assert "reauthenticate" not in str(raised.value)


def test_sessions_share_one_stream(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    sessions = [Session(client, tier="short", keeper=keeper, watch=False).open() for _ in range(3)]

    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for session in sessions:
            session.mark_activity()
        time.sleep(0.05)

    assert all(session.state is SessionState.ALIVE for session in sessions)
    assert keeper.stats.streams_opened == 1
    assert keeper.stats.batches_sent >= 3
    for session in sessions:
        session.close()


def test_keeper_batches_leases_due_apart(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    # 100 leases granted over about 0.3 s, one renewal interval of the short
    # tier (1 s idle timeout), so their renewals fall due at 100 different times.
    sessions = []
    for _ in range(100):
        sessions.append(Session(client, tier="short", keeper=keeper, watch=False).open())
        # Activity while sessions open wakes the keeper again and again.
        for session in sessions[-10:]:
            session.mark_activity()
        time.sleep(0.003)
    batches_before = keeper.stats.batches_sent
    stop_at = time.monotonic() + 2.0
    while time.monotonic() < stop_at:
        for session in sessions:
            session.mark_activity()
        time.sleep(0.05)
    batches = keeper.stats.batches_sent - batches_before

    assert all(session.state is SessionState.ALIVE for session in sessions)
    # A wake sends only when some lease is due, so opening adds no batch of its own.
    assert batches_before <= 10
    # About 6 renewals each: 600 batches one lease at a time, about 2 per interval when shared.
    assert 6 <= batches <= 60
    assert keeper.stats.renewals_failed == 0
    for session in sessions:
        session.close()


def test_session_concurrent_callers_keep_lease(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append).open()
    lease_ids: set[str] = set()
    errors: list[BaseException] = []
    stop_at = time.monotonic() + 1.5

    def call_repeatedly() -> None:
        try:
            while time.monotonic() < stop_at:
                lease_ids.add(session._lease_for_call().lease_id)
                session.mark_activity()
                # Real callers wait for replies; busy loops would starve the
                # in-process authority of the GIL.
                time.sleep(0.002)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=call_repeatedly) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert lease_ids == {session.lease_id}
    assert ends == []
    assert session.state is SessionState.ALIVE
    assert keeper.stats.batches_sent >= 3
    session.close()


def test_session_mark_activity_after_close(client: AuthorityClient, keeper: LeaseKeeper) -> None:
    session = Session(client, tier="standard", keeper=keeper).open()
    session.close()

    session.mark_activity()

    assert session.state is SessionState.CLOSED


def test_session_watch_learns_revoke(client: AuthorityClient, admin: AuthorityClient, keeper: LeaseKeeper) -> None:
    ends: list[EndReason] = []
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append).open()
    assert session.lease_id is not None
    # The watch stream is opened by the keeper thread; give it a moment to subscribe.
    time.sleep(0.3)

    admin.revoke(session.lease_id)

    assert wait_for(lambda: ends == [EndReason.REVOKED])
    assert session.state is SessionState.ENDED


def test_session_renewal_learns_revoke(client: AuthorityClient, admin: AuthorityClient, keeper: LeaseKeeper) -> None:
    ends: list[EndReason] = []
    session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append).open()
    assert session.lease_id is not None
    admin.revoke(session.lease_id)

    session.mark_activity()

    assert wait_for(lambda: ends == [EndReason.REVOKED])


def test_session_reauthenticates_once(client: AuthorityClient, admin: AuthorityClient, keeper: LeaseKeeper) -> None:
    ends: list[EndReason] = []
    session = Session(
        client, tier="short", keeper=keeper, watch=False, end_policy="reauthenticate", on_end=ends.append
    )
    session.open()
    first = session.fingerprint
    assert session.lease_id is not None
    admin.revoke(session.lease_id)
    session.mark_activity()
    assert wait_for(lambda: session.state is SessionState.ENDED)

    session.open()

    assert session.state is SessionState.ALIVE
    assert session.fingerprint != first
    assert ends == [EndReason.REVOKED]


def test_session_survives_two_failed_renewals(authority, keeper: LeaseKeeper) -> None:  # type: ignore[no-untyped-def]
    port = int(authority.target.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    ends: list[EndReason] = []
    try:
        with AuthorityClient(proxy.target, principal="svc", options=FAST_RECONNECT_OPTIONS) as client:
            session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append).open()
            holder = session._holder
            assert holder is not None
            session.mark_activity()
            time.sleep(0.4)
            assert keeper.stats.batches_sent >= 1

            proxy.reject_connections()
            failed = wait_for(lambda: (session.mark_activity(), holder.renewal_failures >= 2)[1], 0.6)
            proxy.accept_connections()
            recovered = wait_for(lambda: (session.mark_activity(), holder.renewal_failures == 0)[1], 0.6)

            assert failed
            assert recovered
            assert session.state is SessionState.ALIVE
            assert ends == []
            assert keeper.stats.streams_opened >= 2
            session.close()
    finally:
        proxy.stop()


def test_session_unreachable_ends_once(authority, keeper: LeaseKeeper) -> None:  # type: ignore[no-untyped-def]
    port = int(authority.target.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    ends: list[EndReason] = []
    try:
        with AuthorityClient(proxy.target, principal="svc", options=FAST_RECONNECT_OPTIONS) as client:
            session = Session(client, tier="short", keeper=keeper, watch=False, on_end=ends.append).open()
            proxy.reject_connections()

            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                session.mark_activity()
                time.sleep(0.05)
            proxy.accept_connections()
            time.sleep(0.5)

            assert ends == [EndReason.AUTHORITY_UNREACHABLE]
            assert session.state is SessionState.ENDED
            with pytest.raises(SessionEnded) as raised:
                session.open()
            assert raised.value.reason is EndReason.AUTHORITY_UNREACHABLE
    finally:
        proxy.stop()


def test_session_close_after_client_close(authority, keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []
    client = AuthorityClient(authority.target, principal="svc")
    session = Session(client, tier="standard", keeper=keeper, on_end=ends.append).open()
    client.close()

    session.close()

    assert ends == [EndReason.RELEASED]
    assert session.state is SessionState.CLOSED
    assert keeper.stats.leases == 0
    assert "close sessions before their authority client" in caplog.text


def test_aio_session_close_after_client_close(authority, keeper: LeaseKeeper, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    ends: list[EndReason] = []

    async def main() -> AioSession:
        client = AioAuthorityClient(authority.target, principal="svc")
        session = AioSession(client, tier="standard", keeper=keeper, on_end=ends.append)
        await session.open()
        await client.close()

        await session.close()
        return session

    session = asyncio.run(main())

    assert ends == [EndReason.RELEASED]
    assert session.state is SessionState.CLOSED
    assert keeper.stats.leases == 0
    assert "close sessions before their authority client" in caplog.text


def test_session_rejects_aio_client() -> None:
    async def main() -> None:
        client = AioAuthorityClient("127.0.0.1:1")
        try:
            with pytest.raises(TypeError, match=r"^Session needs a blocking AuthorityClient, got an AioAuthorityClient"):
                Session(client)
        finally:
            await client.close()

    asyncio.run(main())


def test_aio_session_rejects_blocking_client() -> None:
    with AuthorityClient("127.0.0.1:1") as client:
        with pytest.raises(TypeError, match=r"^AioSession needs an AioAuthorityClient, got a blocking AuthorityClient"):
            AioSession(client)  # type: ignore[arg-type]


def test_session_margin_longer_than_lease(client: AuthorityClient, admin: AuthorityClient, keeper: LeaseKeeper) -> None:
    # The short tier's idle timeout is 1 s, less than the 2 s fixed margin.
    session = Session(client, tier="short", keeper=keeper, drift_margin_fixed_seconds=2.0)

    with pytest.raises(ValueError, match=r"^drift margin of 2\.0\d* s leaves no time of the 1\.0\d* s lease"):
        session.open()

    assert list(admin.list_leases(principal="svc")) == []
    assert keeper.stats.leases == 0


def test_aio_session_margin_longer_than_lease(authority, admin: AuthorityClient, keeper: LeaseKeeper) -> None:  # type: ignore[no-untyped-def]
    async def main() -> None:
        async with AioAuthorityClient(authority.target, principal="svc") as client:
            session = AioSession(client, tier="short", keeper=keeper, drift_margin_ratio=0.5, drift_margin_fixed_seconds=0.5)

            with pytest.raises(ValueError, match=r"^drift margin of 1\.0\d* s leaves no time of the 1\.0\d* s lease"):
                await session.open()

    asyncio.run(main())

    assert list(admin.list_leases(principal="svc")) == []
    assert keeper.stats.leases == 0

"""Tests of the per-principal limits on live leases and grant rate."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest

from session_authority.clients import AuthorityClient
from session_authority.clients._errors import ResourceExhausted
from session_authority.server import (
    AuthorityConfig,
    AuthorityThread,
    EndReason,
    InsecureDevAuthenticator,
    LeaseTable,
    Limits,
    ManualClock,
    parse_policy,
)
from session_authority.server._limits import LIVE_LEASES_RETRY_AFTER_SECONDS, LimitExceeded, PrincipalLimiter


def limited_table(max_live: int = 0, rate: float = 0.0) -> tuple[ManualClock, LeaseTable, PrincipalLimiter]:
    clock = ManualClock()
    table = LeaseTable(clock)
    limiter = PrincipalLimiter(Limits(max_live, rate), clock)
    table.add_listener(limiter)
    return clock, table, limiter


def grant(table: LeaseTable, limiter: PrincipalLimiter, principal: str) -> bytes:
    limiter.acquire(principal)
    _, lease = table.grant(principal, "standard", 60.0, 3600.0)
    return lease.digest


# --- live leases -----------------------------------------------------------------------------


def test_live_limit_rejects_one_over() -> None:
    _, table, limiter = limited_table(max_live=2)
    grant(table, limiter, "svc-a")
    grant(table, limiter, "svc-a")

    with pytest.raises(LimitExceeded, match=r'^principal "svc-a" has 2 live leases, the maximum') as caught:
        limiter.acquire("svc-a")

    assert "limits.max_live_leases_per_principal = 2" in caught.value.details
    assert caught.value.retry_after_seconds == LIVE_LEASES_RETRY_AFTER_SECONDS


def test_live_limit_is_per_principal() -> None:
    _, table, limiter = limited_table(max_live=1)
    grant(table, limiter, "svc-a")

    grant(table, limiter, "svc-b")

    assert limiter.live_count("svc-a") == 1
    assert limiter.live_count("svc-b") == 1


@pytest.mark.parametrize("reason", [EndReason.REVOKED, EndReason.RELEASED])
def test_ended_lease_frees_slot(reason: EndReason) -> None:
    _, table, limiter = limited_table(max_live=1)
    digest = grant(table, limiter, "svc-a")

    table.end(digest, reason)

    assert limiter.live_count("svc-a") == 0
    grant(table, limiter, "svc-a")


def test_expired_lease_frees_slot() -> None:
    clock, table, limiter = limited_table(max_live=1)
    grant(table, limiter, "svc-a")

    clock.advance(61.0)
    table.expire_due()

    assert limiter.live_count("svc-a") == 0


def test_end_twice_frees_one_slot() -> None:
    _, table, limiter = limited_table(max_live=5)
    digest = grant(table, limiter, "svc-a")
    grant(table, limiter, "svc-a")

    table.end(digest, EndReason.REVOKED)
    table.end(digest, EndReason.REVOKED)

    assert limiter.live_count("svc-a") == 1


def test_release_frees_abandoned_grant() -> None:
    _, _, limiter = limited_table(max_live=1)
    limiter.acquire("svc-a")

    limiter.release("svc-a")

    assert limiter.live_count("svc-a") == 0
    limiter.acquire("svc-a")


def test_load_counts_restored_leases() -> None:
    _, _, limiter = limited_table(max_live=2)

    limiter.load(["svc-a", "svc-a", "svc-b"])

    with pytest.raises(LimitExceeded, match="has 2 live leases"):
        limiter.acquire("svc-a")
    limiter.acquire("svc-b")


def test_zero_live_limit_is_unlimited() -> None:
    _, _, limiter = limited_table(max_live=0)

    for _ in range(5000):
        limiter.acquire("svc-a")

    assert limiter.live_count("svc-a") == 5000


# --- grant rate ------------------------------------------------------------------------------


def test_rate_allows_burst_of_one_second() -> None:
    _, _, limiter = limited_table(rate=5.0)

    for _ in range(5):
        limiter.acquire("svc-a")

    with pytest.raises(LimitExceeded, match=r"^principal \"svc-a\" exceeded its grant rate") as caught:
        limiter.acquire("svc-a")
    assert "limits.grants_per_second_per_principal = 5" in caught.value.details
    assert caught.value.retry_after_seconds == pytest.approx(0.2)


def test_rate_refills_with_clock() -> None:
    clock, _, limiter = limited_table(rate=5.0)
    for _ in range(5):
        limiter.acquire("svc-a")

    clock.advance(0.2)
    limiter.acquire("svc-a")

    with pytest.raises(LimitExceeded):
        limiter.acquire("svc-a")


def test_rate_retry_hint_shrinks_with_time() -> None:
    clock, _, limiter = limited_table(rate=2.0)
    limiter.acquire("svc-a")
    limiter.acquire("svc-a")
    clock.advance(0.3)

    with pytest.raises(LimitExceeded) as caught:
        limiter.acquire("svc-a")

    assert caught.value.retry_after_seconds == pytest.approx(0.2)


def test_fractional_rate_allows_one_grant() -> None:
    clock, _, limiter = limited_table(rate=0.5)
    limiter.acquire("svc-a")

    with pytest.raises(LimitExceeded) as caught:
        limiter.acquire("svc-a")
    clock.advance(2.0)
    limiter.acquire("svc-a")

    assert caught.value.retry_after_seconds == pytest.approx(2.0)


def test_rate_is_per_principal() -> None:
    _, _, limiter = limited_table(rate=1.0)
    limiter.acquire("svc-a")

    limiter.acquire("svc-b")

    with pytest.raises(LimitExceeded):
        limiter.acquire("svc-a")


def test_rejected_rate_reserves_no_slot() -> None:
    _, _, limiter = limited_table(max_live=10, rate=1.0)
    limiter.acquire("svc-a")

    with pytest.raises(LimitExceeded):
        limiter.acquire("svc-a")

    assert limiter.live_count("svc-a") == 1


def test_live_limit_spends_no_token() -> None:
    clock, table, limiter = limited_table(max_live=1, rate=1.0)
    digest = grant(table, limiter, "svc-a")
    clock.advance(1.0)
    with pytest.raises(LimitExceeded, match="live leases"):
        limiter.acquire("svc-a")

    table.end(digest, EndReason.RELEASED)

    limiter.acquire("svc-a")


def test_many_principals_keep_buckets_bounded() -> None:
    clock, _, limiter = limited_table(rate=1.0)
    for index in range(10_000):
        limiter.acquire(f"svc-{index}")
    clock.advance(2.0)

    limiter.acquire("svc-late")

    assert len(limiter._buckets) == 1


# --- over gRPC -------------------------------------------------------------------------------

LIMITED_POLICY = """
version = 1
default_tier = "standard"

[tiers.standard]
idle_timeout = "5m"
max_duration = "1h"

[limits]
max_live_leases_per_principal = 2
grants_per_second_per_principal = 3
"""


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def limited_authority(tmp_path: pathlib.Path, clock: ManualClock) -> Iterator[AuthorityThread]:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(LIMITED_POLICY),
        data_dir=tmp_path / "data",
        admin_everyone=True,
        clock=clock,
    )
    running = AuthorityThread(config).start()
    yield running
    running.stop()


def test_grant_over_live_limit_resource_exhausted(limited_authority: AuthorityThread) -> None:
    with AuthorityClient(limited_authority.target, principal="svc-a") as client:
        client.grant()
        client.grant()

        with pytest.raises(ResourceExhausted, match="limits.max_live_leases_per_principal = 2") as caught:
            client.grant()

    assert caught.value.retry_after_seconds == LIVE_LEASES_RETRY_AFTER_SECONDS


def test_grant_over_rate_sends_retry_hint(limited_authority: AuthorityThread) -> None:
    with AuthorityClient(limited_authority.target, principal="svc-a") as client:
        for _ in range(3):
            client.revoke(client.grant().lease_id, release=True)

        with pytest.raises(ResourceExhausted, match="limits.grants_per_second_per_principal = 3") as caught:
            client.grant()

    assert caught.value.retry_after_seconds == pytest.approx(1 / 3, abs=0.001)


def test_rate_limit_leaves_other_principal(limited_authority: AuthorityThread) -> None:
    with AuthorityClient(limited_authority.target) as client:
        for _ in range(3):
            client.revoke(client.grant(principal="svc-a").lease_id, release=True)

        client.grant(principal="svc-b")


def test_released_lease_allows_new_grant(limited_authority: AuthorityThread, clock: ManualClock) -> None:
    with AuthorityClient(limited_authority.target, principal="svc-a") as client:
        first = client.grant()
        client.grant()
        client.revoke(first.lease_id, release=True)

        client.grant()


def test_restart_counts_stored_leases(tmp_path: pathlib.Path, clock: ManualClock) -> None:
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(LIMITED_POLICY),
        data_dir=tmp_path / "data",
        admin_everyone=True,
        clock=clock,
    )
    with AuthorityThread(config) as first_run, AuthorityClient(first_run.target, principal="svc-a") as client:
        client.grant()
        client.grant()

    with AuthorityThread(config) as second_run, AuthorityClient(second_run.target, principal="svc-a") as client:
        with pytest.raises(ResourceExhausted, match="has 2 live leases"):
            client.grant()

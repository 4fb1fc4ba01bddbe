"""Tests of admin authorization: listing all leases, ending another principal's lease and watching session ends."""

from __future__ import annotations

import logging
import pathlib
import time
from collections.abc import Iterator

import grpc
import pytest

from session_authority.clients import AuthorityClient
from session_authority.clients._errors import PermissionDenied, Unauthenticated
from session_authority.clients._metadata import LEASE_METADATA_KEY
from session_authority.clients._types import EndReason, HeartbeatEvent, LeaseState
from session_authority.interceptors import EnforcerConfig
from session_authority.interceptors._enforcer import Enforcer
from session_authority.server import (
    ApiKeyAuthenticator,
    AuthorityConfig,
    AuthorityThread,
    hash_api_key,
    parse_policy,
)

from faults._proxy import ProxyMode, TcpProxy
from lease_harness import SERVICE, SyncServer, enforcer_config
from policies import TEST_POLICY

ADMIN_KEY = "test-key-of-ops"
HOLDER_KEY = "test-key-of-svc-a"
OTHER_KEY = "test-key-of-svc-b"
ADMIN_PERMISSION = "needs the admin permission (list the principal under admins in the policy)"


@pytest.fixture
def keyed_authority(tmp_path: pathlib.Path) -> Iterator[AuthorityThread]:
    """An authority whose policy makes "ops" an admin, with API keys for ops, svc-a and svc-b."""
    authenticator = ApiKeyAuthenticator(
        {hash_api_key(ADMIN_KEY): "ops", hash_api_key(HOLDER_KEY): "svc-a", hash_api_key(OTHER_KEY): "svc-b"}
    )
    config = AuthorityConfig(authenticator=authenticator, policy=parse_policy(TEST_POLICY), data_dir=tmp_path / "data")
    running = AuthorityThread(config).start()
    yield running
    running.stop()


@pytest.fixture
def admin(keyed_authority: AuthorityThread) -> Iterator[AuthorityClient]:
    with AuthorityClient(keyed_authority.target, api_key=ADMIN_KEY) as client:
        yield client


@pytest.fixture
def holder(keyed_authority: AuthorityThread) -> Iterator[AuthorityClient]:
    with AuthorityClient(keyed_authority.target, api_key=HOLDER_KEY) as client:
        yield client


@pytest.fixture
def other(keyed_authority: AuthorityThread) -> Iterator[AuthorityClient]:
    with AuthorityClient(keyed_authority.target, api_key=OTHER_KEY) as client:
        yield client


# --- ListLeases -------------------------------------------------------------------------------


def test_non_admin_list_all_denied(holder: AuthorityClient) -> None:
    with pytest.raises(PermissionDenied) as caught:
        list(holder.list_leases())

    assert 'principal "svc-a" may only list its own leases' in caught.value.details
    assert "listing all leases needs the admin permission" in caught.value.details


def test_non_admin_list_other_principal_denied(holder: AuthorityClient, other: AuthorityClient) -> None:
    other.grant()

    with pytest.raises(PermissionDenied, match="admin permission"):
        list(holder.list_leases(principal="svc-b"))


def test_non_admin_lists_own_leases(holder: AuthorityClient, other: AuthorityClient) -> None:
    mine = holder.grant()
    other.grant()

    listed = list(holder.list_leases(principal="svc-a"))

    assert [lease.fingerprint for lease in listed] == [mine.fingerprint]


def test_admin_lists_all_leases(admin: AuthorityClient, holder: AuthorityClient, other: AuthorityClient) -> None:
    holder.grant()
    other.grant()

    listed = list(admin.list_leases())

    assert sorted(lease.principal for lease in listed) == ["svc-a", "svc-b"]


# --- Revoke by lease_id -----------------------------------------------------------------------


@pytest.mark.parametrize(("release", "action"), [(False, "revoke"), (True, "release")])
def test_non_admin_end_other_lease_denied(
    holder: AuthorityClient, other: AuthorityClient, release: bool, action: str
) -> None:
    granted = holder.grant()

    with pytest.raises(PermissionDenied) as caught:
        other.revoke(granted.lease_id, release=release)

    assert (
        f'principal "svc-b" may not {action} lease {granted.fingerprint} of principal "svc-a"'
        in caught.value.details
    )
    assert ADMIN_PERMISSION in caught.value.details
    assert granted.lease_id not in caught.value.details
    assert holder.time_to_live(granted.lease_id).state is LeaseState.ALIVE


def test_holder_revokes_own_lease(holder: AuthorityClient) -> None:
    granted = holder.grant()

    result = holder.revoke(granted.lease_id)

    assert result.lease.end_reason is EndReason.REVOKED


def test_holder_releases_own_lease(holder: AuthorityClient) -> None:
    granted = holder.grant()

    result = holder.revoke(granted.lease_id, release=True)

    assert result.lease.end_reason is EndReason.RELEASED


def test_admin_revokes_other_lease(admin: AuthorityClient, holder: AuthorityClient) -> None:
    granted = holder.grant()

    result = admin.revoke(granted.lease_id)

    assert result.lease.state is LeaseState.ENDED
    assert result.lease.end_reason is EndReason.REVOKED


def test_unauthenticated_revoke_rejected(keyed_authority: AuthorityThread, holder: AuthorityClient) -> None:
    granted = holder.grant()

    with AuthorityClient(keyed_authority.target) as anonymous:
        with pytest.raises(Unauthenticated, match='missing "authorization" metadata'):
            anonymous.revoke(granted.lease_id)

    assert holder.time_to_live(granted.lease_id).state is LeaseState.ALIVE


def test_non_admin_revoke_unknown_lease_not_found(other: AuthorityClient) -> None:
    result = other.revoke("unknown-lease-id-xxxxxxx")

    assert result.lease.state is LeaseState.NOT_FOUND


# --- Revoke by fingerprint --------------------------------------------------------------------


def test_non_admin_revoke_other_by_fingerprint_denied(holder: AuthorityClient, other: AuthorityClient) -> None:
    granted = holder.grant()

    with pytest.raises(PermissionDenied, match="admin permission"):
        other.revoke(fingerprint=granted.fingerprint)


def test_holder_revokes_own_by_fingerprint(holder: AuthorityClient) -> None:
    granted = holder.grant()

    result = holder.revoke(fingerprint=granted.fingerprint)

    assert result.lease.end_reason is EndReason.REVOKED


def test_admin_revokes_by_fingerprint(admin: AuthorityClient, holder: AuthorityClient) -> None:
    granted = holder.grant()

    result = admin.revoke(fingerprint=granted.fingerprint)

    assert result.lease.end_reason is EndReason.REVOKED


# --- insecure development mode ----------------------------------------------------------------


def test_dev_mode_any_bearer_revokes(authority: AuthorityThread) -> None:
    with AuthorityClient(authority.target, principal="svc-a") as holder_client:
        granted = holder_client.grant()
    with AuthorityClient(authority.target, principal="svc-b") as other_client:
        result = other_client.revoke(granted.lease_id)

    assert result.lease.end_reason is EndReason.REVOKED


def test_dev_mode_everyone_lists_all(authority: AuthorityThread) -> None:
    with AuthorityClient(authority.target, principal="svc-a") as client:
        client.grant()
        client.grant(principal="svc-b")

        listed = list(client.list_leases())

    assert sorted(lease.principal for lease in listed) == ["svc-a", "svc-b"]


# --- WatchSessionEnds -------------------------------------------------------------------------

WATCHER_KEY = "test-key-of-orders-enforcer"


@pytest.fixture
def watched_authority(tmp_path: pathlib.Path) -> Iterator[AuthorityThread]:
    """An authority whose policy lets only "orders-enforcer" (and the admin "ops") watch session ends."""
    authenticator = ApiKeyAuthenticator(
        {
            hash_api_key(ADMIN_KEY): "ops",
            hash_api_key(HOLDER_KEY): "svc-a",
            hash_api_key(WATCHER_KEY): "orders-enforcer",
        }
    )
    policy = parse_policy(TEST_POLICY.replace('admins = ["ops"]', 'admins = ["ops"]\nwatchers = ["orders-enforcer"]'))
    config = AuthorityConfig(authenticator=authenticator, policy=policy, data_dir=tmp_path / "data")
    running = AuthorityThread(config).start()
    yield running
    running.stop()


def _first_event(target: str, api_key: str) -> object:
    with AuthorityClient(target, api_key=api_key) as client:
        stream = client.watch_session_ends()
        try:
            return next(iter(stream))
        finally:
            stream.cancel()


@pytest.mark.parametrize("api_key", [WATCHER_KEY, ADMIN_KEY])
def test_listed_watcher_and_admin_watch(watched_authority: AuthorityThread, api_key: str) -> None:
    assert isinstance(_first_event(watched_authority.target, api_key), HeartbeatEvent)


def test_unlisted_principal_watch_denied(watched_authority: AuthorityThread) -> None:
    with pytest.raises(PermissionDenied) as caught:
        _first_event(watched_authority.target, HOLDER_KEY)

    assert 'principal "svc-a" may not watch session ends' in caught.value.details
    assert "list it under watchers (or admins) in the policy" in caught.value.details


def test_without_watchers_list_anyone_watches(keyed_authority: AuthorityThread) -> None:
    assert isinstance(_first_event(keyed_authority.target, OTHER_KEY), HeartbeatEvent)


def test_enforcer_not_watcher_logs_denial(
    watched_authority: AuthorityThread, caplog: pytest.LogCaptureFixture
) -> None:
    config = EnforcerConfig(authority_target=watched_authority.target, api_key=HOLDER_KEY)
    with caplog.at_level(logging.WARNING, logger="session_authority.interceptors._authority_link"):
        enforcer = Enforcer(config).start()
        try:
            deadline = time.monotonic() + 10
            while "may not watch session ends" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            enforcer.close()

    assert 'PERMISSION_DENIED: principal "svc-a" may not watch session ends' in caplog.text


def _grant_when_stale(authority_target: str, server: SyncServer) -> str:
    """Grant a lease to svc-a, wait up to 10 s for the server's enforcer to go stale, and return the lease ID."""
    with AuthorityClient(authority_target, api_key=HOLDER_KEY) as holder_client:
        lease_id = holder_client.grant().lease_id
    deadline = time.monotonic() + 10
    while not server.interceptor.enforcer.stale and time.monotonic() < deadline:
        time.sleep(0.05)
    return lease_id


def _rejection_details(target: str, lease_id: str) -> str:
    with grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            channel.unary_unary(f"/{SERVICE}/unary_function")(b"ping", metadata=((LEASE_METADATA_KEY, lease_id),), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return refused.value.details() or ""


def test_enforcer_refuses_calls_once_watch_rejected(watched_authority: AuthorityThread) -> None:
    # A staleness bound far beyond the test, so only the rejection can stop the enforcer's trust.
    server = SyncServer(enforcer_config(watched_authority.target, api_key=HOLDER_KEY, staleness_bound_seconds=60.0))
    try:
        lease_id = _grant_when_stale(watched_authority.target, server)
        details = _rejection_details(server.target, lease_id)
    finally:
        server.stop()

    assert "the authority rejected this enforcer's watch stream" in details


def test_rejection_after_silence_named(watched_authority: AuthorityThread) -> None:
    # The enforcer goes stale while the authority is out of reach. Then the
    # authority responds and rejects the watch, and rejections must name that.
    rejected = "the authority rejected this enforcer's watch stream"
    with TcpProxy(watched_authority.target) as proxy:
        proxy.set_mode(ProxyMode.REFUSE)
        server = SyncServer(enforcer_config(proxy.target, api_key=HOLDER_KEY, staleness_bound_seconds=0.5))
        try:
            lease_id = _grant_when_stale(watched_authority.target, server)
            silent_details = _rejection_details(server.target, lease_id)

            proxy.set_mode(ProxyMode.PASS)
            deadline = time.monotonic() + 10
            details = _rejection_details(server.target, lease_id)
            while rejected not in details and time.monotonic() < deadline:
                time.sleep(0.05)
                details = _rejection_details(server.target, lease_id)
        finally:
            server.stop()

    assert "no word from the authority" in silent_details
    assert rejected in details

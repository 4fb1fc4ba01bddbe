"""The blocking AuthorityClient against a real authority, plus the pure conversions it relies on."""

from __future__ import annotations

import concurrent.futures
import datetime
import math
import pathlib
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from session_authority.clients._client import AuthorityClient, WatchStream
from session_authority.clients._common import build_metadata, is_loopback_target
from session_authority.clients._errors import (
    AuthorityError,
    AuthorityUnavailable,
    FailedPrecondition,
    InvalidArgument,
    Unauthenticated,
    _retry_after_seconds,
)
from session_authority.clients._keeper import SyncLink
from session_authority.clients._metadata import EndReason, fingerprint, lease_digest
from session_authority.clients._types import (
    GrantedLease,
    HeartbeatEvent,
    LeaseInfo,
    LeaseState,
    SessionEndEvent,
    Verdict,
    duration_to_seconds,
    end_reason_from_proto,
    lease_state_from_proto,
    seconds_to_duration,
)
from session_authority.server import (
    ApiKeyAuthenticator,
    AuthorityConfig,
    AuthorityThread,
    InsecureDevAuthenticator,
    parse_policy,
)
from session_authority.server._auth import append_api_key
from session_authority.server._table import EndReason as ServerEndReason
from session_authority.v1 import session_authority_pb2 as pb

from policies import TEST_POLICY

MAX_WATCH_EVENTS = 100
"""Upper bound on events read while waiting for one; heartbeats come every 0.2 s in the fixtures."""


def closed_port_target() -> str:
    """Return a loopback address on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def next_end(stream: WatchStream) -> SessionEndEvent:
    for _, event in zip(range(MAX_WATCH_EVENTS), stream):
        if isinstance(event, SessionEndEvent):
            return event
    raise AssertionError(f"no session end within {MAX_WATCH_EVENTS} watch events")


@pytest.fixture
def client(authority) -> Iterator[AuthorityClient]:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc-a") as opened:
        yield opened


# -- pure conversions ----------------------------------------------------------


def test_seconds_to_duration_round_trip() -> None:
    for seconds in (0.0, 0.25, 1.5, 299.999999999, 86_400.0):
        assert duration_to_seconds(seconds_to_duration(seconds)) == pytest.approx(seconds, abs=1e-9)


def test_seconds_to_duration_splits_nanos() -> None:
    duration = seconds_to_duration(2.5)

    assert duration.seconds == 2
    assert duration.nanos == 500_000_000


def test_seconds_to_duration_carries_rounded_nanos() -> None:
    duration = seconds_to_duration(0.9999999999)

    assert duration.seconds == 1
    assert duration.nanos == 0


@pytest.mark.parametrize("bad", [-0.001, math.nan, math.inf, 1e12, "1", True])
def test_seconds_to_duration_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^idle_timeout_seconds must be "):
        seconds_to_duration(bad, field="idle_timeout_seconds")  # type: ignore[arg-type]


def test_duration_to_seconds_adds_nanos() -> None:
    assert duration_to_seconds(duration_pb2.Duration(seconds=3, nanos=250_000_000)) == 3.25


def test_lease_info_from_proto_converts_fields() -> None:
    message = pb.Lease(
        fingerprint="0123456789ab",
        digest="ab" * 32,
        principal="svc-a",
        tier="short",
        state=pb.LEASE_STATE_ENDED,
        end_reason=pb.END_REASON_IDLE_TIMEOUT,
        idle_timeout=duration_pb2.Duration(seconds=1),
        max_duration=duration_pb2.Duration(seconds=4),
        age=duration_pb2.Duration(seconds=2, nanos=500_000_000),
        idle_for=duration_pb2.Duration(seconds=1, nanos=1),
    )
    message.granted_at.FromSeconds(1_700_000_000)
    message.ended_at.FromSeconds(1_700_000_002)

    lease = LeaseInfo.from_proto(message)

    assert lease.state is LeaseState.ENDED
    assert lease.end_reason is EndReason.IDLE_TIMEOUT
    assert not lease.alive
    assert lease.age_seconds == 2.5
    assert lease.max_duration_seconds == 4.0
    assert lease.granted_at == datetime.datetime.fromtimestamp(1_700_000_000, datetime.timezone.utc)
    assert lease.ended_at is not None
    assert lease.ended_at.tzinfo is datetime.timezone.utc


def test_lease_info_unset_timestamps_are_none() -> None:
    lease = LeaseInfo.from_proto(pb.Lease(state=pb.LEASE_STATE_NOT_FOUND))

    assert lease.granted_at is None
    assert lease.ended_at is None
    assert lease.end_reason is None


def test_end_reason_unknown_number_maps_to_unknown() -> None:
    assert end_reason_from_proto(pb.END_REASON_UNSPECIFIED) is None
    assert end_reason_from_proto(99) is EndReason.UNKNOWN


def test_lease_state_unspecified_rejected() -> None:
    with pytest.raises(ValueError, match=r"^the authority sent lease state 0, "):
        lease_state_from_proto(pb.LEASE_STATE_UNSPECIFIED)


def test_granted_lease_repr_hides_lease_id() -> None:
    lease_id = "secret-lease-id-value"
    lease = LeaseInfo.from_proto(
        pb.Lease(fingerprint=fingerprint(lease_id), state=pb.LEASE_STATE_ALIVE)
    )
    granted = GrantedLease(lease_id=lease_id, lease=lease, sent_at_monotonic=10.0)

    text = repr(granted)

    assert lease_id not in text
    assert fingerprint(lease_id) in text


def test_granted_lease_local_deadline_subtracts_margin() -> None:
    lease = LeaseInfo.from_proto(
        pb.Lease(state=pb.LEASE_STATE_ALIVE, ttl=duration_pb2.Duration(seconds=30))
    )
    granted = GrantedLease(lease_id="x", lease=lease, sent_at_monotonic=100.0)

    assert granted.local_deadline(drift_margin_seconds=0.5) == 129.5


def test_build_metadata_bearer_and_principal() -> None:
    assert build_metadata("k3y", "svc-a") == (
        ("authorization", "Bearer k3y"),
        ("x-session-principal", "svc-a"),
    )
    assert build_metadata(None, None) == ()


def test_build_metadata_principal_over_authority_limit() -> None:
    """A principal the authority would refuse is rejected before gRPC's metadata cap returns RESOURCE_EXHAUSTED."""
    assert build_metadata(None, "p" * 256) == (("x-session-principal", "p" * 256),)
    with pytest.raises(ValueError, match=r"^principal must be at most 256 characters, got 20000; "):
        build_metadata(None, "p" * 20000)


# Python decodes a command-line argument that is not UTF-8 into lone surrogates.
NOT_UTF8 = b"\xff\xfe".decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda c: c.grant("standard", principal=f"svc{NOT_UTF8}"), "principal"),
        (lambda c: c.grant(NOT_UTF8), "tier"),
        (lambda c: c.grant(5), "tier"),
        (lambda c: c.revoke(fingerprint=NOT_UTF8), "fingerprint"),
        (lambda c: list(c.list_leases(tier=NOT_UTF8)), "tier"),
        (lambda c: c.validate("some-lease", "/pkg.Svc/M", caller_principal=NOT_UTF8), "caller_principal"),
        (lambda c: c.watch_session_ends(instance_id=NOT_UTF8), "instance_id"),
    ],
)
def test_text_a_request_cannot_carry_names_the_field(client: AuthorityClient, call, field: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        call(client)


def test_non_utf8_lease_id_not_echoed(client: AuthorityClient) -> None:
    lease_id = f"secret{NOT_UTF8}"

    for call in (lambda: client.time_to_live(lease_id), lambda: client.revoke(lease_id), lambda: client.renew([(lease_id, 0.0)])):
        with pytest.raises(ValueError, match=r"must be UTF-8 text, and the value given contains bytes that are not valid UTF-8") as caught:
            call()
        assert "secret" not in str(caught.value)


def test_build_metadata_bad_key_not_echoed() -> None:
    with pytest.raises(ValueError, match=r"^api_key must be printable ASCII") as caught:
        build_metadata("bad\nkey", None)

    assert "bad\nkey" not in str(caught.value)


@pytest.mark.parametrize(
    ("target", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/tmp/authority.sock", True),
        ("authority.example:443", False),
        ("10.0.0.5:50051", False),
    ],
)
def test_is_loopback_target(target: str, loopback: bool) -> None:
    assert is_loopback_target(target) is loopback


def test_retry_after_parsed_from_milliseconds() -> None:
    assert _retry_after_seconds([("other", "1"), ("retry-after-ms", "1500")]) == 1.5
    assert _retry_after_seconds([("retry-after-ms", b"250")]) == 0.25
    assert _retry_after_seconds([("retry-after-ms", "soon")]) is None
    assert _retry_after_seconds([]) is None


# -- construction ----------------------------------------------------------------


def test_client_needs_target_or_channel() -> None:
    with pytest.raises(ValueError, match=r"^AuthorityClient needs exactly one of target"):
        AuthorityClient()


def test_client_rejects_both_target_and_channel() -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(ValueError, match=r"^AuthorityClient needs exactly one of target"):
            AuthorityClient("127.0.0.1:1", channel=channel)


def test_client_rejects_zero_timeout() -> None:
    with pytest.raises(ValueError, match=r"^timeout_seconds must be a finite number of seconds > 0"):
        AuthorityClient("127.0.0.1:1", timeout_seconds=0)


def test_client_rejects_huge_timeout() -> None:
    with pytest.raises(ValueError, match=r"^timeout_seconds must be at most 1e\+09 s \(about 31 years\), got 10000000000\.0"):
        AuthorityClient("127.0.0.1:1", timeout_seconds=1e10)


def test_grant_with_longest_timeout(authority) -> None:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target, principal="svc", timeout_seconds=1e9) as client:
        granted = client.grant()

    assert granted.lease.principal == "svc"


def test_client_leaves_given_channel_open(authority) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(authority.target) as channel:
        AuthorityClient(channel=channel).close()

        now = AuthorityClient(channel=channel).now()

    assert now.tzinfo is datetime.timezone.utc


# -- grant ---------------------------------------------------------------------


def test_grant_returns_alive_lease(client: AuthorityClient) -> None:
    before = time.monotonic()
    granted = client.grant("standard")

    lease = granted.lease
    assert lease.alive
    assert lease.tier == "standard"
    assert lease.principal == "svc-a"
    assert lease.fingerprint == fingerprint(granted.lease_id)
    assert lease.digest == lease_digest(granted.lease_id)
    assert 0 < lease.ttl_seconds <= lease.idle_timeout_seconds == 300.0
    assert lease.max_duration_seconds == 3600.0
    assert lease.granted_at is not None
    assert lease.granted_at.tzinfo is datetime.timezone.utc
    assert before <= granted.sent_at_monotonic <= time.monotonic()


def test_grant_default_tier(client: AuthorityClient) -> None:
    assert client.grant().lease.tier == "standard"


def test_grant_principal_argument_wins(client: AuthorityClient) -> None:
    assert client.grant(principal="svc-b").lease.principal == "svc-b"


def test_grant_shorter_idle_timeout(client: AuthorityClient) -> None:
    granted = client.grant("standard", idle_timeout_seconds=60.0)

    assert granted.lease.idle_timeout_seconds == 60.0


def test_grant_unknown_tier_invalid_argument(client: AuthorityClient) -> None:
    with pytest.raises(
        InvalidArgument, match=r'^Grant failed: INVALID_ARGUMENT: tier "gold" .*brief, short, standard'
    ) as caught:
        client.grant("gold")

    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.operation == "Grant"
    assert not caught.value.retryable
    assert isinstance(caught.value.__cause__, grpc.RpcError)


def test_grant_negative_idle_timeout_rejected_locally() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        with pytest.raises(ValueError, match=r"^idle_timeout_seconds must be a finite number"):
            unreachable.grant(idle_timeout_seconds=-1)


# -- renew ---------------------------------------------------------------------


def test_renew_answers_in_request_order(client: AuthorityClient) -> None:
    first = client.grant("standard")
    second = client.grant("short")

    result = client.renew([(second.lease_id, 0.0), ("no-such-lease", 0.0), (first.lease_id, 0.0)])

    assert [lease.state for lease in result.leases] == [
        LeaseState.ALIVE,
        LeaseState.NOT_FOUND,
        LeaseState.ALIVE,
    ]
    assert result.leases[0].fingerprint == second.fingerprint
    assert result.leases[2].fingerprint == first.fingerprint


def test_renew_unknown_lease_not_found(client: AuthorityClient) -> None:
    result = client.renew([("no-such-lease", 0.0)])

    assert result.leases[0].state is LeaseState.NOT_FOUND


def test_renew_negative_idle_for_rejected(client: AuthorityClient) -> None:
    with pytest.raises(ValueError, match=r"^entries\[0\] idle_for_seconds must be a finite number"):
        client.renew([("some-lease", -1.0)])


def test_renew_ended_lease_reports_reason(client: AuthorityClient) -> None:
    granted = client.grant("standard")
    client.revoke(granted.lease_id)

    result = client.renew([(granted.lease_id, 0.0)])

    assert result.leases[0].state is LeaseState.ENDED
    assert result.leases[0].end_reason is EndReason.REVOKED


def test_renew_empty_batch_makes_no_call() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        result = unreachable.renew([])

    assert result.leases == []


def test_renew_malformed_entry_rejected() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        with pytest.raises(ValueError, match=r"^entries\[0\] must be a \(lease_id, idle_for_seconds\) pair"):
            unreachable.renew(["lease-without-idle-for"])  # type: ignore[list-item]


# -- keep-alive stream ---------------------------------------------------------


def test_keep_alive_matches_replies_from_many_threads(client: AuthorityClient) -> None:
    senders = 8
    batches_per_sender = 25
    leases = [client.grant("standard") for _ in range(senders)]
    results: dict[int, list[tuple[int, concurrent.futures.Future]]] = {i: [] for i in range(senders)}
    start = threading.Barrier(senders)

    def send_batches(index: int, stream) -> None:  # type: ignore[no-untyped-def]
        start.wait()
        for batch in range(batches_per_sender):
            size = batch % 3 + 1
            entries = [(leases[index].lease_id, 0.0)] * size
            results[index].append((size, stream.send(entries)))

    with client.keep_alive() as stream:
        threads = [threading.Thread(target=send_batches, args=(i, stream)) for i in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        for index, sent in results.items():
            for size, future in sent:
                result = future.result(timeout=30)
                assert len(result.leases) == size
                assert {lease.fingerprint for lease in result.leases} == {leases[index].fingerprint}


def test_keep_alive_result_carries_send_time(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    with client.keep_alive() as stream:
        before = time.monotonic()
        result = stream.send([(granted.lease_id, 0.0)]).result(timeout=10)

    assert before <= result.sent_at_monotonic <= time.monotonic()
    assert result.leases[0].alive


def test_keep_alive_unknown_lease_not_found(client: AuthorityClient) -> None:
    with client.keep_alive() as stream:
        result = stream.send([("no-such-lease", 0.0)]).result(timeout=10)

    assert result.leases[0].state is LeaseState.NOT_FOUND


def test_keep_alive_unreachable_fails_future() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        stream = unreachable.keep_alive()
        future = stream.send([("some-lease", 0.0)])

        error = future.exception(timeout=10)
        later = stream.send([("some-lease", 0.0)]).exception(timeout=10)
        stream.close()

    assert isinstance(error, AuthorityUnavailable)
    assert str(error).startswith("KeepAlive failed: UNAVAILABLE: ")
    assert stream.closed
    assert stream.error is error
    assert later is error


def test_keep_alive_fails_futures_when_authority_stops(authority) -> None:  # type: ignore[no-untyped-def]
    with AuthorityClient(authority.target) as stopping:
        granted = stopping.grant("standard")
        stream = stopping.keep_alive()
        stream.send([(granted.lease_id, 0.0)]).result(timeout=10)

        authority.stop()
        error = stream.send([(granted.lease_id, 0.0)]).exception(timeout=30)
        stream.close()

    assert isinstance(error, AuthorityError)
    assert stream.closed


def test_keep_alive_send_after_close_raises(client: AuthorityClient) -> None:
    stream = client.keep_alive()
    stream.close()

    with pytest.raises(RuntimeError, match=r"^send\(\) on a closed KeepAliveStream"):
        stream.send([("some-lease", 0.0)])
    assert stream.closed
    assert stream.error is None


# -- revoke --------------------------------------------------------------------


def test_revoke_ends_lease_revoked(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.revoke(granted.lease_id)

    assert not result.already_ended
    assert result.lease.state is LeaseState.ENDED
    assert result.lease.end_reason is EndReason.REVOKED
    assert result.lease.ended_at is not None


def test_revoke_release_ends_lease_released(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.revoke(granted.lease_id, release=True)

    assert result.lease.end_reason is EndReason.RELEASED


def test_revoke_twice_reports_already_ended(client: AuthorityClient) -> None:
    granted = client.grant("standard")
    client.revoke(granted.lease_id, release=True)

    result = client.revoke(granted.lease_id)

    assert result.already_ended
    assert result.lease.end_reason is EndReason.RELEASED


def test_revoke_by_fingerprint(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.revoke(fingerprint=granted.fingerprint)

    assert result.lease.fingerprint == granted.fingerprint
    assert client.time_to_live(granted.lease_id).end_reason is EndReason.REVOKED


def test_revoke_unknown_fingerprint_failed_precondition(client: AuthorityClient) -> None:
    with pytest.raises(FailedPrecondition, match=r"^Revoke failed: FAILED_PRECONDITION: "):
        client.revoke(fingerprint="0123456789ab")


def test_revoke_unknown_lease_not_found(client: AuthorityClient) -> None:
    result = client.revoke("no-such-lease")

    assert result.lease.state is LeaseState.NOT_FOUND


@pytest.mark.parametrize("arguments", [{}, {"lease_id": "x", "fingerprint": "0123456789ab"}])
def test_revoke_needs_exactly_one_target(client: AuthorityClient, arguments: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"^revoke needs exactly one of lease_id or fingerprint="):
        client.revoke(**arguments)


# -- time to live and listing --------------------------------------------------


def test_time_to_live_describes_lease(client: AuthorityClient) -> None:
    granted = client.grant("short")

    lease = client.time_to_live(granted.lease_id)

    assert lease.fingerprint == granted.fingerprint
    assert lease.tier == "short"
    assert lease.max_duration_seconds == 4.0


def test_time_to_live_unknown_lease_not_found(client: AuthorityClient) -> None:
    assert client.time_to_live("no-such-lease").state is LeaseState.NOT_FOUND


def test_time_to_live_empty_id_rejected(client: AuthorityClient) -> None:
    with pytest.raises(ValueError, match=r"^lease_id must be a non-empty string"):
        client.time_to_live("")


def test_list_leases_follows_page_tokens(client: AuthorityClient) -> None:
    granted = {client.grant("standard", principal="lister").fingerprint for _ in range(5)}

    listed = list(client.list_leases(principal="lister", page_size=2))

    assert sorted(lease.fingerprint for lease in listed) == sorted(granted)


def test_list_leases_page_returns_next_token(client: AuthorityClient) -> None:
    for _ in range(3):
        client.grant("standard", principal="pager")

    first, token = client.list_leases_page(principal="pager", page_size=2)
    second, last_token = client.list_leases_page(principal="pager", page_size=2, page_token=token)

    assert len(first) == 2
    assert token
    assert len(second) == 1
    assert last_token == ""


def test_list_leases_filters_by_tier(client: AuthorityClient) -> None:
    client.grant("standard", principal="filtered")
    short = client.grant("short", principal="filtered")

    listed = list(client.list_leases(principal="filtered", tier="short"))

    assert [lease.fingerprint for lease in listed] == [short.fingerprint]


def test_list_leases_skips_ended(client: AuthorityClient) -> None:
    granted = client.grant("standard", principal="ender")
    client.revoke(granted.lease_id)

    assert list(client.list_leases(principal="ender")) == []


# -- validate ------------------------------------------------------------------


def test_validate_allows_live_lease(client: AuthorityClient) -> None:
    granted = client.grant("short")

    result = client.validate(granted.lease_id, "/test.Guarded/ShortOnly", caller_principal="svc-a")

    assert result.verdict is Verdict.ALLOW
    assert result.allowed
    assert result.details == ""
    assert result.lease is not None
    assert result.lease.fingerprint == granted.fingerprint
    assert result.rule.pattern == "/test.Guarded/ShortOnly"
    assert result.rule.tiers == ("short",)


def test_validate_wrong_tier_policy_denied(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.validate(granted.lease_id, "/test.Guarded/ShortOnly")

    assert result.verdict is Verdict.POLICY_DENIED
    assert "short" in result.details


def test_validate_other_principal_mismatch(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.validate(granted.lease_id, "/test.Open/Call", caller_principal="svc-z")

    assert result.verdict is Verdict.PRINCIPAL_MISMATCH


def test_validate_unknown_lease_not_found(client: AuthorityClient) -> None:
    result = client.validate("no-such-lease", "/test.Open/Call")

    assert result.verdict is Verdict.NOT_FOUND
    assert result.lease is None


def test_validate_ended_lease(client: AuthorityClient) -> None:
    granted = client.grant("standard")
    client.revoke(granted.lease_id)

    result = client.validate(granted.lease_id, "/test.Open/Call")

    assert result.verdict is Verdict.ENDED
    assert result.lease is not None
    assert result.lease.end_reason is EndReason.REVOKED


def test_validate_rule_max_session_age(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    result = client.validate(granted.lease_id, "/test.Guarded/Other")

    assert result.rule.pattern == "/test.Guarded/*"
    assert result.rule.max_session_age_seconds == 2.0


def test_validate_malformed_method_rejected(client: AuthorityClient) -> None:
    with pytest.raises(ValueError, match=r"^method must be a full method name"):
        client.validate("some-lease", "Guarded.Call")


# -- watch -----------------------------------------------------------------------


def test_watch_starts_with_heartbeat(client: AuthorityClient) -> None:
    with client.watch_session_ends() as stream:
        first = next(stream)
        second = next(stream)

    assert isinstance(first, HeartbeatEvent)
    assert isinstance(second, HeartbeatEvent)
    assert first.instance_id
    assert first.instance_id == second.instance_id
    assert first.interval_seconds == pytest.approx(0.2)
    assert first.now.tzinfo is datetime.timezone.utc


def test_watch_receives_end_after_revoke(client: AuthorityClient) -> None:
    granted = client.grant("standard")

    with client.watch_session_ends() as stream:
        next(stream)  # The first heartbeat: the subscription is in place.
        client.revoke(granted.lease_id)
        end = next_end(stream)

    assert end.lease.fingerprint == granted.fingerprint
    assert end.lease.end_reason is EndReason.REVOKED
    assert end.revoked_by == "svc-a"
    assert end.sequence > 0


def test_watch_resumes_after_sequence(client: AuthorityClient) -> None:
    first = client.grant("standard")
    second = client.grant("standard")
    with client.watch_session_ends() as stream:
        heartbeat = next(stream)
        client.revoke(first.lease_id)
        first_end = next_end(stream)
    assert isinstance(heartbeat, HeartbeatEvent)
    client.revoke(second.lease_id)

    with client.watch_session_ends(
        after_sequence=first_end.sequence, instance_id=heartbeat.instance_id
    ) as resumed:
        replayed = next_end(resumed)

    assert replayed.lease.fingerprint == second.fingerprint
    assert replayed.sequence > first_end.sequence
    assert not replayed.reset


def test_resumed_heartbeat_covers_sent_ends(client: AuthorityClient) -> None:
    # A heartbeat that named ends still to be replayed would let a watcher
    # whose stream broke during the replay resume after them.
    leases = [client.grant("standard") for _ in range(3)]
    with client.watch_session_ends() as stream:
        heartbeat = next(stream)
        client.revoke(leases[0].lease_id)
        first_end = next_end(stream)
    assert isinstance(heartbeat, HeartbeatEvent)
    client.revoke(leases[1].lease_id)
    client.revoke(leases[2].lease_id)

    with client.watch_session_ends(
        after_sequence=first_end.sequence, instance_id=heartbeat.instance_id
    ) as resumed:
        resumed_heartbeat = next(resumed)
        replayed = [next_end(resumed), next_end(resumed)]

    assert isinstance(resumed_heartbeat, HeartbeatEvent)
    assert resumed_heartbeat.sequence == first_end.sequence
    assert [end.sequence for end in replayed] == [first_end.sequence + 1, first_end.sequence + 2]


def test_watch_overflow_stops_at_gap(authority, client: AuthorityClient) -> None:  # type: ignore[no-untyped-def]
    # 200 ends published in one pass of the authority's event loop reach the
    # stream's queue before the stream can send any: with a backlog of 5
    # (instead of 100,000) it overflows at once. 20 more ends follow 50 ms
    # later, once the stream has sent what it queued: they must not be sent
    # after the gap.
    authority.authority.hub._backlog = 5
    leases = [client.grant("standard") for _ in range(220)]
    stream = client.watch_session_ends()
    heartbeat = next(stream)
    assert isinstance(heartbeat, HeartbeatEvent)
    table = authority.authority.table

    def revoke(batch: list[GrantedLease]) -> None:
        for lease in batch:
            table.end(bytes.fromhex(lease_digest(lease.lease_id)), ServerEndReason.REVOKED, revoked_by="ops")

    def revoke_in_two_bursts() -> None:
        revoke(leases[:200])
        authority._loop.call_later(0.05, revoke, leases[200:])

    authority._loop.call_soon_threadsafe(revoke_in_two_bursts)
    sequences: list[int] = []
    with pytest.raises(AuthorityUnavailable, match="fell too far behind"):
        for event in stream:
            if isinstance(event, SessionEndEvent):
                sequences.append(event.sequence)
    assert 0 < len(sequences) < len(leases)
    # A resumed stream may overflow again while it replays: resume until every end is in.
    for _ in range(len(leases)):
        if len(sequences) == len(leases):
            break
        with client.watch_session_ends(after_sequence=sequences[-1], instance_id=heartbeat.instance_id) as resumed:
            try:
                while len(sequences) < len(leases):
                    sequences.append(next_end(resumed).sequence)
            except AuthorityUnavailable:
                pass

    assert sequences == list(range(sequences[0], sequences[0] + len(leases)))


@pytest.mark.parametrize(("away_ends", "reset"), [(2, False), (3, True)])
def test_watch_replay_size_bounds_resume(tmp_path: pathlib.Path, away_ends: int, reset: bool) -> None:
    # With room for two ends, a watcher away for two catches up and one away
    # for three must reset its cache.
    config = AuthorityConfig(
        authenticator=InsecureDevAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=tmp_path / "authority-data",
        heartbeat_interval_seconds=0.2,
        watch_replay_size=2,
    )
    running = AuthorityThread(config).start()
    try:
        with AuthorityClient(running.target, principal="svc-a") as client:
            leases = [client.grant("standard") for _ in range(1 + away_ends)]
            with client.watch_session_ends() as stream:
                heartbeat = next(stream)
                client.revoke(leases[0].lease_id)
                seen = next_end(stream)
            assert isinstance(heartbeat, HeartbeatEvent)
            for lease in leases[1:]:
                client.revoke(lease.lease_id)
            with client.watch_session_ends(after_sequence=seen.sequence, instance_id=heartbeat.instance_id) as resumed:
                first = next(resumed)
                replayed = [] if reset else [next_end(resumed) for _ in range(away_ends)]
    finally:
        running.stop()

    assert isinstance(first, HeartbeatEvent)
    assert first.reset is reset
    assert [end.lease.fingerprint for end in replayed] == ([] if reset else [lease.fingerprint for lease in leases[1:]])


def test_watch_replay_size_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^watch_replay_size must be a positive integer, got 0$"):
        AuthorityConfig(authenticator=InsecureDevAuthenticator(), watch_replay_size=0)


def test_watch_cancel_ends_blocked_iteration(client: AuthorityClient) -> None:
    stream = client.watch_session_ends()
    seen: list[object] = []
    reader = threading.Thread(target=lambda: seen.extend(stream))
    reader.start()

    stream.cancel()
    reader.join(timeout=10)

    assert not reader.is_alive()


@pytest.mark.parametrize("sequence", [-1, 2**64])
def test_watch_sequence_out_of_range_rejected(client: AuthorityClient, sequence: int) -> None:
    with pytest.raises(ValueError, match=rf"^after_sequence must be between 0 \(from now\) and {2**64 - 1}, got {sequence};"):
        client.watch_session_ends(after_sequence=sequence)


def test_watch_unreachable_raises_unavailable() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        stream = unreachable.watch_session_ends()
        with pytest.raises(AuthorityUnavailable, match=r"^WatchSessionEnds failed: UNAVAILABLE: "):
            next(stream)


# -- now, policy and errors ------------------------------------------------------


def test_now_returns_utc_datetime(client: AuthorityClient) -> None:
    now = client.now()

    assert now.tzinfo is datetime.timezone.utc
    assert abs(now - datetime.datetime.now(datetime.timezone.utc)) < datetime.timedelta(minutes=1)


def test_get_policy_lists_tiers_and_rules(client: AuthorityClient) -> None:
    policy = client.get_policy()

    assert sorted(tier.name for tier in policy.tiers) == ["brief", "short", "standard"]
    short = policy.tier("short")
    assert short is not None
    assert short.idle_timeout_seconds == 1.0
    assert short.max_duration_seconds == 4.0
    assert policy.tier("gold") is None
    rules = {rule.pattern: rule for rule in policy.rules}
    assert rules["/test.Guarded/ShortOnly"].tiers == ("short",)
    assert rules["/test.Guarded/*"].max_session_age_seconds == 2.0


def test_unreachable_authority_unavailable() -> None:
    with AuthorityClient(closed_port_target()) as unreachable:
        with pytest.raises(AuthorityUnavailable, match=r"^Now failed: UNAVAILABLE: ") as caught:
            unreachable.now()

    assert caught.value.retryable
    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_deadline_exceeded_is_unavailable() -> None:
    # A listening socket that never speaks HTTP/2 keeps the call waiting until its deadline.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        with AuthorityClient(target) as stalled:
            with pytest.raises(AuthorityUnavailable, match=r"^Now failed: DEADLINE_EXCEEDED: ") as caught:
                stalled.now(timeout_seconds=0.5)

    assert caught.value.retryable


# -- API keys --------------------------------------------------------------------


@pytest.fixture
def keyed_authority(tmp_path: pathlib.Path) -> Iterator[tuple[AuthorityThread, str]]:
    """An authority that authenticates by API key, with one key for principal svc-k."""
    keys_file = tmp_path / "api-keys"
    api_key = append_api_key(keys_file, "svc-k")
    config = AuthorityConfig(
        authenticator=ApiKeyAuthenticator.from_file(keys_file),
        policy=parse_policy(TEST_POLICY),
        heartbeat_interval_seconds=0.2,
    )
    running = AuthorityThread(config).start()
    yield running, api_key
    running.stop()


def test_api_key_sent_as_bearer(keyed_authority: tuple[AuthorityThread, str]) -> None:
    authority, api_key = keyed_authority

    with AuthorityClient(authority.target, api_key=api_key) as keyed:
        granted = keyed.grant("standard")

    assert granted.lease.principal == "svc-k"


def test_wrong_api_key_unauthenticated(keyed_authority: tuple[AuthorityThread, str]) -> None:
    authority, _ = keyed_authority

    with AuthorityClient(authority.target, api_key="not-the-key") as keyed:
        with pytest.raises(Unauthenticated, match=r"^Grant failed: UNAUTHENTICATED: ") as caught:
            keyed.grant("standard")

    assert "not-the-key" not in str(caught.value)


def test_link_of_closed_client_stops_its_watch(authority, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """A watch asked for after the caller closed the client ends at once instead of failing and retrying."""
    client = AuthorityClient(authority.target, principal="svc-a")
    link = SyncLink(client)
    client.close()
    ends: list[object] = []
    with caplog.at_level("DEBUG", logger="session_authority.clients"):
        link.start_watch(lambda digest, reason: ends.append(reason))
        # Long enough for a watch on the closed channel to fail and retry.
        time.sleep(0.5)
        link.close()
    assert [r.levelname for r in caplog.records if "session watch" in r.getMessage()] == ["DEBUG"]
    assert ends == []

"""Bad requests get a clear status naming the field, and disturb nothing else."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Iterator

import grpc
import pytest
from google.protobuf import duration_pb2

from session_authority.server import (
    ApiKeyAuthenticator,
    AuthorityConfig,
    AuthorityThread,
    parse_policy,
)
from session_authority.server._auth import hash_api_key
from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from policies import TEST_POLICY

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def stub(authority) -> Iterator[pb_grpc.SessionAuthorityStub]:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(authority.target)
    yield pb_grpc.SessionAuthorityStub(channel)
    channel.close()


def renew(lease_id: str, idle_for: duration_pb2.Duration | None = None) -> pb.RenewRequest:
    entry = pb.RenewEntry(lease_id=lease_id)
    if idle_for is not None:
        entry.idle_for.CopyFrom(idle_for)
    return pb.RenewRequest(entries=[entry])


BAD_REQUESTS: list[tuple[str, Callable[[pb_grpc.SessionAuthorityStub], object], grpc.StatusCode, str]] = [
    (
        "unknown tier",
        lambda s: s.Grant(pb.GrantRequest(principal="svc-a", tier="gold")),
        INVALID,
        r'^tier "gold" is not in the policy; known tiers: brief, short, standard',
    ),
    (
        "idle timeout below minimum",
        lambda s: s.Grant(pb.GrantRequest(principal="svc-a", idle_timeout=duration_pb2.Duration(nanos=5000))),
        INVALID,
        r"^idle_timeout 5e-06 s is below the minimum 1 s",
    ),
    (
        "negative idle timeout",
        lambda s: s.Grant(pb.GrantRequest(principal="svc-a", idle_timeout=duration_pb2.Duration(seconds=-3))),
        INVALID,
        r"^idle_timeout must not be negative, got -3 s",
    ),
    (
        "malformed principal",
        lambda s: s.Grant(pb.GrantRequest(principal="has space")),
        grpc.StatusCode.UNAUTHENTICATED,
        r"principal",
    ),
    (
        "empty lease id in renew",
        lambda s: s.Renew(renew("")),
        INVALID,
        r"^entries\[0\]\.lease_id is empty; pass the lease_id returned by Grant$",
    ),
    (
        "oversized lease id",
        lambda s: s.Renew(renew("x" * 5000)),
        INVALID,
        r"^entries\[0\]\.lease_id is 5000 characters long, over the maximum 256",
    ),
    (
        "negative idle_for",
        lambda s: s.Renew(renew("abc", duration_pb2.Duration(seconds=-1))),
        INVALID,
        r"^entries\[0\]\.idle_for must not be negative, got -1 s$",
    ),
    (
        "duration with mixed signs",
        lambda s: s.Renew(renew("abc", duration_pb2.Duration(seconds=5, nanos=-1))),
        INVALID,
        r"^entries\[0\]\.idle_for has seconds=5 and nanos=-1 of opposite signs",
    ),
    (
        "duration out of range",
        lambda s: s.Renew(renew("abc", duration_pb2.Duration(seconds=10**15))),
        INVALID,
        r"^entries\[0\]\.idle_for is out of the range of google\.protobuf\.Duration",
    ),
    (
        "too many renew entries",
        lambda s: s.Renew(pb.RenewRequest(entries=[pb.RenewEntry(lease_id="a")] * 10_001)),
        INVALID,
        r"^entries has 10001 entries, over the maximum 10000",
    ),
    (
        "empty ttl lease id",
        lambda s: s.TimeToLive(pb.TimeToLiveRequest()),
        INVALID,
        r"^lease_id is empty",
    ),
    (
        "revoke without target",
        lambda s: s.Revoke(pb.RevokeRequest()),
        INVALID,
        r"^set exactly one of lease_id or fingerprint",
    ),
    (
        "revoke malformed fingerprint",
        lambda s: s.Revoke(pb.RevokeRequest(fingerprint="XYZ")),
        INVALID,
        r"^fingerprint 'XYZ' is not 12 lower-case hex characters",
    ),
    (
        "revoke unknown fingerprint",
        lambda s: s.Revoke(pb.RevokeRequest(fingerprint="0123456789ab")),
        grpc.StatusCode.FAILED_PRECONDITION,
        r"^no lease has fingerprint 0123456789ab: .*check it with ListLeases",
    ),
    (
        "validate empty method",
        lambda s: s.Validate(pb.ValidateRequest(lease_id="abc")),
        INVALID,
        r'^method is empty; pass the full method name, "/package\.Service/Method"$',
    ),
    (
        "validate malformed method",
        lambda s: s.Validate(pb.ValidateRequest(lease_id="abc", method="Service.Method")),
        INVALID,
        r"^method 'Service\.Method' is not a full method name",
    ),
    (
        "page size too large",
        lambda s: s.ListLeases(pb.ListLeasesRequest(page_size=5000)),
        INVALID,
        r"^page_size 5000 is over the maximum 1000$",
    ),
    (
        "forged page token",
        lambda s: s.ListLeases(pb.ListLeasesRequest(page_token="zz")),
        INVALID,
        r"^page_token is not a token returned by ListLeases",
    ),
]


@pytest.mark.parametrize(("case", "call", "code", "details"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_rejected_with_field(
    stub: pb_grpc.SessionAuthorityStub,
    case: str,
    call: Callable[[pb_grpc.SessionAuthorityStub], object],
    code: grpc.StatusCode,
    details: str,
) -> None:
    bystander = stub.Grant(pb.GrantRequest(principal="bystander"), timeout=5)

    with pytest.raises(grpc.RpcError) as caught:
        call(stub)

    assert caught.value.code() == code
    assert caught.value.details() is not None
    assert re.search(details, caught.value.details()), caught.value.details()
    after = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=bystander.lease_id), timeout=5).lease
    assert after.state == pb.LEASE_STATE_ALIVE
    assert after.idle_for.seconds == 0


@pytest.mark.parametrize(
    "call",
    [
        lambda s, lease_id: s.Renew(renew(lease_id)).leases[0],
        lambda s, lease_id: s.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease,
        lambda s, lease_id: s.Validate(pb.ValidateRequest(lease_id=lease_id, method="/a.B/C")).lease,
    ],
    ids=["renew", "ttl", "validate"],
)
def test_unknown_lease_answers_not_found(stub: pb_grpc.SessionAuthorityStub, call: Callable) -> None:  # type: ignore[type-arg]
    lease = call(stub, "never-granted")

    assert lease.state in (pb.LEASE_STATE_NOT_FOUND, pb.LEASE_STATE_UNSPECIFIED)
    assert lease.ttl.seconds == 0
    assert lease.ttl.nanos == 0


def test_validate_unknown_lease_verdict(stub: pb_grpc.SessionAuthorityStub) -> None:
    answer = stub.Validate(pb.ValidateRequest(lease_id="never-granted", method="/a.B/C"))

    assert answer.verdict == pb.VERDICT_NOT_FOUND
    assert not answer.HasField("lease")


@pytest.mark.parametrize("release", [False, True])
def test_ended_lease_answers_ended_with_reason(stub: pb_grpc.SessionAuthorityStub, release: bool) -> None:
    lease_id = stub.Grant(pb.GrantRequest(principal="svc-a")).lease_id
    stub.Revoke(pb.RevokeRequest(lease_id=lease_id, release=release))
    reason = pb.END_REASON_RELEASED if release else pb.END_REASON_REVOKED

    renewed = stub.Renew(renew(lease_id)).leases[0]
    validated = stub.Validate(pb.ValidateRequest(lease_id=lease_id, method="/a.B/C"))
    ttl = stub.TimeToLive(pb.TimeToLiveRequest(lease_id=lease_id)).lease

    for lease in (renewed, validated.lease, ttl):
        assert lease.state == pb.LEASE_STATE_ENDED
        assert lease.end_reason == reason
        assert lease.ttl.seconds == 0
        assert lease.ttl.nanos == 0
    assert validated.verdict == pb.VERDICT_ENDED


def test_validate_applies_method_rules(stub: pb_grpc.SessionAuthorityStub) -> None:
    standard = stub.Grant(pb.GrantRequest(principal="svc-a", tier="standard")).lease_id
    short = stub.Grant(pb.GrantRequest(principal="svc-a", tier="short")).lease_id

    wrong_tier = stub.Validate(pb.ValidateRequest(lease_id=standard, method="/test.Guarded/ShortOnly"))
    right_tier = stub.Validate(pb.ValidateRequest(lease_id=short, method="/test.Guarded/ShortOnly"))
    wrong_caller = stub.Validate(
        pb.ValidateRequest(lease_id=standard, method="/a.B/C", caller_principal="svc-b")
    )

    assert wrong_tier.verdict == pb.VERDICT_POLICY_DENIED
    assert 'tier "standard"' in wrong_tier.details
    assert right_tier.verdict == pb.VERDICT_ALLOW
    assert right_tier.rule.pattern == "/test.Guarded/ShortOnly"
    assert wrong_caller.verdict == pb.VERDICT_PRINCIPAL_MISMATCH


def test_grant_takes_shorter_idle_timeout(stub: pb_grpc.SessionAuthorityStub) -> None:
    shorter = stub.Grant(pb.GrantRequest(principal="svc-a", idle_timeout=duration_pb2.Duration(seconds=2)))
    longer = stub.Grant(pb.GrantRequest(principal="svc-a", idle_timeout=duration_pb2.Duration(seconds=10**6)))

    assert shorter.lease.idle_timeout.seconds == 2
    assert longer.lease.idle_timeout.seconds == 300


@pytest.fixture
def keyed_authority(tmp_path: pathlib.Path) -> Iterator[AuthorityThread]:
    authenticator = ApiKeyAuthenticator({hash_api_key("key-a"): "svc-a", hash_api_key("key-ops"): "ops"})
    config = AuthorityConfig(
        authenticator=authenticator, policy=parse_policy(TEST_POLICY), data_dir=tmp_path / "data"
    )
    running = AuthorityThread(config).start()
    yield running
    running.stop()


def test_grant_without_key_unauthenticated(keyed_authority: AuthorityThread) -> None:
    with grpc.insecure_channel(keyed_authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Grant(pb.GrantRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization" in caught.value.details()


def test_key_grant_uses_key_principal(keyed_authority: AuthorityThread) -> None:
    with grpc.insecure_channel(keyed_authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        granted = stub.Grant(pb.GrantRequest(), metadata=[("authorization", "Bearer key-a")], timeout=5)

    assert granted.lease.principal == "svc-a"


def test_list_all_needs_admin(keyed_authority: AuthorityThread) -> None:
    with grpc.insecure_channel(keyed_authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        stub.Grant(pb.GrantRequest(), metadata=[("authorization", "Bearer key-a")], timeout=5)
        own = stub.ListLeases(
            pb.ListLeasesRequest(principal="svc-a"), metadata=[("authorization", "Bearer key-a")], timeout=5
        )
        everything = stub.ListLeases(pb.ListLeasesRequest(), metadata=[("authorization", "Bearer key-ops")])
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListLeases(pb.ListLeasesRequest(), metadata=[("authorization", "Bearer key-a")], timeout=5)

    assert len(own.leases) == 1
    assert len(everything.leases) == 1
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "admin permission" in caught.value.details()


def test_revoke_other_principal_by_fingerprint_needs_admin(keyed_authority: AuthorityThread) -> None:
    with grpc.insecure_channel(keyed_authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        granted = stub.Grant(pb.GrantRequest(), metadata=[("authorization", "Bearer key-ops")], timeout=5)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Revoke(
                pb.RevokeRequest(fingerprint=granted.lease.fingerprint),
                metadata=[("authorization", "Bearer key-a")],
                timeout=5,
            )
        holder = stub.Revoke(
            pb.RevokeRequest(lease_id=granted.lease_id), metadata=[("authorization", "Bearer key-ops")], timeout=5
        )

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert holder.lease.end_reason == pb.END_REASON_REVOKED


def test_keep_alive_answers_malformed_entry_not_found(stub: pb_grpc.SessionAuthorityStub) -> None:
    lease_id = stub.Grant(pb.GrantRequest(principal="svc-a")).lease_id
    message = pb.KeepAliveRequest(
        sequence=7,
        entries=[
            pb.RenewEntry(lease_id=""),
            pb.RenewEntry(lease_id=lease_id, idle_for=duration_pb2.Duration(seconds=-5)),
            pb.RenewEntry(lease_id=lease_id),
        ],
    )

    stream = stub.KeepAlive(iter([message]), timeout=5)
    (answer,) = list(stream)

    assert answer.sequence == 7
    assert [lease.state for lease in answer.leases] == [
        pb.LEASE_STATE_NOT_FOUND,
        pb.LEASE_STATE_NOT_FOUND,
        pb.LEASE_STATE_ALIVE,
    ]
    assert stream.code() == grpc.StatusCode.OK


def test_keep_alive_stream_matches_sequences(stub: pb_grpc.SessionAuthorityStub) -> None:
    lease_ids = [stub.Grant(pb.GrantRequest(principal="svc-a")).lease_id for _ in range(5)]
    messages = [
        pb.KeepAliveRequest(sequence=n, entries=[pb.RenewEntry(lease_id=i) for i in lease_ids[:n]])
        for n in range(1, 6)
    ]

    answers = list(stub.KeepAlive(iter(messages), timeout=5))

    assert [a.sequence for a in answers] == [1, 2, 3, 4, 5]
    assert [len(a.leases) for a in answers] == [1, 2, 3, 4, 5]


def test_rejected_keys_logged_once_per_second(
    keyed_authority: AuthorityThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="session_authority.server._servicer")

    with grpc.insecure_channel(keyed_authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        for _ in range(5):
            with pytest.raises(grpc.RpcError):
                stub.Grant(pb.GrantRequest(), metadata=[("authorization", "Bearer wrong-key")], timeout=5)

    lines = [r.getMessage() for r in caplog.records if "authentication rejected" in r.getMessage()]
    assert len(lines) == 1
    assert "unknown API key" in lines[0]
    assert "wrong-key" not in lines[0]


def test_cancelled_grants_leave_store_working(authority) -> None:  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(authority.target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        stub.Now(pb.NowRequest(), timeout=5)
        for _ in range(200):
            try:
                stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=0.001)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED

        granted = stub.Grant(pb.GrantRequest(principal="svc-a"), timeout=5)

    assert granted.lease.state == pb.LEASE_STATE_ALIVE
    assert authority.authority.flush(10)

"""Property-based bad input: every authority RPC and the enforcer's metadata parser return a clean result.

For every request message of the authority, hypothesis sends random field
values: random Unicode, very long strings, huge repeated fields, negative,
huge and out-of-range durations, and unknown fields with every wire type.
The request messages have no enum fields, so "unknown enum values" are sent
as unknown fields and as out-of-range varints in the ``bool``, ``uint32`` and
``uint64`` fields (valid wire encoding that no client library would produce).
Each reply must have a clean status with details, the server must stay up,
and a bystander lease must change only by the passing of time.

The policy file parser has its own property tests beside its unit tests.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policies import TEST_POLICY
from session_authority.interceptors._enforcer import normalize_metadata_key, read_lease_id
from session_authority.interceptors._errors import LeaseRefused
from session_authority.server import AuthorityConfig, AuthorityThread, InsecureDevAuthenticator, parse_policy
from session_authority.v1 import session_authority_pb2 as pb

SERVICE = "/session_authority.v1.SessionAuthority"
MAX_EXAMPLES = 150
PROPERTY_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CLEAN_CODES = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.NOT_FOUND,
        # The per-principal grant rate and live-lease limits.
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

INT64 = st.integers(-(2**63), 2**63 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT64 = st.integers(0, 2**64 - 1)


# -- the authority under test ----------------------------------------------------------


class Target:
    """An in-process authority with one bystander lease, and raw callables for every RPC."""

    def __init__(self, data_dir: pathlib.Path) -> None:
        config = AuthorityConfig(
            authenticator=InsecureDevAuthenticator(),
            policy=parse_policy(TEST_POLICY),
            data_dir=data_dir,
            admin_everyone=True,
            heartbeat_interval_seconds=0.2,
        )
        self.authority = AuthorityThread(config).start()
        self.channel = grpc.insecure_channel(self.authority.target)
        granted = pb.GrantResponse.FromString(
            self.unary("Grant")(pb.GrantRequest(principal="bystander", tier="standard").SerializeToString(), timeout=5)
        )
        self.bystander_id = granted.lease_id
        self.bystander = granted.lease

    def unary(self, method: str) -> grpc.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(f"{SERVICE}/{method}")

    def check_alive_and_bystander(self) -> None:
        """Assert that ``Now`` succeeds and that the bystander lease saw no activity and no end."""
        now = pb.NowResponse.FromString(self.unary("Now")(b"", timeout=5))
        assert now.instance_id

        answer = self.unary("TimeToLive")(
            pb.TimeToLiveRequest(lease_id=self.bystander_id).SerializeToString(), timeout=5
        )
        lease = pb.TimeToLiveResponse.FromString(answer).lease
        assert lease.state == pb.LEASE_STATE_ALIVE
        assert (lease.principal, lease.tier, lease.digest) == ("bystander", "standard", self.bystander.digest)
        assert seconds(lease.ttl) <= seconds(self.bystander.ttl) + 1e-6, "the bystander lease gained time"
        assert seconds(lease.idle_for) >= seconds(self.bystander.idle_for) - 1e-6, "the bystander lease saw activity"
        self.bystander = lease

    def close(self) -> None:
        self.channel.close()
        self.authority.stop()


def seconds(duration: Any) -> float:
    return duration.seconds + duration.nanos / 1e9


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    running = Target(tmp_path_factory.mktemp("properties") / "authority-data")
    yield running
    running.close()


def assert_clean(code: grpc.StatusCode, details: str | None, rpc_name: str) -> None:
    assert code in CLEAN_CODES, f"{rpc_name} returned {code.name}: {details}"
    if code is not grpc.StatusCode.OK:
        assert details, f"{rpc_name} returned {code.name} without details"


def call_unary(target: Target, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...]) -> None:
    try:
        target.unary(method)(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        assert_clean(exc.code(), exc.details(), method)
    target.check_alive_and_bystander()


# -- raw protobuf encoding, for unknown fields and out-of-range varints ---------------------


def varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, wire_type: int, payload: bytes) -> bytes:
    return varint((number << 3) | wire_type) + payload


@st.composite
def unknown_fields(draw: st.DrawFn, first_unknown: int) -> bytes:
    """Zero to three fields with numbers the message does not declare, each of a random wire type."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        number = draw(st.integers(first_unknown, 2**29 - 1))
        wire_type = draw(st.sampled_from([0, 1, 2, 5]))
        if wire_type == 0:
            payload = varint(draw(UINT64))
        elif wire_type == 1:
            payload = draw(st.binary(min_size=8, max_size=8))
        elif wire_type == 5:
            payload = draw(st.binary(min_size=4, max_size=4))
        else:
            data = draw(st.binary(max_size=64))
            payload = varint(len(data)) + data
        out += field(number, wire_type, payload)
    return out


def raw_varint_field(number: int) -> st.SearchStrategy[bytes]:
    """A known varint field set to any 64-bit value, which parsing merges over the typed value."""
    return st.one_of(st.just(b""), UINT64.map(lambda value: field(number, 0, varint(value))))


# -- strategies for field values ------------------------------------------------------------

TEXT = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), min_size=200, max_size=400),
    st.integers(0, 20_000).map(lambda length: "x" * length),
    st.sampled_from(["", "standard", "short", "brief", "ops", "/test.Guarded/Aged", "/a/b", "0" * 12]),
)
METADATA = st.lists(
    st.tuples(
        st.sampled_from(["x-session-principal", "authorization", "session-lease"]),
        st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
    ),
    max_size=2,
).map(tuple)


@st.composite
def durations(draw: st.DrawFn) -> Any:
    """Valid, negative, huge, out-of-range and mixed-sign ``google.protobuf.Duration`` values."""
    duration = pb.GrantRequest().idle_timeout
    duration.seconds = draw(st.one_of(st.integers(-5, 400), INT64, st.sampled_from([315_576_000_000, 315_576_000_001])))
    duration.nanos = draw(st.one_of(st.integers(-999_999_999, 999_999_999), INT32))
    return duration


@st.composite
def renew_entries(draw: st.DrawFn, copies: st.SearchStrategy[int] = st.sampled_from([0, 0, 0, 9_999, 10_001, 12_000])) -> list[Any]:
    """A few random entries, sometimes followed by many copies of one, to pass the entry limit."""
    entries = []
    for _ in range(draw(st.integers(0, 4))):
        entry = pb.RenewEntry(lease_id=draw(TEXT))
        if draw(st.booleans()):
            entry.idle_for.CopyFrom(draw(durations()))
        entries.append(entry)
    copies = draw(copies)
    if copies:
        entries.extend([pb.RenewEntry(lease_id=draw(TEXT.filter(lambda text: len(text) < 30)))] * copies)
    return entries


# -- one property per RPC -----------------------------------------------------------------


@PROPERTY_SETTINGS
@given(
    principal=TEXT,
    tier=TEXT,
    idle_timeout=st.one_of(st.none(), durations()),
    extra=unknown_fields(4),
    metadata=METADATA,
)
def test_grant_returns_clean_status(target: Target, principal: str, tier: str, idle_timeout: Any, extra: bytes, metadata: Any) -> None:
    request = pb.GrantRequest(principal=principal, tier=tier)
    if idle_timeout is not None:
        request.idle_timeout.CopyFrom(idle_timeout)

    call_unary(target, "Grant", request.SerializeToString() + extra, metadata)


@PROPERTY_SETTINGS
@given(entries=renew_entries(), extra=unknown_fields(2), metadata=METADATA)
def test_renew_returns_clean_status(target: Target, entries: list[Any], extra: bytes, metadata: Any) -> None:
    call_unary(target, "Renew", pb.RenewRequest(entries=entries).SerializeToString() + extra, metadata)


@PROPERTY_SETTINGS
@given(
    lease_id=st.one_of(st.none(), TEXT),
    fingerprint=st.one_of(st.none(), TEXT, st.text(alphabet="0123456789abcdef", min_size=12, max_size=12)),
    release=st.booleans(),
    raw_release=raw_varint_field(3),
    extra=unknown_fields(4),
    metadata=METADATA,
)
def test_revoke_returns_clean_status(
    target: Target,
    lease_id: str | None,
    fingerprint: str | None,
    release: bool,
    raw_release: bytes,
    extra: bytes,
    metadata: Any,
) -> None:
    request = pb.RevokeRequest(release=release)
    if lease_id is not None:
        request.lease_id = lease_id
    if fingerprint is not None:
        request.fingerprint = fingerprint

    call_unary(target, "Revoke", request.SerializeToString() + raw_release + extra, metadata)


@PROPERTY_SETTINGS
@given(lease_id=TEXT, extra=unknown_fields(2), metadata=METADATA)
def test_time_to_live_returns_clean_status(target: Target, lease_id: str, extra: bytes, metadata: Any) -> None:
    call_unary(target, "TimeToLive", pb.TimeToLiveRequest(lease_id=lease_id).SerializeToString() + extra, metadata)


@PROPERTY_SETTINGS
@given(
    page_size=st.integers(0, 2**32 - 1),
    raw_page_size=raw_varint_field(1),
    page_token=st.one_of(TEXT, st.binary(max_size=40).map(bytes.hex)),
    principal=TEXT,
    tier=TEXT,
    extra=unknown_fields(5),
    metadata=METADATA,
)
def test_list_leases_returns_clean_status(
    target: Target,
    page_size: int,
    raw_page_size: bytes,
    page_token: str,
    principal: str,
    tier: str,
    extra: bytes,
    metadata: Any,
) -> None:
    request = pb.ListLeasesRequest(page_size=page_size, page_token=page_token, principal=principal, tier=tier)

    call_unary(target, "ListLeases", request.SerializeToString() + raw_page_size + extra, metadata)


@PROPERTY_SETTINGS
@given(lease_id=TEXT, caller_principal=TEXT, method=TEXT, extra=unknown_fields(4), metadata=METADATA)
def test_validate_returns_clean_status(
    target: Target, lease_id: str, caller_principal: str, method: str, extra: bytes, metadata: Any
) -> None:
    request = pb.ValidateRequest(lease_id=lease_id, caller_principal=caller_principal, method=method)

    call_unary(target, "Validate", request.SerializeToString() + extra, metadata)


@PROPERTY_SETTINGS
@given(extra=unknown_fields(1), metadata=METADATA, method=st.sampled_from(["Now", "GetPolicy"]))
def test_now_and_get_policy_return_clean_status(target: Target, extra: bytes, metadata: Any, method: str) -> None:
    call_unary(target, method, extra, metadata)


@PROPERTY_SETTINGS
@given(
    messages=st.lists(
        # A stream message over the entry limit ends the stream, so one per stream is enough.
        st.tuples(UINT64, renew_entries(st.sampled_from([0] * 9 + [10_001])), raw_varint_field(1), unknown_fields(3)),
        max_size=3,
    ),
    metadata=METADATA,
)
def test_keep_alive_returns_clean_status(target: Target, messages: list[Any], metadata: Any) -> None:
    payloads = [
        pb.KeepAliveRequest(sequence=sequence, entries=entries).SerializeToString() + raw + extra
        for sequence, entries, raw, extra in messages
    ]
    stream = target.channel.stream_stream(f"{SERVICE}/KeepAlive")

    call = stream(iter(payloads), metadata=metadata, timeout=10)
    answers = 0
    try:
        for _ in call:
            answers += 1
        code, details = call.code(), call.details()
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()

    assert_clean(code, details, "KeepAlive")
    if code is grpc.StatusCode.OK:
        assert answers == len(payloads)
    target.check_alive_and_bystander()


@PROPERTY_SETTINGS
@given(
    after_sequence=UINT64,
    instance_id=TEXT,
    raw_after=raw_varint_field(1),
    extra=unknown_fields(3),
    metadata=METADATA,
)
def test_watch_session_ends_returns_clean_status(
    target: Target, after_sequence: int, instance_id: str, raw_after: bytes, extra: bytes, metadata: Any
) -> None:
    request = pb.WatchSessionEndsRequest(after_sequence=after_sequence, instance_id=instance_id)
    stream = target.channel.unary_stream(f"{SERVICE}/WatchSessionEnds")

    call = stream(request.SerializeToString() + raw_after + extra, metadata=metadata, timeout=10)
    try:
        first = pb.WatchSessionEndsResponse.FromString(next(call))
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        first = None
        code, details = exc.code(), exc.details()
    finally:
        call.cancel()

    assert_clean(code, details, "WatchSessionEnds")
    if first is not None:
        assert first.WhichOneof("event") == "heartbeat"
    target.check_alive_and_bystander()


@pytest.mark.parametrize(
    "payload",
    [field(1, 2, varint(2) + b"\xff\xfe"), field(1, 2, varint(5) + b"ab")],
    ids=["invalid-utf8", "truncated"],
)
def test_undecodable_request_invalid_argument(target: Target, payload: bytes) -> None:
    with pytest.raises(grpc.RpcError) as refused:
        target.unary("TimeToLive")(payload, timeout=5)

    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid serialized session_authority.v1.TimeToLiveRequest" in refused.value.details()


# -- the enforcer's metadata parser --------------------------------------------------------

LEASE_KEY = "session-lease"
METADATA_VALUES = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=300),
    st.binary(max_size=30),
)
METADATA_ITEMS = st.lists(
    st.tuples(
        st.one_of(st.sampled_from([LEASE_KEY, LEASE_KEY + "-bin", "Session-Lease", "authorization"]), st.text(max_size=20)),
        METADATA_VALUES,
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(metadata=st.one_of(st.none(), METADATA_ITEMS))
def test_read_lease_id_returns_or_rejects(metadata: list[tuple[str, str | bytes]] | None) -> None:
    try:
        lease_id = read_lease_id(metadata, LEASE_KEY)
    except LeaseRefused as exc:
        assert exc.code is grpc.StatusCode.UNAUTHENTICATED
        assert exc.details
        return

    values = [value for key, value in metadata or () if key == LEASE_KEY]
    assert values == [lease_id]
    assert isinstance(lease_id, str)
    assert 0 < len(lease_id) <= 256
    assert lease_id.isascii()
    assert lease_id.isprintable()


@settings(max_examples=200, deadline=None)
@given(key=st.one_of(st.text(max_size=30), st.sampled_from(["session-lease", "X-Lease", "grpc-lease", "a-bin", ""])))
def test_normalize_metadata_key_returns_or_raises(key: str) -> None:
    try:
        normalized = normalize_metadata_key(key)
    except ValueError as exc:
        assert repr(key) in str(exc) or key == ""
        return

    assert normalized == key.lower()
    assert not normalized.endswith("-bin")
    assert not normalized.startswith("grpc-")

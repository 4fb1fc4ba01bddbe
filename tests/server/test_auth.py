"""Tests of the Grant authenticators, API key files and the loopback check."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from session_authority.server._auth import (
    ApiKeyAuthenticator,
    AuthenticationError,
    Authenticator,
    CallerInfo,
    InsecureDevAuthenticator,
    append_api_key,
    caller_info_from_context,
    generate_api_key,
    hash_api_key,
    is_loopback_address,
    validate_principal,
)

KEY = "test-key-for-payments"
OTHER_KEY = "test-key-for-ops"
PRINCIPAL_RULE = "a principal is 1 to 256 printable ASCII characters without whitespace"
BEARER_FORM = re.escape('send "authorization: Bearer <api key>"')


def bearer(key: str) -> CallerInfo:
    return CallerInfo(metadata=(("authorization", f"Bearer {key}"),))


@pytest.fixture
def authenticator() -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator({hash_api_key(KEY): "payments", hash_api_key(OTHER_KEY): "ops-admin"})


# --- validate_principal -----------------------------------------------------------------------


@pytest.mark.parametrize("principal", ["svc-a", "spiffe://example.org/ns/prod/sa/payments", "a", "x" * 256, "!~"])
def test_validate_principal_accepts(principal: str) -> None:
    assert validate_principal(principal) == principal


@pytest.mark.parametrize(
    ("principal", "shown"),
    [
        ("", '""'),
        ("x" * 257, '"' + "x" * 64 + '"...'),
        ("ops admin", '"ops admin"'),
        ("tab\there", '"tab\\\\there"'),
        ("caf\u00e9", '"caf\\\\u00e9"'),
        ("nul\x00", '"nul\\\\u0000"'),
        ("line\n", '"line\\\\n"'),
    ],
)
def test_validate_principal_rejects(principal: str, shown: str) -> None:
    with pytest.raises(AuthenticationError, match=rf"^invalid principal {shown}: {PRINCIPAL_RULE}$"):
        validate_principal(principal)


# --- ApiKeyAuthenticator.authenticate ---------------------------------------------------------


def test_api_key_returns_principal(authenticator: ApiKeyAuthenticator) -> None:
    assert authenticator.authenticate(bearer(KEY), "") == "payments"
    assert authenticator.authenticate(bearer(OTHER_KEY), "") == "ops-admin"


def test_api_key_matching_requested_principal(authenticator: ApiKeyAuthenticator) -> None:
    assert authenticator.authenticate(bearer(KEY), "payments") == "payments"


def test_api_key_scheme_case_insensitive(authenticator: ApiKeyAuthenticator) -> None:
    caller = CallerInfo(metadata=(("authorization", f"bearer   {KEY} "),))

    assert authenticator.authenticate(caller, "") == "payments"


def test_api_key_metadata_key_case_insensitive(authenticator: ApiKeyAuthenticator) -> None:
    caller = CallerInfo(metadata=(("Authorization", f"Bearer {KEY}"),))

    assert authenticator.authenticate(caller, "") == "payments"


def test_api_key_other_metadata_ignored(authenticator: ApiKeyAuthenticator) -> None:
    caller = CallerInfo(metadata=(("x-trace", "1"), ("authorization", f"Bearer {KEY}"), ("data-bin", b"\x00")))

    assert authenticator.authenticate(caller, "") == "payments"


def test_api_key_requested_principal_differs(authenticator: ApiKeyAuthenticator) -> None:
    message = (
        r'^the API key belongs to principal "payments", but the request names "ops-admin"; '
        r"leave the principal empty or use a key of that principal$"
    )

    with pytest.raises(AuthenticationError, match=message):
        authenticator.authenticate(bearer(KEY), "ops-admin")


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), rf'^missing "authorization" metadata; {BEARER_FORM}$'),
        ((("x-session-principal", "payments"),), r'^missing "authorization" metadata; '),
        (
            (("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {KEY}")),
            rf'^"authorization" metadata is repeated; {BEARER_FORM} once$',
        ),
        ((("authorization", KEY),), rf'^"authorization" metadata must use the Bearer scheme; {BEARER_FORM}$'),
        ((("authorization", f"Basic {KEY}"),), r'^"authorization" metadata must use the Bearer scheme; '),
        ((("authorization", ""),), r'^"authorization" metadata must use the Bearer scheme; '),
        ((("authorization", "Bearer"),), rf'^"authorization" metadata has no key after "Bearer"; {BEARER_FORM}$'),
        ((("authorization", "Bearer   "),), r'^"authorization" metadata has no key after "Bearer"; '),
        ((("authorization", f"Bearer {KEY}".encode()),), rf'^"authorization" metadata must be text; {BEARER_FORM}$'),
    ],
)
def test_api_key_malformed_metadata(
    authenticator: ApiKeyAuthenticator, metadata: tuple[tuple[str, str | bytes], ...], message: str
) -> None:
    with pytest.raises(AuthenticationError, match=message) as caught:
        authenticator.authenticate(CallerInfo(metadata=metadata), "")

    assert KEY not in str(caught.value)


def test_api_key_unknown_key(authenticator: ApiKeyAuthenticator) -> None:
    fingerprint = hash_api_key("wrong-key")[:12]
    message = (
        rf"^unknown API key \(fingerprint {fingerprint}\); "
        r"check the key, or ask an operator to add its hash to the key file$"
    )

    with pytest.raises(AuthenticationError, match=message) as caught:
        authenticator.authenticate(bearer("wrong-key"), "")

    assert "wrong-key" not in str(caught.value)


def test_api_key_shared_prefix_rejected() -> None:
    # A stored hash that shares the lookup prefix with the presented key's hash but differs
    # after it must be rejected by the full comparison.
    real_hash = hash_api_key(KEY)
    decoy_hash = real_hash[:16] + ("0" if real_hash[16] != "0" else "1") + real_hash[17:]
    authenticator = ApiKeyAuthenticator({decoy_hash: "intruder"})

    with pytest.raises(AuthenticationError, match=r"^unknown API key "):
        authenticator.authenticate(bearer(KEY), "")


def test_api_key_shared_prefix_exact_match() -> None:
    real_hash = hash_api_key(KEY)
    decoy_hash = real_hash[:-1] + ("0" if real_hash[-1] != "0" else "1")
    authenticator = ApiKeyAuthenticator({decoy_hash: "intruder", real_hash: "payments"})

    assert authenticator.authenticate(bearer(KEY), "") == "payments"


def test_api_key_upper_case_hash_accepted() -> None:
    authenticator = ApiKeyAuthenticator({hash_api_key(KEY).upper(): "payments"})

    assert authenticator.authenticate(bearer(KEY), "") == "payments"


def test_api_key_constructor_rejects_bad_hash() -> None:
    with pytest.raises(ValueError, match=r'^invalid API key hash "abc": expected 64 hex digits \(SHA-256\)$'):
        ApiKeyAuthenticator({"abc": "payments"})


def test_api_key_constructor_rejects_bad_principal() -> None:
    with pytest.raises(ValueError, match=rf'^invalid principal "a b": {PRINCIPAL_RULE}$'):
        ApiKeyAuthenticator({hash_api_key(KEY): "a b"})


def test_api_key_repr_hides_hashes(authenticator: ApiKeyAuthenticator) -> None:
    assert repr(authenticator) == "ApiKeyAuthenticator(<2 keys>)"


def test_authenticators_satisfy_protocol(authenticator: ApiKeyAuthenticator) -> None:
    assert isinstance(authenticator, Authenticator)
    assert isinstance(InsecureDevAuthenticator(), Authenticator)
    assert authenticator.name == "api-key"
    assert InsecureDevAuthenticator().name == "insecure-dev"


# --- ApiKeyAuthenticator.from_file ------------------------------------------------------------


def write_key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(text, encoding="utf-8")
    return path


def test_key_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    text = (
        "# API keys of the payments fleet\n"
        "\n"
        f"{hash_api_key(KEY)} payments\n"
        "   # indented comment\n"
        f"{hash_api_key(OTHER_KEY).upper()}\tops-admin   # added for the on-call\n"
    )
    authenticator = ApiKeyAuthenticator.from_file(write_key_file(tmp_path, text))

    assert authenticator.authenticate(bearer(KEY), "") == "payments"
    assert authenticator.authenticate(bearer(OTHER_KEY), "") == "ops-admin"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0123abc", r"expected SHA256HEX PRINCIPAL, got 1 fields"),
        (f"{hash_api_key(KEY)} payments extra", r"expected SHA256HEX PRINCIPAL, got 3 fields"),
        ("z" * 64 + " payments", r"the key hash must be 64 hex digits \(the SHA-256 of the key\)"),
        (hash_api_key(KEY)[:63] + " payments", r"the key hash must be 64 hex digits \(the SHA-256 of the key\)"),
        (f"{hash_api_key(KEY)} caf\u00e9", rf'invalid principal "caf\\u00e9": {PRINCIPAL_RULE}'),
    ],
)
def test_key_file_bad_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_key_file(tmp_path, f"# keys\n{hash_api_key(OTHER_KEY)} ops-admin\n{line}\n")

    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: {message}$"):
        ApiKeyAuthenticator.from_file(path)


def test_key_file_duplicate_hash(tmp_path: Path) -> None:
    path = write_key_file(tmp_path, f"{hash_api_key(KEY)} payments\n\n{hash_api_key(KEY).upper()} other\n")

    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: the same key hash is on line 1$"):
        ApiKeyAuthenticator.from_file(path)


def test_key_file_without_keys(tmp_path: Path) -> None:
    path = write_key_file(tmp_path, "# nothing yet\n\n")

    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: no API keys; add a line SHA256HEX PRINCIPAL"):
        ApiKeyAuthenticator.from_file(path)


def test_key_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_bytes(b"\xff\n")

    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: not valid UTF-8 \(.* at byte 0\)$"):
        ApiKeyAuthenticator.from_file(path)


def test_key_file_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ApiKeyAuthenticator.from_file(tmp_path / "absent")


# --- Key generation and key files -------------------------------------------------------------


def test_generate_api_key_is_random_url_safe_text() -> None:
    keys = {generate_api_key() for _ in range(20)}

    assert len(keys) == 20
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{43}", key) for key in keys)


def test_hash_api_key_is_sha256_hex() -> None:
    assert hash_api_key("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_append_api_key_creates_private_file(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"

    key = append_api_key(path, "payments")

    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text(encoding="ascii") == f"{hash_api_key(key)} payments\n"
    assert ApiKeyAuthenticator.from_file(path).authenticate(bearer(key), "") == "payments"


def test_append_api_key_keeps_existing_keys(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"
    path.write_text(f"# keys\n{hash_api_key(KEY)} payments", encoding="ascii")

    key = append_api_key(path, "ops-admin")

    assert path.read_text(encoding="ascii") == f"# keys\n{hash_api_key(KEY)} payments\n{hash_api_key(key)} ops-admin\n"
    authenticator = ApiKeyAuthenticator.from_file(path)
    assert authenticator.authenticate(bearer(KEY), "") == "payments"
    assert authenticator.authenticate(bearer(key), "") == "ops-admin"


def test_append_api_key_rejects_bad_principal(tmp_path: Path) -> None:
    path = tmp_path / "api-keys"

    with pytest.raises(ValueError, match=rf'^invalid principal "ops admin": {PRINCIPAL_RULE}$'):
        append_api_key(path, "ops admin")

    assert not path.exists()


# --- InsecureDevAuthenticator -----------------------------------------------------------------


def test_insecure_dev_requested_principal() -> None:
    caller = CallerInfo(metadata=(("x-session-principal", "from-metadata"),))

    assert InsecureDevAuthenticator().authenticate(caller, "from-request") == "from-request"


def test_insecure_dev_principal_from_metadata() -> None:
    caller = CallerInfo(metadata=(("x-session-principal", "from-metadata"),))

    assert InsecureDevAuthenticator().authenticate(caller, "") == "from-metadata"


def test_insecure_dev_default_principal() -> None:
    assert InsecureDevAuthenticator().authenticate(CallerInfo(), "") == "dev"


def test_insecure_dev_invalid_requested_principal() -> None:
    with pytest.raises(AuthenticationError, match=rf'^invalid principal "a b": {PRINCIPAL_RULE}$'):
        InsecureDevAuthenticator().authenticate(CallerInfo(), "a b")


def test_insecure_dev_invalid_metadata_principal() -> None:
    caller = CallerInfo(metadata=(("x-session-principal", ""),))

    with pytest.raises(AuthenticationError, match=rf'^invalid principal "": {PRINCIPAL_RULE}$'):
        InsecureDevAuthenticator().authenticate(caller, "")


def test_insecure_dev_repeated_metadata() -> None:
    caller = CallerInfo(metadata=(("x-session-principal", "a"), ("x-session-principal", "b")))

    with pytest.raises(AuthenticationError, match=r'^"x-session-principal" metadata is repeated; send it once$'):
        InsecureDevAuthenticator().authenticate(caller, "")


def test_insecure_dev_binary_metadata() -> None:
    caller = CallerInfo(metadata=(("x-session-principal", b"a"),))

    with pytest.raises(AuthenticationError, match=r'^"x-session-principal" metadata must be text, got bytes$'):
        InsecureDevAuthenticator().authenticate(caller, "")


# --- is_loopback_address ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.0.0.1:0", True),
        ("127.8.9.10:443", True),
        ("localhost:50051", True),
        ("LOCALHOST:1", True),
        ("[::1]:50051", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("192.168.1.10:50051", False),
        ("example.com:50051", False),
        ("localhost.example.com:50051", False),
        ("127.0.0.1", False),
        ("127.0.0.1:", False),
        ("127.0.0.1:http", False),
        ("127.0.0.1:65536", False),
        ("::1:50051", False),
        ("[::1]", False),
        (":50051", False),
        ("", False),
    ],
)
def test_is_loopback_address(listen: str, loopback: bool) -> None:
    assert is_loopback_address(listen) is loopback


# --- caller_info_from_context over real servers -----------------------------------------------

METHOD = "/test.Auth/WhoAmI"


def describe_caller(caller: CallerInfo, authenticator: ApiKeyAuthenticator) -> bytes:
    try:
        principal = authenticator.authenticate(caller, "")
    except AuthenticationError as exc:
        principal = f"error: {exc}"
    return json.dumps(
        {
            "principal": principal,
            "metadata": [[key, value] for key, value in caller.metadata if isinstance(value, str)],
            "peer": caller.peer,
            "auth_context": {name: [value.decode() for value in values] for name, values in caller.auth_context.items()},
        }
    ).encode()


@pytest.fixture
def sync_server(authenticator: ApiKeyAuthenticator) -> Iterator[str]:
    def who_am_i(request: bytes, context: grpc.ServicerContext) -> bytes:
        return describe_caller(caller_info_from_context(context), authenticator)

    handler = grpc.method_handlers_generic_handler(
        "test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def call_who_am_i(target: str, metadata: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    with grpc.insecure_channel(target) as channel:
        reply = channel.unary_unary(METHOD)(b"", metadata=metadata, timeout=10)
    return json.loads(reply)


def test_caller_info_from_sync_context(sync_server: str) -> None:
    reply = call_who_am_i(sync_server, (("authorization", f"Bearer {KEY}"), ("x-trace", "abc")))

    assert reply["principal"] == "payments"
    assert ["authorization", f"Bearer {KEY}"] in reply["metadata"]
    assert ["x-trace", "abc"] in reply["metadata"]
    assert reply["peer"].startswith("ipv4:127.0.0.1:")
    assert reply["auth_context"]["transport_security_type"] == ["insecure"]


def test_sync_server_rejects_unknown_key(sync_server: str) -> None:
    reply = call_who_am_i(sync_server, (("authorization", "Bearer nope"),))

    assert reply["principal"].startswith("error: unknown API key (fingerprint ")


def test_caller_info_from_aio_context(authenticator: ApiKeyAuthenticator) -> None:
    async def who_am_i(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return describe_caller(caller_info_from_context(context), authenticator)

    async def run() -> dict[str, Any]:
        handler = grpc.method_handlers_generic_handler(
            "test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(who_am_i)}
        )
        server = grpc.aio.server(handlers=(handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                metadata = (("authorization", f"Bearer {OTHER_KEY}"),)
                reply = await channel.unary_unary(METHOD)(b"", metadata=metadata, timeout=10)
        finally:
            await server.stop(grace=None)
        return json.loads(reply)

    reply = asyncio.run(run())

    assert reply["principal"] == "ops-admin"
    assert ["authorization", f"Bearer {OTHER_KEY}"] in reply["metadata"]
    assert reply["peer"].startswith("ipv4:127.0.0.1:")
    assert reply["auth_context"]["transport_security_type"] == ["insecure"]

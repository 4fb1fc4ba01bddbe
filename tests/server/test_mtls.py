"""Tests of mutual TLS: principals from client certificates, on the authority and on enforcers."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import pathlib
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from cryptography import x509

from session_authority.clients import AuthorityClient
from session_authority.clients._cli import main as cli_main
from session_authority.clients._common import load_channel_credentials
from session_authority.clients._errors import AuthorityUnavailable, Unauthenticated
from session_authority.clients._metadata import LEASE_METADATA_KEY, fingerprint, peer_identity
from session_authority.interceptors import EnforcerConfig, LeaseServerInterceptor
from session_authority.server import AuthorityConfig, AuthorityThread, parse_policy
from session_authority.server._auth import CallerInfo, AuthenticationError, MtlsAuthenticator
from session_authority.server._main import build_config, build_parser
from session_authority.server._tls import server_credentials

from policies import TEST_POLICY
from tls_support import Identity, TestCa

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/payments"
ECHO_METHOD = "/test.Echo/Call"


@dataclasses.dataclass(frozen=True)
class Pki:
    """A test CA with a server identity and client identities, written to a directory."""

    ca: pathlib.Path
    server: Identity
    spiffe_client: Identity
    cn_client: Identity
    enforcer_client: Identity
    foreign_client: Identity


def _make_pki(directory: pathlib.Path) -> Pki:
    ca = TestCa(directory)
    server = ca.issue(
        "server", "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    # The DNS name comes first so that a reader who takes gRPC's first peer identity gets it wrong.
    spiffe_client = ca.issue(
        "spiffe-client", "payments-cn", [x509.DNSName("payments.internal"), x509.UniformResourceIdentifier(SPIFFE_ID)]
    )
    cn_client = ca.issue("cn-client", "batch-worker")
    enforcer_client = ca.issue("enforcer", "orders-enforcer")
    foreign = TestCa(directory, "some other CA").issue("foreign", "payments-cn")
    return Pki(ca.cert, server, spiffe_client, cn_client, enforcer_client, foreign)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def mtls_authority(pki: Pki, tmp_path: pathlib.Path) -> Iterator[AuthorityThread]:
    config = AuthorityConfig(
        authenticator=MtlsAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=tmp_path / "data",
        server_credentials=server_credentials(pki.server.cert, pki.server.key, pki.ca),
        heartbeat_interval_seconds=0.2,
    )
    running = AuthorityThread(config).start()
    yield running
    running.stop()


def client_for(authority: AuthorityThread, pki: Pki, identity: Identity) -> AuthorityClient:
    return AuthorityClient(authority.target, credentials=identity.channel_credentials(pki.ca))


# --- peer_identity ---------------------------------------------------------------------------


def test_peer_identity_prefers_spiffe_uri() -> None:
    auth_context = {
        "x509_common_name": [b"payments-cn"],
        "x509_subject_alternative_name": [b"payments.internal", SPIFFE_ID.encode()],
        "peer_dns": [b"payments.internal"],
        "peer_uri": [b"https://example.org/other", SPIFFE_ID.encode()],
    }

    assert peer_identity(auth_context) == SPIFFE_ID


def test_peer_identity_reads_spiffe_property() -> None:
    assert peer_identity({"peer_spiffe_id": [SPIFFE_ID.encode()], "x509_common_name": [b"cn"]}) == SPIFFE_ID


def test_peer_identity_falls_back_to_common_name() -> None:
    auth_context = {"x509_common_name": [b"batch-worker"], "peer_uri": [b"https://example.org/not-spiffe"]}

    assert peer_identity(auth_context) == "batch-worker"


def test_peer_identity_none_withoutissue_certificate() -> None:
    assert peer_identity({"transport_security_type": [b"ssl"]}) is None
    assert peer_identity({}) is None


def test_peer_identity_rejects_two_spiffe_ids() -> None:
    auth_context = {"peer_uri": [b"spiffe://a.org/x", b"spiffe://a.org/y"], "x509_common_name": [b"cn"]}

    with pytest.raises(ValueError, match=r"^the client certificate has 2 SPIFFE IDs \(spiffe://a.org/x, spiffe://a.org/y\)"):
        peer_identity(auth_context)


# --- MtlsAuthenticator -----------------------------------------------------------------------


def test_mtls_authenticator_withoutissue_certificate() -> None:
    with pytest.raises(AuthenticationError, match="^the connection presented no verified client certificate"):
        MtlsAuthenticator().authenticate(CallerInfo(), "")


def test_mtls_authenticator_rejects_invalid_common_name() -> None:
    caller = CallerInfo(auth_context={"x509_common_name": (b"batch worker",)})

    with pytest.raises(AuthenticationError, match=r'^the client certificate\'s identity is not usable: invalid principal "batch worker"'):
        MtlsAuthenticator().authenticate(caller, "")


def test_mtls_authenticator_needs_tls_config() -> None:
    with pytest.raises(ValueError, match="^MtlsAuthenticator needs server_credentials that require client certificates"):
        AuthorityConfig(authenticator=MtlsAuthenticator())


# --- Grant over mutual TLS -------------------------------------------------------------------


def test_grant_principal_from_spiffe_id(mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.spiffe_client) as client:
        granted = client.grant()

    assert granted.lease.principal == SPIFFE_ID


def test_grant_principal_from_common_name(mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.cn_client) as client:
        granted = client.grant()

    assert granted.lease.principal == "batch-worker"


def test_grant_same_principal_accepted(mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.cn_client) as client:
        granted = client.grant(principal="batch-worker")

    assert granted.lease.principal == "batch-worker"


def test_grant_other_principal_unauthenticated(mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.cn_client) as client:
        with pytest.raises(Unauthenticated) as caught:
            client.grant(principal=SPIFFE_ID)

    assert 'the client certificate belongs to principal "batch-worker"' in caught.value.details
    assert f'the request names "{SPIFFE_ID}"' in caught.value.details


def test_load_channel_credentials_grants(mtls_authority: AuthorityThread, pki: Pki) -> None:
    credentials = load_channel_credentials(pki.ca, pki.cn_client.cert, pki.cn_client.key)

    with AuthorityClient(mtls_authority.target, credentials=credentials) as client:
        granted = client.grant()

    assert granted.lease.principal == "batch-worker"


def test_load_channel_credentials_needs_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match="^key_file is missing; give the client certificate and its key together$"):
        load_channel_credentials(pki.ca, pki.cn_client.cert)


def test_load_channel_credentials_not_pem(pki: Pki, tmp_path: pathlib.Path) -> None:
    garbage = tmp_path / "ca.der"
    garbage.write_bytes(b"\x30\x82")

    with pytest.raises(ValueError, match=f"^ca_file {garbage} is not a PEM file"):
        load_channel_credentials(garbage)


def test_client_without_certificate_unavailable(mtls_authority: AuthorityThread, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())

    with grpc.secure_channel(mtls_authority.target, credentials) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/session_authority.v1.SessionAuthority/Now")(b"", timeout=5)

    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


def test_client_of_other_ca_unavailable(mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.foreign_client) as client:
        with pytest.raises(AuthorityUnavailable) as caught:
            client.grant()

    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


def test_plaintext_client_unavailable(mtls_authority: AuthorityThread) -> None:
    with AuthorityClient(mtls_authority.target) as client:
        with pytest.raises(AuthorityUnavailable) as caught:
            client.grant()

    assert caught.value.code is grpc.StatusCode.UNAVAILABLE


# --- enforcer on a server that requires client certificates ----------------------------------


class _Echo(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method != ECHO_METHOD:
            return None
        return grpc.unary_unary_rpc_method_handler(lambda request, context: request)


def _certificate_identity(context: grpc.ServicerContext) -> str | None:
    return peer_identity(context.auth_context())


@pytest.fixture(params=["peer_identity"])
def protected_target(mtls_authority: AuthorityThread, pki: Pki, request: pytest.FixtureRequest) -> Iterator[str]:
    identity_settings = {"caller_identity": _certificate_identity} if request.param == "peer_identity" else {}
    interceptor = LeaseServerInterceptor(
        EnforcerConfig(
            authority_target=mtls_authority.target,
            authority_credentials=pki.enforcer_client.channel_credentials(pki.ca),
            staleness_bound_seconds=2.0,
            **identity_settings,
        )
    )
    executor = futures.ThreadPoolExecutor(max_workers=4)
    server = grpc.server(executor, interceptors=[interceptor])
    server.add_generic_rpc_handlers([_Echo()])
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(pki.server.cert, pki.server.key, pki.ca)
    )
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait(10)
    executor.shutdown(wait=True)
    interceptor.close()


def _call_echo(target: str, pki: Pki, identity: Identity, lease_id: str) -> tuple[bytes, grpc.Call]:
    with grpc.secure_channel(target, identity.channel_credentials(pki.ca)) as channel:
        echo = channel.unary_unary(ECHO_METHOD)
        return echo.with_call(b"ping", metadata=((LEASE_METADATA_KEY, lease_id),), timeout=10)


def test_enforcer_admits_lease_holder(protected_target: str, mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.spiffe_client) as client:
        lease_id = client.grant().lease_id

    reply, _ = _call_echo(protected_target, pki, pki.spiffe_client, lease_id)

    assert reply == b"ping"


# gRPC's own peer identity list puts a certificate's DNS names before its URIs, so this
# holder (SPIFFE ID and a DNS name) is admitted only because the default reads peer_identity.
@pytest.mark.parametrize("protected_target", ["default"], indirect=True)
def test_enforcer_default_identity_admits_holder(
    protected_target: str, mtls_authority: AuthorityThread, pki: Pki
) -> None:
    with client_for(mtls_authority, pki, pki.spiffe_client) as client:
        lease_id = client.grant().lease_id

    reply, _ = _call_echo(protected_target, pki, pki.spiffe_client, lease_id)

    assert reply == b"ping"


def test_enforcer_rejects_leaked_lease(protected_target: str, mtls_authority: AuthorityThread, pki: Pki) -> None:
    with client_for(mtls_authority, pki, pki.spiffe_client) as client:
        lease_id = client.grant().lease_id

    with pytest.raises(grpc.RpcError) as caught:
        _call_echo(protected_target, pki, pki.cn_client, lease_id)

    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert SPIFFE_ID in caught.value.details()
    assert '"batch-worker"' in caught.value.details()
    assert fingerprint(lease_id) in caught.value.details()
    assert lease_id not in caught.value.details()


def test_enforcer_rejects_leaked_lease_from_cache(
    protected_target: str, mtls_authority: AuthorityThread, pki: Pki
) -> None:
    with client_for(mtls_authority, pki, pki.spiffe_client) as client:
        lease_id = client.grant().lease_id
    _call_echo(protected_target, pki, pki.spiffe_client, lease_id)

    with pytest.raises(grpc.RpcError) as caught:
        _call_echo(protected_target, pki, pki.cn_client, lease_id)

    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert SPIFFE_ID in caught.value.details()
    assert '"batch-worker"' in caught.value.details()


# --- serve and the command line --------------------------------------------------------------


def _serve_args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["--listen", "127.0.0.1:0", *argv])


def test_serve_tls_flags_select_mtls(pki: Pki) -> None:
    config = build_config(
        _serve_args("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca))
    )

    assert isinstance(config.authenticator, MtlsAuthenticator)
    assert config.server_credentials is not None


def test_serve_api_keys_take_precedence(pki: Pki, tmp_path: pathlib.Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("0" * 64 + " ops\n")

    config = build_config(
        _serve_args(
            "--api-keys", str(keys),
            "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(pki.ca),
        )
    )

    assert config.authenticator.name == "api-key"
    assert config.server_credentials is not None


def test_serve_tls_env_variables(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_CERT", str(pki.server.cert))
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_KEY", str(pki.server.key))
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_CLIENT_CA", str(pki.ca))

    config = build_config(_serve_args())

    assert isinstance(config.authenticator, MtlsAuthenticator)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "CERT"], "--tls-key is missing; give --tls-cert and --tls-key together"),
        (["--tls-key", "KEY"], "--tls-cert is missing; give --tls-cert and --tls-key together"),
        (["--tls-client-ca", "CA"], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "CERT", "--tls-key", "KEY"], "no authentication configured"),
        (["--insecure-dev", "--tls-cert", "CERT", "--tls-key", "KEY", "--tls-client-ca", "CA"],
         "--insecure-dev ignores client certificates"),
    ],
)
def test_serve_tls_flag_errors(pki: Pki, flags: list[str], message: str) -> None:
    paths = {"CERT": str(pki.server.cert), "KEY": str(pki.server.key), "CA": str(pki.ca)}

    with pytest.raises(SystemExit, match=message):
        build_config(_serve_args(*[paths.get(flag, flag) for flag in flags]))


def test_serve_tls_unreadable_file(pki: Pki, tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing.key"

    with pytest.raises(SystemExit, match=f"cannot read --tls-key {missing}"):
        build_config(_serve_args("--tls-cert", str(pki.server.cert), "--tls-key", str(missing), "--tls-client-ca", str(pki.ca)))


def test_serve_tls_not_pem(pki: Pki, tmp_path: pathlib.Path) -> None:
    garbage = tmp_path / "ca.der"
    garbage.write_bytes(b"\x30\x82")

    with pytest.raises(SystemExit, match=f"--tls-client-ca {garbage} is not a PEM file"):
        build_config(_serve_args("--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key), "--tls-client-ca", str(garbage)))


def test_cli_grant_over_mtls(
    mtls_authority: AuthorityThread, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    status = cli_main(
        [
            "--authority", mtls_authority.target,
            "--tls-ca", str(pki.ca),
            "--tls-cert", str(pki.spiffe_client.cert),
            "--tls-key", str(pki.spiffe_client.key),
            "--json",
            "lease",
            "grant",
        ]
    )

    assert status == 0
    assert f'"principal":"{SPIFFE_ID}"' in capsys.readouterr().out


def test_cli_tls_from_environment(
    mtls_authority: AuthorityThread, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_CA", str(pki.ca))
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_CLIENT_CERT", str(pki.cn_client.cert))
    monkeypatch.setenv("SESSION_AUTHORITY_TLS_CLIENT_KEY", str(pki.cn_client.key))

    status = cli_main(["--authority", mtls_authority.target, "--json", "lease", "grant"])

    assert status == 0
    assert '"principal":"batch-worker"' in capsys.readouterr().out


def test_cli_tls_cert_without_key(pki: Pki, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli_main(["--tls-cert", str(pki.cn_client.cert), "lease", "grant"])

    assert status == 2
    assert "--tls-key is missing; give the client certificate and its key together" in capsys.readouterr().err


def test_serve_process_over_mtls(pki: Pki, tmp_path: pathlib.Path, policy_file: pathlib.Path) -> None:
    port_file = tmp_path / "port"
    process = subprocess.Popen(
        [
            sys.executable, "-m", "session_authority.server._main",
            "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path / "data"),
            "--policy", str(policy_file),
            "--port-file", str(port_file),
            "--tls-cert", str(pki.server.cert),
            "--tls-key", str(pki.server.key),
            "--tls-client-ca", str(pki.ca),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(1500):
            if port_file.exists() or process.poll() is not None:
                break
            time.sleep(0.02)
        assert port_file.exists(), process.stderr.read().decode() if process.stderr else ""
        target = f"127.0.0.1:{int(port_file.read_text())}"

        with AuthorityClient(target, credentials=pki.cn_client.channel_credentials(pki.ca)) as client:
            granted = client.grant()
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=15)

    assert granted.lease.principal == "batch-worker"
    assert "transport: TLS" in stderr.decode()
    assert "authenticator: mtls" in stderr.decode()

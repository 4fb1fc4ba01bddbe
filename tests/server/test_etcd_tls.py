"""TLS from the authority to etcd: https endpoints, a CA, client certificates and the server name.

The etcd members here serve https on loopback and require client
certificates (``--client-cert-auth``), as a fleet's etcd may require.
"""

from __future__ import annotations

import ipaddress
import os
import pathlib
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509

from session_authority.clients import AuthorityClient
from session_authority.server import AuthorityConfig, InsecureDevAuthenticator
from session_authority.server._etcd_store import EtcdLeaseStore
from session_authority.server._main import build_config, build_parser
from session_authority.server._store import StoreError

from etcd_cluster import EtcdCluster, EtcdTls, etcd_binary
from policies import TEST_POLICY
from replication._replicas import ETCD_PREFIX, ReplicaProcess
from tls_support import Identity, TestCa

SERVER_NAME = "etcd.test"
"""A DNS name in the members' certificate besides 127.0.0.1."""


class Pki:
    """The etcd members' CA and certificates, a client of that CA, and a client of another CA."""

    def __init__(self, directory: pathlib.Path) -> None:
        ca = TestCa(directory, "etcd test CA")
        self.ca = ca.cert
        self.server = ca.issue(
            "etcd-server", "etcd", [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(SERVER_NAME)]
        )
        self.client = ca.issue("authority", "authority")
        self.foreign_client = TestCa(directory, "another CA").issue("foreign", "authority")

    def flags(self, client: Identity | None = None) -> list[str]:
        client = client or self.client
        return ["--etcd-ca", str(self.ca), "--etcd-cert", str(client.cert), "--etcd-key", str(client.key)]


def _require_etcd() -> None:
    if etcd_binary() is None:
        reason = "etcd is not on PATH; install it (Debian: apt-get install etcd-server) to run the etcd TLS tests"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("etcd-pki"))


@pytest.fixture(scope="module")
def tls_etcd(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One etcd member that serves https and requires client certificates."""
    _require_etcd()
    with EtcdCluster(1, tmp_path_factory.mktemp("etcd-tls"), tls=EtcdTls(pki.ca, pki.server, pki.client)) as cluster:
        yield cluster


def _load(endpoints: list[str], load_timeout_seconds: float = 5.0, **settings: object) -> None:
    """Open a store, read the shared table once and close the store. Errors of the read propagate."""
    store = EtcdLeaseStore(
        endpoints, replica_id="replica-a", prefix=ETCD_PREFIX, load_timeout_seconds=load_timeout_seconds, **settings  # type: ignore[arg-type]
    )
    try:
        store.load_replica()
    finally:
        store.close()


def test_store_reads_with_client_certificate(tls_etcd: EtcdCluster, pki: Pki) -> None:
    _load(tls_etcd.endpoints, credentials=pki.client.channel_credentials(pki.ca))


def test_store_checks_given_server_name(tls_etcd: EtcdCluster, pki: Pki) -> None:
    _load(tls_etcd.endpoints, credentials=pki.client.channel_credentials(pki.ca), server_name=SERVER_NAME)

    with pytest.raises(StoreError, match="the TLS handshake failed") as raised:
        _load(tls_etcd.endpoints, credentials=pki.client.channel_credentials(pki.ca), server_name="other.test")

    assert "'other.test' (--etcd-server-name)" in str(raised.value)


@pytest.mark.parametrize("case", ["foreign client certificate", "no client certificate", "system roots"])
def test_store_reports_failed_handshake(tls_etcd: EtcdCluster, pki: Pki, case: str) -> None:
    credentials = {
        "foreign client certificate": pki.foreign_client.channel_credentials(pki.ca),
        "no client certificate": grpc.ssl_channel_credentials(pki.ca.read_bytes()),
        "system roots": None,
    }[case]

    with pytest.raises(StoreError) as raised:
        _load(tls_etcd.endpoints, credentials=credentials)

    message = str(raised.value)
    assert f"etcd at {tls_etcd.endpoints[0]} did not" in message
    assert "the TLS handshake failed: check that the CA (--etcd-ca)" in message


def test_store_names_unusable_local_files(tls_etcd: EtcdCluster, pki: Pki) -> None:
    # The key of another identity than the certificate it is given with.
    credentials = grpc.ssl_channel_credentials(
        pki.ca.read_bytes(), pki.foreign_client.key.read_bytes(), pki.client.cert.read_bytes()
    )

    with pytest.raises(StoreError) as raised:
        _load(tls_etcd.endpoints, credentials=credentials)

    assert "the local TLS files could not be used: check that --etcd-key is the private key of" in str(raised.value)


def test_http_endpoint_of_https_member_hints(tls_etcd: EtcdCluster) -> None:
    plain = tls_etcd.endpoints[0].replace("https://", "http://")

    with pytest.raises(StoreError) as raised:
        _load([plain], load_timeout_seconds=1.0)

    assert "If the members serve https, write the endpoints as https://HOST:PORT." in str(raised.value)


def test_store_fails_over_by_one_name(pki: Pki, tmp_path: pathlib.Path) -> None:
    _require_etcd()
    credentials = pki.client.channel_credentials(pki.ca)
    with EtcdCluster(3, tmp_path / "etcd", tls=EtcdTls(pki.ca, pki.server, pki.client)) as cluster:
        _load(cluster.endpoints, credentials=credentials, server_name=SERVER_NAME)
        # With the first member gone, the channel connects to another one and checks its certificate by the same name.
        cluster.kill(cluster.members[0])
        _load(cluster.endpoints, credentials=credentials, server_name=SERVER_NAME)


def test_replica_grants_revokes_over_tls(tls_etcd: EtcdCluster, pki: Pki, tmp_path: pathlib.Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    replica = ReplicaProcess(
        "replica-tls", tmp_path, policy, tls_etcd.endpoints_flag, ETCD_PREFIX, extra_args=pki.flags()
    )
    replica.start()
    client = AuthorityClient(replica.target)
    try:
        granted = client.grant(principal="svc-a", timeout_seconds=10)
        live_keys = tls_etcd.keys(f"{ETCD_PREFIX}leases/".encode())
        client.revoke(granted.lease_id, timeout_seconds=10)
        end_keys = tls_etcd.keys(f"{ETCD_PREFIX}ends/".encode())
    finally:
        client.close()
        exit_code = replica.stop()

    assert f"{ETCD_PREFIX}leases/{granted.lease.digest}".encode() in live_keys
    assert f"{ETCD_PREFIX}ends/{granted.lease.digest}".encode() in end_keys
    assert exit_code == 0, replica.log_tail()


def test_replica_foreign_certificate_exits(
    tls_etcd: EtcdCluster, pki: Pki, tmp_path: pathlib.Path
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(TEST_POLICY)
    replica = ReplicaProcess(
        "replica-foreign",
        tmp_path,
        policy,
        tls_etcd.endpoints_flag,
        ETCD_PREFIX,
        extra_args=pki.flags(pki.foreign_client),
    )

    with pytest.raises(RuntimeError, match="exited with 1"):
        replica.start()

    log = replica.log_tail()
    assert "the TLS handshake failed" in log
    assert "Traceback" not in log


# -- flags --------------------------------------------------------------------------


def _config(*flags: str) -> AuthorityConfig:
    parser = build_parser()
    return build_config(parser.parse_args(["--insecure-dev", *flags]), parser)


def test_https_without_files_trusts_system_roots() -> None:
    config = _config("--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379")

    assert config.etcd_endpoints == ("https://127.0.0.1:2379",)
    assert config.etcd_credentials is not None
    assert config.etcd_server_name == ""


def test_tls_flags_reach_the_config(pki: Pki) -> None:
    config = _config(
        "--store", "etcd",
        "--etcd-endpoints", "https://127.0.0.1:2379,https://127.0.0.1:22379",
        "--etcd-server-name", SERVER_NAME,
        *pki.flags(),
    )  # fmt: skip

    assert config.etcd_credentials is not None
    assert config.etcd_server_name == SERVER_NAME


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-ca", "ca.crt"],
            "--etcd-ca applies only to https etcd endpoints; write them as https://HOST:PORT or drop --etcd-ca",
        ),
        (
            ["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379", "--etcd-server-name", SERVER_NAME],
            "--etcd-server-name applies only to https etcd endpoints",
        ),
        (["--etcd-ca", "ca.crt"], "--etcd-ca applies only to --store etcd; add --store etcd or drop --etcd-ca"),
        (["--etcd-server-name", SERVER_NAME], "--etcd-server-name applies only to --store etcd"),
        (
            ["--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379,https://127.0.0.1:22379"],
            "several https endpoints (https://127.0.0.1:2379,https://127.0.0.1:22379) share one channel",
        ),
        (
            ["--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-server-name", "etcd.test:2379"],
            "etcd server name 'etcd.test:2379' is not a host name or IP address",
        ),
    ],
)
def test_inconsistent_tls_flags_usage_error(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _config(*flags)

    assert exited.value.code == 2
    assert f"session-authority serve: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("missing", ["--etcd-cert", "--etcd-key"])
def test_client_certificate_needs_its_key(pki: Pki, missing: str) -> None:
    files = {"--etcd-cert": str(pki.client.cert), "--etcd-key": str(pki.client.key)}
    del files[missing]

    with pytest.raises(SystemExit) as exited:
        _config("--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379", *[x for item in files.items() for x in item])

    assert exited.value.code == f"session-authority serve: {missing} is missing; give --etcd-cert and --etcd-key together"


def test_unreadable_tls_files_named(tmp_path: pathlib.Path) -> None:
    not_pem = tmp_path / "ca.der"
    not_pem.write_bytes(b"\x30\x82\x01\x0a")
    endpoint = ("--store", "etcd", "--etcd-endpoints", "https://127.0.0.1:2379")

    with pytest.raises(SystemExit) as missing:
        _config(*endpoint, "--etcd-ca", str(tmp_path / "absent.crt"))
    with pytest.raises(SystemExit) as garbled:
        _config(*endpoint, "--etcd-ca", str(not_pem))

    assert missing.value.code == f"session-authority serve: cannot read --etcd-ca {tmp_path / 'absent.crt'}: No such file or directory"
    assert garbled.value.code == (
        f"session-authority serve: --etcd-ca {not_pem} is not a PEM file (no -----BEGIN line); give the PEM form"
    )


def test_config_rejects_misplaced_tls_settings(pki: Pki) -> None:
    with pytest.raises(ValueError, match='apply only to store="etcd"'):
        AuthorityConfig(authenticator=InsecureDevAuthenticator(), etcd_server_name=SERVER_NAME)
    with pytest.raises(ValueError, match="apply only to https endpoints"):
        AuthorityConfig(
            authenticator=InsecureDevAuthenticator(),
            store="etcd",
            etcd_endpoints=("http://127.0.0.1:2379",),
            etcd_credentials=pki.client.channel_credentials(pki.ca),
        )

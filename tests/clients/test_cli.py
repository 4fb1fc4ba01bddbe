"""The ``session-authority`` console script, run as a real subprocess against a real authority."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from session_authority.clients._client import AuthorityClient
from session_authority.clients._errors import AuthorityUnavailable
from session_authority.clients._metadata import fingerprint
from session_authority.server import AuthorityConfig, AuthorityThread, MtlsAuthenticator, parse_policy
from session_authority.server._audit import AuditLog
from session_authority.server._tls import server_credentials

from audit_support import SteppingWallClock, released_end_fields
from policies import TEST_POLICY
from tls_support import issue_certificate, name_of

SCRIPT = pathlib.Path(sys.executable).with_name("session-authority")
RUN_TIMEOUT_SECONDS = 60
MAX_WATCH_LINES = 100
"""Upper bound on lines read from ``watch`` while waiting for one; heartbeats come every 0.2 s."""


def clean_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("SESSION_AUTHORITY_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def popen_interruptible(command: list[str]) -> subprocess.Popen[str]:
    """Start the CLI with SIGINT at its default, as in a terminal, so that SIGINT stands for Ctrl-C.

    A test run started in the background (``cmd &`` in a script, as some CI
    runners do) ignores SIGINT, and children inherit an ignored signal. A
    handler, unlike an ignored disposition, is reset to the default in the child.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    finally:
        signal.signal(signal.SIGINT, previous)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        timeout=RUN_TIMEOUT_SECONDS,
    )


def closed_port_target() -> str:
    """Return a loopback address on which nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def grant_json(target: str, *extra: str) -> dict[str, object]:
    result = run_cli("--authority", target, "--principal", "svc-cli", "lease", "grant", "--json", *extra)
    assert result.returncode == 0, result.stderr
    record: dict[str, object] = json.loads(result.stdout)
    return record


@pytest.fixture
def target(authority) -> str:  # type: ignore[no-untyped-def]
    return str(authority.target)


def test_console_script_installed() -> None:
    assert SCRIPT.exists(), f"{SCRIPT} is missing: run pip install -e . in this environment"


def test_cli_lease_life_cycle(authority_process) -> None:  # type: ignore[no-untyped-def]
    target = authority_process.target

    granted = grant_json(target, "--tier", "standard")
    lease_id = str(granted["lease_id"])
    ttl = run_cli("--authority", target, "lease", "ttl", lease_id)
    listed = run_cli("--authority", target, "lease", "list", "--principal", "svc-cli")
    revoked = run_cli("--authority", target, "lease", "revoke", lease_id)
    after = run_cli("--authority", target, "lease", "ttl", lease_id)

    assert ttl.returncode == 0, ttl.stderr
    header, row = ttl.stdout.splitlines()
    assert header.split() == [
        "fingerprint", "principal", "tier", "state", "ttl", "max", "remaining", "age", "end", "reason"
    ]
    assert row.split()[:4] == [granted["fingerprint"], "svc-cli", "standard", "alive"]
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[0] for line in listed.stdout.splitlines()[1:]] == [granted["fingerprint"]]
    assert revoked.returncode == 0, revoked.stderr
    assert revoked.stdout.splitlines()[1].split()[3] == "ended"
    assert after.returncode == 0, after.stderr
    fields = after.stdout.splitlines()[1].split()
    assert fields[3] == "ended"
    assert fields[-1] == "revoked"


def test_cli_grant_prints_lease_id_and_fingerprint(target: str) -> None:
    result = run_cli("--authority", target, "lease", "grant", "--tier", "short", "--principal", "svc-p")

    assert result.returncode == 0, result.stderr
    fields = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.stdout.splitlines())
    assert fields["fingerprint"] == fingerprint(fields["lease ID"])
    assert fields["principal"] == "svc-p"
    assert fields["tier"] == "short"


def test_cli_grant_json_parses(target: str) -> None:
    granted = grant_json(target, "--tier", "short", "--idle-timeout", "1")

    assert granted["state"] == "alive"
    assert granted["tier"] == "short"
    assert granted["principal"] == "svc-cli"
    assert granted["idle_timeout_seconds"] == 1.0
    assert granted["fingerprint"] == fingerprint(str(granted["lease_id"]))
    assert str(granted["granted_at"]).endswith("Z")


def test_cli_list_json_one_object_per_line(target: str) -> None:
    fingerprints = {grant_json(target)["fingerprint"] for _ in range(3)}

    result = run_cli(
        "--authority", target, "lease", "list", "--principal", "svc-cli", "--page-size", "2", "--json"
    )

    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {record["fingerprint"] for record in records} == fingerprints
    assert all(record["state"] == "alive" for record in records)


def test_cli_list_unknown_tier_names_policy_tiers(target: str) -> None:
    grant_json(target)

    result = run_cli("--authority", target, "lease", "list", "--tier", "nope")

    assert result.returncode == 0, result.stderr
    assert "'nope' is not in the authority's policy" in result.stderr
    assert "standard" in result.stderr


def test_cli_revoke_json_by_fingerprint_release(target: str) -> None:
    granted = grant_json(target)

    result = run_cli(
        "--authority", target, "lease", "revoke", "--fingerprint", str(granted["fingerprint"]), "--release", "--json"
    )

    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["end_reason"] == "released"
    assert record["already_ended"] is False


def test_cli_revoke_twice_says_already_ended(target: str) -> None:
    lease_id = str(grant_json(target)["lease_id"])
    run_cli("--authority", target, "lease", "revoke", lease_id)

    result = run_cli("--authority", target, "lease", "revoke", lease_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "The lease had already ended (revoked); nothing changed."


def test_cli_revoke_unknown_lease_exits_1(target: str) -> None:
    result = run_cli("--authority", target, "lease", "revoke", "no-such-lease")

    assert result.returncode == 1
    assert result.stderr == "session-authority: error: Revoke failed: the authority has no record of this lease\n"


def test_cli_renew_alive_lease(target: str) -> None:
    granted = grant_json(target)

    result = run_cli("--authority", target, "lease", "renew", str(granted["lease_id"]), "--idle-for", "0.5", "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["state"] == "alive"


def test_cli_renew_ended_lease_exits_1(target: str) -> None:
    granted = grant_json(target)
    run_cli("--authority", target, "lease", "revoke", str(granted["lease_id"]))

    result = run_cli("--authority", target, "lease", "renew", str(granted["lease_id"]))

    assert result.returncode == 1
    assert result.stderr == (
        f"session-authority: error: Renew failed: lease {granted['fingerprint']} has ended (revoked)\n"
    )


def test_cli_unknown_tier_exits_1_naming_tiers(target: str) -> None:
    result = run_cli("--authority", target, "lease", "grant", "--tier", "gold")

    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith('session-authority: error: Grant failed: INVALID_ARGUMENT: tier "gold" ')
    assert "brief, short, standard" in result.stderr


def test_cli_bad_target_exits_3() -> None:
    result = run_cli("--authority", closed_port_target(), "now")

    assert result.returncode == 3
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("session-authority: error: Now failed: UNAVAILABLE: ")


def test_cli_target_from_environment(target: str) -> None:
    env = clean_env()
    env["SESSION_AUTHORITY_TARGET"] = target

    result = run_cli("now", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["now"].endswith("Z")


def test_cli_principal_from_environment(target: str) -> None:
    env = clean_env()
    env["SESSION_AUTHORITY_PRINCIPAL"] = "svc-env"

    result = run_cli("--authority", target, "lease", "grant", "--json", env=env)

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["principal"] == "svc-env"


def test_cli_now_prints_utc_time(target: str) -> None:
    result = run_cli("--authority", target, "now")

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("Z")
    assert "T" in result.stdout


def test_cli_policy_shows_tiers_and_rules(target: str) -> None:
    result = run_cli("--authority", target, "policy")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "Tiers"
    assert lines[1].split() == ["tier", "idle", "timeout", "max", "duration"]
    assert any(line.split() == ["short", "1.0s", "4.0s"] for line in lines)
    assert any(line.split() == ["/test.Guarded/ShortOnly", "short", "-", "no"] for line in lines)


def test_cli_policy_json(target: str) -> None:
    result = run_cli("--authority", target, "policy", "--json")

    assert result.returncode == 0, result.stderr
    policy = json.loads(result.stdout)
    assert sorted(tier["name"] for tier in policy["tiers"]) == ["brief", "short", "standard"]
    assert {"pattern": "/test.Guarded/*", "tiers": [], "max_session_age_seconds": 2.0, "exempt": False} in policy[
        "rules"
    ]


def test_cli_watch_prints_end_and_stops_on_interrupt(target: str) -> None:
    lease_id = str(grant_json(target)["lease_id"])
    process = popen_interruptible([str(SCRIPT), "--authority", target, "watch", "--heartbeats", "--json"])
    try:
        assert process.stdout is not None
        first = json.loads(process.stdout.readline())
        with AuthorityClient(target) as client:
            client.revoke(lease_id)
        end = None
        for _ in range(MAX_WATCH_LINES):
            record = json.loads(process.stdout.readline())
            if record["event"] == "end":
                end = record
                break

        process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert first["event"] == "heartbeat"
    assert end is not None
    assert end["fingerprint"] == fingerprint(lease_id)
    assert end["end_reason"] == "revoked"
    assert end["sequence"] > 0
    assert returncode == 0


def test_cli_watch_count_stops(target: str) -> None:
    result = run_cli("--authority", target, "watch", "--heartbeats", "--count", "2")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2
    assert all(" heartbeat sequence=" in line for line in lines)


def test_cli_watch_replays_end_as_line(target: str) -> None:
    with AuthorityClient(target) as client:
        earlier = client.grant("standard")
        granted = client.grant("standard", principal="svc-w")
        client.revoke(earlier.lease_id)
        # after_sequence 0 means "from now", so resume after an earlier end.
        stream = client.watch_session_ends()
        heartbeat = next(stream)
        stream.cancel()
        client.revoke(granted.lease_id)
    assert heartbeat.sequence > 0  # type: ignore[union-attr]

    result = run_cli(
        "--authority",
        target,
        "watch",
        "--after-sequence",
        str(heartbeat.sequence),  # type: ignore[union-attr]
        "--instance-id",
        heartbeat.instance_id,  # type: ignore[union-attr]
        "--count",
        "1",
    )

    assert result.returncode == 0, result.stderr
    assert " end sequence=" in result.stdout
    assert f"fingerprint={granted.fingerprint} principal=svc-w tier=standard reason=revoked" in result.stdout


def test_cli_keys_add_prints_key_once(tmp_path: pathlib.Path) -> None:
    keys_file = tmp_path / "api-keys"

    result = run_cli("keys", "add", "svc-k", "--file", str(keys_file))

    assert result.returncode == 0, result.stderr
    api_key = result.stdout.strip()
    assert api_key
    stored = keys_file.read_text()
    assert api_key not in stored
    assert stored.rstrip().endswith(" svc-k")
    assert "only its hash" in result.stderr


def test_cli_keys_add_invalid_principal_exits_2(tmp_path: pathlib.Path) -> None:
    result = run_cli("keys", "add", "bad principal", "--file", str(tmp_path / "api-keys"))

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("session-authority: error: ")


def test_cli_usage_error_exits_2() -> None:
    result = run_cli("lease", "revoke")

    assert result.returncode == 2
    assert "one of the arguments LEASE_ID --fingerprint is required" in result.stderr


def test_cli_api_key_file_missing_exits_2(tmp_path: pathlib.Path) -> None:
    missing = tmp_path / "missing-key"

    result = run_cli("--api-key-file", str(missing), "now")

    assert result.returncode == 2
    assert result.stderr == f"session-authority: error: cannot read --api-key-file {missing}: No such file or directory\n"


def test_cli_serve_help_forwarded() -> None:
    result = run_cli("serve", "--help")

    assert result.returncode == 0
    assert "--insecure-dev" in result.stdout


def test_cli_audit_help_forwarded() -> None:
    result = run_cli("audit", "--help")

    assert result.returncode == 0
    assert "verify" in result.stdout


def test_cli_global_option_before_serve_exits_2() -> None:
    result = run_cli("-v", "serve")

    assert result.returncode == 2
    assert result.stderr == "session-authority: error: serve takes its own options; put them after 'serve'\n"


def test_cli_runs_as_module(target: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "session_authority.clients._cli", "--authority", target, "now"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=RUN_TIMEOUT_SECONDS,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("Z")


RESET_WARNING_START = "session-authority: warning: the authority could not replay every end after sequence 5 "


def test_cli_watch_other_instance_warns_reset(target: str) -> None:
    result = run_cli(
        "--authority", target, "watch", "--after-sequence", "5", "--instance-id", "other-run", "--heartbeats", "--count", "1"
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith(" reset")
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(RESET_WARNING_START)


def test_cli_watch_reset_warns_json(target: str) -> None:
    process = popen_interruptible([str(SCRIPT), "--authority", target, "watch", "--after-sequence", "5", "--json"])
    try:
        assert process.stderr is not None
        warning = process.stderr.readline()
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=RUN_TIMEOUT_SECONDS)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert warning.startswith(RESET_WARNING_START)
    assert stdout == ""
    assert process.returncode == 0


@pytest.mark.parametrize("lease_id", ["no-such-lease", "%%garbage%%"])
def test_cli_ttl_unknown_lease_exits_1(target: str, lease_id: str) -> None:
    result = run_cli("--authority", target, "lease", "ttl", lease_id)

    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "session-authority: error: TimeToLive failed: the authority has no record of this lease "
        "(state not_found); check the ID printed by 'lease grant'\n"
    )


def test_cli_ttl_ended_lease_json_exits_0(target: str) -> None:
    lease_id = str(grant_json(target)["lease_id"])
    run_cli("--authority", target, "lease", "revoke", lease_id)

    result = run_cli("--authority", target, "lease", "ttl", lease_id, "--json")

    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["state"] == "ended"
    assert record["end_reason"] == "revoked"


@pytest.mark.parametrize(
    "value", ["127.0.0.1:99999", "127.0.0.1:0", "", "127.0.0.1", "localhost:http", "::1:50051", "[::1]", "unix:"]
)
def test_cli_invalid_authority_exits_2(value: str) -> None:
    result = run_cli("--authority", value, "now")

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"session-authority: error: --authority {value!r} ")
    assert "expected HOST:PORT with a port from 1 to 65535" in result.stderr


def test_cli_invalid_target_variable_exits_2() -> None:
    env = clean_env()
    env["SESSION_AUTHORITY_TARGET"] = "127.0.0.1:70000"

    result = run_cli("now", env=env)

    assert result.returncode == 2
    assert result.stderr.startswith("session-authority: error: SESSION_AUTHORITY_TARGET '127.0.0.1:70000' ")


def test_cli_scheme_target_passed_unchanged(tmp_path: pathlib.Path) -> None:
    result = run_cli("--authority", f"unix:{tmp_path / 'no-socket'}", "now", "--timeout", "1")

    assert result.returncode == 3
    assert result.stderr.startswith("session-authority: error: Now failed: UNAVAILABLE: ")


def test_cli_idle_for_too_large_names_flag() -> None:
    result = run_cli("lease", "renew", "some-lease", "--idle-for", "1e308")

    assert result.returncode == 2
    assert "argument --idle-for: must be at most 315576000000 seconds" in result.stderr
    assert "idle_for_seconds" not in result.stderr


def test_cli_after_sequence_too_large_exits_2() -> None:
    result = run_cli("watch", "--after-sequence", "99999999999999999999999")

    assert result.returncode == 2
    assert (
        "argument --after-sequence: must be a whole number from 0 to 18446744073709551615 (2^64-1), "
        "got '99999999999999999999999'"
    ) in result.stderr


def run_cli_with_input(text: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        input=text,
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=RUN_TIMEOUT_SECONDS,
    )


def test_cli_lease_id_dash_reads_stdin(target: str) -> None:
    granted = grant_json(target)
    lease_id = str(granted["lease_id"])

    ttl = run_cli_with_input(lease_id + "\n", "--authority", target, "lease", "ttl", "-", "--json")
    renew = run_cli_with_input(lease_id + "\n", "--authority", target, "lease", "renew", "-", "--json")
    revoke = run_cli_with_input(lease_id + "\n", "--authority", target, "lease", "revoke", "-", "--json")

    assert ttl.returncode == 0, ttl.stderr
    assert json.loads(ttl.stdout)["fingerprint"] == granted["fingerprint"]
    assert renew.returncode == 0, renew.stderr
    assert json.loads(renew.stdout)["state"] == "alive"
    assert revoke.returncode == 0, revoke.stderr
    assert json.loads(revoke.stdout)["end_reason"] == "revoked"


def test_cli_lease_id_dash_empty_stdin_exits_2() -> None:
    result = run_cli_with_input("", "lease", "ttl", "-")

    assert result.returncode == 2
    assert result.stderr == (
        "session-authority: error: LEASE_ID is - but the lease ID is missing from the first line of "
        "standard input; pipe the ID printed by 'lease grant'\n"
    )


@pytest.mark.parametrize("command", ["renew", "revoke", "ttl"])
def test_cli_lease_id_help_mentions_stdin(command: str) -> None:
    result = run_cli("lease", command, "--help")

    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "or - to read it from the first line of standard input" in text
    assert "shows in the process list and shell history" in text


@pytest.mark.parametrize("command", [["lease", "ttl"], ["lease", "renew"], ["lease", "revoke"]])
def test_cli_lease_id_starting_with_dash(command: list[str]) -> None:
    from session_authority.clients._cli import _lease_ids_after_separator, build_parser

    lease_id = "-yYiAbCdEfGhIjKlMnOpQr"

    arguments = _lease_ids_after_separator([*command, lease_id, "--json"], build_parser())
    args = build_parser().parse_args(arguments)

    assert args.lease_id == lease_id
    assert args.json is True


# --- Usage errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments",
    [
        [],
        ["no-such-command"],
        ["--no-such-option", "now"],
        ["lease"],
        ["lease", "revoke"],
        ["lease", "ttl", "some-lease", "--no-such-option"],
        ["keys", "add"],
        ["watch", "--count", "0"],
        ["now", "--timeout", "soon"],
        ["serve", "--no-such-option"],
        ["audit"],
        ["audit", "verify", "--no-such-option", "audit"],
        ["demo", "--no-such-option"],
    ],
)
def test_cli_usage_error_prints_one_line(arguments: list[str]) -> None:
    result = run_cli(*arguments)

    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert re.fullmatch(
        r"session-authority( [a-z]+)*: error: .+ \(see 'session-authority( [a-z]+)* --help'\)\n", result.stderr
    ), result.stderr


def test_cli_usage_error_names_subcommand() -> None:
    result = run_cli("watch", "--count", "0")

    assert result.stderr == (
        "session-authority watch: error: argument --count: must be >= 1, got '0' "
        "(see 'session-authority watch --help')\n"
    )


# --- TLS files and handshakes ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test CA, an authority certificate and a client certificate."""

    ca: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path
    client_cert: pathlib.Path
    client_key: pathlib.Path
    other_key: pathlib.Path
    """A valid key that belongs to no certificate here."""
    encrypted_key: pathlib.Path
    """The client key, encrypted with a password."""


def _write_key(path: pathlib.Path, key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> None:
    encryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))


CLI_CA_NAME = name_of("cli test CA")


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    directory = tmp_path_factory.mktemp("tls")
    files = TlsFiles(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_key=directory / "other.key",
        encrypted_key=directory / "encrypted.key",
    )
    ca_key = ec.generate_private_key(ec.SECP256R1())
    server_key = ec.generate_private_key(ec.SECP256R1())
    client_key = ec.generate_private_key(ec.SECP256R1())
    loopback = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]

    for path, certificate in [
        (files.ca, issue_certificate("cli test CA", ca_key, CLI_CA_NAME, ca_key, is_ca=True)),
        (files.server_cert, issue_certificate("localhost", server_key, CLI_CA_NAME, ca_key, sans=loopback)),
        (files.client_cert, issue_certificate("svc-tls", client_key, CLI_CA_NAME, ca_key)),
    ]:
        path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(files.server_key, server_key)
    _write_key(files.client_key, client_key)
    _write_key(files.other_key, ec.generate_private_key(ec.SECP256R1()))
    _write_key(files.encrypted_key, client_key, password=b"correct horse")
    return files


@pytest.fixture
def mtls_target(tls_files: TlsFiles, tmp_path: pathlib.Path) -> Iterator[str]:
    """Target of an in-process authority that requires client certificates of the test CA."""
    config = AuthorityConfig(
        authenticator=MtlsAuthenticator(),
        policy=parse_policy(TEST_POLICY),
        data_dir=tmp_path / "mtls-data",
        server_credentials=server_credentials(tls_files.server_cert, tls_files.server_key, tls_files.ca),
        heartbeat_interval_seconds=0.2,
    )
    running = AuthorityThread(config).start()
    yield str(running.target)
    running.stop()


def test_cli_tls_client_certificate_grants(mtls_target: str, tls_files: TlsFiles) -> None:
    result = run_cli(
        "--authority", mtls_target, "--tls-ca", str(tls_files.ca),
        "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.client_key),
        "lease", "grant", "--json",
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["principal"] == "svc-tls"


def test_cli_tls_key_mismatch_exits_2(tls_files: TlsFiles) -> None:
    # Nothing listens on the target: the files are checked before any call.
    result = run_cli(
        "--authority", closed_port_target(), "--tls-ca", str(tls_files.ca),
        "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.other_key), "now",
    )

    assert result.returncode == 2
    assert result.stderr == (
        f"session-authority: error: --tls-key {tls_files.other_key} is not the private key of the "
        f"certificate in --tls-cert {tls_files.client_cert}; give the key that was created with that "
        "certificate\n"
    )


def test_cli_tls_key_from_variable_named(tls_files: TlsFiles) -> None:
    env = clean_env()
    env["SESSION_AUTHORITY_TLS_CLIENT_KEY"] = str(tls_files.other_key)

    result = run_cli(
        "--authority", closed_port_target(), "--tls-cert", str(tls_files.client_cert), "now", env=env
    )

    assert result.returncode == 2
    assert result.stderr.startswith(
        f"session-authority: error: SESSION_AUTHORITY_TLS_CLIENT_KEY {tls_files.other_key} is not the "
        "private key of the certificate in --tls-cert"
    )


def test_cli_tls_key_not_a_key_exits_2(tls_files: TlsFiles) -> None:
    result = run_cli(
        "--authority", closed_port_target(),
        "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.ca), "now",
    )

    assert result.returncode == 2
    assert result.stderr == (
        f"session-authority: error: --tls-key {tls_files.ca} is not a valid PEM private key file; "
        "give the private key of the certificate in --tls-cert\n"
    )


def test_cli_tls_cert_not_a_certificate_exits_2(tls_files: TlsFiles) -> None:
    result = run_cli(
        "--authority", closed_port_target(),
        "--tls-cert", str(tls_files.client_key), "--tls-key", str(tls_files.client_key), "now",
    )

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(
        f"session-authority: error: --tls-cert {tls_files.client_key} is not a valid PEM certificate file "
    )


def test_cli_tls_key_encrypted_exits_2(tls_files: TlsFiles) -> None:
    # Without the check, OpenSSL would prompt for the password on the terminal.
    result = run_cli(
        "--authority", closed_port_target(),
        "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.encrypted_key), "now",
    )

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(
        f"session-authority: error: --tls-key {tls_files.encrypted_key} is encrypted, and gRPC accepts "
        "only unencrypted keys; "
    )


def test_cli_tls_ca_not_a_certificate_exits_2(tls_files: TlsFiles, tmp_path: pathlib.Path) -> None:
    broken_ca = tmp_path / "broken-ca.crt"
    broken_ca.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    result = run_cli("--authority", closed_port_target(), "--tls-ca", str(broken_ca), "now")

    assert result.returncode == 2
    assert result.stderr == (
        f"session-authority: error: --tls-ca {broken_ca} is not a valid PEM certificate file; "
        "give the PEM file of the CA that signed the authority's certificate\n"
    )


def test_cli_plaintext_to_mtls_hints_tls(mtls_target: str) -> None:
    result = run_cli("--authority", mtls_target, "now")

    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("session-authority: error: Now failed: UNAVAILABLE: ")
    assert result.stderr.endswith(
        "; if the authority serves TLS, this is how it rejects a plaintext connection: pass --tls-ca, "
        "and --tls-cert with --tls-key if it requires client certificates\n"
    )


def test_cli_tls_without_certificate_hints_cert(mtls_target: str, tls_files: TlsFiles) -> None:
    result = run_cli("--authority", mtls_target, "--tls-ca", str(tls_files.ca), "now")

    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("session-authority: error: Now failed: UNAVAILABLE: ")
    assert result.stderr.endswith(
        "; if the TLS handshake failed, the authority may require a client certificate (pass --tls-cert "
        "and --tls-key), may not serve TLS (drop the --tls-* options), or may present a certificate "
        "that --tls-ca did not sign\n"
    )


def test_cli_tls_to_plaintext_hints_tls(target: str, tls_files: TlsFiles) -> None:
    result = run_cli(
        "--authority", target, "--tls-ca", str(tls_files.ca),
        "--tls-cert", str(tls_files.client_cert), "--tls-key", str(tls_files.client_key), "now",
    )

    # NOTE: gRPC core may log the failed handshake on stderr before the error line.
    error_line = result.stderr.splitlines()[-1]
    assert result.returncode == 3
    assert error_line.startswith("session-authority: error: Now failed: UNAVAILABLE: ")
    assert error_line.endswith(
        "; if the TLS handshake failed, the authority may not serve TLS (drop the --tls-* options), "
        "may not trust the client certificate in --tls-cert, or may present a certificate that "
        "--tls-ca did not sign"
    )


def test_cli_connection_refused_no_tls_hint(tls_files: TlsFiles) -> None:
    result = run_cli("--authority", closed_port_target(), "--tls-ca", str(tls_files.ca), "now", "--timeout", "2")

    assert result.returncode == 3
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert "Connection refused" in result.stderr
    assert "TLS" not in result.stderr


@pytest.mark.parametrize(
    ("code", "details"),
    [
        (grpc.StatusCode.UNAVAILABLE, "the lease could not be stored: etcd is down; retry later"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    ],
)
def test_tls_hint_skips_other_unavailable(code: grpc.StatusCode, details: str) -> None:
    from session_authority.clients._cli import _tls_hint

    error = AuthorityUnavailable(code, details, operation="Grant")

    assert _tls_hint(error, ca_given=True, cert_given=True, key_given=True) is None


# --- --principal with an API key -------------------------------------------------------------


PRINCIPAL_IGNORED_WARNING = (
    "session-authority: warning: an authority that checks API keys ignores {principal_source} 'svc-named' "
    "and takes the principal from the API key given by {key_source}. Only an authority in insecure "
    "development mode reads {principal_source}, and it ignores the key.\n"
)


@pytest.mark.parametrize("key_source", ["--api-key", "--api-key-file", "SESSION_AUTHORITY_API_KEY"])
def test_cli_principal_with_api_key_warns(target: str, key_source: str, tmp_path: pathlib.Path) -> None:
    env = clean_env()
    key_arguments: list[str] = []
    if key_source == "--api-key":
        key_arguments = ["--api-key", "some-key"]
    elif key_source == "--api-key-file":
        key_file = tmp_path / "api-key"
        key_file.write_text("some-key\n")
        key_arguments = ["--api-key-file", str(key_file)]
    else:
        env["SESSION_AUTHORITY_API_KEY"] = "some-key"

    result = run_cli("--authority", target, "--principal", "svc-named", *key_arguments, "now", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stderr == PRINCIPAL_IGNORED_WARNING.format(principal_source="--principal", key_source=key_source)


def test_cli_principal_variable_warns(target: str) -> None:
    env = clean_env()
    env["SESSION_AUTHORITY_PRINCIPAL"] = "svc-named"
    env["SESSION_AUTHORITY_API_KEY"] = "some-key"

    result = run_cli("--authority", target, "now", env=env)

    assert result.returncode == 0, result.stderr
    assert result.stderr == PRINCIPAL_IGNORED_WARNING.format(
        principal_source="SESSION_AUTHORITY_PRINCIPAL", key_source="SESSION_AUTHORITY_API_KEY"
    )


def test_cli_principal_without_api_key_silent(target: str) -> None:
    result = run_cli("--authority", target, "--principal", "svc-named", "now")

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- audit verify of a rotated log -----------------------------------------------------------


@pytest.fixture
def rotated_audit_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """An audit directory whose log has rotated into three files before ``audit.jsonl``."""
    directory = tmp_path / "audit"
    with AuditLog(directory, max_bytes=4096, wall_clock=SteppingWallClock()) as log:
        for index in range(40):
            log.append(f"end:{index:04d}", "end", released_end_fields(index))
    assert len(list(directory.glob("audit-*.jsonl"))) == 3
    return directory


def test_cli_verify_live_file_hints_directory(rotated_audit_dir: pathlib.Path) -> None:
    live_file = rotated_audit_dir / "audit.jsonl"

    result = run_cli("audit", "verify", str(live_file))

    assert result.returncode == 1
    assert result.stdout.startswith(f"FAIL: {live_file} line 1: the chain starts at seq ")
    assert result.stderr == (
        f"session-authority audit verify: hint: {rotated_audit_dir} also holds 3 rotated files of this log "
        "that were not checked, the oldest audit-000000000001.jsonl; pass the directory to check the "
        f"whole chain: session-authority audit verify {rotated_audit_dir}\n"
    )


def test_cli_verify_all_files_no_hint(rotated_audit_dir: pathlib.Path) -> None:
    files = sorted(str(path) for path in rotated_audit_dir.glob("audit-*.jsonl"))

    result = run_cli("audit", "verify", *files, str(rotated_audit_dir / "audit.jsonl"))

    assert result.returncode == 0, result.stdout
    assert result.stderr == ""


def test_cli_verify_directory_no_hint(rotated_audit_dir: pathlib.Path) -> None:
    result = run_cli("audit", "verify", str(rotated_audit_dir))

    assert result.returncode == 0, result.stdout
    assert result.stderr == ""


# --- keys add --------------------------------------------------------------------------------


def test_cli_keys_add_unwritable_file_exits_2(tmp_path: pathlib.Path) -> None:
    keys_file = tmp_path / "missing-directory" / "api-keys"

    result = run_cli("keys", "add", "svc-k", "--file", str(keys_file))

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"session-authority: error: cannot write --file {keys_file}: No such file or directory; "
        "give a writable file in an existing directory\n"
    )

"""The ``session-authority`` console script, run as a real subprocess against a real authority."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys

import pytest

from session_authority.clients._client import AuthorityClient
from session_authority.clients._metadata import fingerprint

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

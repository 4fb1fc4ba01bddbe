"""A Node.js client (@grpc/grpc-js, protos loaded at run time) against the authority and a protected aio server."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from session_authority.examples._processes import ChildProcesses

ROOT = pathlib.Path(__file__).resolve().parents[2]
NODE_DIR = ROOT / "examples" / "node"
STARTUP_TIMEOUT_SECONDS = 20.0
CLIENT_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The authority with the demo policy, the protected payments (aio) and telemetry (sync) servers, as processes."""
    work = tmp_path_factory.mktemp("node-client")
    children = ChildProcesses(work / "logs")
    policy = work / "policy.toml"
    shutil.copyfile(ROOT / "examples" / "demo_policy.toml", policy)
    env = dict(os.environ, OTEL_SDK_DISABLED="true")
    try:
        authority = children.start(
            "authority",
            [sys.executable, "-m", "session_authority.server._main", "--listen", "127.0.0.1:0",
             "--port-file", str(work / "authority.port"), "--data-dir", str(work / "data"),
             "--policy", str(policy), "--insecure-dev", "--heartbeat-interval", "0.5"],
            env=env,
        )
        authority_target = f"127.0.0.1:{children.wait_for_port(authority, work / 'authority.port', STARTUP_TIMEOUT_SECONDS)}"
        targets = {"authority": authority_target}
        for service in ("payments", "telemetry"):
            child = children.start(
                service,
                [sys.executable, "-m", "session_authority.examples._servers", service,
                 "--authority", authority_target, "--port-file", str(work / f"{service}.port")],
            )
            targets[service] = f"127.0.0.1:{children.wait_for_port(child, work / f'{service}.port', STARTUP_TIMEOUT_SECONDS)}"
        yield targets
    finally:
        children.stop_all()


def missing_prerequisite() -> str | None:
    """Return why client.js cannot run here, or None when Node.js and its packages are installed."""
    if shutil.which("node") is None:
        return "node is not on PATH; install Node.js 18 or newer to run the Node.js client test"
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        return "examples/node/node_modules is missing; run `npm ci --prefix examples/node` first"
    return None


@pytest.fixture(scope="module")
def node_result(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Run client.js once for the module, or return ``{"missing": reason}`` when it cannot run.

    The tests then fail with that reason (pytest would report a fixture
    failure as an error at setup), and never skip: CI installs the packages.
    """
    missing = missing_prerequisite()
    if missing is not None:
        return {"missing": missing}
    services: dict[str, str] = request.getfixturevalue("services")
    node = shutil.which("node")
    assert node is not None
    completed = subprocess.run(
        [node, str(NODE_DIR / "client.js"), "--authority", services["authority"], "--payments", services["payments"],
         "--telemetry", services["telemetry"], "--principal", "node-machine", "--tier", "payments"],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    assert completed.stdout.strip(), f"client.js printed nothing; exit status {completed.returncode}, stderr:\n{completed.stderr}"
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    result["exit_status"] = completed.returncode
    result["stderr"] = completed.stderr
    return result


def ran(node_result: dict[str, Any]) -> dict[str, Any]:
    """Return the client's result, or fail the test when client.js could not run."""
    if "missing" in node_result:
        pytest.fail(node_result["missing"])
    return node_result


def test_node_client_exits_zero(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    assert result["exit_status"] == 0, result
    assert result["ok"] is True


def test_node_grant_in_requested_tier(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    assert result["grant"] == {"code": "OK", "state": "LEASE_STATE_ALIVE", "tier": "payments", "principal": "node-machine"}
    assert len(result["fingerprint"]) == 12


def test_node_call_without_lease_unauthenticated(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    assert result["without_lease"]["code"] == "UNAUTHENTICATED"


def test_node_calls_with_lease_succeed(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    assert [(call["method"], call["code"]) for call in result["before_revoke"]] == [("Balance", "OK"), ("Transfer", "OK")]


def test_node_revoke_ends_lease(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    assert result["revoke"] == {"code": "OK", "state": "LEASE_STATE_ENDED", "end_reason": "END_REASON_REVOKED"}


def test_node_call_after_revoke_unauthenticated(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    after = result["after_revoke"]

    assert after["code"] == "UNAUTHENTICATED"
    assert after["session_end_reason"] == "revoked"


def test_node_stream_cut_off_by_revoke(node_result: dict[str, Any]) -> None:
    result = ran(node_result)

    stream = result["stream"]

    assert stream["code"] == "UNAUTHENTICATED"
    assert stream["session_end_reason"] == "revoked"
    assert stream["acks"] >= 1

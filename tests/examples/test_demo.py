"""The demo end to end: real processes on loopback, every session checked against its expected end."""

from __future__ import annotations

import io
import json
import pathlib
import subprocess
import sys
from typing import Any

import pytest

from session_authority.examples._demo import CUT_OFF_MACHINES, EXPECTED_ENDS, Demo, Narrator, check_results
from session_authority.examples._processes import ChildProcesses

DEMO_TIMEOUT_SECONDS = 60.0


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run ``session-authority demo`` once for the module and return its exit status, output and summary."""
    root = tmp_path_factory.mktemp("demo")
    work_dir = root / "work"
    summary_path = root / "summary.json"
    completed = subprocess.run(
        [sys.executable, "-m", "session_authority.clients._cli", "demo", "--work-dir", str(work_dir), "--json-summary", str(summary_path)],
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL,
    )
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return {"completed": completed, "summary": summary, "work_dir": work_dir}


def _session(demo_run: dict[str, Any], machine: str) -> dict[str, Any]:
    sessions = {session["machine"]: session for session in demo_run["summary"].get("sessions", [])}
    assert machine in sessions, f"no summary for {machine}; demo output:\n{demo_run['completed'].stdout}"
    return sessions[machine]


def test_demo_exits_zero(demo_run: dict[str, Any]) -> None:
    completed = demo_run["completed"]

    assert completed.returncode == 0, f"stdout:\n{completed.stdout}\nstderr:\n{completed.stderr}"
    assert demo_run["summary"]["failures"] == []


@pytest.mark.parametrize("machine", sorted(EXPECTED_ENDS))
def test_session_end_reason(demo_run: dict[str, Any], machine: str) -> None:
    session = _session(demo_run, machine)

    assert session["authority_end"] == EXPECTED_ENDS[machine]
    assert session["holder_end"] == EXPECTED_ENDS[machine]


@pytest.mark.parametrize("machine", sorted(CUT_OFF_MACHINES))
def test_stream_in_flight_cut_off(demo_run: dict[str, Any], machine: str) -> None:
    in_flight = _session(demo_run, machine)["in_flight"]

    assert in_flight is not None
    assert in_flight["code"] == "UNAUTHENTICATED"
    assert in_flight["trailer"] == EXPECTED_ENDS[machine]


@pytest.mark.parametrize("machine", sorted(EXPECTED_ENDS))
def test_one_audit_end_record(demo_run: dict[str, Any], machine: str) -> None:
    assert _session(demo_run, machine)["audit_end_records"] == [EXPECTED_ENDS[machine]]


@pytest.mark.parametrize("machine", sorted(EXPECTED_ENDS))
def test_one_end_span(demo_run: dict[str, Any], machine: str) -> None:
    assert _session(demo_run, machine)["end_spans"] == [EXPECTED_ENDS[machine]]


def test_transfer_past_max_session_age_denied(demo_run: dict[str, Any]) -> None:
    transfers = _session(demo_run, "max")["details"]["transfers"]

    assert [transfer["code"] for transfer in transfers] == ["OK", "PERMISSION_DENIED"]
    assert transfers[1]["trailer"] == "policy"


def test_watch_cli_prints_every_end(demo_run: dict[str, Any]) -> None:
    summary = demo_run["summary"]
    printed = {record["fingerprint"]: record["end_reason"] for record in summary["watch_cli"]}
    expected = {_session(demo_run, machine)["fingerprint"]: reason for machine, reason in EXPECTED_ENDS.items()}

    assert printed == expected
    assert summary["watch_cli_exit_status"] == 0


def test_watch_lines_narrated_before_demo_ends(demo_run: dict[str, Any]) -> None:
    lines = demo_run["completed"].stdout.splitlines()
    watch_lines = [index for index, line in enumerate(lines) if "watch | end" in line]
    stopped = next(index for index, line in enumerate(lines) if "stopped:" in line)

    assert len(watch_lines) == len(EXPECTED_ENDS)
    assert max(watch_lines) < stopped


def test_audit_verify_cli_passes(demo_run: dict[str, Any]) -> None:
    audit_dir: pathlib.Path = demo_run["work_dir"] / "data" / "audit"

    completed = subprocess.run(
        [sys.executable, "-m", "session_authority.clients._cli", "audit", "verify", str(audit_dir)],
        capture_output=True,
        text=True,
        timeout=30.0,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert demo_run["summary"]["audit"]["ok"] is True


def test_check_results_reports_wrong_end(tmp_path: pathlib.Path) -> None:
    demo = Demo(tmp_path, Narrator(io.StringIO()), ChildProcesses(tmp_path / "logs"))
    for name, reason in EXPECTED_ENDS.items():
        view = demo.machines[name]
        view.fingerprint = f"{name:0>12}"
        view.authority_end = reason
        view.result = {"end_reason": reason, "stream": {"code": "UNAUTHENTICATED", "trailer": reason, "details": ""}}
    demo.machines["idle"].authority_end = "released"

    sessions, failures = check_results(demo, {}, {}, audit_ok=True)

    assert len(sessions) == len(EXPECTED_ENDS)
    assert "idle: the authority ended it as released, expected idle_timeout" in failures

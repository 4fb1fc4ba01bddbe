"""Smoke test of the benchmark entry point: ``python -m bench --quick`` runs and prints its ratios.

It checks only that the benchmarks still run and print each figure beside its
baseline. It asserts no time or rate because those depend on the machine.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
RATIO_LINE = re.compile(r"^(?P<name>.+?) [0-9][0-9,.]*.* \| (?P<baseline>.+?) [0-9][0-9,.]*.* \| ratio [0-9]+\.[0-9]{2,3} ")


@pytest.mark.timeout(300)
def test_bench_quick_prints_ratios() -> None:
    command = [sys.executable, "-m", "bench", "--quick", "--only", "throughput", "scale"]
    if shutil.which("etcd") is None:
        command.append("--skip-etcd")

    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)

    output = finished.stdout
    assert finished.returncode == 0, f"exit status {finished.returncode}\nstdout:\n{output}\nstderr:\n{finished.stderr[-3000:]}"
    ratio_lines = [line for line in output.splitlines() if RATIO_LINE.match(line)]
    names = {RATIO_LINE.match(line).group("baseline") for line in ratio_lines}  # type: ignore[union-attr]
    assert "bare grpcio unary echo" in names, output
    assert "dict of slotted records + deadline heap" in names, output
    assert "p99 budget" in names, output
    if shutil.which("etcd") is not None:
        assert "etcd keep-alives/s" in names, output


@pytest.mark.timeout(300)
def test_bench_quick_enforcement_prints_ratios() -> None:
    command = [sys.executable, "-m", "bench", "--quick", "--only", "interceptors", "cutoff"]

    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=280, check=False)

    output = finished.stdout
    assert finished.returncode == 0, f"exit status {finished.returncode}\nstdout:\n{output}\nstderr:\n{finished.stderr[-3000:]}"
    assert "failed to run" not in output, output
    ratio_lines = [line for line in output.splitlines() if RATIO_LINE.match(line)]
    names = {RATIO_LINE.match(line).group("baseline") for line in ratio_lines}  # type: ignore[union-attr]
    assert "pass-through interceptor" in names, output
    assert "bare grpcio" in names, output
    assert "p99 budget" in names, output
    assert "bare grpcio aio server ending its own calls" in names, output


@pytest.mark.timeout(120)
def test_bench_quick_load_checks_pass() -> None:
    command = [sys.executable, "-m", "bench", "--quick", "--only", "load"]

    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=100, check=False)

    output = finished.stdout
    assert finished.returncode == 0, f"exit status {finished.returncode}\nstdout:\n{output}\nstderr:\n{finished.stderr[-3000:]}"
    lines = output.splitlines()
    assert not [line for line in lines if line.startswith("FAIL")], output
    passed = [line for line in lines if line.startswith("PASS ")]
    assert any(line.startswith("PASS calls admitted after the enforcer had learned their lease ended: 0 of") for line in passed), output
    assert any(line.startswith("PASS ended leases without an end record: 0 of") for line in passed), output
    assert "PASS leases with more than one end record: 0" in passed, output
    assert any(line.startswith("PASS audit verify: OK:") for line in passed), output
    assert any(line.startswith("PASS authority RSS after warm-up") for line in passed), output

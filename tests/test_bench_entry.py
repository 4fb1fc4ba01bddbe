"""End-to-end tests of ``python -m bench``: usage errors, interrupts and a child that dies mid-run.

Each test runs the entry point in a child process, with ``TMPDIR`` set to the
test's own directory, so the work directory it creates can be listed. The
stand-in benchmarks start ``python -m bench._echo``, a bare grpcio server
on a free loopback port, so no test runs a real measurement.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

DRIVER = """
import os
import signal
import sys
import time

from bench import __main__ as entry
from bench._common import ServerProcess, python_command


def echo_server(work_dir, port_file_name):
    written = work_dir / port_file_name
    return ServerProcess(python_command("bench._echo", "--port-file", str(written)), work_dir / "echo.port", work_dir / "echo.log")


def hold(options):
    with echo_server(options.work_dir, "echo.port") as server:
        print(f"child {server.process.pid}", flush=True)
        time.sleep(60)
    return []


def hang_in_start(options):
    # The echo writes its port to a file the ServerProcess does not wait for.
    with echo_server(options.work_dir, "elsewhere.port"):
        pass
    return []


def lose_child(options):
    with echo_server(options.work_dir, "echo.port") as server:
        print(f"child {server.process.pid}", flush=True)
        server.process.wait(timeout=30)
    return []


def named(options):
    print(f"ran {options.work_dir.name}", flush=True)
    return []


def one_figure(options):
    from bench._common import Figure

    return [
        Figure(name="rate", value=1.0, unit="", baseline_name="baseline", baseline=2.0, target=0.9),
        Figure(name="cost", value=1.0, unit="", baseline_name="baseline", baseline=2.0),
    ]


entry.BENCHMARKS = {
    "hold": ("holds an echo server until interrupted", hold),
    "hang-in-start": ("waits for a port file that never appears", hang_in_start),
    "lose-child": ("waits until its echo server dies", lose_child),
    "first": ("prints its name", named),
    "second": ("prints its name", named),
    "figure": ("returns a figure with a target and one without", one_figure),
}
# A test run started in the background (nohup, a CI runner) inherits SIGINT
# ignored. Each test sets the disposition a terminal run would have, or the
# ignored one on purpose.
if os.environ.get("DRIVER_SIGINT") == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
else:
    signal.signal(signal.SIGINT, signal.default_int_handler)
sys.exit(entry.main(sys.argv[1:]))
"""


def start_driver(tmp_path: pathlib.Path, *args: str, sigint: str = "default") -> subprocess.Popen[str]:
    environment = dict(os.environ, TMPDIR=str(tmp_path), DRIVER_SIGINT=sigint)
    return subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args],
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def read_child_pid(driver: subprocess.Popen[str]) -> int:
    assert driver.stdout is not None
    for line in driver.stdout:
        if line.startswith("child "):
            return int(line.split()[1])
    stderr = driver.stderr.read() if driver.stderr else ""
    raise AssertionError(f"the driver printed no child PID; stderr:\n{stderr}")


def is_running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_path(pattern: str, root: pathlib.Path, timeout_seconds: float) -> pathlib.Path:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no {pattern} under {root} within {timeout_seconds:g} s")


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def stop_leftover(pid: int) -> None:
    """Stop a child that the entry point failed to stop, so a failing test leaves nothing running."""
    if is_running(pid):
        os.kill(pid, signal.SIGTERM)


def test_only_repeated_name_is_usage_error(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "first", "first")
    stdout, stderr = driver.communicate(timeout=60)

    assert driver.returncode == 2
    assert stderr.splitlines()[-1].endswith("error: --only must name each benchmark once, got first more than once")
    assert "Traceback" not in stderr
    assert "ran " not in stdout
    assert list(tmp_path.iterdir()) == []


def test_only_given_twice_runs_both(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "second", "--only", "first")
    stdout, stderr = driver.communicate(timeout=60)

    assert driver.returncode == 0, stderr
    assert [line for line in stdout.splitlines() if line.startswith("ran ")] == ["ran second", "ran first"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_run_stops_children(tmp_path: pathlib.Path, signum: signal.Signals) -> None:
    driver = start_driver(tmp_path, "--only", "hold")
    child = read_child_pid(driver)

    driver.send_signal(signum)
    _, stderr = driver.communicate(timeout=60)
    leftover = is_running(child)
    stop_leftover(child)

    assert driver.returncode == 128 + signum, stderr
    assert not leftover, f"echo server {child} still running after {signum.name}"
    assert stderr.strip() == f"interrupted by {signum.name}, and every process this run started has been stopped"
    assert list(tmp_path.iterdir()) == []


def test_ignored_sigint_stays_ignored(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "hold", sigint="ignored")
    child = read_child_pid(driver)

    driver.send_signal(signal.SIGINT)
    time.sleep(0.5)
    still_running = driver.poll() is None
    driver.send_signal(signal.SIGTERM)
    _, stderr = driver.communicate(timeout=60)
    leftover = is_running(child)
    stop_leftover(child)

    assert still_running, f"the run ended on a SIGINT it inherited as ignored; stderr:\n{stderr}"
    assert driver.returncode == 128 + signal.SIGTERM, stderr
    assert not leftover, f"echo server {child} still running after SIGTERM"


def test_sigint_while_child_starts_stops_it(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "hang-in-start")
    wait_for_path("session-authority-bench-*/hang-in-start/elsewhere.port", tmp_path, 30.0)
    [child] = children_of(driver.pid)

    driver.send_signal(signal.SIGINT)
    _, stderr = driver.communicate(timeout=60)
    leftover = is_running(child)
    stop_leftover(child)

    assert driver.returncode == 130, stderr
    assert not leftover, f"echo server {child} still running after SIGINT during its start"
    assert list(tmp_path.iterdir()) == []


def test_killed_child_named_with_its_log(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "lose-child")
    child = read_child_pid(driver)

    os.kill(child, signal.SIGKILL)
    stdout, stderr = driver.communicate(timeout=60)

    assert driver.returncode == 1, stderr
    [failure] = [line for line in stdout.splitlines() if line.startswith("lose-child: failed to run: ")]
    assert f"bench._echo (PID {child}) was killed by SIGKILL before the benchmark stopped it. Its log: " in failure
    log_path = pathlib.Path(failure.rsplit("Its log: ", 1)[1])
    assert log_path.is_file()
    assert stdout.splitlines()[-1] == f"work directory kept for the logs of lose-child: {log_path.parent.parent}"


@pytest.mark.parametrize("profile", [False, True], ids=["plain", "profiled"])
def test_profiled_verdicts_marked(tmp_path: pathlib.Path, profile: bool) -> None:
    driver = start_driver(tmp_path, "--only", "figure", *(["--profile"] if profile else []))
    stdout, stderr = driver.communicate(timeout=60)

    assert driver.returncode == 0, stderr
    [rate] = [line for line in stdout.splitlines() if line.startswith("rate ")]
    [cost] = [line for line in stdout.splitlines() if line.startswith("cost ")]
    assert "(target >= 0.90: MISSED)" in rate
    assert rate.endswith("[profiled run: the verdict does not count]") is profile
    assert "profiled run" not in cost


def test_sigkill_stops_children(tmp_path: pathlib.Path) -> None:
    driver = start_driver(tmp_path, "--only", "hold")
    child = read_child_pid(driver)

    driver.kill()
    driver.communicate(timeout=60)
    deadline = time.monotonic() + 15.0
    while is_running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    leftover = is_running(child)
    stop_leftover(child)

    assert not leftover, f"echo server {child} still running 15 s after SIGKILL of the benchmark"

"""``python -m bench``: run the benchmarks and print each figure beside its baseline.

Each figure line reads ``NAME VALUE | BASELINE_NAME BASELINE | ratio R
(target ...)``. The baseline comes from the same run on the same machine, so
the ratio is the result; absolute numbers depend on the machine. The exit
status is 0 when every selected benchmark ran, whether or not its targets
were met, and 1 when one failed to run or when a PASS/FAIL check of the
load test failed. After a failure the work directory, with every child's
log, is kept and its path printed. SIGINT or SIGTERM stops every process
the run started, removes the work directory unless a benchmark failed, and
exits with 130 or 143.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import platform
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence

import grpc

from . import _authority_throughput, _etcd, _load_test, _replication, _scale
from ._common import Figure, Options

Benchmark = Callable[[Options], list[Figure]]


def optional_benchmark(module_name: str) -> Benchmark | None:
    """Return ``run`` of ``bench.<module_name>`` if that module exists, else None.

    The per-call enforcement cost and the cut-off latency benchmarks plug in
    here: each module defines ``run(options: Options) -> list[Figure]``.
    """
    if importlib.util.find_spec(f"bench.{module_name}") is None:
        return None
    return importlib.import_module(f"bench.{module_name}").run


BENCHMARKS: dict[str, tuple[str, Benchmark | None]] = {
    "interceptors": ("per-call enforcement cost (bench/_interceptors.py)", optional_benchmark("_interceptors")),
    "throughput": ("authority grant and renewal throughput", _authority_throughput.run),
    "scale": ("memory per lease and expiry timeliness", _scale.run),
    "cutoff": ("cut-off latency (bench/_cutoff.py)", optional_benchmark("_cutoff")),
    "load": ("bounded load test with PASS/FAIL checks (bench/_load_test.py)", optional_benchmark("_load_test")),
    "replication": ("authority replicas on etcd beside etcd's own leases and SQLite", _replication.run),
}


def machine_summary() -> str:
    """Describe the machine and the software versions in one line."""
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    binary = _etcd.etcd_binary()
    etcd = _etcd.etcd_version(binary) if binary else "etcd not installed"
    return (
        f"machine: {os.cpu_count()} cores, {model}; Python {platform.python_version()},"
        f" grpcio {grpc.__version__}; {etcd}; load average {os.getloadavg()[0]:.2f}"
    )


class Interrupted(BaseException):
    """The arrival of SIGINT or SIGTERM, raised so that every ``with`` block unwinds and stops its child.

    It derives from BaseException, like KeyboardInterrupt, so that the
    ``except Exception`` clauses of the benchmarks let it through.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum: int, frame: object) -> None:
    """Raise :class:`Interrupted`, and ignore further signals so that a second Ctrl-C cannot cut the clean-up short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short windows and 100,000 leases instead of 1,000,000 (a minute or two)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        action="extend",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)}), in the order given; default: all",
    )
    parser.add_argument("--skip-etcd", action="store_true", help="leave out the etcd baselines")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the authority under cProfile and print its hottest functions (slows it down)",
    )
    return parser


def parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line, exiting with status 2 on a usage error."""
    parser = build_parser()
    args = parser.parse_args(argv)
    repeated = sorted({name for name in args.only or [] if args.only.count(name) > 1})
    if repeated:
        parser.error(f"--only must name each benchmark once, got {', '.join(repeated)} more than once")
    return args


def run_benchmark(name: str, args: argparse.Namespace, work_dir: pathlib.Path) -> bool:
    """Run one benchmark and print its figures. Return False when it failed to run or a check failed."""
    description, benchmark = BENCHMARKS[name]
    if benchmark is None:
        print(f"== {name}: {description}: not built yet, skipped", flush=True)
        return True
    print(f"== {name}: {description}", flush=True)
    options = Options(quick=args.quick, skip_etcd=args.skip_etcd, work_dir=work_dir, profile=args.profile)
    options.work_dir.mkdir()
    started = time.monotonic()
    try:
        figures = benchmark(options)
    except _load_test.ChecksFailed as exc:
        print(f"{name}: FAIL: {exc}", flush=True)
        return False
    except Exception as exc:  # noqa: BLE001 - report the failure and go on with the next benchmark
        summary = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"{name}: failed to run: {summary}\n{traceback.format_exc()}", flush=True)
        return False
    for figure in figures:
        line = figure.line()
        if args.profile and figure.target is not None:
            # cProfile slows the profiled processes several times over, so
            # their figures cannot show whether the target is met.
            line += "  [profiled run: the verdict does not count]"
        print(line, flush=True)
    print(
        f"({name} took {time.monotonic() - started:.1f} s;"
        f" 1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)",
        flush=True,
    )
    return True


def run_selected(args: argparse.Namespace) -> int:
    """Run the selected benchmarks in one work directory, which is kept for the children's logs when one failed."""
    selected = args.only or list(BENCHMARKS)
    print(machine_summary(), flush=True)
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="session-authority-bench-"))
    failed: list[str] = []
    try:
        for name in selected:
            if not run_benchmark(name, args, work_dir / name):
                failed.append(name)
    finally:
        if failed:
            print(f"work directory kept for the logs of {', '.join(failed)}: {work_dir}", flush=True)
        else:
            shutil.rmtree(work_dir)
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(argv)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum, handler in previous.items():
        # A signal ignored at start (SIGINT of a background job) stays ignored.
        if handler is not signal.SIG_IGN:
            signal.signal(signum, raise_interrupted)
    try:
        return run_selected(args)
    except Interrupted as exc:
        print(
            f"interrupted by {signal.Signals(exc.signum).name}, and every process this run started has been stopped",
            file=sys.stderr,
            flush=True,
        )
        return 128 + exc.signum
    finally:
        for signum, handler in previous.items():
            # None stands for a handler that C code installed, which Python cannot reinstall.
            if handler is not None:
                signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: run the benchmarks and print each figure beside its baseline.

Each figure line reads ``NAME VALUE | BASELINE_NAME BASELINE | ratio R
(target ...)``. The baseline comes from the same run on the same machine, so
the ratio is the result; absolute numbers depend on the machine. The exit
status is 0 when every selected benchmark ran, whether or not its targets
were met, and 1 when one failed to run or when a PASS/FAIL check of the
load test failed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import pathlib
import platform
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="short windows and 100,000 leases instead of 1,000,000 (about a minute)"
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(BENCHMARKS)}); default: all",
    )
    parser.add_argument("--skip-etcd", action="store_true", help="leave out the etcd baselines")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the authority under cProfile and print its hottest functions (slows it down)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    selected = args.only or list(BENCHMARKS)
    print(machine_summary(), flush=True)
    failed = 0
    with tempfile.TemporaryDirectory(prefix="session-authority-bench-") as work_dir:
        for name in selected:
            description, benchmark = BENCHMARKS[name]
            if benchmark is None:
                print(f"== {name}: {description}: not built yet, skipped", flush=True)
                continue
            print(f"== {name}: {description}", flush=True)
            options = Options(
                quick=args.quick,
                skip_etcd=args.skip_etcd,
                work_dir=pathlib.Path(work_dir) / name,
                profile=args.profile,
            )
            options.work_dir.mkdir()
            started = time.monotonic()
            try:
                figures = benchmark(options)
            except _load_test.ChecksFailed as exc:
                failed += 1
                print(f"{name}: FAIL: {exc}", flush=True)
                continue
            except Exception:  # noqa: BLE001 - report the failure and go on with the next benchmark
                failed += 1
                print(f"{name}: failed to run:\n{traceback.format_exc()}", flush=True)
                continue
            for figure in figures:
                print(figure.line(), flush=True)
            print(
                f"({name} took {time.monotonic() - started:.1f} s;"
                f" 1-min load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Grant and renewal throughput of the authority beside a bare grpcio server and etcd.

Every server runs in its own process and so does every load client; each
client drives one server at a time. The authority is the real
``session-authority serve`` with its SQLite store in a temporary data
directory. Pairs of figures are measured in alternation, ``rounds`` times,
and the median of each is reported, so a slow spell on a shared machine
hits both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import io
import logging
import os
import pathlib
import pstats
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence

from . import _etcd
from ._common import Figure, Options, ServerProcess, python_command, run_json

logger = logging.getLogger(__name__)

POLICY = """\
version = 1
default_tier = "standard"

[tiers.standard]
idle_timeout = "5m"
max_duration = "8h"

# The benchmark grants thousands of leases per second from 64 principals, so
# the per-principal limits are lifted (0 means unlimited).
[limits]
max_live_leases_per_principal = 0
grants_per_second_per_principal = 0
"""

RENEWAL_BATCH = 1000
"""Renewal entries per KeepAlive message."""

GRANT_CONCURRENCY = 64
"""Unary calls in flight from the load client, for grants on every server."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one pass; ``--quick`` picks the small one."""

    seconds: float
    warmup_seconds: float
    rounds: int
    renewal_leases: int
    etcd_leases: int
    etcd_in_flight: int

    @classmethod
    def for_options(cls, options: Options) -> Plan:
        if options.quick:
            return cls(seconds=1.5, warmup_seconds=0.3, rounds=1, renewal_leases=2000, etcd_leases=500, etcd_in_flight=256)
        return cls(seconds=5.0, warmup_seconds=1.0, rounds=3, renewal_leases=10_000, etcd_leases=2000, etcd_in_flight=256)

    def timeout_seconds(self) -> float:
        """Upper bound on one load client's run, set-up included."""
        return 120.0 + self.warmup_seconds + self.seconds


def load(plan: Plan, kind: str, server: ServerProcess | _etcd.EtcdServer, *extra: str) -> dict:
    """Run one load client process against ``server`` and return its JSON result.

    The result gains ``server_cpu_per_operation``: the server's CPU time over
    the whole client run divided by every operation the client completed.
    A Python server also gets ``server_loop_cpu_per_operation``, the same
    for its main thread, which runs the event loop.
    """
    command = python_command(
        "bench._load",
        kind,
        "--target", server.target,
        "--seconds", str(plan.seconds),
        "--warmup", str(plan.warmup_seconds),
        *extra,
    )  # fmt: skip
    python_server = isinstance(server, ServerProcess)
    cpu_before = server.cpu_seconds()
    loop_cpu_before = server.cpu_seconds(main_thread=True) if python_server else 0.0
    result = run_json(command, plan.timeout_seconds())
    operations = max(1, result["all_operations"])
    result["server_cpu_per_operation"] = (server.cpu_seconds() - cpu_before) / operations
    if python_server:
        result["server_loop_cpu_per_operation"] = (server.cpu_seconds(main_thread=True) - loop_cpu_before) / operations
    return result


@contextlib.contextmanager
def authority_server(
    work_dir: pathlib.Path, name: str, profile_dir: pathlib.Path | None = None, *, without_store: bool = False
) -> Iterator[ServerProcess]:
    """Run ``session-authority serve`` with a fresh SQLite data directory, profiled into ``profile_dir`` if given.

    With ``without_store`` the authority keeps nothing on disk: no lease
    store and no audit log. It is a reference that splits the grant's cost
    between the call path and what makes a grant durable.
    """
    policy = work_dir / "policy.toml"
    policy.write_text(POLICY)
    serve_args = [
        "--insecure-dev",
        "--listen", "127.0.0.1:0",
        "--data-dir", str(work_dir / f"{name}-data"),
        "--policy", str(policy),
        "--port-file", str(work_dir / f"{name}.port"),
    ]  # fmt: skip
    if profile_dir is not None:
        command = python_command("bench._authority_throughput", "--profile-dir", str(profile_dir), *serve_args)
    elif without_store:
        command = python_command("bench._authority_throughput", "--without-store", *serve_args)
    else:
        command = python_command("session_authority.server._main", *serve_args)
    with ServerProcess(command, work_dir / f"{name}.port", work_dir / f"{name}.log") as server:
        yield server


@contextlib.contextmanager
def echo_server(work_dir: pathlib.Path) -> Iterator[ServerProcess]:
    command = python_command("bench._echo", "--port-file", str(work_dir / "echo.port"))
    with ServerProcess(command, work_dir / "echo.port", work_dir / "echo.log") as server:
        yield server


@contextlib.contextmanager
def etcd_server(options: Options) -> Iterator[_etcd.EtcdServer | None]:
    """Start etcd unless skipped; yield it, or None."""
    binary = _etcd.etcd_binary()
    if options.skip_etcd or binary is None:
        if binary is None and not options.skip_etcd:
            print("etcd: not installed (apt-get install etcd-server); its baselines are left out")
        yield None
        return
    with _etcd.EtcdServer(binary, options.work_dir) as server:
        yield server


PROFILED_THREADS = ("lease-store", "audit-sink")
"""Threads of the authority profiled besides the main thread, which runs the event loop."""

PROFILE_NOISE = (
    "builtins.compile", "marshal.loads", "_imp.create_dynamic", "__build_class__", "builtins.exec", "posix.stat"
)
"""Rows of start-up imports, left out of the printed profile."""


def serve_profiled(profile_dir: pathlib.Path, serve_args: Sequence[str]) -> int:
    """Run ``session-authority serve`` with a CPU-time profile of the main thread and of each writer thread.

    Each profile measures with ``time.thread_time``, the CPU time of the
    thread it profiles, so time spent waiting in ``epoll`` or for the GIL
    does not count. A wall-clock profile of the event loop shows it waiting
    in ``select`` and hides how busy it is. On exit, which SIGTERM causes,
    each thread's profile is written to ``<profile_dir>/<thread name>.prof``.
    """
    from session_authority.server._main import serve_main

    profile_dir.mkdir(parents=True, exist_ok=True)
    run_thread = threading.Thread.run

    def run_profiled(thread: threading.Thread) -> None:
        if thread.name not in PROFILED_THREADS:
            run_thread(thread)
            return
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            run_thread(thread)
        finally:
            profile.disable()
            profile.dump_stats(str(profile_dir / f"{thread.name}.prof"))

    threading.Thread.run = run_profiled  # type: ignore[method-assign]
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    try:
        return serve_main(list(serve_args))
    finally:
        profile.disable()
        profile.dump_stats(str(profile_dir / "main.prof"))


def serve_without_store(serve_args: Sequence[str]) -> int:
    """Run ``session-authority serve`` with ``serve_args``, but with no lease store and no audit log."""
    from session_authority.server._main import build_config, build_parser, run

    parser = build_parser()
    args = parser.parse_args(list(serve_args))
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = dataclasses.replace(build_config(args, parser), data_dir=None)
    asyncio.run(run(config, args.port_file))
    return 0


def print_profile(kind: str, profile_dir: pathlib.Path, top: int = 12) -> None:
    """Print the CPU time of each profiled thread of the authority and its functions with the most own time.

    Time inside grpcio's Cython callbacks shows as the own time of
    ``Context.run``. cProfile slows every profiled Python call, so the times
    are inflated, most in threads that make many small calls.
    """
    for thread in ("main", *PROFILED_THREADS):
        path = profile_dir / f"{thread}.prof"
        if not path.exists():
            print(f"profile of the {kind} authority, thread {thread}: {path} was not written")
            continue
        output = io.StringIO()
        stats = pstats.Stats(str(path), stream=output)
        stats.sort_stats("tottime").print_stats(top + len(PROFILE_NOISE))
        print(f"-- profile of the {kind} authority, thread {thread}: {stats.total_tt:.2f} s CPU; by own time:")
        table = output.getvalue()
        rows = table[table.index("ncalls") :].rstrip().splitlines() if "ncalls" in table else [table]
        kept = [row for row in rows if not any(noise in row for noise in PROFILE_NOISE)]
        print("\n".join(kept[: top + 1]))


def median_rate(results: list[dict]) -> float:
    return statistics.median(result["rate"] for result in results)


def median_cpu_microseconds(results: list[dict], key: str = "server_cpu_per_operation") -> float:
    return statistics.median(result[key] for result in results) * 1e6


def grant_figures(
    label: str, grants: list[dict], echoes: list[dict], *, target: float | None, note: str
) -> list[Figure]:
    """Return the grant rate and the server CPU per grant of one authority, each beside the bare echo's."""
    return [
        Figure(
            name=f"grant/s {label}",
            value=median_rate(grants),
            unit="",
            baseline_name="bare grpcio unary echo",
            baseline=median_rate(echoes),
            target=target,
            note=note,
        ),
        # CPU time per call does not depend on what else the machine runs,
        # so it separates the authority's own cost from a busy neighbour's.
        Figure(
            name=f"server CPU us/grant {label}",
            value=median_cpu_microseconds(grants),
            unit="",
            baseline_name="bare grpcio unary echo",
            baseline=median_cpu_microseconds(echoes),
            note="all server threads; lower is better",
        ),
    ]


def grant_loop_budget(label: str, grants: list[dict], echoes: list[dict], target: float) -> Figure:
    """Return the CPU the authority's event loop spends per grant beside one thread's time per grant at ``target``.

    Every grant passes through the event loop's one thread, which cannot
    run for more than a second per second. At ``target`` times the echo's
    rate it therefore has at most ``1 / (target * echo rate)`` per grant,
    whatever the other threads do. A ratio above 1 means that the target is
    out of reach until the loop's share of a grant shrinks.
    """
    allowed = 1e6 / (target * median_rate(echoes))
    echo_loop = median_cpu_microseconds(echoes, "server_loop_cpu_per_operation")
    return Figure(
        name=f"event loop CPU us/grant {label}",
        value=median_cpu_microseconds(grants, "server_loop_cpu_per_operation"),
        unit="",
        baseline_name=f"one thread's time per grant at {target:.2f} of the echo",
        baseline=allowed,
        note=f"the echo's event loop: {echo_loop:.0f} us/call; above 1 the target is out of reach here",
    )


def grant_cpu_budget(label: str, grants: list[dict], echoes: list[dict], target: float) -> Figure:
    """Return the authority's server CPU per grant beside the most it may spend to reach ``target`` here.

    Client and server share this machine's cores. When the echo run keeps
    them all busy, as it does on a small machine, the rate is bounded by the
    CPU that one call costs the two processes together. So a server that
    reaches ``target`` times the echo's rate may spend at most ``cores /
    (target * echo rate)`` per call, less the client's own CPU per call. A
    ratio above 1 means that the target is out of reach on this machine
    until a grant costs less CPU, however the work is spread over threads
    or processes.
    """
    cores = len(os.sched_getaffinity(0))
    echo_rate = median_rate(echoes)
    client = median_cpu_microseconds(grants, "client_cpu_per_operation")
    echo_busy = echo_rate * (
        median_cpu_microseconds(echoes) + median_cpu_microseconds(echoes, "client_cpu_per_operation")
    ) / 1e6 / cores
    budget = cores / (target * echo_rate) * 1e6 - client
    return Figure(
        name=f"server CPU us/grant {label}",
        value=median_cpu_microseconds(grants),
        unit="",
        baseline_name=f"CPU budget for {target:.2f} of the echo",
        baseline=budget,
        note=(
            f"budget = {cores} cores / ({target:.2f} x echo rate) - client CPU {client:.0f} us/grant;"
            f" the echo run kept {echo_busy:.0%} of the cores busy; above 1 the target is out of reach here"
        ),
    )


def run(options: Options) -> list[Figure]:
    """Measure grants and renewals; return the figures."""
    plan = Plan.for_options(options)
    grants: list[dict] = []
    echoes: list[dict] = []
    grants_without_store: list[dict] = []
    renewals: list[dict] = []
    etcd_grants: list[dict] = []
    etcd_keepalives: list[dict] = []
    concurrency = ["--concurrency", str(GRANT_CONCURRENCY)]

    profiles: dict[str, pathlib.Path] = {}
    if options.profile:
        profiles = {kind: options.work_dir / f"{kind}-profile" for kind in ("grants", "renewals")}
    with contextlib.ExitStack() as stack:
        # Grants and renewals each get their own authority, so neither
        # measures a table that the other one filled.
        grant_authority = stack.enter_context(authority_server(options.work_dir, "grants", profiles.get("grants")))
        renewal_authority = stack.enter_context(
            authority_server(options.work_dir, "renewals", profiles.get("renewals"))
        )
        authority_without_store = stack.enter_context(
            authority_server(options.work_dir, "without-store", without_store=True)
        )
        echo = stack.enter_context(echo_server(options.work_dir))
        etcd = stack.enter_context(etcd_server(options))
        for _ in range(plan.rounds):
            echoes.append(load(plan, "grant", echo, *concurrency))
            grants.append(load(plan, "grant", grant_authority, *concurrency))
            grants_without_store.append(load(plan, "grant", authority_without_store, *concurrency))
            renewals.append(
                load(
                    plan, "keepalive", renewal_authority,
                    "--leases", str(plan.renewal_leases),
                    "--batch", str(RENEWAL_BATCH),
                    "--in-flight", "4",
                    "--lease-file", str(options.work_dir / "renewal-leases.txt"),
                )  # fmt: skip
            )
            if etcd is not None:
                etcd_grants.append(load(plan, "etcd-grant", etcd, *concurrency))
                etcd_keepalives.append(
                    load(
                        plan, "etcd-keepalive", etcd,
                        "--leases", str(plan.etcd_leases),
                        "--in-flight", str(plan.etcd_in_flight),
                    )  # fmt: skip
                )
    for kind, path in profiles.items():
        print_profile(kind, path)

    not_alive = sum(result.get("not_alive", 0) for result in renewals + etcd_keepalives)
    if not_alive:
        raise RuntimeError(
            f"{not_alive} renewal replies reported a lease as not alive, so the renewal figures are invalid;"
            " check the authority log in the work directory"
        )

    grant_rate = median_rate(grants)
    renewal_rate = median_rate(renewals)
    figures = grant_figures(
        "sqlite", grants, echoes, target=0.80, note=f"{GRANT_CONCURRENCY} in flight, median of {plan.rounds}"
    )
    # No target: these split the gap above into the call path (gRPC, the
    # handler, the lease table) and the store and audit writes.
    figures += grant_figures(
        "without store or audit log", grants_without_store, echoes, target=None, note="reference: nothing kept on disk"
    )
    # Two bounds that the grant target must fit within on this machine: the
    # CPU of all processes, and the time of the authority's event loop.
    figures += [
        grant_cpu_budget("sqlite", grants, echoes, 0.80),
        grant_cpu_budget("without store or audit log", grants_without_store, echoes, 0.80),
        grant_loop_budget("sqlite", grants, echoes, 0.80),
        grant_loop_budget("without store or audit log", grants_without_store, echoes, 0.80),
    ]
    if etcd_grants:
        figures.append(
            Figure(
                name="grant/s sqlite",
                value=grant_rate,
                unit="",
                baseline_name="etcd lease grants/s",
                baseline=median_rate(etcd_grants),
                note=f"{GRANT_CONCURRENCY} in flight",
            )
        )
    if etcd_keepalives:
        figures.append(
            Figure(
                name=f"renewals/s keep-alive ({RENEWAL_BATCH:,}/msg)",
                value=renewal_rate,
                unit="",
                baseline_name="etcd keep-alives/s",
                baseline=median_rate(etcd_keepalives),
                target=3.0,
                note=(
                    f"one client process each; etcd {plan.etcd_in_flight} requests ahead on one stream;"
                    f" client CPU us/renewal {median_cpu_microseconds(renewals, 'client_cpu_per_operation'):.1f}"
                    f" vs etcd {median_cpu_microseconds(etcd_keepalives, 'client_cpu_per_operation'):.0f};"
                    f" etcd server CPU us/keep-alive {median_cpu_microseconds(etcd_keepalives):.0f}"
                    " (with its set-up grants)"
                ),
            )
        )
    else:
        print(f"renewals/s keep-alive ({RENEWAL_BATCH:,}/msg) {renewal_rate:,.0f} (no etcd baseline in this run)")
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    """Run an authority for the benchmark: ``python -m bench._authority_throughput (--profile-dir DIR | --without-store) SERVE_ARGS...``."""
    parser = argparse.ArgumentParser(
        prog="python -m bench._authority_throughput",
        description=(
            "Run session-authority serve with a CPU-time profile per thread (for python -m bench --profile),"
            " or without a lease store and audit log (the benchmark's reference)."
        ),
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--profile-dir", type=pathlib.Path, help="directory for the .prof files")
    mode.add_argument("--without-store", action="store_true", help="keep no lease store and no audit log")
    arguments, serve_args = parser.parse_known_args(argv)
    if arguments.without_store:
        return serve_without_store(serve_args)
    return serve_profiled(arguments.profile_dir, serve_args)


if __name__ == "__main__":
    sys.exit(main())

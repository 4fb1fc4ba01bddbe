"""Authority replicas on etcd: expiry timeliness and throughput beside etcd's own leases and the SQLite store.

Three measurements share one single-member etcd on loopback:

- etcd's native lease expiry: leases with a key attached and a TTL of 1 or
  2 s, watched under their prefix. The delay runs from the expected expiry
  (the grant reply's arrival plus the TTL that etcd granted) to the arrival
  of the key's DELETE event at the watcher.
- grant and renewal throughput of ``session-authority serve --store etcd``,
  measured with the load clients of ``_authority_throughput`` and
  alternated with the SQLite authority and with etcd's own lease grants and
  keep-alives in the same run.
- expiry timeliness of the authority on each store: leases with a 2 s idle
  timeout and no activity, and a ``WatchSessionEnds`` stream. The delay runs
  from the expected deadline (the grant reply's arrival plus its TTL) to
  the arrival of the lease's end on the stream.

Each deadline is estimated when the grant reply is read, which is after
the server fixed the deadline. The estimate is therefore late by the store
write that precedes the reply, by the reply's transit and by any wait
before the client thread reads it, and every delay reads short by as much.
That is a millisecond or two on an idle machine and more on a busy one,
where a delay can read below zero. The same kind of error applies to
etcd's leases and to the authority's.

Each expiry measurement runs in a child process (``python -m
bench._replication KIND --target HOST:PORT --leases N``) that prints its
delays as JSON, like the load clients of the other benchmarks.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import pathlib
import queue
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from . import _authority_throughput as throughput
from . import _etcd
from ._common import Figure, Options, ServerProcess, python_command, run_json
from ._scale import P99_TARGET_SECONDS, percentile

logger = logging.getLogger(__name__)

POLICY = (
    throughput.POLICY
    + """
# Leases that end by themselves 2 s after their grant, for the expiry delays.
# That matches the etcd leases, for which etcd 3.4 with its default election
# timeout granted 2 s when 1 s was requested (the benchmark prints the TTLs).
[tiers.brief]
idle_timeout = "2s"
max_duration = "1m"
"""
)

ETCD_EXPIRY_PREFIX = b"/bench-expiry/"
EVENT_TYPE_DELETE = 1
"""Value of ``mvccpb.Event.EventType.DELETE`` in etcd's ``kv.proto``."""

GRANT_WORKERS = 4
"""Threads that grant the timed leases.

More threads grant faster but delay the reading of each reply on a busy
machine, and every such delay makes the deadline estimate late.
"""

END_WAIT_SLACK_SECONDS = 10.0
"""Wait beyond the last expected deadline before the ends still missing are given up on."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one pass. ``--quick`` picks the small one."""

    expiring_leases: int

    @classmethod
    def for_options(cls, options: Options) -> Plan:
        # NOTE: on a busy machine 1,000 grants can take longer than the 2 s
        # lifetime, so the first ends then overlap the last grants. The
        # figures print how long the grants took.
        return cls(expiring_leases=200 if options.quick else 1000)


@dataclasses.dataclass
class Delays:
    """Delays from deadlines to the ends seen, and how many ends were expected."""

    seconds: list[float]
    expected: int
    grant_seconds: float
    """Seconds the grants took, over which the deadlines spread."""

    @property
    def missing(self) -> int:
        return self.expected - len(self.seconds)

    def at(self, fraction: float) -> float:
        ordered = sorted(self.seconds)
        return percentile(ordered, fraction) if ordered else float("nan")

    @classmethod
    def from_json(cls, result: dict) -> Delays:
        return cls(
            seconds=[float(value) for value in result["delays"]],
            expected=int(result["expected"]),
            grant_seconds=float(result["grant_seconds"]),
        )

    def to_json(self) -> dict[str, object]:
        return {"delays": self.seconds, "expected": self.expected, "grant_seconds": self.grant_seconds}


def grant_all(count: int, grant_one: Callable[[int], tuple[str, float]]) -> tuple[dict[str, float], float]:
    """Call ``grant_one(index)`` for every index on :data:`GRANT_WORKERS` threads.

    Returns:
        Each granted key (a lease digest or an etcd key) with its expected
        deadline on this process's monotonic clock, and the seconds the
        grants took.
    """
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(max_workers=GRANT_WORKERS) as pool:
        deadlines = dict(pool.map(grant_one, range(count)))
    return deadlines, time.monotonic() - started


def collect_delays(
    deadlines: dict[str, float], grant_seconds: float, seen: dict[str, float], seen_all: threading.Event
) -> Delays:
    """Wait for every end, then pair each end's arrival with its key's deadline."""
    last_deadline = max(deadlines.values(), default=time.monotonic())
    seen_all.wait(max(0.0, last_deadline - time.monotonic()) + END_WAIT_SLACK_SECONDS)
    delays = [seen[key] - deadline for key, deadline in deadlines.items() if key in seen]
    return Delays(seconds=delays, expected=len(deadlines), grant_seconds=grant_seconds)


# -- etcd's native lease expiry -------------------------------------------------


def measure_etcd_expiry(target: str, leases: int) -> dict[str, object]:
    """Time etcd's own expiry of ``leases`` leases with a key each, and return the delays and the TTLs granted."""
    rpc_pb2, rpc_pb2_grpc = _etcd.load_stubs()
    prefix_end = ETCD_EXPIRY_PREFIX[:-1] + bytes([ETCD_EXPIRY_PREFIX[-1] + 1])
    seen: dict[str, float] = {}
    seen_all = threading.Event()
    granted_ttls: list[int] = []

    with grpc.insecure_channel(target) as channel:
        requests: queue.Queue[object] = queue.Queue()
        create = rpc_pb2.WatchCreateRequest(key=ETCD_EXPIRY_PREFIX, range_end=prefix_end)
        requests.put(rpc_pb2.WatchRequest(create_request=create))
        watch = rpc_pb2_grpc.WatchStub(channel).Watch(iter(requests.get, None))
        created = threading.Event()

        def read_events() -> None:
            try:
                for reply in watch:
                    arrived = time.monotonic()
                    if reply.created:
                        created.set()
                    for event in reply.events:
                        if event.type == EVENT_TYPE_DELETE:
                            seen[event.kv.key.decode()] = arrived
                    if len(seen) >= leases:
                        seen_all.set()
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    logger.warning("etcd watch failed: %s", exc.code().name)

        reader = threading.Thread(target=read_events, name="etcd-expiry-watch", daemon=True)
        reader.start()
        if not created.wait(10.0):
            raise RuntimeError(f"etcd on {target} did not confirm the watch on {ETCD_EXPIRY_PREFIX!r} within 10 s")

        lease_stub = rpc_pb2_grpc.LeaseStub(channel)
        kv_stub = rpc_pb2_grpc.KVStub(channel)

        def grant_one(index: int) -> tuple[str, float]:
            # Request TTLs of 1 and 2 s. etcd raises a TTL below its minimum, so the deadline uses the TTL in the reply.
            reply = lease_stub.LeaseGrant(rpc_pb2.LeaseGrantRequest(TTL=1 + index % 2), timeout=10.0)
            deadline = time.monotonic() + reply.TTL
            granted_ttls.append(reply.TTL)
            key = ETCD_EXPIRY_PREFIX + f"{index:06d}".encode()
            kv_stub.Put(rpc_pb2.PutRequest(key=key, lease=reply.ID), timeout=10.0)
            return key.decode(), deadline

        deadlines, grant_seconds = grant_all(leases, grant_one)
        delays = collect_delays(deadlines, grant_seconds, seen, seen_all)
        watch.cancel()
        requests.put(None)
        reader.join(timeout=5.0)
    return {**delays.to_json(), "granted_ttls": sorted(set(granted_ttls))}


# -- the authority's own expiry -----------------------------------------------


def measure_authority_expiry(target: str, leases: int) -> dict[str, object]:
    """Time the authority's idle expiry of ``leases`` leases of tier ``brief``, seen on ``WatchSessionEnds``."""
    seen: dict[str, float] = {}
    seen_all = threading.Event()

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        watch = stub.WatchSessionEnds(pb.WatchSessionEndsRequest())
        first_reply = threading.Event()

        def read_ends() -> None:
            try:
                for reply in watch:
                    arrived = time.monotonic()
                    first_reply.set()
                    if reply.WhichOneof("event") == "end":
                        seen[reply.end.lease.digest] = arrived
                        if len(seen) >= leases:
                            seen_all.set()
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.CANCELLED:
                    logger.warning("WatchSessionEnds on %s failed: %s", target, exc.code().name)

        reader = threading.Thread(target=read_ends, name="authority-expiry-watch", daemon=True)
        reader.start()
        # The first heartbeat shows that the stream is open, so no end can be missed.
        if not first_reply.wait(10.0):
            raise RuntimeError(f"the authority on {target} sent no heartbeat on WatchSessionEnds within 10 s")

        def grant_one(index: int) -> tuple[str, float]:
            request = pb.GrantRequest(principal=f"expiry-{index % 64:02d}", tier="brief")
            reply = stub.Grant(request, timeout=10.0)
            deadline = time.monotonic() + reply.lease.ttl.ToTimedelta().total_seconds()
            return reply.lease.digest, deadline

        deadlines, grant_seconds = grant_all(leases, grant_one)
        delays = collect_delays(deadlines, grant_seconds, seen, seen_all)
        watch.cancel()
        reader.join(timeout=5.0)
    return delays.to_json()


# -- processes ------------------------------------------------------------------


@contextlib.contextmanager
def sqlite_authority(work_dir: pathlib.Path, name: str) -> Iterator[ServerProcess]:
    """Run ``session-authority serve`` on a fresh SQLite data directory with this module's policy."""
    with authority_process(work_dir, name, []) as server:
        yield server


@contextlib.contextmanager
def etcd_authority(work_dir: pathlib.Path, name: str, endpoint: str) -> Iterator[ServerProcess]:
    """Run ``session-authority serve --store etcd`` as replica ``name`` under its own key prefix.

    Each authority gets its own prefix, so no two of them mirror each other's leases.
    """
    store_args = [
        "--store", "etcd",
        "--etcd-endpoints", endpoint,
        "--replica-id", name,
        "--etcd-prefix", f"/bench-{name}/",
    ]  # fmt: skip
    with authority_process(work_dir, name, store_args) as server:
        yield server


@contextlib.contextmanager
def authority_process(work_dir: pathlib.Path, name: str, store_args: list[str]) -> Iterator[ServerProcess]:
    policy = work_dir / "replication-policy.toml"
    policy.write_text(POLICY)
    command = python_command(
        "session_authority.server._main",
        "--insecure-dev",
        "--listen", "127.0.0.1:0",
        "--data-dir", str(work_dir / f"{name}-data"),
        "--policy", str(policy),
        "--port-file", str(work_dir / f"{name}.port"),
        *store_args,
    )  # fmt: skip
    with ServerProcess(command, work_dir / f"{name}.port", work_dir / f"{name}.log") as server:
        yield server


def expiry_in_child(kind: str, target: str, leases: int) -> dict:
    """Run one expiry measurement in a child process and return its JSON result."""
    return run_json(python_command("bench._replication", kind, "--target", target, "--leases", str(leases)), 120.0)


# -- figures --------------------------------------------------------------------


def delay_figures(label: str, delays: Delays, note: str, *, with_target: bool) -> list[Figure]:
    """Return p50, p99 and max of ``delays`` in milliseconds, each beside the p99 budget.

    With ``with_target`` the p99 must stay under the budget. etcd's own
    leases get no target, because the authority does not rely on them.
    """
    if delays.missing:
        print(f"replication: {delays.missing} of {delays.expected} ends of {label} were not seen within the wait")
    note = f"{note}; grants took {delays.grant_seconds:.2f} s"
    if delays.at(0.0) < 0:
        note += "; below 0: the end came before the deadline as estimated from the late grant reply"
    figures = []
    for name, fraction in (("p50", 0.50), ("p99", 0.99), ("max", 1.0)):
        figures.append(
            Figure(
                name=f"{label} expiry delay {name} ({delays.expected:,} leases)",
                value=delays.at(fraction) * 1e3,
                unit=" ms",
                baseline_name="p99 budget",
                baseline=P99_TARGET_SECONDS * 1e3,
                target=1.0 if with_target and name == "p99" else None,
                target_op="<",
                note=note if name == "max" else "",
            )
        )
    return figures


def rate_figure(name: str, value: float, baseline_name: str, baseline: float, note: str = "") -> Figure:
    return Figure(name=name, value=value, unit="", baseline_name=baseline_name, baseline=baseline, note=note)


def measure_throughput(options: Options, etcd: _etcd.EtcdServer) -> list[Figure]:
    """Alternate grant and renewal loads on both stores and on etcd itself, and return the rate figures."""
    loads = throughput.Plan.for_options(options)
    concurrency = ["--concurrency", str(throughput.GRANT_CONCURRENCY)]
    endpoint = f"http://{etcd.target}"
    results: dict[str, list[dict]] = {
        key: []
        for key in ("sqlite grants", "etcd store grants", "sqlite renewals", "etcd store renewals", "etcd grants", "etcd keep-alives")
    }

    def renew(server: ServerProcess, name: str) -> dict:
        return throughput.load(
            loads, "keepalive", server,
            "--leases", str(loads.renewal_leases),
            "--batch", str(throughput.RENEWAL_BATCH),
            "--in-flight", "4",
            "--lease-file", str(options.work_dir / f"{name}-leases.txt"),
        )  # fmt: skip

    with contextlib.ExitStack() as stack:
        sqlite_grants = stack.enter_context(sqlite_authority(options.work_dir, "sqlite-grants"))
        sqlite_renewals = stack.enter_context(sqlite_authority(options.work_dir, "sqlite-renewals"))
        etcd_grants = stack.enter_context(etcd_authority(options.work_dir, "etcd-grants", endpoint))
        etcd_renewals = stack.enter_context(etcd_authority(options.work_dir, "etcd-renewals", endpoint))
        for _ in range(loads.rounds):
            results["sqlite grants"].append(throughput.load(loads, "grant", sqlite_grants, *concurrency))
            results["etcd store grants"].append(throughput.load(loads, "grant", etcd_grants, *concurrency))
            results["sqlite renewals"].append(renew(sqlite_renewals, "sqlite-renewals"))
            results["etcd store renewals"].append(renew(etcd_renewals, "etcd-renewals"))
            results["etcd grants"].append(
                throughput.load(loads, "etcd-grant", etcd, *concurrency)
            )
            results["etcd keep-alives"].append(
                throughput.load(
                    loads, "etcd-keepalive", etcd,
                    "--leases", str(loads.etcd_leases),
                    "--in-flight", str(loads.etcd_in_flight),
                )  # fmt: skip
            )

    not_alive = sum(result.get("not_alive", 0) for key in ("sqlite renewals", "etcd store renewals") for result in results[key])
    if not_alive:
        raise RuntimeError(
            f"{not_alive} renewal replies reported a lease as not alive, so the renewal figures are invalid."
            " Check the authority logs in the work directory"
        )
    rates = {key: statistics.median(result["rate"] for result in values) for key, values in results.items()}
    grants_note = f"{throughput.GRANT_CONCURRENCY} in flight, median of {loads.rounds}"
    renewals = f"renewals/s etcd store ({throughput.RENEWAL_BATCH:,}/msg)"
    return [
        rate_figure("grant/s etcd store", rates["etcd store grants"], "grant/s sqlite", rates["sqlite grants"], grants_note),
        rate_figure("grant/s etcd store", rates["etcd store grants"], "etcd lease grants/s", rates["etcd grants"], grants_note),
        rate_figure(
            renewals, rates["etcd store renewals"],
            f"renewals/s sqlite ({throughput.RENEWAL_BATCH:,}/msg)", rates["sqlite renewals"],
            f"median of {loads.rounds}",
        ),  # fmt: skip
        rate_figure(
            renewals, rates["etcd store renewals"], "etcd keep-alives/s", rates["etcd keep-alives"],
            f"etcd {loads.etcd_in_flight} requests ahead on one stream, median of {loads.rounds}",
        ),  # fmt: skip
    ]


def run(options: Options) -> list[Figure]:
    """Measure etcd's expiry, then throughput and expiry of the authority on etcd and on SQLite, and return the figures."""
    binary = _etcd.etcd_binary()
    if options.skip_etcd or binary is None:
        reason = "--skip-etcd given" if options.skip_etcd else "etcd is not installed (apt-get install etcd-server)"
        print(f"replication: {reason}; every figure of this benchmark needs etcd, so none is printed")
        return []
    plan = Plan.for_options(options)

    with contextlib.ExitStack() as stack:
        etcd = stack.enter_context(throughput.etcd_server(options))
        assert etcd is not None, "etcd_server yields None only without etcd, checked above"
        etcd_expiry = expiry_in_child("etcd-expiry", etcd.target, plan.expiring_leases)
        rate_figures = measure_throughput(options, etcd)
        sqlite_expiry_authority = stack.enter_context(sqlite_authority(options.work_dir, "sqlite-expiry"))
        etcd_expiry_authority = stack.enter_context(
            etcd_authority(options.work_dir, "etcd-expiry", f"http://{etcd.target}")
        )
        sqlite_expiry = expiry_in_child("authority-expiry", sqlite_expiry_authority.target, plan.expiring_leases)
        authority_expiry = expiry_in_child("authority-expiry", etcd_expiry_authority.target, plan.expiring_leases)

    etcd_delays = Delays.from_json(etcd_expiry)
    authority_delays = Delays.from_json(authority_expiry)
    granted = " and ".join(str(ttl) for ttl in etcd_expiry["granted_ttls"])
    figures = delay_figures(
        "etcd native lease", etcd_delays, f"TTLs asked 1 and 2 s, granted {granted} s", with_target=False
    )
    figures += rate_figures
    authority_note = "idle timeout 2 s, seen on WatchSessionEnds"
    figures += delay_figures("sqlite authority", Delays.from_json(sqlite_expiry), authority_note, with_target=True)
    figures += delay_figures("etcd store authority", authority_delays, authority_note, with_target=True)
    figures.append(
        rate_figure(
            "etcd store authority expiry delay p99 ms",
            authority_delays.at(0.99) * 1e3,
            "etcd native lease expiry delay p99 ms",
            etcd_delays.at(0.99) * 1e3,
        )
    )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._replication", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["etcd-expiry", "authority-expiry"])
    parser.add_argument("--target", required=True, help="HOST:PORT of etcd (etcd-expiry) or of the authority")
    parser.add_argument("--leases", type=int, default=1000, help="number of leases to grant and time")
    args = parser.parse_args()
    if args.leases < 1:
        parser.error(f"--leases must be at least 1, got {args.leases}")
    if args.kind == "etcd-expiry":
        result = measure_etcd_expiry(args.target, args.leases)
    else:
        result = measure_authority_expiry(args.target, args.leases)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Memory per live lease and expiry timeliness of the lease table, in process, without gRPC.

Each measurement runs in a fresh child process (``python -m bench._scale
KIND --leases N``) so that one measurement's freed memory does not hide in
the next one's RSS. RSS is read from ``/proc/self/statm`` after a full
garbage collection, before and after the leases are created.

Timeliness: among the live leases, ``ENDING`` leases get idle deadlines
spread evenly over one second a few seconds ahead. The real
``ExpiryScheduler`` on the system clock ends them. For each end, a table
listener records how long after the lease's deadline it was notified.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import tracemalloc

from session_authority.server import LeaseTable, SystemClock
from session_authority.server._scheduler import ExpiryScheduler
from session_authority.server._table import SessionEnd, lease_digest

from ._common import Figure, Options, python_command, run_json

ENDING = 10_000
"""Leases that end within the same second."""

LEAD_SECONDS = 2.0
"""Time between the end of set-up and the first of the timed deadlines."""

BYTES_TARGET = 512
P99_TARGET_SECONDS = 0.020


def rss_bytes() -> int:
    """Return this process's resident set size after a full garbage collection."""
    gc.collect()
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


class CollectionTimer:
    """Records the longest garbage collection pause while installed in ``gc.callbacks``."""

    def __init__(self) -> None:
        self.started = 0.0
        self.longest_seconds = 0.0
        self.longest_generation = -1
        self.collections = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        self.collections += 1
        pause = time.perf_counter() - self.started
        if pause > self.longest_seconds:
            self.longest_seconds = pause
            self.longest_generation = info["generation"]


class EndRecorder:
    """A table listener that stores, per end, the delay between deadline and notice."""

    def __init__(self, expected: int) -> None:
        self.delays: list[float] = []
        self.expected = expected
        self.all_seen = threading.Event()

    def on_grant(self, lease: object) -> None:
        pass

    def on_end(self, end: SessionEnd) -> None:
        self.delays.append(time.monotonic() - end.ended_at)
        if len(self.delays) >= self.expected:
            self.all_seen.set()


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def measure_table(leases: int, ending: int) -> dict[str, float]:
    """Fill a ``LeaseTable`` with ``leases`` live leases, then time the end of ``ending`` of them."""
    clock = SystemClock()
    table = LeaseTable(clock)
    recorder = EndRecorder(ending)
    table.add_listener(recorder)
    before = rss_bytes()

    for index in range(leases - ending):
        table.grant(f"principal-{index % 1000}", "standard", 3600.0, 28800.0)
    first_deadline = clock.monotonic() + LEAD_SECONDS + ending * 20e-6
    for index in range(ending):
        deadline = first_deadline + index / ending
        table.grant(f"principal-{index % 1000}", "short", deadline - clock.monotonic(), 28800.0)
    after = rss_bytes()

    collections = CollectionTimer()
    gc.callbacks.append(collections)
    scheduler = ExpiryScheduler(table)
    scheduler.start()
    # Bounded wait: the last deadline plus ten seconds of slack.
    recorder.all_seen.wait(max(0.0, first_deadline + 1.0 - clock.monotonic()) + 10.0)
    scheduler.stop()
    gc.callbacks.remove(collections)
    load_average = os.getloadavg()[0]

    delays = sorted(recorder.delays)
    return {
        "leases": leases,
        "bytes_per_lease": (after - before) / leases,
        "ended": len(delays),
        "p50": percentile(delays, 0.50) if delays else float("nan"),
        "p99": percentile(delays, 0.99) if delays else float("nan"),
        "max": delays[-1] if delays else float("nan"),
        "gc_collections": collections.collections,
        "gc_longest_pause": collections.longest_seconds,
        "gc_longest_generation": collections.longest_generation,
        "load_average": load_average,
    }


class MinimalRecord:
    """The smallest useful lease record: who, which tier, and the three times that decide its end."""

    __slots__ = ("principal", "tier", "granted_at", "last_activity", "idle_timeout")

    def __init__(self, principal: str, tier: str, granted_at: float, idle_timeout: float) -> None:
        self.principal = principal
        self.tier = tier
        self.granted_at = granted_at
        self.last_activity = granted_at
        self.idle_timeout = idle_timeout


def measure_minimal(leases: int) -> dict[str, float]:
    """Measure a dict of slotted records keyed by SHA-256 digest plus a heap of deadlines."""
    import heapq
    import secrets

    records: dict[bytes, MinimalRecord] = {}
    heap: list[tuple[float, bytes]] = []
    principals = [f"principal-{index}" for index in range(1000)]
    before = rss_bytes()
    for index in range(leases):
        digest = lease_digest(secrets.token_urlsafe(16))
        now = time.monotonic()
        records[digest] = MinimalRecord(principals[index % 1000], "standard", now, 3600.0)
        heapq.heappush(heap, (now + 3600.0, digest))
    after = rss_bytes()
    return {"leases": leases, "bytes_per_lease": (after - before) / leases}


def profile_table(leases: int, top: int = 12) -> list[str]:
    """Return the allocation sites that hold the most memory after ``leases`` grants."""
    table = LeaseTable(SystemClock())
    gc.collect()
    tracemalloc.start()
    for index in range(leases):
        table.grant(f"principal-{index % 1000}", "standard", 3600.0, 28800.0)
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    tracemalloc.stop()
    lines = []
    for stat in snapshot.statistics("lineno")[:top]:
        frame = stat.traceback[0]
        lines.append(
            f"{stat.size / leases:7.1f} B/lease {stat.count / leases:5.2f} blocks/lease"
            f"  {frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
        )
    return lines


def run(options: Options) -> list[Figure]:
    """Measure memory per lease and expiry delays in child processes; return the figures."""
    leases = 100_000 if options.quick else 1_000_000
    timeout = 600.0
    table = run_json(python_command("bench._scale", "table", "--leases", str(leases)), timeout)
    minimal = run_json(python_command("bench._scale", "minimal", "--leases", str(leases)), timeout)
    if table["ended"] < ENDING:
        print(f"scale: only {table['ended']:,} of {ENDING:,} timed leases ended within the wait")

    bytes_per_lease = table["bytes_per_lease"]
    figures = [
        Figure(
            name=f"RSS bytes/lease LeaseTable ({leases:,} live)",
            value=bytes_per_lease,
            unit=" B",
            baseline_name="dict of slotted records + deadline heap",
            baseline=minimal["bytes_per_lease"],
            note=f"target < {BYTES_TARGET} B/lease: {'met' if bytes_per_lease < BYTES_TARGET else 'MISSED'}",
        ),
        Figure(
            name=f"RSS bytes/lease LeaseTable ({leases:,} live)",
            value=bytes_per_lease,
            unit=" B",
            baseline_name="budget",
            baseline=BYTES_TARGET,
            target=1.0,
            target_op="<",
        ),
    ]
    # Expiry delays depend on the scheduler thread getting a core in time, so
    # the load average and the garbage collector's pauses go beside them.
    delay_note = (
        f"{table['gc_collections']} collections, longest {table['gc_longest_pause'] * 1e3:.1f} ms"
        f" (generation {table['gc_longest_generation']}); 1-min load average {table['load_average']:.2f}"
    )
    for label in ("p50", "p99", "max"):
        delay_ms = table[label] * 1e3
        figures.append(
            Figure(
                name=f"expiry delay {label} ({ENDING:,} ends in 1 s among {leases:,})",
                value=delay_ms,
                unit=" ms",
                baseline_name="p99 budget",
                baseline=P99_TARGET_SECONDS * 1e3,
                target=1.0 if label == "p99" else None,
                target_op="<",
                note=delay_note if label == "max" else "",
            )
        )
    if bytes_per_lease >= BYTES_TARGET:
        print("scale: memory target missed; largest allocation sites per lease (tracemalloc):")
        profile = run_json(python_command("bench._scale", "profile", "--leases", str(min(leases, 100_000))), timeout)
        for line in profile["sites"]:
            print(f"  {line}")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._scale", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["table", "minimal", "profile"])
    parser.add_argument("--leases", type=int, default=1_000_000, help="live leases to create")
    args = parser.parse_args()
    if args.leases <= ENDING:
        sys.exit(f"--leases must be over {ENDING}, got {args.leases}")
    if args.kind == "table":
        result: dict[str, object] = measure_table(args.leases, ENDING)
    elif args.kind == "minimal":
        result = measure_minimal(args.leases)
    else:
        result = {"sites": profile_table(args.leases)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Cut-off latency: from a lease's end to clients seeing ``UNAUTHENTICATED`` on open streams.

One protected server (``grpc.aio.server`` with :class:`AioLeaseServerInterceptor`,
or ``grpc.server`` with :class:`LeaseServerInterceptor`) serves a
server-streaming method whose handler sends its initial metadata and then
waits without sending anything. Several client processes open streams to it
under one or a few leases, wait until every stream has its initial metadata
(so the enforcer has admitted it), and then record when each stream ends.
The server, the clients, the authority and this process all run on one
machine, so their clocks are the same clocks:

- ``revoke``: this process calls ``Revoke`` and reads ``CLOCK_MONOTONIC``
  when the call returns; each client reads ``CLOCK_MONOTONIC`` when its
  stream ends. On Linux that clock is one system-wide clock, the same for
  every process outside a time namespace.
- ``idle``: the leases are in a tier with a 1 s idle timeout (8 s with one
  lease per stream, below) and the streams carry no messages, so the leases idle out. The expected end is the
  authority's own deadline. After the end, ``TimeToLive`` reports it as
  ``ended_at`` (wall time). Each client reads ``CLOCK_REALTIME`` when its
  stream ends. The authority maps its monotonic deadline to wall time from a
  reading taken at grant, a few seconds earlier, so a wall-clock step in
  between would shift these figures (NTP slewing moves them by under 1 ms).
- one lease per stream: every stream carries a lease of its own, and only
  the first 200 leases to end are counted (20 of 100 with ``--quick``), each
  while at least 800 other streams stay open. For ``revoke`` this process revokes the leases one by
  one. For ``idle`` the streams open ``OPEN_INTERVAL_SECONDS`` apart, so the
  leases idle out one at a time, 200 per second. Without this layout, one lease (or four) carries
  every stream, and all of them end in the same instant.
- ``holders``: a child process holds N sessions (``Session`` or ``AioSession``,
  one lease each, all sharing one authority client) and opens one ``Hold``
  stream per session through the aio server, via the session's
  interceptor. This process revokes the leases one by one and reads
  ``CLOCK_MONOTONIC`` just before each ``Revoke`` is sent and when it returns.
  The child reads the same clock in each ``on_end`` callback and when each
  stream ends.

Children: ``python -m bench._cutoff serve ...``, ``python -m bench._cutoff
streams ...`` and ``python -m bench._cutoff holders ...``; ``run`` starts
them. Every call has a deadline, so every child ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import pathlib
import select
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import IO, Any

import grpc

from ._common import Figure, Options, ServerProcess, child_environment, python_command, stop_process, REPO_ROOT
from ._interceptors import write_port

HOLD = "/bench.Cut/Hold"
END_ALL = "/bench.Cut/EndAll"
LEASE_KEY = "session-lease"
HOLD_SECONDS = 60.0
"""A handler waits at most this long; a stream that is never cut off ends then."""

STREAM_TIMEOUT_SECONDS = 30.0
"""Client deadline of every stream."""

BUDGET_MS = 50.0
"""Target for the p99 cut-off delay."""

POLICY = """\
version = 1
default_tier = "standard"

[limits]
max_live_leases_per_principal = 0
grants_per_second_per_principal = 0

[tiers.standard]
idle_timeout = "5m"
max_duration = "8h"

[tiers.idle1]
idle_timeout = "1s"
max_duration = "1m"

[tiers.idle8]
idle_timeout = "8s"
max_duration = "1m"
"""

OPEN_INTERVAL_SECONDS = 0.005
"""Time between the openings of two streams in a one-lease-per-stream idle scenario, and so between their idle deadlines."""


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One cut-off measurement: server kind, what ends the leases, and the stream layout.

    Stream ``i`` carries lease ``i % leases``. With ``measured`` set, every
    stream has a lease of its own, and only the first ``measured`` leases to
    end count: the ones that end while nearly every other stream is still
    open. Leases end one at a time in those scenarios. Without it, every
    stream counts, and the streams of one lease end together.
    """

    kind: str
    trigger: str
    streams: int
    clients: int
    leases: int
    measured: int = 0

    @property
    def label(self) -> str:
        if self.kind == "aio-bare":
            return f"aio, no interceptor, {self.streams:,} streams"
        if self.measured:
            return f"{self.kind}, {self.streams:,} streams open, a lease each, first {self.measured} to end"
        leases = "1 lease" if self.leases == 1 else f"{self.leases} leases"
        return f"{self.kind}, {self.streams:,} streams, {leases}"

    @property
    def spread(self) -> bool:
        """True when the streams open ``OPEN_INTERVAL_SECONDS`` apart.

        Each admission reports activity, which moves the lease's idle
        deadline, so the leases end one at a time, as in a fleet, rather than
        all in the same instant.
        """
        return self.trigger == "idle" and self.measured > 0

    @property
    def tier(self) -> str:
        if self.trigger != "idle":
            return "standard"
        return "idle8" if self.measured else "idle1"


def scenarios(options: Options) -> list[Scenario]:
    aio_streams, aio_clients = (100, 2) if options.quick else (1000, 4)
    measured = 20 if options.quick else 200
    return [
        Scenario("aio", "revoke", aio_streams, aio_clients, aio_streams, measured),
        Scenario("aio", "idle", aio_streams, aio_clients, aio_streams, measured),
        Scenario("sync", "revoke", aio_streams, aio_clients, aio_streams, measured),
        Scenario("aio", "revoke", aio_streams, aio_clients, 1),
        Scenario("aio", "idle", aio_streams, aio_clients, 4),
        Scenario("aio-bare", "server", aio_streams, aio_clients, 1),
        Scenario("sync", "revoke", 100, 2, 1),
        Scenario("sync", "idle", 100, 2, 4),
    ]


# -- protected server (child process) ------------------------------------------------


def serve_aio(authority: str, port_file: pathlib.Path, profile_path: pathlib.Path | None = None, *, bare: bool = False) -> None:
    """Serve ``Hold`` behind the aio lease interceptor, or with ``bare`` serve ``Hold`` and ``EndAll`` without it.

    The bare server is the baseline: ``EndAll`` wakes every held call, which
    then aborts itself with ``UNAUTHENTICATED``, as fast as grpcio ends
    calls from inside their own handlers.
    """
    from session_authority.interceptors import AioLeaseServerInterceptor, EnforcerConfig

    release: list[asyncio.Event] = []

    async def hold(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await context.send_initial_metadata(())
        if not bare:
            await asyncio.sleep(HOLD_SECONDS)
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(release[-1].wait(), HOLD_SECONDS)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "ended by the server", (("session-end-reason", "revoked"),))
        yield b""  # unreachable: marks this function as an async generator

    async def end_all(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        event = release[-1]
        release.append(asyncio.Event())
        event.set()
        return b""

    async def main() -> None:
        release.append(asyncio.Event())
        interceptor = None if bare else AioLeaseServerInterceptor(EnforcerConfig(authority_target=authority))
        server = grpc.aio.server(interceptors=[interceptor] if interceptor else [])
        server.add_generic_rpc_handlers(
            [
                grpc.method_handlers_generic_handler(
                    "bench.Cut",
                    {
                        "Hold": grpc.unary_stream_rpc_method_handler(hold),
                        "EndAll": grpc.unary_unary_rpc_method_handler(end_all),
                    },
                )
            ]
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        write_port(port_file, port)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        await server.stop(0.5)
        if interceptor is not None:
            await interceptor.aclose()

    if profile_path is None:
        asyncio.run(main())
        return
    import cProfile

    profile = cProfile.Profile()
    profile.enable()
    asyncio.run(main())
    profile.disable()
    profile.dump_stats(str(profile_path))


def serve_sync(authority: str, port_file: pathlib.Path, workers: int) -> None:
    import concurrent.futures

    from session_authority.interceptors import EnforcerConfig, LeaseServerInterceptor

    def hold(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        context.send_initial_metadata(())
        ended = threading.Event()
        context.add_callback(ended.set)
        ended.wait(HOLD_SECONDS)
        return
        yield b""  # unreachable: marks this function as a generator

    interceptor = LeaseServerInterceptor(EnforcerConfig(authority_target=authority))
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    server = grpc.server(executor, interceptors=[interceptor])
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("bench.Cut", {"Hold": grpc.unary_stream_rpc_method_handler(hold)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    write_port(port_file, port)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    server.stop(0.5).wait(5)
    executor.shutdown(wait=False, cancel_futures=True)
    interceptor.close()


# -- stream client (child process) ----------------------------------------------------


async def hold_streams(target: str, count: int, first: int, step_seconds: float) -> dict[str, Any]:
    """Open ``count`` streams under the leases read from stdin and record how each ends.

    Streams are numbered across all client processes from ``first`` on, and
    stream ``i`` carries lease ``i % len(leases)``. With ``step_seconds``,
    stream ``i`` opens ``i * step_seconds`` after the leases arrive, so that
    the activity each admission reports, and the idle deadline it sets, is
    spread in time across all clients.

    Protocol on stdout: ``connected`` once the channel is ready, ``ready`` once
    every stream has its initial metadata, then one JSON line with the results.
    Stdin brings one JSON line ``{"leases": [...]}`` after ``connected``.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=STREAM_TIMEOUT_SECONDS)
        print("connected", flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        leases: list[str] = json.loads(line)["leases"]
        hold = channel.unary_stream(HOLD)
        start = time.monotonic()
        calls = []
        for index in range(first, first + count):
            pause = start + index * step_seconds - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            calls.append(
                hold(b"", metadata=((LEASE_KEY, leases[index % len(leases)]),), timeout=STREAM_TIMEOUT_SECONDS)
            )
        await asyncio.wait_for(asyncio.gather(*(call.initial_metadata() for call in calls)), STREAM_TIMEOUT_SECONDS)
        print("ready", flush=True)

        async def ending(index: int, call: Any) -> dict[str, Any]:
            code = await call.code()
            monotonic_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            realtime_ns = time.clock_gettime_ns(time.CLOCK_REALTIME)
            return {
                "lease": index % len(leases),
                "code": code.name,
                "monotonic_ns": monotonic_ns,
                "realtime_ns": realtime_ns,
            }

        ends = await asyncio.gather(*(ending(index, call) for index, call in enumerate(calls, start=first)))
    return {"ends": ends}


# -- lease holders (child process) ----------------------------------------------------


HOLDER_PRINCIPAL = "bench-cutoff-holders"
WATCH_PROBES = 10
"""Probe leases a holder process revokes, one after another, until its watch stream reports one."""

WATCH_PROBE_SECONDS = 1.0
"""How long a holder process waits for the watch stream to report a probe lease's end."""


def _now_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def hold_sessions_sync(authority_target: str, target: str, count: int) -> dict[str, Any]:
    """Hold ``count`` sync sessions, each with one ``Hold`` stream, and record how each learns of its end.

    Protocol on stdout: one JSON line ``{"leases": [...]}`` once every session
    has a lease, its stream is admitted and the shared watch stream is
    subscribed. Then one JSON line with the results.

    NOTE: ``on_end`` fires on whichever comes first, the watch stream or the
    stream's ``UNAUTHENTICATED`` reply, and the results do not record which.
    """
    from session_authority.clients import AuthorityClient, EndReason, Session

    ended: list[threading.Event] = [threading.Event() for _ in range(count)]
    on_end_ns: list[int | None] = [None] * count
    reasons: list[str | None] = [None] * count
    stream_ends: list[dict[str, Any] | None] = [None] * count

    def on_end_of(index: int) -> Any:
        def on_end(reason: EndReason) -> None:
            if on_end_ns[index] is None:
                on_end_ns[index] = _now_ns()
                reasons[index] = reason.value
            ended[index].set()

        return on_end

    with AuthorityClient(authority_target) as client, grpc.insecure_channel(target) as base:
        sessions = [
            Session(client, principal=HOLDER_PRINCIPAL, watch=True, on_end=on_end_of(index)).open()
            for index in range(count)
        ]
        streams_done = [threading.Event() for _ in range(count)]

        def done_of(index: int) -> Any:
            def done(call: Any) -> None:
                stream_ends[index] = {"code": call.code().name, "monotonic_ns": _now_ns()}
                streams_done[index].set()

            return done

        calls = []
        for index, session in enumerate(sessions):
            channel = grpc.intercept_channel(base, session.interceptor())
            call = channel.unary_stream(HOLD)(b"", timeout=STREAM_TIMEOUT_SECONDS)
            call.initial_metadata()
            call.add_done_callback(done_of(index))
            calls.append(call)
        await_watch_sync(client)
        print(json.dumps({"leases": [session.lease_id for session in sessions]}), flush=True)
        deadline = time.monotonic() + STREAM_TIMEOUT_SECONDS
        for event in (*ended, *streams_done):
            event.wait(max(0.0, deadline - time.monotonic()))
        for session in sessions:
            session.close()
    return {"on_end_ns": on_end_ns, "reasons": reasons, "streams": stream_ends}


def await_watch_sync(client: Any) -> None:
    """Return once the client's shared watch stream reports ends, proven with probe leases.

    The watch stream starts from now, so an end that happens before it is
    subscribed never reaches it. A probe session is opened and its lease
    revoked until the probe's ``on_end`` fires. Call it while other sessions
    hold leases through ``client``: the keeper closes a client's streams
    when its last lease ends, so probes alone would never find a watch.
    """
    from session_authority.clients import Session

    for _ in range(WATCH_PROBES):
        seen = threading.Event()
        probe = Session(client, principal=HOLDER_PRINCIPAL, watch=True, on_end=lambda reason: seen.set()).open()
        client.revoke(probe.lease_id)
        if seen.wait(WATCH_PROBE_SECONDS):
            probe.close()
            return
        probe.close()
    raise RuntimeError(f"the watch stream reported none of {WATCH_PROBES} probe revokes")


async def hold_sessions_aio(authority_target: str, target: str, count: int) -> dict[str, Any]:
    """Hold ``count`` ``AioSession`` holders, one channel each; otherwise like :func:`hold_sessions_sync`."""
    from session_authority.clients import AioAuthorityClient, AioSession, EndReason

    ended = [asyncio.Event() for _ in range(count)]
    on_end_ns: list[int | None] = [None] * count
    reasons: list[str | None] = [None] * count

    def on_end_of(index: int) -> Any:
        def on_end(reason: EndReason) -> None:
            if on_end_ns[index] is None:
                on_end_ns[index] = _now_ns()
                reasons[index] = reason.value
            ended[index].set()

        return on_end

    async def await_watch(client: AioAuthorityClient) -> None:
        for _ in range(WATCH_PROBES):
            seen = asyncio.Event()
            probe = await AioSession(client, principal=HOLDER_PRINCIPAL, watch=True, on_end=lambda reason: seen.set()).open()
            await client.revoke(probe.lease_id)
            try:
                await asyncio.wait_for(seen.wait(), WATCH_PROBE_SECONDS)
                await probe.close()
                return
            except asyncio.TimeoutError:
                await probe.close()
        raise RuntimeError(f"the watch stream reported none of {WATCH_PROBES} probe revokes")

    async with AioAuthorityClient(authority_target) as client:
        sessions = [
            await AioSession(client, principal=HOLDER_PRINCIPAL, watch=True, on_end=on_end_of(index)).open()
            for index in range(count)
        ]
        channels = [grpc.aio.insecure_channel(target, interceptors=session.aio_interceptors()) for session in sessions]
        calls = [channel.unary_stream(HOLD)(b"", timeout=STREAM_TIMEOUT_SECONDS) for channel in channels]
        await asyncio.wait_for(asyncio.gather(*(call.initial_metadata() for call in calls)), STREAM_TIMEOUT_SECONDS)
        await await_watch(client)

        async def ending(call: Any) -> dict[str, Any]:
            code = await call.code()
            return {"code": code.name, "monotonic_ns": _now_ns()}

        stream_tasks = [asyncio.ensure_future(ending(call)) for call in calls]
        print(json.dumps({"leases": [session.lease_id for session in sessions]}), flush=True)
        await asyncio.wait_for(
            asyncio.gather(*(event.wait() for event in ended), *stream_tasks), STREAM_TIMEOUT_SECONDS
        )
        stream_ends = [task.result() for task in stream_tasks]
        for session in sessions:
            await session.close()
        for channel in channels:
            await channel.close()
    return {"on_end_ns": on_end_ns, "reasons": reasons, "streams": stream_ends}


# -- holders (parent side) ------------------------------------------------------------


def holder_counts(options: Options) -> dict[str, int]:
    """Return the number of holders per API: ``sync`` (``Session``) and ``aio`` (``AioSession``)."""
    count = 20 if options.quick else 100
    return {"sync": count, "aio": count}


def measure_holders(
    api: str, count: int, server: ServerProcess, authority_target: str, work_dir: pathlib.Path
) -> tuple[list[float], list[float], list[float]]:
    """Revoke the leases of ``count`` holders one by one; return the holders' and the streams' delays in ms.

    Each list has one delay per lease. The first is the ``on_end`` time minus
    the time its ``Revoke`` returned. The second is the ``on_end`` time minus
    the time just before ``Revoke`` was sent. The third is the end of the
    lease's one ``Hold`` stream through the protected server minus the time
    ``Revoke`` returned.
    """
    from session_authority.clients import AuthorityClient

    log = work_dir / f"holders-{api}.log"
    with open(log, "ab") as stderr:
        process = subprocess.Popen(
            python_command(
                "bench._cutoff", "holders",
                "--api", api,
                "--authority", authority_target,
                "--target", server.target,
                "--count", str(count),
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=child_environment(),
            cwd=REPO_ROOT,
        )
    try:
        assert process.stdout is not None
        line = read_line(process.stdout, time.monotonic() + 60.0)
        if not line:
            raise RuntimeError(f"a holder process printed no leases:\n{log.read_text()[-3000:]}")
        leases: list[str] = json.loads(line)["leases"]
        revoked_ns: list[int] = []
        sent_ns: list[int] = []
        with AuthorityClient(authority_target) as authority_client:
            for lease in leases:
                sent_ns.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
                authority_client.revoke(lease)
                revoked_ns.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
        line = read_line(process.stdout, time.monotonic() + STREAM_TIMEOUT_SECONDS + 10.0)
        if not line:
            raise RuntimeError(f"a holder process printed no result:\n{log.read_text()[-3000:]}")
        result = json.loads(line)
    finally:
        stop_process(process)  # type: ignore[arg-type]
    missing = [index for index, value in enumerate(result["on_end_ns"]) if value is None]
    if missing:
        raise RuntimeError(f"{len(missing)} of {count} {api} holders never had on_end called")
    reasons = sorted({reason for reason in result["reasons"] if reason != "revoked"})
    if reasons:
        raise RuntimeError(f"{api} holders ended with reasons {reasons}; expected only 'revoked'")
    wrong = sorted({end["code"] for end in result["streams"] if end is None or end["code"] != "UNAUTHENTICATED"} - {None})
    if wrong or None in result["streams"]:
        raise RuntimeError(f"{api} holders' streams ended with {wrong or 'no status'}, not UNAUTHENTICATED")
    holder_delays = [(value - revoked) / 1e6 for value, revoked in zip(result["on_end_ns"], revoked_ns)]
    from_sent = [(value - sent) / 1e6 for value, sent in zip(result["on_end_ns"], sent_ns)]
    stream_delays = [(end["monotonic_ns"] - revoked) / 1e6 for end, revoked in zip(result["streams"], revoked_ns)]
    return holder_delays, from_sent, stream_delays


def holder_figures(
    api: str, count: int, delays_of: tuple[list[float], list[float], list[float]], rounds: int
) -> list[Figure]:
    """Return p50, p99 and max of the holders' ``on_end`` delays and of their streams' cut-off delays.

    The delays from ``Revoke`` being sent carry no target: they include the
    ``Revoke`` call itself, and bound the delays from above.
    """
    kind = "Session" if api == "sync" else "AioSession"
    holder_delays, from_sent, stream_delays = delays_of
    figures: list[Figure] = []
    for what, delays, has_target in (
        (f"on_end of {api} holders after Revoke returning", holder_delays, True),
        (f"on_end of {api} holders after Revoke sent", from_sent, False),
        (f"cut-off of one stream per {api} holder after Revoke returning", stream_delays, True),
    ):
        note = f"{len(delays):,} leases over {rounds} round(s), {count} {kind}s sharing one client; min {min(delays):.2f} ms"
        if min(delays) < 0:
            note += " (below 0: the holder learned of the end before the Revoke reply reached this process)"
        figures.extend(
            Figure(
                name=f"{what} {label} (aio server, {count} leases revoked one by one)",
                value=value,
                unit=" ms",
                baseline_name="p99 budget",
                baseline=BUDGET_MS,
                target=1.0 if label == "p99" and has_target else None,
                target_op="<",
                note=note if label == "p50" else "",
            )
            for label, value in (
                ("p50", statistics.median(delays)),
                ("p99", percentile(delays, 0.99)),
                ("max", max(delays)),
            )
        )
    return figures

# -- the benchmark (parent process) ---------------------------------------------------


@contextlib.contextmanager
def authority(work_dir: pathlib.Path) -> Iterator[ServerProcess]:
    policy = work_dir / "policy.toml"
    policy.write_text(POLICY)
    command = python_command(
        "session_authority.server._main",
        "--insecure-dev",
        "--listen", "127.0.0.1:0",
        "--data-dir", str(work_dir / "authority-data"),
        "--policy", str(policy),
        "--port-file", str(work_dir / "authority.port"),
    )  # fmt: skip
    with ServerProcess(command, work_dir / "authority.port", work_dir / "authority.log") as server:
        yield server


@contextlib.contextmanager
def protected_server(
    work_dir: pathlib.Path, kind: str, authority_target: str, workers: int, profile: pathlib.Path | None = None
) -> Iterator[ServerProcess]:
    command = python_command(
        "bench._cutoff", "serve",
        "--kind", kind,
        "--authority", authority_target,
        "--workers", str(workers),
        "--port-file", str(work_dir / f"{kind}-server.port"),
        *(["--profile", str(profile)] if profile is not None else []),
    )  # fmt: skip
    with ServerProcess(command, work_dir / f"{kind}-server.port", work_dir / f"{kind}-server.log") as server:
        yield server


class StreamClients:
    """The client processes of one scenario, driven over their stdin and stdout."""

    def __init__(self, target: str, scenario: Scenario, log_dir: pathlib.Path) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.logs: list[pathlib.Path] = []
        share, extra = divmod(scenario.streams, scenario.clients)
        step_seconds = OPEN_INTERVAL_SECONDS if scenario.spread else 0.0
        first = 0
        for index in range(scenario.clients):
            count = share + (index < extra)
            log = log_dir / f"client-{scenario.kind}-{scenario.trigger}-{index}.log"
            self.logs.append(log)
            with open(log, "ab") as stderr:
                self.processes.append(
                    subprocess.Popen(
                        python_command(
                            "bench._cutoff", "streams",
                            "--target", target,
                            "--count", str(count),
                            "--first", str(first),
                            "--step", str(step_seconds),
                        ),  # fmt: skip
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=stderr,
                        text=True,
                        env=child_environment(),
                        cwd=REPO_ROOT,
                    )
                )
            first += count

    def expect(self, word: str, timeout_seconds: float) -> None:
        """Wait until every client has printed ``word``."""
        deadline = time.monotonic() + timeout_seconds
        for process, log in zip(self.processes, self.logs):
            assert process.stdout is not None
            line = read_line(process.stdout, deadline)
            if line.strip() != word:
                raise RuntimeError(
                    f"a stream client printed {line.strip()!r} instead of {word!r}:\n{log.read_text()[-3000:]}"
                )

    def send_leases(self, leases: list[str]) -> None:
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(json.dumps({"leases": leases}) + "\n")
            process.stdin.flush()

    def results(self, timeout_seconds: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_seconds
        ends: list[dict[str, Any]] = []
        for process, log in zip(self.processes, self.logs):
            assert process.stdout is not None
            line = read_line(process.stdout, deadline)
            if not line:
                raise RuntimeError(f"a stream client printed no result:\n{log.read_text()[-3000:]}")
            ends.extend(json.loads(line)["ends"])
        return ends

    def stop(self) -> None:
        for process in self.processes:
            stop_process(process)  # type: ignore[arg-type]


def read_line(stream: IO[str], deadline: float) -> str:
    """Read one line from a child's stdout, giving up at ``deadline``."""
    remaining = deadline - time.monotonic()
    ready, _, _ = select.select([stream], [], [], max(0.0, remaining))
    if not ready:
        raise RuntimeError("a stream client printed nothing before its deadline; see its log in the work directory")
    return stream.readline()


def measure(
    scenario: Scenario, server: ServerProcess, authority_target: str, work_dir: pathlib.Path
) -> tuple[list[float], float]:
    """Run one scenario once.

    Returns:
        The cut-off delay of each counted stream, and the time from the first
        to the last end of the counted leases, all in milliseconds.
    """
    from session_authority.clients import AuthorityClient, EndReason

    clients = StreamClients(server.target, scenario, work_dir)
    try:
        clients.expect("connected", 60.0)
        with AuthorityClient(authority_target) as authority_client:
            leases = [
                authority_client.grant(tier=scenario.tier, principal="bench-cutoff").lease_id
                for _ in range(scenario.leases)
            ]
            clients.send_leases(leases)
            clients.expect("ready", STREAM_TIMEOUT_SECONDS)
            expected_ns: list[int] = []
            if scenario.trigger == "revoke":
                for lease in leases:
                    authority_client.revoke(lease)
                    expected_ns.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            elif scenario.trigger == "server":
                with grpc.insecure_channel(server.target) as channel:
                    channel.unary_unary(END_ALL)(b"", timeout=STREAM_TIMEOUT_SECONDS)
                expected_ns.append(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
            ends = clients.results(STREAM_TIMEOUT_SECONDS + 10.0)
            if scenario.trigger == "idle":
                for lease in leases:
                    info = authority_client.time_to_live(lease)
                    if info.end_reason is not EndReason.IDLE_TIMEOUT or info.ended_at is None:
                        raise RuntimeError(f"a lease of the idle scenario ended with {info.end_reason}, not idle_timeout")
                    expected_ns.append(round(info.ended_at.timestamp() * 1e9))
    finally:
        clients.stop()
    wrong = [end["code"] for end in ends if end["code"] != "UNAUTHENTICATED"]
    if wrong:
        raise RuntimeError(f"{len(wrong)} of {len(ends)} streams ended with {sorted(set(wrong))}, not UNAUTHENTICATED")
    counted: list[int] = list(range(len(leases)))
    if scenario.measured:
        # Leases are revoked in list order; idle ones end in deadline order.
        counted = sorted(counted, key=expected_ns.__getitem__)[: scenario.measured]
        counted_set = set(counted)
        ends = [end for end in ends if end["lease"] in counted_set]
    counted_ns = [expected_ns[index] for index in counted]
    span_ms = (max(counted_ns) - min(counted_ns)) / 1e6
    clock = "realtime_ns" if scenario.trigger == "idle" else "monotonic_ns"
    return [(end[clock] - expected_ns[end["lease"]]) / 1e6 for end in ends], span_ms


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def run(options: Options) -> list[Figure]:
    """Measure cut-off delays after Revoke and after an idle deadline; return the figures.

    Every scenario runs once per round, in turn, so a busy spell on the
    machine falls on all of them alike. The delays of all rounds are pooled.
    """
    rounds = 1 if options.quick else 3
    plan = scenarios(options)
    delays: dict[Scenario, list[float]] = {scenario: [] for scenario in plan}
    spans: dict[Scenario, list[float]] = {scenario: [] for scenario in plan}
    holders = holder_counts(options)
    holder_delays_of: dict[str, tuple[list[float], list[float], list[float]]] = {
        api: ([], [], []) for api in holders
    }
    with contextlib.ExitStack() as stack:
        authority_server = stack.enter_context(authority(options.work_dir))
        servers: dict[str, ServerProcess] = {}
        for kind in dict.fromkeys(scenario.kind for scenario in plan):
            workers = max(scenario.streams for scenario in plan if scenario.kind == kind) + 16
            profile = options.work_dir / f"{kind}.prof" if options.profile and kind == "aio" else None
            servers[kind] = stack.enter_context(
                protected_server(options.work_dir, kind, authority_server.target, workers, profile)
            )
        for _ in range(rounds):
            for scenario in plan:
                measured, span_ms = measure(scenario, servers[scenario.kind], authority_server.target, options.work_dir)
                delays[scenario].extend(measured)
                spans[scenario].append(span_ms)
            for api, count in holders.items():
                measured = measure_holders(api, count, servers["aio"], authority_server.target, options.work_dir)
                for pooled, new in zip(holder_delays_of[api], measured):
                    pooled.extend(new)
    if options.profile:
        print_profile(options.work_dir / "aio.prof")
    figures: list[Figure] = []
    baseline = next(scenario for scenario in plan if scenario.kind == "aio-bare")
    for scenario in plan:
        figures.extend(scenario_figures(scenario, delays[scenario], rounds, spans[scenario]))
        if scenario.kind == "aio" and not scenario.measured:
            figures.extend(baseline_figures(scenario, delays[scenario], delays[baseline]))
    for api, count in holders.items():
        figures.extend(holder_figures(api, count, holder_delays_of[api], rounds))
    return figures


def print_profile(path: pathlib.Path, top: int = 20) -> None:
    """Print the aio server's event-loop thread by own time (cProfile), all scenarios together."""
    import io
    import pstats

    if not path.exists():
        print(f"profile of the aio protected server: {path} was not written")
        return
    output = io.StringIO()
    pstats.Stats(str(path), stream=output).sort_stats("tottime").print_stats(top)
    table = output.getvalue()
    print("-- profile of the aio protected server, event-loop thread, by own time (cProfile):")
    print(table[table.index("ncalls") :].rstrip() if "ncalls" in table else table)


def scenario_figures(scenario: Scenario, delays: list[float], rounds: int, spans_ms: list[float]) -> list[Figure]:
    start = {"revoke": "Revoke returning", "idle": "idle deadline", "server": "EndAll returning"}[scenario.trigger]
    if not delays:
        raise RuntimeError(f"no cut-off delays measured for {scenario}")
    note = f"{len(delays):,} streams over {rounds} round(s); min {min(delays):.2f} ms"
    if min(delays) < 0 and scenario.trigger == "revoke":
        note += " (below 0: the stream ended before the Revoke reply reached this process)"
    if scenario.measured:
        # How far apart the counted leases ended shows whether they ended one at a time.
        note += f"; their leases ended over {statistics.median(spans_ms):,.0f} ms per round"
    has_target = scenario.kind != "aio-bare"
    return [
        Figure(
            name=f"cut-off after {start} {label} ({scenario.label})",
            value=value,
            unit=" ms",
            baseline_name="p99 budget",
            baseline=BUDGET_MS,
            target=1.0 if label == "p99" and has_target else None,
            target_op="<",
            note=note if label == "p50" else "",
        )
        for label, value in (
            ("p50", statistics.median(delays)),
            ("p99", percentile(delays, 0.99)),
            ("max", max(delays)),
        )
    ]


def baseline_figures(scenario: Scenario, delays: list[float], baseline: list[float]) -> list[Figure]:
    start = "Revoke returning" if scenario.trigger == "revoke" else "idle deadline"
    return [
        Figure(
            name=f"cut-off after {start} {label} ({scenario.label})",
            value=pick(delays),
            unit=" ms",
            baseline_name="bare grpcio aio server ending its own calls",
            baseline=pick(baseline),
            note="lower is better",
        )
        for label, pick in (("p50", statistics.median), ("p99", lambda values: percentile(values, 0.99)))
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._cutoff", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the holding method behind the lease interceptor")
    serve.add_argument("--kind", choices=("aio", "sync", "aio-bare"), required=True)
    serve.add_argument("--authority", required=True, help="host:port of the authority")
    serve.add_argument("--workers", type=int, default=128, help="worker threads of the sync server")
    serve.add_argument("--port-file", type=pathlib.Path, required=True)
    serve.add_argument("--profile", type=pathlib.Path, help="aio only: write a cProfile of the event-loop thread here at exit")
    streams = commands.add_parser("streams", help="hold streams open and report how they end, as JSON")
    streams.add_argument("--target", required=True)
    streams.add_argument("--count", type=int, required=True)
    streams.add_argument("--first", type=int, default=0, help="number of this client's first stream across all clients")
    streams.add_argument("--step", type=float, default=0.0, help="seconds between the openings of stream i and i+1")

    holders = commands.add_parser("holders", help="hold sessions, each with one stream, and report how they learn of their ends, as JSON")
    holders.add_argument("--api", choices=("sync", "aio"), required=True)
    holders.add_argument("--authority", required=True, help="host:port of the authority")
    holders.add_argument("--target", required=True, help="host:port of the protected server")
    holders.add_argument("--count", type=int, required=True)

    args = parser.parse_args(argv)
    if args.command == "holders":
        if args.api == "sync":
            result = hold_sessions_sync(args.authority, args.target, args.count)
        else:
            result = asyncio.run(hold_sessions_aio(args.authority, args.target, args.count))
        print(json.dumps(result), flush=True)
    elif args.command == "serve":
        if args.kind.startswith("aio"):
            serve_aio(args.authority, args.port_file, args.profile, bare=args.kind == "aio-bare")
        else:
            serve_sync(args.authority, args.port_file, args.workers)
    else:
        print(json.dumps(asyncio.run(hold_streams(args.target, args.count, args.first, args.step))), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

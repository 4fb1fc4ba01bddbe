"""Per-call cost of lease enforcement, beside bare grpcio and a pass-through interceptor.

Three servers of one kind (``grpc.server`` or ``grpc.aio.server``) run side
by side, each in its own process, all serving the same echo methods:

- ``bare``: no interceptor;
- ``passthrough``: a server interceptor that reads one metadata key and
  hands the call on, the least an interceptor can cost;
- ``protected``: :class:`LeaseServerInterceptor` or
  :class:`AioLeaseServerInterceptor` with default settings, enforcing
  leases granted by a real ``session-authority serve``.

One load client process per setting (call shape and calls in flight) drives
all three in alternation. Each round runs a warm-up and a measuring window on
each server in turn, and the order rotates every round. ``run`` reports the
median of the rounds, and the protected server's rate against the
pass-through server's as the median of the rounds' own ratios. Clients of
the bare and pass-through servers send a made-up ``session-lease`` value of
a real lease's length on a plain channel, so every server receives the same
bytes. The client of the protected server sends its calls through a
session's channel (:class:`LeaseChannel` or :class:`AioLeaseChannel`), so
the figures include the holder's per-call work too.

Authority traffic is counted by client interceptors on the channels that the
enforcer (``EnforcerConfig.authority_channel``) and the holder
(``AuthorityClient(channel=...)``) use to reach the authority: every call
started (``Validate``, ``Grant``, ``GetPolicy``, ``KeepAlive`` and
``WatchSessionEnds`` streams opened) and every message sent on a
``KeepAlive`` stream, over the measuring windows only.

Children: ``python -m bench._interceptors serve ...`` and
``python -m bench._interceptors load ...``; ``run`` starts them.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import cProfile
import dataclasses
import io
import json
import pathlib
import pstats
import queue
import secrets
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc

from ._common import Figure, Options, ServerProcess, python_command, run_json

UNARY = "/bench.Echo/Unary"
STREAM = "/bench.Echo/Stream"
STATS = "/bench.Control/Stats"
MODES = ("bare", "passthrough", "protected")
LEASE_KEY = "session-lease"
PAYLOAD = b"x" * 64
"""Request and reply body of every echo call and stream message."""

KINDS = {"sync": (1, 8), "aio": (1, 64)}
"""Server kind and the calls in flight measured on it."""

SHAPES = ("unary", "stream")

SYNC_WORKERS = 16
"""Worker threads of the sync servers: more than the calls in flight, so none waits for a thread."""

POLICY = """\
version = 1
default_tier = "standard"

[limits]
max_live_leases_per_principal = 0
grants_per_second_per_principal = 0

[tiers.standard]
idle_timeout = "5m"
max_duration = "8h"
"""


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one pass; ``--quick`` picks the small one."""

    seconds: float
    warmup_seconds: float
    rounds: int

    @classmethod
    def for_options(cls, options: Options) -> Plan:
        if options.quick:
            return cls(seconds=0.5, warmup_seconds=0.2, rounds=1)
        return cls(seconds=1.5, warmup_seconds=0.5, rounds=5)


# -- counting the traffic to the authority --------------------------------------


def short_name(method: str | bytes) -> str:
    """Return the method name without its service (``grpc.aio`` passes it as bytes)."""
    text = method.decode() if isinstance(method, bytes) else method
    return text.rsplit("/", 1)[-1]


class AuthorityTraffic:
    """Counts calls started and stream messages sent on a channel to the authority. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: collections.Counter[str] = collections.Counter()
        self.messages: collections.Counter[str] = collections.Counter()

    def call(self, method: str | bytes) -> None:
        with self._lock:
            self.calls[short_name(method)] += 1

    def message(self, method: str | bytes) -> None:
        with self._lock:
            self.messages[short_name(method)] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {"calls": dict(self.calls), "messages": dict(self.messages)}

    def counted(self, method: str, requests: Iterator[Any]) -> Iterator[Any]:
        for request in requests:
            self.message(method)
            yield request

    async def counted_async(self, method: str, requests: Any) -> AsyncIterator[Any]:
        if hasattr(requests, "__aiter__"):
            async for request in requests:
                self.message(method)
                yield request
        else:
            for request in requests:
                self.message(method)
                yield request


class CountingInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Counts every call and request-stream message on a blocking channel."""

    def __init__(self, traffic: AuthorityTraffic) -> None:
        self.traffic = traffic

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.traffic.call(details.method)
        return continuation(details, request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.traffic.call(details.method)
        return continuation(details, request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.traffic.call(details.method)
        return continuation(details, self.traffic.counted(details.method, requests))

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.traffic.call(details.method)
        return continuation(details, self.traffic.counted(details.method, requests))


class _AioCountUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, traffic: AuthorityTraffic) -> None:
        self.traffic = traffic

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        self.traffic.call(details.method)
        return await continuation(details, request)


class _AioCountUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, traffic: AuthorityTraffic) -> None:
        self.traffic = traffic

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        self.traffic.call(details.method)
        return await continuation(details, request)


class _AioCountStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, traffic: AuthorityTraffic) -> None:
        self.traffic = traffic

    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.traffic.call(details.method)
        return await continuation(details, self.traffic.counted_async(details.method, requests))


class _AioCountStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, traffic: AuthorityTraffic) -> None:
        self.traffic = traffic

    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        self.traffic.call(details.method)
        return await continuation(details, self.traffic.counted_async(details.method, requests))


def counting_aio_interceptors(traffic: AuthorityTraffic) -> list[grpc.aio.ClientInterceptor]:
    """Return one counting interceptor per call shape, as ``grpc.aio`` needs."""
    return [
        _AioCountUnaryUnary(traffic),
        _AioCountUnaryStream(traffic),
        _AioCountStreamUnary(traffic),
        _AioCountStreamStream(traffic),
    ]


# -- servers (child process) -------------------------------------------------------


class PassThrough(grpc.ServerInterceptor):
    """Reads the lease metadata key of every call and hands the call on unchanged."""

    def __init__(self) -> None:
        self.seen = 0

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        for key, _ in details.invocation_metadata or ():
            if key == LEASE_KEY:
                self.seen += 1
                break
        return continuation(details)


class AioPassThrough(grpc.aio.ServerInterceptor):
    """The ``grpc.aio`` form of :class:`PassThrough`."""

    def __init__(self) -> None:
        self.seen = 0

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        for key, _ in details.invocation_metadata or ():
            if key == LEASE_KEY:
                self.seen += 1
                break
        return await continuation(details)


def enforcer_config(authority: str, traffic: AuthorityTraffic) -> Any:
    """Default enforcer settings, on a blocking channel that counts the authority traffic."""
    from session_authority.interceptors._enforcer import DEFAULT_EXEMPT_PATTERNS, EnforcerConfig

    channel = grpc.intercept_channel(grpc.insecure_channel(authority), CountingInterceptor(traffic))
    return EnforcerConfig(
        authority_channel=channel, exempt_patterns=(*DEFAULT_EXEMPT_PATTERNS, "/bench.Control/*")
    )


def stats_payload(traffic: AuthorityTraffic, interceptor: Any) -> bytes:
    enforcer = getattr(interceptor, "enforcer", None)
    return json.dumps(
        {
            "traffic": traffic.snapshot(),
            "validate_calls": enforcer.validate_calls if enforcer else 0,
            # All threads of this process: gRPC's, the enforcer's and the handlers'.
            "cpu_seconds": time.process_time(),
        }
    ).encode()


def write_port(port_file: pathlib.Path, port: int) -> None:
    temporary = port_file.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(port_file)


def serve_sync(mode: str, authority: str, port_file: pathlib.Path, profiles: list[cProfile.Profile] | None) -> None:
    from session_authority.interceptors import LeaseServerInterceptor

    traffic = AuthorityTraffic()
    interceptor: Any = None
    if mode == "passthrough":
        interceptor = PassThrough()
    elif mode == "protected":
        interceptor = LeaseServerInterceptor(enforcer_config(authority, traffic))

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    def stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield request

    def stats(request: bytes, context: grpc.ServicerContext) -> bytes:
        return stats_payload(traffic, interceptor)

    def start_profile() -> None:
        assert profiles is not None
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()

    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=SYNC_WORKERS, initializer=start_profile if profiles is not None else None
    )
    server = grpc.server(executor, interceptors=[interceptor] if interceptor else [])
    server.add_generic_rpc_handlers(handlers(unary, stream, stats))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    write_port(port_file, port)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    server.stop(0.5).wait(5)
    executor.shutdown(wait=False)
    if mode == "protected":
        interceptor.close()


def handlers(unary: Any, stream: Any, stats: Any) -> list[grpc.GenericRpcHandler]:
    return [
        grpc.method_handlers_generic_handler(
            "bench.Echo",
            {
                "Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.stream_stream_rpc_method_handler(stream),
            },
        ),
        grpc.method_handlers_generic_handler("bench.Control", {"Stats": grpc.unary_unary_rpc_method_handler(stats)}),
    ]


async def serve_aio(mode: str, authority: str, port_file: pathlib.Path) -> None:
    from session_authority.interceptors import AioLeaseServerInterceptor

    traffic = AuthorityTraffic()
    interceptor: Any = None
    if mode == "passthrough":
        interceptor = AioPassThrough()
    elif mode == "protected":
        interceptor = AioLeaseServerInterceptor(enforcer_config(authority, traffic))

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    async def stats(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return stats_payload(traffic, interceptor)

    server = grpc.aio.server(interceptors=[interceptor] if interceptor else [])
    server.add_generic_rpc_handlers(handlers(unary, stream, stats))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    write_port(port_file, port)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0.5)
    if mode == "protected":
        await interceptor.aclose()


def serve_main(args: argparse.Namespace) -> None:
    profile_path: pathlib.Path | None = args.profile
    profiles: list[cProfile.Profile] | None = [] if profile_path else None
    main_profile = cProfile.Profile() if profile_path else None
    if main_profile is not None:
        main_profile.enable()
    if args.kind == "sync":
        serve_sync(args.mode, args.authority, args.port_file, profiles)
    else:
        asyncio.run(serve_aio(args.mode, args.authority, args.port_file))
    if main_profile is not None and profile_path is not None:
        main_profile.disable()
        stats = pstats.Stats(main_profile)
        for profile in profiles or []:
            stats.add(profile)
        stats.dump_stats(str(profile_path))


# -- load client (child process) -----------------------------------------------------


class Recorder:
    """Operations and their latencies inside the measuring window."""

    def __init__(self) -> None:
        self.latencies: list[int] = []
        self.start = 0.0
        self.end = 0.0

    def open(self, warmup_seconds: float, seconds: float) -> None:
        self.latencies = []
        self.all_operations = 0
        self.start = time.monotonic() + warmup_seconds
        self.end = self.start + seconds

    def running(self) -> bool:
        return time.monotonic() < self.end

    def record(self, began_ns: int, ended_ns: int) -> None:
        self.all_operations += 1
        now = time.monotonic()
        if self.start <= now < self.end:
            self.latencies.append(ended_ns - began_ns)

    def result(self, seconds: float) -> dict[str, float]:
        ordered = sorted(self.latencies)
        count = len(ordered)
        return {
            "operations": count,
            "rate": count / seconds,
            "p50_us": ordered[count // 2] / 1e3 if count else 0.0,
            "p99_us": ordered[min(count - 1, int(count * 0.99))] / 1e3 if count else 0.0,
            "all_operations": self.all_operations,
        }


def sync_unary_worker(channel: grpc.Channel, metadata: Any, recorder: Recorder) -> None:
    call = channel.unary_unary(UNARY)
    while recorder.running():
        began = time.perf_counter_ns()
        call(PAYLOAD, metadata=metadata, timeout=10)
        recorder.record(began, time.perf_counter_ns())


def sync_stream_worker(channel: grpc.Channel, metadata: Any, recorder: Recorder) -> None:
    # Ping-pong on one stream: the next message goes out when the reply to the last one is in.
    outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Iterator[bytes]:
        while (item := outbox.get()) is not None:
            yield item

    outbox.put(PAYLOAD)
    began = time.perf_counter_ns()
    responses = channel.stream_stream(STREAM)(requests(), metadata=metadata, timeout=120)
    for _ in responses:
        recorder.record(began, time.perf_counter_ns())
        if not recorder.running():
            outbox.put(None)
            continue
        began = time.perf_counter_ns()
        outbox.put(PAYLOAD)


def sync_window(channel: grpc.Channel, metadata: Any, shape: str, in_flight: int, plan: Plan) -> dict[str, float]:
    recorder = Recorder()
    recorder.open(plan.warmup_seconds, plan.seconds)
    worker = sync_unary_worker if shape == "unary" else sync_stream_worker
    threads = [threading.Thread(target=worker, args=(channel, metadata, recorder)) for _ in range(in_flight)]
    cpu_before = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return with_client_cpu(recorder.result(plan.seconds), time.process_time() - cpu_before)


async def aio_unary_worker(channel: grpc.aio.Channel, metadata: Any, recorder: Recorder) -> None:
    call = channel.unary_unary(UNARY)
    while recorder.running():
        began = time.perf_counter_ns()
        await call(PAYLOAD, metadata=metadata, timeout=10)
        recorder.record(began, time.perf_counter_ns())


async def aio_stream_worker(channel: grpc.aio.Channel, metadata: Any, recorder: Recorder) -> None:
    outbox: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def requests() -> AsyncIterator[bytes]:
        while (item := await outbox.get()) is not None:
            yield item

    outbox.put_nowait(PAYLOAD)
    began = time.perf_counter_ns()
    async for _ in channel.stream_stream(STREAM)(requests(), metadata=metadata, timeout=120):
        recorder.record(began, time.perf_counter_ns())
        if not recorder.running():
            outbox.put_nowait(None)
            continue
        began = time.perf_counter_ns()
        outbox.put_nowait(PAYLOAD)


async def aio_window(channel: grpc.aio.Channel, metadata: Any, shape: str, in_flight: int, plan: Plan) -> dict[str, float]:
    recorder = Recorder()
    recorder.open(plan.warmup_seconds, plan.seconds)
    worker = aio_unary_worker if shape == "unary" else aio_stream_worker
    cpu_before = time.process_time()
    await asyncio.gather(*(worker(channel, metadata, recorder) for _ in range(in_flight)))
    return with_client_cpu(recorder.result(plan.seconds), time.process_time() - cpu_before)


def traffic_delta(before: dict, after: dict) -> dict[str, Any]:
    """Authority calls started (in total and by method) and stream messages sent between two snapshots."""
    by_method = {
        method: count - before["calls"].get(method, 0)
        for method, count in after["calls"].items()
        if count > before["calls"].get(method, 0)
    }
    messages = sum(after["messages"].values()) - sum(before["messages"].values())
    return {"calls": sum(by_method.values()), "by_method": by_method, "messages": messages}


def fake_lease_metadata() -> tuple[tuple[str, str], ...]:
    # The same length as a real lease ID, so every server receives the same bytes.
    return ((LEASE_KEY, secrets.token_urlsafe(16)),)


def load_sync(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from session_authority.clients import AuthorityClient, Session

    targets = dict(item.split("=", 1) for item in args.targets)
    holder_traffic = AuthorityTraffic()
    authority_channel = grpc.intercept_channel(grpc.insecure_channel(args.authority), CountingInterceptor(holder_traffic))
    client = AuthorityClient(channel=authority_channel)
    session = Session(client, tier="standard", principal="bench-holder").open()
    channels = {
        "bare": grpc.insecure_channel(targets["bare"]),
        "passthrough": grpc.insecure_channel(targets["passthrough"]),
        "protected": session.channel(grpc.insecure_channel(targets["protected"])),
    }
    stats_calls = {mode: grpc.insecure_channel(targets[mode]).unary_unary(STATS) for mode in MODES}
    # One call before the rounds fills the enforcer's cache (one Validate),
    # so every window measures the steady state.
    channels["protected"].unary_unary(UNARY)(PAYLOAD, timeout=10)
    fake = fake_lease_metadata()
    results: dict[str, Any] = {mode: [] for mode in MODES}
    results["counts"] = []
    for round_index in range(plan.rounds):
        for mode in rotated(MODES, round_index):
            metadata = None if mode == "protected" else fake
            server_before = json.loads(stats_calls[mode](b"", timeout=10))
            holder_before = holder_traffic.snapshot()
            window = sync_window(channels[mode], metadata, args.shape, args.in_flight, plan)
            server_after = json.loads(stats_calls[mode](b"", timeout=10))
            results[mode].append(with_server_cpu(window, server_before, server_after))
            if mode == "protected":
                results["counts"].append(counts(window, server_before, server_after, holder_before, holder_traffic.snapshot()))
    session.close()
    client.close()
    return results


def counts(window: dict, server_before: dict, server_after: dict, holder_before: dict, holder_after: dict) -> dict[str, Any]:
    # Traffic counted from the start of the warm-up to the end of the window,
    # against every operation in that span (the window's count scaled up).
    enforcer = traffic_delta(server_before["traffic"], server_after["traffic"])
    holder = traffic_delta(holder_before, holder_after)
    return {
        "by_method": {
            **{f"enforcer {m}": n for m, n in enforcer["by_method"].items()},
            **{f"holder {m}": n for m, n in holder["by_method"].items()},
        },
        "enforcer_calls": enforcer["calls"],
        "enforcer_messages": enforcer["messages"],
        "holder_calls": holder["calls"],
        "holder_messages": holder["messages"],
        "validate_calls": server_after["validate_calls"] - server_before["validate_calls"],
        "window_operations": window["operations"],
    }


def with_client_cpu(window: dict[str, Any], cpu_seconds: float) -> dict[str, Any]:
    """Add the load client's CPU time per operation (all its threads), over the warm-up and the window."""
    return {**window, "client_cpu_us": cpu_seconds * 1e6 / max(1, window["all_operations"])}


def with_server_cpu(window: dict[str, Any], server_before: dict, server_after: dict) -> dict[str, Any]:
    """Add the server's CPU time per operation, over the warm-up and the window together."""
    cpu = server_after["cpu_seconds"] - server_before["cpu_seconds"]
    return {**window, "server_cpu_us": cpu * 1e6 / max(1, window["all_operations"])}


def rotated(modes: tuple[str, ...], shift: int) -> tuple[str, ...]:
    shift %= len(modes)
    return modes[shift:] + modes[:shift]


async def load_aio(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    from session_authority.clients import AioAuthorityClient, AioSession

    targets = dict(item.split("=", 1) for item in args.targets)
    holder_traffic = AuthorityTraffic()
    authority_channel = grpc.aio.insecure_channel(args.authority, interceptors=counting_aio_interceptors(holder_traffic))
    client = AioAuthorityClient(channel=authority_channel)
    session = await AioSession(client, tier="standard", principal="bench-holder").open()
    channels = {
        "bare": grpc.aio.insecure_channel(targets["bare"]),
        "passthrough": grpc.aio.insecure_channel(targets["passthrough"]),
        "protected": session.channel(targets["protected"]),
    }
    stats_channels = {mode: grpc.aio.insecure_channel(targets[mode]) for mode in MODES}
    stats_calls = {mode: channel.unary_unary(STATS) for mode, channel in stats_channels.items()}
    await channels["protected"].unary_unary(UNARY)(PAYLOAD, timeout=10)
    fake = fake_lease_metadata()
    results: dict[str, Any] = {mode: [] for mode in MODES}
    results["counts"] = []
    for round_index in range(plan.rounds):
        for mode in rotated(MODES, round_index):
            metadata = None if mode == "protected" else fake
            server_before = json.loads(await stats_calls[mode](b"", timeout=10))
            holder_before = holder_traffic.snapshot()
            window = await aio_window(channels[mode], metadata, args.shape, args.in_flight, plan)
            server_after = json.loads(await stats_calls[mode](b"", timeout=10))
            results[mode].append(with_server_cpu(window, server_before, server_after))
            if mode == "protected":
                results["counts"].append(counts(window, server_before, server_after, holder_before, holder_traffic.snapshot()))
    await session.close()
    for channel in (*channels.values(), *stats_channels.values(), authority_channel):
        await channel.close()
    return results


def load_main(args: argparse.Namespace) -> None:
    plan = Plan(seconds=args.seconds, warmup_seconds=args.warmup, rounds=args.rounds)
    if args.kind == "sync":
        result = load_sync(args, plan)
    else:
        result = asyncio.run(load_aio(args, plan))
    print(json.dumps(result), flush=True)


# -- the benchmark (parent process) ----------------------------------------------------


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
def echo_servers(
    work_dir: pathlib.Path, kind: str, authority_target: str, profile: bool
) -> Iterator[dict[str, ServerProcess]]:
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for mode in MODES:
            name = f"{kind}-{mode}"
            extra = ["--profile", str(work_dir / f"{name}.prof")] if profile and mode == "protected" else []
            command = python_command(
                "bench._interceptors", "serve",
                "--kind", kind,
                "--mode", mode,
                "--authority", authority_target,
                "--port-file", str(work_dir / f"{name}.port"),
                *extra,
            )  # fmt: skip
            servers[mode] = stack.enter_context(ServerProcess(command, work_dir / f"{name}.port", work_dir / f"{name}.log"))
        yield servers


def median_of(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def per_10k(counts: list[dict], key: str, plan: Plan) -> float:
    # Counts span warm-up plus window; scale the window's operations to that span.
    span = (plan.warmup_seconds + plan.seconds) / plan.seconds
    operations = sum(item["window_operations"] for item in counts) * span
    return sum(item[key] for item in counts) * 10_000 / max(1.0, operations)


def methods_text(counts: list[dict]) -> str:
    total: collections.Counter[str] = collections.Counter()
    for item in counts:
        total.update(item["by_method"])
    return ", ".join(f"{method} {count}" for method, count in sorted(total.items())) or "none"


def figures_for(kind: str, shape: str, in_flight: int, result: dict[str, Any], plan: Plan) -> list[Figure]:
    unit_name = "calls/s" if shape == "unary" else "stream msgs/s"
    label = f"{kind} {shape}, {in_flight} in flight"
    protected, passthrough, bare = (result[mode] for mode in ("protected", "passthrough", "bare"))
    counts = result["counts"]
    rounds = f"median of {plan.rounds}" if plan.rounds > 1 else "1 round"
    # The protected and pass-through windows of one round run seconds apart.
    paired = [mine["rate"] / max(1e-9, theirs["rate"]) for mine, theirs in zip(protected, passthrough)]
    authority_calls = per_10k(counts, "enforcer_calls", plan) + per_10k(counts, "holder_calls", plan)
    keepalive_messages = per_10k(counts, "enforcer_messages", plan) + per_10k(counts, "holder_messages", plan)
    return [
        Figure(
            name=f"{unit_name} protected ({label})",
            value=median_of(protected, "rate"),
            unit="",
            baseline_name="pass-through interceptor",
            baseline=median_of(passthrough, "rate"),
            target=0.90,
            paired_ratio=statistics.median(paired),
            note=(
                f"ratio: median of {len(paired)} paired round(s), range {min(paired):.2f}-{max(paired):.2f};"
                f" rates: {rounds}; client CPU us/{'call' if shape == 'unary' else 'msg'}"
                f" {median_of(protected, 'client_cpu_us'):.0f} vs {median_of(passthrough, 'client_cpu_us'):.0f}"
            ),
        ),
        Figure(
            name=f"{unit_name} protected ({label})",
            value=median_of(protected, "rate"),
            unit="",
            baseline_name="bare grpcio",
            baseline=median_of(bare, "rate"),
            note=f"pass-through/bare {median_of(passthrough, 'rate') / max(1e-9, median_of(bare, 'rate')):.2f}",
        ),
        Figure(
            name=f"server CPU us/{'call' if shape == 'unary' else 'msg'} protected ({label})",
            value=median_of(protected, "server_cpu_us"),
            unit="",
            baseline_name="pass-through server CPU us",
            baseline=median_of(passthrough, "server_cpu_us"),
            note=f"bare {median_of(bare, 'server_cpu_us'):.0f} us; all server threads; lower is better",
        ),
        Figure(
            name=f"p50 us protected ({label})",
            value=median_of(protected, "p50_us"),
            unit="",
            baseline_name="pass-through p50 us",
            baseline=median_of(passthrough, "p50_us"),
            note=f"bare {median_of(bare, 'p50_us'):.0f} us; lower is better",
        ),
        Figure(
            name=f"p99 us protected ({label})",
            value=median_of(protected, "p99_us"),
            unit="",
            baseline_name="pass-through p99 us",
            baseline=median_of(passthrough, "p99_us"),
            note=f"bare {median_of(bare, 'p99_us'):.0f} us; lower is better",
        ),
        Figure(
            name=f"authority calls per 10,000 ({label})",
            value=authority_calls,
            unit="",
            baseline_name="budget",
            baseline=5.0,
            target=1.0,
            target_op="<=",
            note=(
                f"calls by method: {methods_text(counts)};"
                f" KeepAlive messages per 10,000 {keepalive_messages:.1f}, on an open stream, off the call path"
            ),
        ),
    ]


def load_command(kind: str, shape: str, in_flight: int, servers: dict[str, ServerProcess], authority_target: str, plan: Plan) -> list[str]:
    return python_command(
        "bench._interceptors", "load",
        "--kind", kind,
        "--shape", shape,
        "--in-flight", str(in_flight),
        "--seconds", str(plan.seconds),
        "--warmup", str(plan.warmup_seconds),
        "--rounds", str(plan.rounds),
        "--authority", authority_target,
        "--targets", *(f"{mode}={server.target}" for mode, server in servers.items()),
    )  # fmt: skip


def print_profile(kind: str, path: pathlib.Path, top: int = 18) -> None:
    if not path.exists():
        print(f"profile of the {kind} protected server: {path} was not written")
        return
    output = io.StringIO()
    stats = pstats.Stats(str(path), stream=output)
    stats.sort_stats("tottime").print_stats(top)
    table = output.getvalue()
    print(f"-- profile of the {kind} protected server, all threads, by own time (cProfile):")
    print(table[table.index("ncalls") :].rstrip() if "ncalls" in table else table)


def run(options: Options) -> list[Figure]:
    """Measure the per-call cost of enforcement; return the figures."""
    plan = Plan.for_options(options)
    figures: list[Figure] = []
    with authority(options.work_dir) as authority_server:
        for kind, in_flights in KINDS.items():
            with echo_servers(options.work_dir, kind, authority_server.target, options.profile) as servers:
                for shape in SHAPES:
                    for in_flight in in_flights:
                        timeout = 120.0 + plan.rounds * len(MODES) * (plan.seconds + plan.warmup_seconds) * 2
                        result = run_json(load_command(kind, shape, in_flight, servers, authority_server.target, plan), timeout)
                        figures.extend(figures_for(kind, shape, in_flight, result, plan))
            if options.profile:
                print_profile(kind, options.work_dir / f"{kind}-protected.prof")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._interceptors", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the echo methods (one benchmark server)")
    serve.add_argument("--kind", choices=sorted(KINDS), required=True)
    serve.add_argument("--mode", choices=MODES, required=True)
    serve.add_argument("--authority", required=True, help="host:port of the authority")
    serve.add_argument("--port-file", type=pathlib.Path, required=True)
    serve.add_argument("--profile", type=pathlib.Path, help="write a cProfile of every server thread here at exit")
    load = commands.add_parser("load", help="drive the three servers in alternation and print JSON")
    load.add_argument("--kind", choices=sorted(KINDS), required=True)
    load.add_argument("--shape", choices=SHAPES, required=True)
    load.add_argument("--in-flight", type=int, required=True)
    load.add_argument("--seconds", type=float, required=True)
    load.add_argument("--warmup", type=float, required=True)
    load.add_argument("--rounds", type=int, required=True)
    load.add_argument("--authority", required=True)
    load.add_argument("--targets", nargs=3, required=True, metavar="MODE=HOST:PORT")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve_main(args)
    else:
        load_main(args)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Load clients, each run in its own process: ``python -m bench._load KIND --target HOST:PORT ...``.

Every client warms up, then counts completed operations over a fixed
measuring window, and prints one JSON object: ``{"operations": N,
"seconds": S, "rate": N / S, "all_operations": M}``, where ``M`` also counts
the warm-up and the calls still in flight when the window closed. Everything stops by itself at the end of the
window; no client runs longer than ``warmup + seconds`` plus its set-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import time
from collections.abc import Awaitable, Callable

import grpc

from session_authority.v1 import session_authority_pb2 as pb
from session_authority.v1 import session_authority_pb2_grpc as pb_grpc

from ._etcd import load_stubs

PRINCIPALS = 64
"""Grants rotate over this many principals, as a fleet of holders would."""

CALL_TIMEOUT_SECONDS = 10.0


class Window:
    """The measuring window: operations completed between ``start`` and ``end`` are counted."""

    def __init__(self, warmup_seconds: float, seconds: float) -> None:
        self.warmup_seconds = warmup_seconds
        self.seconds = seconds
        self.operations = 0
        self.all_operations = 0
        self.restart()

    def restart(self) -> None:
        """Open the window ``warmup_seconds`` from now, after a client's set-up."""
        self.start = time.monotonic() + self.warmup_seconds
        self.end = self.start + self.seconds

    def running(self) -> bool:
        return time.monotonic() < self.end

    def count(self, operations: int = 1) -> None:
        self.all_operations += operations
        now = time.monotonic()
        if self.start <= now < self.end:
            self.operations += operations

    def result(self) -> dict[str, float]:
        return {
            "operations": self.operations,
            "seconds": self.seconds,
            "rate": self.operations / self.seconds,
            "all_operations": self.all_operations,
        }


async def run_unary(window: Window, concurrency: int, call: Callable[[int], Awaitable[object]]) -> None:
    """Keep ``concurrency`` unary calls in flight until the window closes."""

    async def worker(index: int) -> None:
        while window.running():
            await call(index)
            window.count()

    await asyncio.gather(*(worker(i) for i in range(concurrency)))


# -- the authority (and the echo server, which serves the same Grant) --------


async def grant(target: str, window: Window, concurrency: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        requests = [pb.GrantRequest(principal=f"bench-{i:02d}", tier="standard") for i in range(PRINCIPALS)]

        async def call(index: int) -> object:
            return await stub.Grant(requests[index % PRINCIPALS], timeout=CALL_TIMEOUT_SECONDS)

        await run_unary(window, concurrency, call)


async def grant_many(stub: pb_grpc.SessionAuthorityStub, count: int, concurrency: int) -> list[str]:
    """Grant ``count`` leases, ``concurrency`` at a time, and return their IDs."""
    lease_ids: list[str] = []

    async def worker(index: int) -> None:
        for n in range(index, count, concurrency):
            reply = await stub.Grant(
                pb.GrantRequest(principal=f"bench-{n % PRINCIPALS:02d}", tier="standard"),
                timeout=CALL_TIMEOUT_SECONDS,
            )
            lease_ids.append(reply.lease_id)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return lease_ids


async def keepalive(
    target: str, window: Window, leases: int, batch: int, in_flight: int, lease_file: pathlib.Path | None
) -> dict[str, float]:
    """Renew ``leases`` leases in messages of ``batch`` entries, ``in_flight`` messages ahead.

    With ``lease_file``, the leases granted by an earlier client of the same
    authority are read from it (and a first client writes it), so later
    rounds spend no time on set-up.
    """
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.SessionAuthorityStub(channel)
        if lease_file is not None and lease_file.exists():
            lease_ids = lease_file.read_text().split()
        else:
            lease_ids = await grant_many(stub, leases, 64)
            if lease_file is not None:
                lease_file.write_text("\n".join(lease_ids))
        messages = [
            pb.KeepAliveRequest(entries=[pb.RenewEntry(lease_id=i) for i in lease_ids[start : start + batch]])
            for start in range(0, len(lease_ids), batch)
        ]
        window.restart()
        cpu_before = time.process_time()
        call = stub.KeepAlive()
        credit = asyncio.Semaphore(in_flight)
        not_alive = 0

        async def write() -> None:
            sequence = 0
            while window.running():
                await credit.acquire()
                message = messages[sequence % len(messages)]
                message.sequence = sequence
                await call.write(message)
                sequence += 1
            await call.done_writing()

        async def read() -> None:
            nonlocal not_alive
            async for reply in call:
                window.count(len(reply.leases))
                not_alive += sum(1 for lease in reply.leases if lease.state != pb.LEASE_STATE_ALIVE)
                credit.release()

        await asyncio.gather(write(), read())
        cpu = time.process_time() - cpu_before
        return {"not_alive": not_alive, "client_cpu_per_operation": cpu / max(1, window.all_operations)}


# -- etcd ---------------------------------------------------------------------


async def etcd_grant(target: str, window: Window, concurrency: int) -> None:
    etcd_pb, etcd_grpc = load_stubs()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = etcd_grpc.LeaseStub(channel)
        request = etcd_pb.LeaseGrantRequest(TTL=300)

        async def call(index: int) -> object:
            return await stub.LeaseGrant(request, timeout=CALL_TIMEOUT_SECONDS)

        await run_unary(window, concurrency, call)


async def etcd_keepalive(
    target: str, window: Window, leases: int, in_flight: int
) -> dict[str, float]:
    """Renew ``leases`` etcd leases round-robin on one stream, ``in_flight`` requests ahead.

    etcd's keep-alive request names one lease, so every renewal is one message.
    """
    etcd_pb, etcd_grpc = load_stubs()
    async with grpc.aio.insecure_channel(target) as channel:
        stub = etcd_grpc.LeaseStub(channel)
        ids: list[int] = []

        async def granter(index: int) -> None:
            for _ in range(index, leases, 64):
                reply = await stub.LeaseGrant(etcd_pb.LeaseGrantRequest(TTL=300), timeout=CALL_TIMEOUT_SECONDS)
                ids.append(reply.ID)

        await asyncio.gather(*(granter(i) for i in range(64)))
        requests = [etcd_pb.LeaseKeepAliveRequest(ID=i) for i in ids]
        window.restart()
        cpu_before = time.process_time()
        call = stub.LeaseKeepAlive()
        credit = asyncio.Semaphore(in_flight)
        expired = 0

        async def write() -> None:
            sent = 0
            while window.running():
                await credit.acquire()
                await call.write(requests[sent % len(requests)])
                sent += 1
            await call.done_writing()

        async def read() -> None:
            nonlocal expired
            async for reply in call:
                window.count()
                if reply.TTL <= 0:
                    expired += 1
                credit.release()

        await asyncio.gather(write(), read())
        cpu = time.process_time() - cpu_before
        return {"not_alive": expired, "client_cpu_per_operation": cpu / max(1, window.all_operations)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._load", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["grant", "keepalive", "etcd-grant", "etcd-keepalive"])
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the measuring window")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of load before the window opens")
    parser.add_argument("--concurrency", type=int, default=64, help="unary calls in flight")
    parser.add_argument("--leases", type=int, default=10_000, help="leases renewed round-robin (keep-alive kinds)")
    parser.add_argument("--batch", type=int, default=1000, help="renewal entries per KeepAlive message")
    parser.add_argument("--in-flight", type=int, default=4, help="keep-alive messages sent ahead of their replies")
    parser.add_argument(
        "--lease-file", type=pathlib.Path, help="file of lease IDs to renew, written by the first client (keepalive)"
    )
    args = parser.parse_args()

    window = Window(args.warmup, args.seconds)
    extra: dict[str, float] | None = None
    if args.kind == "grant":
        cpu_before = time.process_time()
        asyncio.run(grant(args.target, window, args.concurrency))
        cpu = time.process_time() - cpu_before
        extra = {"client_cpu_per_operation": cpu / max(1, window.all_operations)}
    elif args.kind == "keepalive":
        extra = asyncio.run(
            keepalive(args.target, window, args.leases, args.batch, args.in_flight, args.lease_file)
        )
    elif args.kind == "etcd-grant":
        asyncio.run(etcd_grant(args.target, window, args.concurrency))
    else:
        extra = asyncio.run(etcd_keepalive(args.target, window, args.leases, args.in_flight))
    print(json.dumps({**window.result(), **(extra or {})}))


if __name__ == "__main__":
    main()

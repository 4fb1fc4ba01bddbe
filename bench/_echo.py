"""A bare ``grpc.aio`` server that returns a canned reply to ``Grant``: the ceiling for grants.

It serves the authority's ``Grant`` method name with the same request and
reply types, and a reply of the same size as a real grant, so the one load
client drives both servers alike. It does no work besides the gRPC stack's
own: parsing the request and serialising the reply.

Run as ``python -m bench._echo --port-file FILE``; it serves on a free
loopback port until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import secrets
import signal
import time

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from session_authority.v1 import session_authority_pb2 as pb

SERVICE = "session_authority.v1.SessionAuthority"


def canned_grant_response() -> pb.GrantResponse:
    """Return a reply shaped like a real grant in the default tier."""
    granted_at = timestamp_pb2.Timestamp()
    granted_at.FromNanoseconds(time.time_ns())
    lease = pb.Lease(
        fingerprint="0123456789ab",
        digest=secrets.token_hex(32),
        principal="bench-00",
        tier="standard",
        state=pb.LEASE_STATE_ALIVE,
        idle_timeout=duration_pb2.Duration(seconds=300),
        max_duration=duration_pb2.Duration(seconds=28800),
        ttl=duration_pb2.Duration(seconds=300),
        max_remaining=duration_pb2.Duration(seconds=28800),
        age=duration_pb2.Duration(),
        idle_for=duration_pb2.Duration(),
        granted_at=granted_at,
    )
    return pb.GrantResponse(lease_id=secrets.token_urlsafe(16), lease=lease)


async def serve(port_file: pathlib.Path) -> None:
    """Serve until SIGTERM or SIGINT, writing the bound port to ``port_file``."""
    reply = canned_grant_response()

    async def grant(request: pb.GrantRequest, context: grpc.aio.ServicerContext) -> pb.GrantResponse:
        return reply

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Grant": grpc.unary_unary_rpc_method_handler(
                grant,
                request_deserializer=pb.GrantRequest.FromString,
                response_serializer=pb.GrantResponse.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    temporary = port_file.with_suffix(".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(port_file)

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    await stopping.wait()
    await server.stop(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench._echo", description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=pathlib.Path, required=True, help="file to write the bound port to")
    asyncio.run(serve(parser.parse_args().port_file))


if __name__ == "__main__":
    main()

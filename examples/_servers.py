"""Processes that serve the demo's services behind the lease interceptors.

``python -m session_authority.examples._servers telemetry|payments --authority HOST:PORT``
serves until SIGTERM or SIGINT. ``telemetry`` is a ``grpc.server`` hosting the
standard Health service and ``demo.v1.Telemetry``; ``payments`` is a
``grpc.aio.server`` hosting ``demo.v1.Payments``. The only lease-specific line in
each is the interceptor passed to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import pathlib
import signal
import sys
import threading
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from session_authority.examples._services import PaymentsService, TelemetryService
from session_authority.examples.protos.demo.v1 import demo_pb2, demo_pb2_grpc
from session_authority.interceptors import AioLeaseServerInterceptor, EnforcerConfig, LeaseServerInterceptor

logger = logging.getLogger(__name__)

# gRPC enables SO_REUSEPORT by default; a second copy of a service must not
# silently take half of this one's calls.
NO_PORT_SHARING = [("grpc.so_reuseport", 0)]

TELEMETRY_SERVICE = demo_pb2.DESCRIPTOR.services_by_name["Telemetry"].full_name
STOP_GRACE_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m session_authority.examples._servers",
        description="Serve a demo service behind the session lease interceptor until SIGTERM.",
    )
    parser.add_argument("service", choices=("telemetry", "payments"), help="which server to run")
    parser.add_argument("--authority", required=True, metavar="HOST:PORT", help="address of the authority")
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT", help="address to serve on (default: 127.0.0.1:0)")
    parser.add_argument("--port-file", type=pathlib.Path, help="write the bound port to this file once serving")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def enforcer_config(authority: str) -> EnforcerConfig:
    """Return the enforcer settings of the demo servers.

    The authority heartbeats twice a second in the demo, so a watch stream
    silent for 1.5 s is treated as down.
    """
    return EnforcerConfig(authority_target=authority, staleness_bound_seconds=1.5)


def write_port_file(path: pathlib.Path | None, port: int) -> None:
    """Write ``port`` to ``path`` atomically, so a reader never sees a partial file."""
    if path is None:
        return
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(f"{port}\n")
    temporary.replace(path)


def bind(server: grpc.Server | grpc.aio.Server, listen: str) -> int:
    """Bind an insecure port and return it.

    Raises:
        RuntimeError: The address cannot be bound.
    """
    port = server.add_insecure_port(listen)
    if port == 0:
        raise RuntimeError(f"cannot bind {listen}; pass a free --listen address such as 127.0.0.1:0")
    return port


def serve_telemetry(args: argparse.Namespace) -> None:
    """Run the sync server hosting Health and Telemetry until SIGTERM or SIGINT."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())

    interceptor = LeaseServerInterceptor(enforcer_config(args.authority))
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=16),
        interceptors=[interceptor],
        options=NO_PORT_SHARING,
    )
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    demo_pb2_grpc.add_TelemetryServicer_to_server(TelemetryService(), server)
    port = bind(server, args.listen)
    server.start()
    health_servicer.set(TELEMETRY_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    write_port_file(args.port_file, port)
    logger.info("telemetry server on port %d", port)

    stop.wait()
    health_servicer.enter_graceful_shutdown()
    server.stop(STOP_GRACE_SECONDS).wait()
    interceptor.close()


async def _serve_payments(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    # The constructor blocks while it fetches the policy, before any call arrives.
    interceptor = AioLeaseServerInterceptor(enforcer_config(args.authority))
    server = grpc.aio.server(interceptors=[interceptor], options=NO_PORT_SHARING)
    demo_pb2_grpc.add_PaymentsServicer_to_server(PaymentsService(), server)
    port = bind(server, args.listen)
    await server.start()
    write_port_file(args.port_file, port)
    logger.info("payments server on port %d", port)

    await stop.wait()
    await server.stop(STOP_GRACE_SECONDS)
    await interceptor.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.service == "telemetry":
            serve_telemetry(args)
        else:
            asyncio.run(_serve_payments(args))
    except RuntimeError as exc:
        print(f"{args.service} server: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

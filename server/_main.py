"""``session-authority serve``: flags, logging and signal handling around ``Authority``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import pathlib
import signal
import sys
from collections.abc import Callable, Sequence

import grpc

from session_authority.clients._common import OneLineArgumentParser

from ._audit import DEFAULT_MAX_BYTES as DEFAULT_AUDIT_MAX_BYTES
from ._audit import MIN_MAX_BYTES as MIN_AUDIT_MAX_BYTES
from ._audit import AuditWriteError
from ._auth import (
    ApiKeyAuthenticator,
    Authenticator,
    InsecureDevAuthenticator,
    MtlsAuthenticator,
    is_loopback_address,
)
from ._authority import DEFAULT_RESTART_GRACE_SECONDS, Authority, AuthorityConfig
from ._etcd_store import DEFAULT_PREFIX as DEFAULT_ETCD_PREFIX
from ._etcd_store import check_prefix, check_replica_id, check_tls, parse_endpoints, uses_tls
from ._policy import Policy, PolicyError, load_policy
from ._store import StoreError
from ._telemetry_sdk import TelemetryConfigError, TelemetrySetup, configure_sdk
from ._tls import TlsConfigError, channel_credentials, server_credentials
from ._watch import DEFAULT_REPLAY_SIZE

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_DATA_DIR = "session-authority-data"


def seconds_between(minimum: float, maximum: float) -> Callable[[str], float]:
    """Return an argparse type for a number of seconds in [minimum, maximum]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (math.isfinite(value) and minimum <= value <= maximum):
            raise argparse.ArgumentTypeError(f"{text} s is outside the allowed range {minimum:g} s to {maximum:g} s")
        return value

    return parse


def integer_between(minimum: int, maximum: int) -> Callable[[str], int]:
    """Return an argparse type for a whole number in [minimum, maximum]."""

    def parse(text: str) -> int:
        if not text.strip().isascii() or not text.strip().isdigit():
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of decimal digits")
        value = int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"{value} is outside the allowed range {minimum} to {maximum}")
        return value

    return parse


def port_number(text: str) -> int:
    """Parse a TCP port for argparse: 0 (pick a free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is outside 0 to 65535")
    return value


def listen_address(text: str) -> str:
    """Check a HOST:PORT listen address for argparse, so a bad port is named as such."""
    host, colon, port = text.rpartition(":")
    if not colon or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT, for example 127.0.0.1:50051")
    port_number(port)
    return text


def _argparse_type(check: Callable[[str], object]) -> Callable[[str], object]:
    """Wrap a checker that raises ValueError so that argparse names the flag in its message."""

    def parse(text: str) -> object:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


def _add_file_flag(group: argparse._ArgumentGroup, flag: str, text: str, note: str = "") -> None:
    """Add a file-path flag whose default comes from ``SESSION_AUTHORITY_<FLAG>`` in the environment."""
    variable = "SESSION_AUTHORITY_" + flag.removeprefix("--").replace("-", "_").upper()
    group.add_argument(
        flag,
        type=pathlib.Path,
        default=os.environ.get(variable) or None,
        metavar="FILE",
        help=f"{text} (env {variable}{'; ' + note if note else ''})",
    )


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = OneLineArgumentParser(
        prog="session-authority serve",
        description="Run the session authority: grants, renews, revokes and expires session leases.",
        epilog=(
            "Authentication of grants, in order of precedence: with --api-keys the API key names the"
            " principal, and TLS (if configured) only encrypts, even when --tls-client-ca makes client"
            " certificates mandatory; else with --tls-client-ca the principal is the client certificate's"
            " SPIFFE ID (spiffe:// URI SAN), else its subject common name; else --insecure-dev takes the"
            " principal from the request on a loopback address, and every caller is admin."
        ),
    )
    parser.add_argument(
        "--listen",
        type=listen_address,
        default=env("SESSION_AUTHORITY_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT to serve on; port 0 picks a free one (env SESSION_AUTHORITY_LISTEN, default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--data-dir",
        type=pathlib.Path,
        default=pathlib.Path(env("SESSION_AUTHORITY_DATA_DIR", DEFAULT_DATA_DIR)),
        help=f"directory of the lease store (env SESSION_AUTHORITY_DATA_DIR, default ./{DEFAULT_DATA_DIR})",
    )
    store = parser.add_argument_group("lease store")
    store.add_argument(
        "--store",
        choices=["sqlite", "etcd"],
        default=env("SESSION_AUTHORITY_STORE", "sqlite"),
        help="where leases live: sqlite keeps them in DATA_DIR/leases.db for this authority alone; etcd shares"
        " them with other replicas, and DATA_DIR then holds only the audit log"
        " (env SESSION_AUTHORITY_STORE, default sqlite)",
    )
    store.add_argument(
        "--etcd-endpoints",
        type=_argparse_type(parse_endpoints),
        default=env("SESSION_AUTHORITY_ETCD_ENDPOINTS") or None,
        metavar="URLS",
        help="comma-separated etcd client URLs, http://HOST:PORT or https://HOST:PORT each, for --store etcd"
        " (env SESSION_AUTHORITY_ETCD_ENDPOINTS)",
    )
    store.add_argument(
        "--replica-id",
        type=_argparse_type(check_replica_id),
        default=env("SESSION_AUTHORITY_REPLICA_ID") or None,
        metavar="NAME",
        help="this replica's name in etcd; unique in the fleet and kept across restarts, so that a restarted"
        " replica writes the audit records of the ends it had claimed"
        " (env SESSION_AUTHORITY_REPLICA_ID, default: the host name)",
    )
    store.add_argument(
        "--etcd-prefix",
        type=_argparse_type(check_prefix),
        default=env("SESSION_AUTHORITY_ETCD_PREFIX", DEFAULT_ETCD_PREFIX),
        metavar="PREFIX",
        help=f"prefix of every etcd key the replicas share (env SESSION_AUTHORITY_ETCD_PREFIX, default {DEFAULT_ETCD_PREFIX})",
    )
    _add_file_flag(
        store, "--etcd-ca", "PEM CA bundle that signed the etcd members' certificates, for https endpoints", "default: the system's roots"
    )
    _add_file_flag(
        store, "--etcd-cert", "PEM client certificate chain to present to etcd, for etcd's --client-cert-auth", "needs --etcd-key"
    )
    _add_file_flag(store, "--etcd-key", "PEM private key of --etcd-cert")
    store.add_argument(
        "--etcd-server-name",
        default=env("SESSION_AUTHORITY_ETCD_SERVER_NAME") or None,
        metavar="NAME",
        help="name that every etcd member's certificate contains, for https endpoints"
        " (env SESSION_AUTHORITY_ETCD_SERVER_NAME; default: the host of the single endpoint;"
        " needed with several https endpoints)",
    )
    parser.add_argument(
        "--policy",
        type=pathlib.Path,
        default=env("SESSION_AUTHORITY_POLICY") or None,
        help="TOML policy file (env SESSION_AUTHORITY_POLICY; default: the built-in policy)",
    )
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument(
        "--api-keys",
        type=pathlib.Path,
        default=env("SESSION_AUTHORITY_API_KEYS") or None,
        help='file of "SHA256HEX PRINCIPAL" lines (env SESSION_AUTHORITY_API_KEYS); create keys with'
        " `session-authority keys add`",
    )
    auth.add_argument(
        "--insecure-dev",
        action="store_true",
        help="take the principal from the request, with no authentication; loopback addresses only",
    )
    tls = parser.add_argument_group("TLS")
    _add_file_flag(
        tls, "--tls-cert", "PEM certificate chain of the server; serves TLS instead of plaintext", "needs --tls-key"
    )
    _add_file_flag(tls, "--tls-key", "PEM private key of --tls-cert")
    _add_file_flag(
        tls,
        "--tls-client-ca",
        "PEM CA bundle; every client must present a certificate signed by it (mutual TLS),"
        " and without --api-keys the certificate's identity is the grant's principal",
        "needs --tls-cert",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=seconds_between(0.05, 3600.0),
        default=1.0,
        metavar="SECONDS",
        help="maximum silence on a watch stream before a heartbeat is sent (default 1.0)",
    )
    parser.add_argument(
        "--restart-grace",
        type=seconds_between(0.0, 600.0),
        default=DEFAULT_RESTART_GRACE_SECONDS,
        metavar="SECONDS",
        help="after a restart, how long leases restored past their idle deadline wait for enforcers to report"
        " the activity they saw meanwhile before they end, dated at that deadline"
        f" (default {DEFAULT_RESTART_GRACE_SECONDS:g})",
    )
    parser.add_argument(
        "--ended-retention",
        type=seconds_between(0.0, 30 * 86400.0),
        default=3600.0,
        metavar="SECONDS",
        help="how long ended leases are reported as ended rather than not found (default 3600)",
    )
    parser.add_argument(
        "--audit-fail-closed",
        action="store_true",
        default=env("SESSION_AUTHORITY_AUDIT_FAIL_CLOSED", "").lower() in ("1", "true", "yes"),
        help="reject grants (UNAVAILABLE) while the audit log in DATA_DIR/audit cannot be written;"
        " by default grants go on and the records are written once the log recovers"
        " (env SESSION_AUTHORITY_AUDIT_FAIL_CLOSED=true)",
    )
    parser.add_argument(
        "--audit-max-bytes",
        type=integer_between(MIN_AUDIT_MAX_BYTES, 2**40),
        # argparse passes a text default through the type too, so a bad environment value is named like a bad flag.
        default=env("SESSION_AUTHORITY_AUDIT_MAX_BYTES", str(DEFAULT_AUDIT_MAX_BYTES)),
        metavar="BYTES",
        help="rotate DATA_DIR/audit/audit.jsonl before it grows past this size; the authority indexes the"
        " current and the previous file in memory, about 180 bytes per record"
        " (env SESSION_AUTHORITY_AUDIT_MAX_BYTES, default 67108864, 64 MiB)",
    )
    parser.add_argument(
        "--watch-replay-size",
        type=integer_between(1, 10_000_000),
        default=env("SESSION_AUTHORITY_WATCH_REPLAY_SIZE", str(DEFAULT_REPLAY_SIZE)),
        metavar="ENDS",
        help="recent session ends kept for enforcers whose watch stream reconnects, about 310 bytes each;"
        " an enforcer away for more ends resets its cache (env SESSION_AUTHORITY_WATCH_REPLAY_SIZE, default 65536)",
    )
    parser.add_argument(
        "--prometheus-port",
        type=port_number,
        default=int(env("SESSION_AUTHORITY_PROMETHEUS_PORT")) if env("SESSION_AUTHORITY_PROMETHEUS_PORT") else None,
        metavar="PORT",
        help="serve OpenTelemetry metrics for Prometheus at http://HOST:PORT/metrics; 0 picks a free port"
        " (env SESSION_AUTHORITY_PROMETHEUS_PORT; default: no endpoint)",
    )
    parser.add_argument(
        "--prometheus-host",
        default=env("SESSION_AUTHORITY_PROMETHEUS_HOST", "127.0.0.1"),
        metavar="HOST",
        help="address of the Prometheus endpoint (env SESSION_AUTHORITY_PROMETHEUS_HOST, default 127.0.0.1)",
    )
    parser.add_argument(
        "--port-file",
        type=pathlib.Path,
        help="write the bound port to this file once serving (useful with port 0)",
    )
    parser.add_argument(
        "--log-level",
        default=env("SESSION_AUTHORITY_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level (env SESSION_AUTHORITY_LOG_LEVEL, default INFO)",
    )
    return parser


def build_config(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> AuthorityConfig:
    """Turn parsed flags into a config.

    Args:
        args: Flags parsed by ``parser``.
        parser: Reports flags that contradict each other as usage errors
            (exit status 2); None uses a new :func:`build_parser`.

    Raises:
        SystemExit: With a one-line message when a flag or file is invalid.
    """
    policy = Policy.default()
    if args.policy is not None:
        try:
            policy = load_policy(args.policy)
        except PolicyError as exc:
            raise SystemExit(f"session-authority serve: invalid policy:\n{exc}") from exc

    credentials = _server_credentials(args)
    authenticator = _authenticator(args)
    store_options = _store_options(args, parser or build_parser())
    return AuthorityConfig(
        authenticator=authenticator,
        listen=args.listen,
        data_dir=args.data_dir,
        policy=policy,
        admin_everyone=args.insecure_dev,
        server_credentials=credentials,
        heartbeat_interval_seconds=args.heartbeat_interval,
        restart_grace_seconds=args.restart_grace,
        ended_retention_seconds=args.ended_retention,
        audit_fail_closed=args.audit_fail_closed,
        audit_max_bytes=args.audit_max_bytes,
        watch_replay_size=args.watch_replay_size,
        **store_options,
    )


def _store_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, object]:
    # Flags and environment values both arrive here, so values from the
    # environment are checked again. parser.error exits with status 2.
    endpoints = args.etcd_endpoints
    if args.store not in ("sqlite", "etcd"):
        parser.error(f"--store {args.store!r} is invalid; use sqlite or etcd")
    tls_flags = {
        "--etcd-ca": args.etcd_ca,
        "--etcd-cert": args.etcd_cert,
        "--etcd-key": args.etcd_key,
        "--etcd-server-name": args.etcd_server_name,
    }
    if args.store == "sqlite":
        etcd_flags = {"--etcd-endpoints": endpoints, "--replica-id": args.replica_id, **tls_flags}
        flag = next((flag for flag, value in etcd_flags.items() if value), None)
        if flag is not None:
            parser.error(f"{flag} applies only to --store etcd; add --store etcd or drop {flag}")
        return {}
    if endpoints is None:
        parser.error(
            "--store etcd needs --etcd-endpoints, for example"
            " --etcd-endpoints http://127.0.0.1:2379,http://127.0.0.1:22379"
        )
    try:
        checked = parse_endpoints(endpoints) if isinstance(endpoints, str) else endpoints
        server_name = args.etcd_server_name or ""
        tls_flags_given = [flag for flag, value in tls_flags.items() if value]
        if tls_flags_given and not uses_tls(checked):
            parser.error(
                f"{tls_flags_given[0]} applies only to https etcd endpoints;"
                f" write them as https://HOST:PORT or drop {tls_flags_given[0]}"
            )
        check_tls(checked, credentials=False, server_name=server_name)
        options: dict[str, object] = {
            "store": "etcd",
            "etcd_endpoints": checked,
            "replica_id": check_replica_id(args.replica_id) if args.replica_id else "",
            "etcd_prefix": check_prefix(args.etcd_prefix),
            "etcd_server_name": server_name,
        }
    except ValueError as exc:
        parser.error(str(exc))
    if uses_tls(checked):
        try:
            options["etcd_credentials"] = channel_credentials(args.etcd_ca, args.etcd_cert, args.etcd_key)
        except TlsConfigError as exc:
            raise SystemExit(f"session-authority serve: {exc}") from exc
    return options


def _server_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise SystemExit("session-authority serve: --tls-client-ca needs --tls-cert and --tls-key")
        return None
    if args.tls_cert is None or args.tls_key is None:
        missing = "--tls-key" if args.tls_key is None else "--tls-cert"
        raise SystemExit(f"session-authority serve: {missing} is missing; give --tls-cert and --tls-key together")
    try:
        return server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    except TlsConfigError as exc:
        raise SystemExit(f"session-authority serve: {exc}") from exc


def _authenticator(args: argparse.Namespace) -> Authenticator:
    # The precedence stated in the --help epilog: API keys, then client certificates,
    # then insecure development mode.
    if args.insecure_dev:
        if args.tls_client_ca is not None:
            raise SystemExit(
                "session-authority serve: --insecure-dev ignores client certificates;"
                " drop --tls-client-ca, or drop --insecure-dev to take principals from certificates"
            )
        if not is_loopback_address(args.listen):
            raise SystemExit(
                f"session-authority serve: --insecure-dev refuses to listen on {args.listen}:"
                " it accepts any principal without authentication; use a loopback address"
                " such as 127.0.0.1:50051, or --api-keys"
            )
        return InsecureDevAuthenticator()
    if args.api_keys is not None:
        try:
            return ApiKeyAuthenticator.from_file(args.api_keys)
        except (OSError, ValueError) as exc:
            raise SystemExit(f"session-authority serve: cannot load --api-keys: {exc}") from exc
    if args.tls_client_ca is not None:
        return MtlsAuthenticator()
    raise SystemExit(
        "session-authority serve: no authentication configured; pass --api-keys FILE"
        " (see `session-authority keys add`), --tls-client-ca FILE with --tls-cert and --tls-key"
        " for client certificates, or --insecure-dev on a loopback address"
    )


async def run(config: AuthorityConfig, port_file: pathlib.Path | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then stop cleanly and flush the store."""
    authority = Authority(config)
    await authority.start()
    if isinstance(config.authenticator, InsecureDevAuthenticator):
        logger.warning(
            "insecure development mode: any caller may claim any principal and every caller is admin;"
            " never use this in production"
        )
    elif config.server_credentials is None and not is_loopback_address(config.listen):
        logger.warning(
            "serving plaintext on %s: API keys and lease IDs cross the network unencrypted;"
            " pass --tls-cert and --tls-key",
            config.listen,
        )
    # Handlers go in before the port file appears, because a process waiting for
    # that file may send SIGTERM at once.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    if port_file is not None:
        temporary = port_file.with_suffix(port_file.suffix + ".tmp")
        try:
            temporary.write_text(f"{authority.port}\n")
            temporary.replace(port_file)
        except OSError as exc:
            # The authority is already serving, so stop it as SIGTERM does,
            # which closes the store and the audit log.
            await authority.stop(grace_seconds=0)
            raise RuntimeError(
                f"cannot write --port-file {port_file}: {exc.strerror or exc};"
                " create its directory or choose another path"
            ) from exc

    await stopping.wait()
    logger.info("stop requested; finishing calls in flight")
    await authority.stop(grace_seconds=1.0)


def serve_main(argv: Sequence[str] | None = None) -> int:
    """Run ``session-authority serve`` with ``argv`` (without the ``serve`` word)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        config = build_config(args, parser)
    except SystemExit as exc:
        if not isinstance(exc.code, str):
            raise
        # A bad flag, policy or key file is a usage error, like the flags argparse rejects.
        print(exc.code, file=sys.stderr)
        return 2
    try:
        telemetry = configure_sdk(prometheus_host=args.prometheus_host, prometheus_port=args.prometheus_port)
    except TelemetryConfigError as exc:
        print(f"session-authority serve: {exc}", file=sys.stderr)
        return 2
    _log_telemetry(telemetry)
    try:
        asyncio.run(run(config, args.port_file))
    except (StoreError, AuditWriteError, RuntimeError) as exc:
        print(f"session-authority serve: {exc}", file=sys.stderr)
        return 1
    finally:
        # Flushes spans and metrics still queued for the exporters.
        telemetry.shutdown()
    return 0


def _log_telemetry(telemetry: TelemetrySetup) -> None:
    logger.info(
        "OpenTelemetry: traces to %s, metrics to %s",
        ", ".join(telemetry.traces_exporters) or "nowhere",
        ", ".join(telemetry.metrics_exporters) or "nowhere",
    )


if __name__ == "__main__":
    sys.exit(serve_main())

"""The ``session-authority`` command: runs the authority and operates on its leases.

Exit status: 0 on success, 1 when the authority rejected the request, 2 for
invalid usage, 3 when the authority could not be reached, 130 when
interrupted. Errors print as one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import json
import logging
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable, Sequence, TextIO

import grpc

from session_authority.clients._client import AuthorityClient
from session_authority.clients._common import OneLineArgumentParser, check_ca_file, check_client_certificate, read_pem_file
from session_authority.clients._errors import AuthorityError, AuthorityUnavailable
from session_authority.clients._types import (
    MAX_DURATION_SECONDS,
    HeartbeatEvent,
    LeaseInfo,
    LeaseState,
    MethodRuleInfo,
    SessionEndEvent,
    TierInfo,
)

logger = logging.getLogger(__name__)

PROG = "session-authority"

EXIT_OK = 0
EXIT_REJECTED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

DEFAULT_TARGET = "127.0.0.1:50051"
TARGET_ENV = "SESSION_AUTHORITY_TARGET"
API_KEY_ENV = "SESSION_AUTHORITY_API_KEY"
PRINCIPAL_ENV = "SESSION_AUTHORITY_PRINCIPAL"
TLS_CA_ENV = "SESSION_AUTHORITY_TLS_CA"
TLS_CERT_ENV = "SESSION_AUTHORITY_TLS_CLIENT_CERT"
TLS_KEY_ENV = "SESSION_AUTHORITY_TLS_CLIENT_KEY"
DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_SEQUENCE = 2**64 - 1
"""``after_sequence`` is a uint64 on the wire."""

STDIN_LEASE_ID = "-"

# gRPC target schemes passed to the channel unchanged.
_TARGET_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:", "xds:")

_LEASE_ID_HELP = (
    "the lease ID printed by 'lease grant', or - to read it from the first line of "
    "standard input; an ID given here shows in the process list and shell history"
)

_FORWARDED_COMMANDS = ("serve", "audit", "demo")

# Global options that take a value, for finding a forwarded command in argv.
_GLOBAL_OPTIONS_WITH_VALUE = (
    "--authority",
    "--api-key",
    "--api-key-file",
    "--principal",
    "--timeout",
    "--tls-ca",
    "--tls-cert",
    "--tls-key",
)

_LEASE_COLUMNS = (
    "fingerprint",
    "principal",
    "tier",
    "state",
    "ttl",
    "max remaining",
    "age",
    "end reason",
)


class UsageError(Exception):
    """Invalid command-line input found after argparse accepted it (exit status 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    Args:
        argv: Arguments without the program name; ``sys.argv[1:]`` when None.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)

    forwarded_index = _find_forwarded_command(arguments)
    if forwarded_index is not None:
        if forwarded_index > 0:
            command = arguments[forwarded_index]
            _print_error(f"{command} takes its own options; put them after '{command}'")
            return EXIT_USAGE
        return _run_forwarded(arguments[0], arguments[1:])

    parser = build_parser()
    try:
        args = parser.parse_args(_lease_ids_after_separator(arguments, parser))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE

    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", 0) else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    context = _Context(args)
    try:
        return args.handler(context)
    except UsageError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except ValueError as exc:
        _print_error(str(exc))
        return EXIT_USAGE
    except AuthorityUnavailable as exc:
        hint = _tls_hint(exc, *context.tls_options())
        _print_error(f"{exc}; {hint}" if hint else str(exc))
        return EXIT_UNREACHABLE
    except AuthorityError as exc:
        _print_error(str(exc))
        return EXIT_REJECTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


_LEASE_ID_PATTERN = re.compile(r"-[A-Za-z0-9_-]{21}")
"""A lease ID that begins with '-': 22 URL-safe characters, as the authority issues them."""


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Return every option string of a parser and of its subcommands' parsers."""
    found: set[str] = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                found |= _option_strings(subparser)
    return found


def _lease_ids_after_separator(arguments: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """Move lease IDs that begin with '-' behind a '--' separator.

    One lease ID in 64 begins with '-' (the URL-safe alphabet includes it),
    and argparse would read it as an unknown option. After '--' it is read as
    the LEASE_ID positional.
    """
    if "--" in arguments:
        return arguments
    options = _option_strings(parser)
    lease_ids = [a for a in arguments if _LEASE_ID_PATTERN.fullmatch(a) and a.split("=", 1)[0] not in options]
    if not lease_ids:
        return arguments
    return [a for a in arguments if a not in lease_ids] + ["--", *lease_ids]


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser of every subcommand except the forwarded ``serve``, ``audit`` and ``demo``."""
    global_options = _global_options_parser()
    parser = OneLineArgumentParser(
        prog=PROG,
        description="Run the session authority, or grant, inspect and revoke session leases.",
        parents=[global_options],
        epilog=(
            f"Exit status: {EXIT_OK} ok, {EXIT_REJECTED} rejected by the authority, "
            f"{EXIT_USAGE} invalid usage, {EXIT_UNREACHABLE} authority unreachable or unavailable (no reply"
            " in time, or its store is down): retry later."
        ),
    )
    parser.add_argument(
        "--principal",
        dest="caller_principal",
        metavar="PRINCIPAL",
        default=argparse.SUPPRESS,
        help=(
            f"caller identity sent as x-session-principal, honoured only by an authority "
            f"in insecure development mode; give it before the command (env: {PRINCIPAL_ENV})"
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser(
        "serve",
        add_help=False,
        help="run the authority server (see 'session-authority serve --help')",
    )
    commands.add_parser(
        "audit",
        add_help=False,
        help="inspect and verify the audit log (see 'session-authority audit --help')",
    )
    commands.add_parser(
        "demo",
        add_help=False,
        help="run the authority, protected services and machine clients on loopback (see 'session-authority demo --help')",
    )
    _add_keys_commands(commands, global_options)
    _add_lease_commands(commands, global_options)

    watch = commands.add_parser(
        "watch",
        parents=[global_options],
        help="print each session end as it happens, until Ctrl-C or --count",
    )
    watch.add_argument(
        "--after-sequence",
        type=_sequence,
        default=0,
        metavar="N",
        help=(
            "replay the ends after this sequence number (default: 0, only new ends); without "
            "the matching --instance-id the authority replays nothing, and a warning says so"
        ),
    )
    watch.add_argument(
        "--instance-id",
        default="",
        metavar="ID",
        help="with --after-sequence: the instance ID the sequence came from (shown on heartbeats)",
    )
    watch.add_argument(
        "--heartbeats", action="store_true", help="also print the authority's heartbeats"
    )
    watch.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="stop after printing N events",
    )
    watch.set_defaults(handler=_watch)

    now = commands.add_parser(
        "now", parents=[global_options], help="print the authority's wall time (UTC)"
    )
    now.set_defaults(handler=_now)

    policy = commands.add_parser(
        "policy", parents=[global_options], help="print the tiers and method rules in force"
    )
    policy.set_defaults(handler=_policy)
    return parser


def _global_options_parser() -> argparse.ArgumentParser:
    # SUPPRESS defaults let the same option appear before or after the
    # command without the later parser resetting what the earlier one set.
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--authority",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help=f"address of the authority (env: {TARGET_ENV}; default: {DEFAULT_TARGET})",
    )
    options.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help=(
            f"API key sent as 'authorization: Bearer KEY' (env: {API_KEY_ENV}); other local "
            "users can read it in the process list, so prefer --api-key-file or the variable"
        ),
    )
    options.add_argument(
        "--api-key-file",
        type=pathlib.Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="read the API key from the first line of FILE",
    )
    options.add_argument(
        "--tls-ca",
        type=pathlib.Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=(
            f"connect over TLS and verify the authority against this PEM CA bundle (env: {TLS_CA_ENV});"
            " any --tls-* option turns TLS on, and without --tls-ca the system's roots are used"
        ),
    )
    options.add_argument(
        "--tls-cert",
        type=pathlib.Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"PEM client certificate for mutual TLS, with --tls-key (env: {TLS_CERT_ENV})",
    )
    options.add_argument(
        "--tls-key",
        type=pathlib.Path,
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"PEM private key of --tls-cert (env: {TLS_KEY_ENV})",
    )
    options.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help=f"deadline of each call in seconds (default: {DEFAULT_TIMEOUT_SECONDS:g})",
    )
    options.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print one JSON object per line instead of tables",
    )
    options.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="log debug messages to stderr",
    )
    return options


def _add_keys_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    global_options: argparse.ArgumentParser,
) -> None:
    keys = commands.add_parser("keys", help="manage the API keys file of the authority")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    add = key_commands.add_parser(
        "add",
        parents=[global_options],
        help="create an API key for a principal and append its hash to the keys file",
    )
    add.add_argument("principal", metavar="PRINCIPAL", help="the identity the key authenticates")
    add.add_argument(
        "--file",
        type=pathlib.Path,
        required=True,
        metavar="FILE",
        help="the authority's API keys file (created if missing)",
    )
    add.set_defaults(handler=_keys_add)


def _add_lease_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    global_options: argparse.ArgumentParser,
) -> None:
    lease = commands.add_parser("lease", help="grant, renew, inspect, list and revoke leases")
    lease_commands = lease.add_subparsers(dest="lease_command", required=True, metavar="COMMAND")

    grant = lease_commands.add_parser(
        "grant", parents=[global_options], help="grant a lease and print its ID"
    )
    grant.add_argument("--tier", default="", help="tier named in the policy (default: the authority's)")
    grant.add_argument(
        "--principal",
        default="",
        help="principal to grant to (honoured only in insecure development mode)",
    )
    grant.add_argument(
        "--idle-timeout",
        type=_duration_seconds,
        default=None,
        metavar="SECONDS",
        help="ask for a shorter idle timeout than the tier's",
    )
    grant.set_defaults(handler=_lease_grant)

    renew = lease_commands.add_parser(
        "renew", parents=[global_options], help="record activity on a lease"
    )
    renew.add_argument("lease_id", metavar="LEASE_ID", help=_LEASE_ID_HELP)
    renew.add_argument(
        "--idle-for",
        type=_duration_seconds,
        default=0.0,
        metavar="SECONDS",
        help="how long ago the activity happened (default: 0, now)",
    )
    renew.set_defaults(handler=_lease_renew)

    revoke = lease_commands.add_parser(
        "revoke", parents=[global_options], help="end a lease now"
    )
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("lease_id", metavar="LEASE_ID", nargs="?", default=None, help=_LEASE_ID_HELP)
    target.add_argument(
        "--fingerprint",
        metavar="FP",
        default=None,
        help="name the lease by the fingerprint shown by 'lease list' (admins)",
    )
    revoke.add_argument(
        "--release",
        action="store_true",
        help="end it as released by its holder instead of revoked",
    )
    revoke.set_defaults(handler=_lease_revoke)

    ttl = lease_commands.add_parser(
        "ttl",
        parents=[global_options],
        help="describe a lease without renewing it",
        description=(
            "Describe a lease without renewing it. An alive or ended lease prints its row and "
            "exits 0 (an ended lease shows its end reason); a lease the authority has no "
            f"record of exits {EXIT_REJECTED}."
        ),
    )
    ttl.add_argument("lease_id", metavar="LEASE_ID", help=_LEASE_ID_HELP)
    ttl.set_defaults(handler=_lease_ttl)

    list_ = lease_commands.add_parser("list", parents=[global_options], help="list live leases")
    list_.add_argument("--principal", default="", help="only leases of this principal")
    list_.add_argument("--tier", default="", help="only leases in this tier")
    list_.add_argument(
        "--page-size",
        type=_non_negative_int,
        default=100,
        metavar="N",
        help="leases fetched per call (default: 100; 0 for the authority's default)",
    )
    list_.set_defaults(handler=_lease_list)


class _Context:
    """Resolved global options, the lazily opened client and the output format."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json: bool = getattr(args, "json", False)
        self.out: TextIO = sys.stdout
        self._client: AuthorityClient | None = None

    def client(self) -> AuthorityClient:
        if self._client is None:
            target = self.target()
            credentials = self.credentials()
            api_key = self.api_key()
            principal = self.caller_principal()
            if api_key is not None and principal is not None:
                _print_principal_ignored_warning(principal, self._principal_source(), self._api_key_source())
            self._client = AuthorityClient(
                target,
                credentials=credentials,
                api_key=api_key,
                principal=principal,
                timeout_seconds=getattr(self.args, "timeout", DEFAULT_TIMEOUT_SECONDS),
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def target(self) -> str:
        """Return the validated target from ``--authority``, the variable or the default.

        Raises:
            UsageError: The target is neither ``HOST:PORT`` nor a target with a known gRPC scheme.
        """
        flag_target: str | None = getattr(self.args, "authority", None)
        if flag_target is not None:
            return check_target(flag_target, "--authority")
        env_target = os.environ.get(TARGET_ENV)
        if env_target:
            return check_target(env_target, TARGET_ENV)
        return DEFAULT_TARGET

    def lease_id(self) -> str | None:
        """Return the LEASE_ID argument, read from standard input when it is ``-``.

        Raises:
            UsageError: ``-`` was given and standard input has no lease ID on its first line.
        """
        lease_id: str | None = self.args.lease_id
        if lease_id != STDIN_LEASE_ID:
            return lease_id
        line = sys.stdin.readline().strip()
        if not line:
            raise UsageError(
                "LEASE_ID is - but the lease ID is missing from the first line of standard "
                "input; pipe the ID printed by 'lease grant'"
            )
        return line

    def caller_principal(self) -> str | None:
        principal = getattr(self.args, "caller_principal", None) or os.environ.get(PRINCIPAL_ENV)
        return principal or None

    def _principal_source(self) -> str:
        return "--principal" if getattr(self.args, "caller_principal", None) else PRINCIPAL_ENV

    def _api_key_source(self) -> str:
        if getattr(self.args, "api_key_file", None) is not None:
            return "--api-key-file"
        if getattr(self.args, "api_key", None):
            return "--api-key"
        return API_KEY_ENV

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Return TLS channel credentials when any ``--tls-*`` option or variable is set.

        Raises:
            UsageError: Only one of the client certificate and its key is given.
            ValueError: A file cannot be read, is not valid PEM, or the key does not
                match the certificate. The message names the option or variable.
        """
        ca, ca_source = self._path_option("tls_ca", TLS_CA_ENV)
        cert, cert_source = self._path_option("tls_cert", TLS_CERT_ENV)
        key, key_source = self._path_option("tls_key", TLS_KEY_ENV)
        if ca is None and cert is None and key is None:
            return None
        if (cert is None) != (key is None):
            missing = "--tls-key" if key is None else "--tls-cert"
            raise UsageError(f"{missing} is missing; give the client certificate and its key together")

        root_certificates = read_pem_file(ca, ca_source)
        private_key = read_pem_file(key, key_source)
        certificate_chain = read_pem_file(cert, cert_source)
        if ca is not None:
            check_ca_file(ca, ca_source)
        if cert is not None and key is not None:
            check_client_certificate(cert, key, cert_source, key_source)
        return grpc.ssl_channel_credentials(
            root_certificates=root_certificates,
            private_key=private_key,
            certificate_chain=certificate_chain,
        )

    def tls_options(self) -> tuple[bool, bool, bool]:
        """Return whether a CA bundle, a client certificate and a client key are given."""
        return (
            self._path_option("tls_ca", TLS_CA_ENV)[0] is not None,
            self._path_option("tls_cert", TLS_CERT_ENV)[0] is not None,
            self._path_option("tls_key", TLS_KEY_ENV)[0] is not None,
        )

    def _path_option(self, name: str, env_name: str) -> tuple[pathlib.Path | None, str]:
        """Return the path from the option or its variable, and the name of the one that gave it."""
        value: pathlib.Path | None = getattr(self.args, name, None)
        if value is not None:
            return value, "--" + name.replace("_", "-")
        text = os.environ.get(env_name)
        return (pathlib.Path(text) if text else None), env_name

    def api_key(self) -> str | None:
        flag_key: str | None = getattr(self.args, "api_key", None)
        key_file: pathlib.Path | None = getattr(self.args, "api_key_file", None)
        if flag_key is not None and key_file is not None:
            raise UsageError("give either --api-key or --api-key-file, not both")
        if key_file is not None:
            return _read_api_key_file(key_file)
        return flag_key or os.environ.get(API_KEY_ENV) or None

    def emit(self, record: dict[str, Any]) -> None:
        """Write one JSON object on one line (``--json`` mode)."""
        self.out.write(json.dumps(_to_json(record), separators=(",", ":")) + "\n")
        self.out.flush()

    def line(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()


def _read_api_key_file(path: pathlib.Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read --api-key-file {path}: {exc.strerror or exc}") from exc
    lines = text.splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise UsageError(f"--api-key-file {path} is empty; put the API key on its first line")
    return key


def _with_client(handler: Callable[[_Context], int]) -> Callable[[_Context], int]:
    def run(context: _Context) -> int:
        try:
            return handler(context)
        finally:
            context.close()

    return run


@_with_client
def _lease_grant(context: _Context) -> int:
    args = context.args
    granted = context.client().grant(
        args.tier, principal=args.principal, idle_timeout_seconds=args.idle_timeout
    )

    if context.json:
        context.emit({"lease_id": granted.lease_id, **_lease_record(granted.lease)})
        return EXIT_OK
    lease = granted.lease
    _print_fields(
        context,
        [
            ("lease ID", granted.lease_id),
            ("fingerprint", lease.fingerprint),
            ("principal", lease.principal),
            ("tier", lease.tier),
            ("idle timeout", format_seconds(lease.idle_timeout_seconds)),
            ("max duration", format_seconds(lease.max_duration_seconds)),
            ("ttl", format_seconds(lease.ttl_seconds)),
        ],
    )
    return EXIT_OK


@_with_client
def _lease_renew(context: _Context) -> int:
    args = context.args
    lease_id = context.lease_id()
    assert lease_id is not None  # LEASE_ID is required by the parser.
    result = context.client().renew([(lease_id, args.idle_for)])
    _print_leases(context, result.leases)

    lease = result.leases[0]
    if lease.alive:
        return EXIT_OK
    if lease.state is LeaseState.NOT_FOUND:
        _print_error("Renew failed: the authority has no record of this lease")
    else:
        reason = lease.end_reason.value if lease.end_reason else "unknown reason"
        _print_error(f"Renew failed: lease {lease.fingerprint} has ended ({reason})")
    return EXIT_REJECTED


@_with_client
def _lease_revoke(context: _Context) -> int:
    args = context.args
    result = context.client().revoke(
        context.lease_id(), fingerprint=args.fingerprint, release=args.release
    )

    if result.lease.state is LeaseState.NOT_FOUND:
        _print_error("Revoke failed: the authority has no record of this lease")
        return EXIT_REJECTED
    if context.json:
        context.emit({**_lease_record(result.lease), "already_ended": result.already_ended})
        return EXIT_OK
    _print_leases(context, [result.lease])
    if result.already_ended:
        reason = result.lease.end_reason.value if result.lease.end_reason else "unknown"
        context.line(f"The lease had already ended ({reason}); nothing changed.")
    return EXIT_OK


@_with_client
def _lease_ttl(context: _Context) -> int:
    lease_id = context.lease_id()
    assert lease_id is not None  # LEASE_ID is required by the parser.
    lease = context.client().time_to_live(lease_id)

    # An ended lease is still a real lease with a state and reason, so only an unknown lease fails.
    if lease.state is LeaseState.NOT_FOUND:
        _print_error(
            "TimeToLive failed: the authority has no record of this lease (state not_found); "
            "check the ID printed by 'lease grant'"
        )
        return EXIT_REJECTED
    _print_leases(context, [lease])
    return EXIT_OK


@_with_client
def _lease_list(context: _Context) -> int:
    args = context.args
    leases = list(context.client().list_leases(principal=args.principal, tier=args.tier, page_size=args.page_size))

    _print_leases(context, leases)
    if not leases and args.tier:
        # The authority lists leases of a tier that left the policy too, so
        # an unknown tier is not an error, but it is most likely a typo.
        policy = context.client().get_policy()
        if policy.tier(args.tier) is None:
            known = ", ".join(tier.name for tier in policy.tiers)
            print(f"{PROG}: tier {args.tier!r} is not in the authority's policy (tiers: {known})", file=sys.stderr)
    return EXIT_OK


@_with_client
def _watch(context: _Context) -> int:
    args = context.args
    stream = context.client().watch_session_ends(
        after_sequence=args.after_sequence, instance_id=args.instance_id
    )
    printed = 0
    warned = False
    try:
        for event in stream:
            if event.reset and not warned:
                _print_reset_warning(args.after_sequence)
                warned = True
            if isinstance(event, HeartbeatEvent) and not args.heartbeats:
                continue
            _print_event(context, event)
            printed += 1
            if args.count is not None and printed >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        stream.cancel()
    return EXIT_OK


@_with_client
def _now(context: _Context) -> int:
    now = context.client().now()
    if context.json:
        context.emit({"now": now})
    else:
        context.line(_format_time(now))
    return EXIT_OK


@_with_client
def _policy(context: _Context) -> int:
    policy = context.client().get_policy()

    if context.json:
        context.emit(
            {
                "tiers": [dataclasses.asdict(tier) for tier in policy.tiers],
                "rules": [dataclasses.asdict(rule) for rule in policy.rules],
            }
        )
        return EXIT_OK
    context.line("Tiers")
    _print_table(context, ("tier", "idle timeout", "max duration"), [_tier_row(t) for t in policy.tiers])
    context.line()
    context.line("Method rules")
    _print_table(
        context,
        ("pattern", "tiers", "max session age", "exempt"),
        [_rule_row(rule) for rule in policy.rules],
    )
    return EXIT_OK


def _keys_add(context: _Context) -> int:
    # Imported here so that the client library never loads server code.
    from session_authority.server._auth import append_api_key

    args = context.args
    try:
        api_key = append_api_key(args.file, args.principal)
    except OSError as exc:
        # No authority is involved: like an unreadable --api-key-file, this is a usage error.
        _print_error(
            f"cannot write --file {args.file}: {exc.strerror or exc}; give a writable file "
            "in an existing directory"
        )
        return EXIT_USAGE

    if context.json:
        context.emit({"principal": args.principal, "api_key": api_key, "file": str(args.file)})
    else:
        context.line(api_key)
    print(
        f"{PROG}: API key for {args.principal!r} added to {args.file}. "
        "Save it now: the file stores only its hash, so it cannot be shown again.",
        file=sys.stderr,
    )
    return EXIT_OK


def _run_forwarded(command: str, argv: list[str]) -> int:
    # Imported here so that the lease commands never load the server package.
    if command == "serve":
        from session_authority.server._main import serve_main

        return serve_main(argv)
    if command == "demo":
        from session_authority.examples._demo import main as demo_main

        return demo_main(argv)
    from session_authority.server._audit import audit_main

    status = audit_main(argv)
    if status == 1 and argv[:1] == ["verify"]:
        _print_rotated_files_hint(argv[1:])
    return status


# Options of 'audit verify' that take a value, for finding its PATH arguments.
_AUDIT_VERIFY_OPTIONS_WITH_VALUE = ("--expected-last-hash",)


def _print_rotated_files_hint(verify_argv: list[str]) -> None:
    """Suggest verifying the directory when a failed 'audit verify' left out rotated files of the log.

    The live ``audit.jsonl`` of a rotated log starts in the middle of the chain,
    so on its own it fails with "the chain starts at seq N, expected 1".
    """
    from session_authority.server._audit import CURRENT_FILE_NAME, _list_rotated_files

    paths: list[pathlib.Path] = []
    index = 0
    while index < len(verify_argv):
        token = verify_argv[index]
        if token == "--":
            paths.extend(pathlib.Path(rest) for rest in verify_argv[index + 1 :])
            break
        if token in _AUDIT_VERIFY_OPTIONS_WITH_VALUE:
            index += 2
            continue
        if not token.startswith("-"):
            paths.append(pathlib.Path(token))
        index += 1

    given_files = {path.resolve() for path in paths}
    for path in paths:
        if not path.is_file():
            continue
        rotated = [rotated_path for _, rotated_path in _list_rotated_files(path.parent)]
        if path.name != CURRENT_FILE_NAME and path.resolve() not in {item.resolve() for item in rotated}:
            continue
        left_out = [item for item in rotated if item.resolve() not in given_files]
        if left_out:
            directory = path.parent
            files = "file" if len(left_out) == 1 else "files"
            print(
                f"{PROG} audit verify: hint: {directory} also holds {len(left_out)} rotated {files} of this "
                f"log that were not checked, the oldest {left_out[0].name}; pass the directory to "
                f"check the whole chain: {PROG} audit verify {directory}",
                file=sys.stderr,
            )
            return


def _find_forwarded_command(argv: Sequence[str]) -> int | None:
    """Return the index of ``serve``, ``audit`` or ``demo`` if it is the command, else None."""
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in _FORWARDED_COMMANDS:
            return index
        if token == "--" or not token.startswith("-"):
            return None
        index += 2 if token in _GLOBAL_OPTIONS_WITH_VALUE else 1
    return None


def _print_leases(context: _Context, leases: Sequence[LeaseInfo]) -> None:
    if context.json:
        for lease in leases:
            context.emit(_lease_record(lease))
        return
    _print_table(context, _LEASE_COLUMNS, [_lease_row(lease) for lease in leases])


def _print_event(context: _Context, event: SessionEndEvent | HeartbeatEvent) -> None:
    if context.json:
        if isinstance(event, SessionEndEvent):
            context.emit(
                {
                    "event": "end",
                    "sequence": event.sequence,
                    "reset": event.reset,
                    "revoked_by": event.revoked_by,
                    **_lease_record(event.lease),
                }
            )
        else:
            context.emit({"event": "heartbeat", **dataclasses.asdict(event)})
        return

    reset = " reset" if event.reset else ""
    if isinstance(event, SessionEndEvent):
        lease = event.lease
        reason = lease.end_reason.value if lease.end_reason else "-"
        revoked_by = f" revoked_by={event.revoked_by}" if event.revoked_by else ""
        when = _format_time(lease.ended_at) if lease.ended_at else "-"
        context.line(
            f"{when} end sequence={event.sequence} fingerprint={lease.fingerprint} "
            f"principal={lease.principal} tier={lease.tier} reason={reason}{revoked_by} "
            f"age={format_seconds(lease.age_seconds)}{reset}"
        )
    else:
        context.line(
            f"{_format_time(event.now)} heartbeat sequence={event.sequence} "
            f"instance={event.instance_id} interval={format_seconds(event.interval_seconds)}{reset}"
        )


def _print_fields(context: _Context, fields: Sequence[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        context.line(f"{name.ljust(width)}  {value}")


def _print_table(context: _Context, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row)]
    for row in [headers, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        context.line("  ".join(cells).rstrip())


def _lease_row(lease: LeaseInfo) -> list[str]:
    return [
        lease.fingerprint,
        lease.principal,
        lease.tier,
        lease.state.value,
        format_seconds(lease.ttl_seconds),
        format_seconds(lease.max_remaining_seconds),
        format_seconds(lease.age_seconds),
        lease.end_reason.value if lease.end_reason else "-",
    ]


def _tier_row(tier: TierInfo) -> list[str]:
    return [
        tier.name,
        format_seconds(tier.idle_timeout_seconds),
        format_seconds(tier.max_duration_seconds),
    ]


def _rule_row(rule: MethodRuleInfo) -> list[str]:
    return [
        rule.pattern or "(default)",
        ",".join(rule.tiers) or "any",
        "-" if rule.max_session_age_seconds is None else format_seconds(rule.max_session_age_seconds),
        "yes" if rule.exempt else "no",
    ]


def _lease_record(lease: LeaseInfo) -> dict[str, Any]:
    record: dict[str, Any] = dataclasses.asdict(lease)
    return record


def _to_json(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime.datetime):
        return _format_time(value)
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value


def format_seconds(seconds: float) -> str:
    """Format a duration for people: ``0.5s``, ``42.0s``, ``5m03s``, ``2h05m``."""
    if not math.isfinite(seconds):
        return str(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _format_time(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )


def _print_principal_ignored_warning(principal: str, principal_source: str, api_key_source: str) -> None:
    print(
        f"{PROG}: warning: an authority that checks API keys ignores {principal_source} {principal!r} and "
        f"takes the principal from the API key given by {api_key_source}. Only an authority in insecure "
        f"development mode reads {principal_source}, and it ignores the key.",
        file=sys.stderr,
        flush=True,
    )


# Status details that gRPC core (grpcio 1.85) writes when a TLS handshake fails
# ("Tls handshake failed", "WRONG_VERSION_NUMBER", "Failed to create security
# handshaker"), or when the peer closes the connection before it is set up
# ("Socket closed"), as a TLS authority does to a plaintext client.
_HANDSHAKE_DETAILS = ("handshake", "socket closed", "ssl", "tls", "certificate")

# Details of a connection that failed for any reason, TLS or not.
_CONNECT_FAILED_DETAILS = "failed to connect to all addresses"

# Details that name a cause other than TLS.
_NOT_TLS_DETAILS = ("connection refused", "dns resolution failed")


def _tls_hint(exc: AuthorityUnavailable, ca_given: bool, cert_given: bool, key_given: bool) -> str | None:
    """Return a hint at the TLS options when an UNAVAILABLE error may come from a TLS mismatch.

    gRPC reports a failed handshake with the same status as an authority that is
    down, so the hint names possible causes and never claims one. An UNAVAILABLE
    sent by the authority itself (its store is down) gets no hint, unless its
    details happen to mention TLS, SSL or a certificate.
    """
    if exc.code is not grpc.StatusCode.UNAVAILABLE:
        return None
    details = exc.details.lower()
    if any(marker in details for marker in _NOT_TLS_DETAILS):
        return None
    handshake = any(marker in details for marker in _HANDSHAKE_DETAILS)
    if not handshake and _CONNECT_FAILED_DETAILS not in details:
        return None

    tls_enabled = ca_given or cert_given or key_given
    if not tls_enabled:
        if not handshake:
            return None
        return (
            "if the authority serves TLS, this is how it rejects a plaintext connection: pass --tls-ca, "
            "and --tls-cert with --tls-key if it requires client certificates"
        )

    untrusted = (
        "present a certificate that --tls-ca did not sign"
        if ca_given
        else "present a certificate that the system's roots do not trust (pass --tls-ca)"
    )
    if cert_given and key_given:
        return (
            "if the TLS handshake failed, the authority may not serve TLS (drop the --tls-* options), "
            f"may not trust the client certificate in --tls-cert, or may {untrusted}"
        )
    return (
        "if the TLS handshake failed, the authority may require a client certificate (pass --tls-cert "
        f"and --tls-key), may not serve TLS (drop the --tls-* options), or may {untrusted}"
    )


def _print_reset_warning(after_sequence: int) -> None:
    print(
        f"{PROG}: warning: the authority could not replay every end after sequence "
        f"{after_sequence} (another authority run, a sequence it has not reached, or ends too "
        "old to keep); ends since then may be "
        "missing, and the ones that follow are shown",
        file=sys.stderr,
        flush=True,
    )


def check_target(target: str, source: str) -> str:
    """Return a gRPC target unchanged if it is ``HOST:PORT`` or carries a known scheme.

    Args:
        target: The target as given.
        source: The option or variable it came from, for the error message.

    Raises:
        UsageError: The target is empty, has no port, or its port is not in 1 to 65535.
    """
    expected = (
        "expected HOST:PORT with a port from 1 to 65535 (such as 127.0.0.1:50051 or "
        "[::1]:50051), or a gRPC target such as unix:/path/to/socket or dns:///host:port"
    )
    if target.startswith(_TARGET_SCHEMES):
        if target.split(":", 1)[1].strip("/"):
            return target
        raise UsageError(f"{source} {target!r} is missing the address after the scheme; {expected}")
    if target.startswith("["):
        host, _, port = target[1:].partition("]")
        if not port.startswith(":"):
            raise UsageError(f"{source} {target!r} is not a valid target; {expected}")
        port = port[1:]
    else:
        host, _, port = target.rpartition(":")
        if ":" in host:
            raise UsageError(
                f"{source} {target!r} is not a valid target (put an IPv6 address in "
                f"brackets); {expected}"
            )
    if not host or not port.isascii() or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UsageError(f"{source} {target!r} is not a valid target; {expected}")
    return target


def _print_error(message: str, prog: str = PROG) -> None:
    one_line = " ".join(message.split())
    print(f"{prog}: error: {one_line}", file=sys.stderr)


def _positive_float(text: str) -> float:
    value = _parse_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = _parse_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text!r}")
    return value


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, got {text!r}")
    return value


def _duration_seconds(text: str) -> float:
    value = _non_negative_float(text)
    if value > MAX_DURATION_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_DURATION_SECONDS} seconds (the protobuf Duration limit), "
            f"got {text!r}"
        )
    return value


def _sequence(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEQUENCE:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from 0 to {MAX_SEQUENCE} (2^64-1), got {text!r}"
        )
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())

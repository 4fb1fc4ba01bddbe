"""Request building, metadata and argument checks shared by the sync and aio authority clients."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import math
import os
import pathlib
import ssl
import sys
import threading
from typing import Generic, NoReturn, Sequence, TypeVar

import grpc

from session_authority.clients._types import LeaseInfo, RenewResult, seconds_to_duration
from session_authority.v1 import session_authority_pb2 as pb

logger = logging.getLogger(__name__)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An argument parser whose usage errors print one line, and where to find help, instead of the usage block.

    Subcommand parsers inherit the class, because ``add_subparsers`` creates
    them with the class of the parser it belongs to. Exits with status 2, as
    argparse does.
    """

    def error(self, message: str) -> NoReturn:
        one_line = " ".join(message.split())
        print(f"{self.prog}: error: {one_line} (see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)

AUTHORIZATION_METADATA_KEY = "authorization"
"""Request metadata key for the API key, sent as ``Bearer <key>``."""

PRINCIPAL_METADATA_KEY = "x-session-principal"
"""Request metadata key naming the caller when the authority runs in insecure development mode."""

DEFAULT_TIMEOUT_SECONDS = 5.0
"""Deadline of each unary call unless the client or the call sets another."""

MAX_PAGE_SIZE = 2**32 - 1
"""``ListLeasesRequest.page_size`` is a uint32."""

MAX_SEQUENCE = 2**64 - 1
"""``WatchSessionEndsRequest.after_sequence`` is a uint64."""

MAX_PRINCIPAL_LENGTH = 256
"""The authority's limit on a principal's length. Checked here, it also keeps a long principal from reaching gRPC's 16 KiB metadata limit."""

Metadata = tuple[tuple[str, str], ...]

_FutureT = TypeVar("_FutureT")


def build_metadata(api_key: str | None, principal: str | None) -> Metadata:
    """Return the request metadata every call of a client carries.

    Raises:
        ValueError: The API key or principal is empty or contains characters
            that gRPC metadata cannot carry.
    """
    metadata: list[tuple[str, str]] = []
    if api_key is not None:
        _check_metadata_value(api_key, "api_key", secret=True)
        metadata.append((AUTHORIZATION_METADATA_KEY, f"Bearer {api_key}"))
    if principal is not None:
        _check_metadata_value(principal, "principal", secret=False)
        if len(principal) > MAX_PRINCIPAL_LENGTH:
            raise ValueError(
                f"principal must be at most {MAX_PRINCIPAL_LENGTH} characters, got {len(principal)};"
                " use a shorter service name"
            )
        metadata.append((PRINCIPAL_METADATA_KEY, principal))
    return tuple(metadata)


def _check_metadata_value(value: str, field: str, *, secret: bool) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{field} must be a non-empty string, or None to send none")
    if not value.isascii() or not value.isprintable():
        value_text = "the value given" if secret else repr(value)
        raise ValueError(
            f"{field} must be printable ASCII to fit in gRPC metadata, and {value_text} is not"
        )


def load_channel_credentials(
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Build TLS channel credentials from PEM files.

    Args:
        ca_file: CA bundle that the authority's certificate must chain to; None uses the
            system's trusted roots.
        cert_file: Client certificate chain, for mutual TLS. Give it with ``key_file``.
        key_file: Private key of ``cert_file``.

    Raises:
        ValueError: Only one of ``cert_file`` and ``key_file`` was given, or a file cannot be
            read or is not PEM. The message names the parameter and the file.
    """
    if (cert_file is None) != (key_file is None):
        missing = "key_file" if key_file is None else "cert_file"
        raise ValueError(f"{missing} is missing; give the client certificate and its key together")
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem_file(ca_file, "ca_file"),
        private_key=read_pem_file(key_file, "key_file"),
        certificate_chain=read_pem_file(cert_file, "cert_file"),
    )


def read_pem_file(path: str | os.PathLike[str] | None, field: str) -> bytes | None:
    """Return the bytes of a PEM file, or None when ``path`` is None.

    Raises:
        ValueError: The file cannot be read or has no PEM block; the message names ``field``.
    """
    if path is None:
        return None
    source = pathlib.Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {field} {source}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise ValueError(f"{field} {source} is not a PEM file (no -----BEGIN line); give the PEM form")
    return data


class _EncryptedKeyError(Exception):
    """Raised by the password callback when ``ssl`` finds an encrypted private key."""


def _reject_password_prompt() -> str:
    # Without a callback, OpenSSL would prompt on the terminal for the password.
    raise _EncryptedKeyError


def _ssl_reason(exc: OSError) -> str:
    """Return `` (REASON)`` from an ``ssl.SSLError``, or the OS error text of an unreadable file."""
    if isinstance(exc, ssl.SSLError):
        return f" ({exc.reason})" if exc.reason else ""
    return f" ({exc.strerror or exc})"


def check_ca_file(ca_file: str | os.PathLike[str], field: str) -> None:
    """Check that a file contains PEM certificates that TLS can trust.

    ``grpc`` reports a bad file only when the first call fails, as an unreachable
    authority, so callers check it before they open a channel.

    Raises:
        ValueError: The file contains no valid PEM certificate. The message names ``field``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    except OSError as exc:
        raise ValueError(
            f"{field} {os.fspath(ca_file)} is not a valid PEM certificate file{_ssl_reason(exc)}; "
            "give the PEM file of the CA that signed the authority's certificate"
        ) from exc


def check_client_certificate(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    cert_field: str,
    key_field: str,
) -> None:
    """Check that a client certificate and its private key load and belong together.

    The check uses the ``ssl`` module (OpenSSL) rather than ``grpc`` (BoringSSL),
    because ``grpc`` reports a bad pair only as a failed handshake on the first call.

    Args:
        cert_file: PEM certificate chain, leaf first.
        key_file: PEM private key of the leaf certificate.
        cert_field: Name of the option or parameter that gave ``cert_file``, for messages.
        key_field: Name of the option or parameter that gave ``key_file``, for messages.

    Raises:
        ValueError: The certificate or the key is invalid, the key is encrypted, or
            the key does not match the certificate. The message names the field.
    """
    cert_path = os.fspath(cert_file)
    key_path = os.fspath(key_file)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=cert_path)
    except OSError as exc:
        raise ValueError(
            f"{cert_field} {cert_path} is not a valid PEM certificate file{_ssl_reason(exc)}; "
            f"give the client certificate there and its private key in {key_field}"
        ) from exc

    try:
        context.load_cert_chain(cert_path, key_path, password=_reject_password_prompt)
    except _EncryptedKeyError:
        raise ValueError(
            f"{key_field} {key_path} is encrypted, and gRPC accepts only unencrypted keys; "
            f"decrypt it (for example with 'openssl pkey -in {key_path}') into a file readable only by you"
        ) from None
    except OSError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ValueError(
                f"{key_field} {key_path} is not the private key of the certificate in {cert_field} "
                f"{cert_path}; give the key that was created with that certificate"
            ) from exc
        raise ValueError(
            f"{key_field} {key_path} is not a valid PEM private key file{_ssl_reason(exc)}; "
            f"give the private key of the certificate in {cert_field}"
        ) from exc


def is_loopback_target(target: str) -> bool:
    """Return True when a gRPC target names this machine (loopback address or Unix socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    host = target.removeprefix("dns:///").removeprefix("ipv4:").removeprefix("ipv6:")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_key_sent_in_clear(target: str, api_key: str | None, secure: bool) -> None:
    """Log a warning when an API key is about to cross the network without TLS."""
    if api_key is not None and not secure and not is_loopback_target(target):
        logger.warning(
            "sending an API key to %s over an insecure channel; pass credentials= to use TLS",
            target,
        )


MAX_TIMEOUT_SECONDS = 1e9
"""Maximum call deadline, about 31 years.

gRPC failed calls at once with DEADLINE_EXCEEDED for a deadline of 1e10 s
(grpcio 1.85), which would send an operator looking at the network.
"""


def check_timeout_seconds(value: float | None, field: str = "timeout_seconds") -> float | None:
    """Validate a call deadline in seconds; None means no deadline.

    Raises:
        ValueError: The value is not a finite number greater than zero and
            at most :data:`MAX_TIMEOUT_SECONDS`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field} must be a number of seconds or None, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{field} must be a finite number of seconds > 0, got {value!r}")
    if value > MAX_TIMEOUT_SECONDS:
        raise ValueError(
            f"{field} must be at most {MAX_TIMEOUT_SECONDS:.0e} s (about 31 years), got {value!r};"
            " pass None for no deadline"
        )
    return float(value)


def check_text(value: str, field: str, *, secret: bool = False) -> str:
    """Return ``value`` if a protobuf string field can carry it.

    Args:
        value: The text; empty is allowed.
        field: The argument's name, for the error message.
        secret: Keep the value out of the message.

    Raises:
        ValueError: ``value`` is not a str, or contains lone surrogates, which
            UTF-8 cannot encode. Python decodes command-line arguments and
            file names that are not UTF-8 into such surrogates.
    """
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value_text = "the value given" if secret else repr(value)
        raise ValueError(
            f"{field} must be UTF-8 text, and {value_text} contains bytes that are not valid UTF-8;"
            " re-encode it as UTF-8"
        ) from None
    return value


def check_lease_id(lease_id: str, field: str = "lease_id") -> str:
    """Validate a lease ID without ever putting it in the error message.

    Raises:
        ValueError: The lease ID is not a non-empty string of UTF-8 text.
    """
    if not isinstance(lease_id, str) or not lease_id:
        raise ValueError(f"{field} must be a non-empty string (the ID returned by grant)")
    return check_text(lease_id, field, secret=True)


def grant_request(
    tier: str, principal: str, idle_timeout_seconds: float | None
) -> pb.GrantRequest:
    """Build a ``GrantRequest``; an empty tier leaves the choice to the authority."""
    request = pb.GrantRequest(tier=check_text(tier, "tier"), principal=check_text(principal, "principal"))
    if idle_timeout_seconds is not None:
        request.idle_timeout.CopyFrom(
            seconds_to_duration(idle_timeout_seconds, field="idle_timeout_seconds")
        )
    return request


def renew_entries(entries: Sequence[tuple[str, float]]) -> list[pb.RenewEntry]:
    """Build ``RenewEntry`` messages from ``(lease_id, idle_for_seconds)`` pairs.

    Raises:
        ValueError: An entry is not a pair, has an empty lease ID or an
            ``idle_for_seconds`` that is negative or not finite.
    """
    messages = []
    for index, entry in enumerate(entries):
        try:
            lease_id, idle_for_seconds = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"entries[{index}] must be a (lease_id, idle_for_seconds) pair"
            ) from None
        check_lease_id(lease_id, f"entries[{index}] lease_id")
        idle_for = seconds_to_duration(idle_for_seconds, field=f"entries[{index}] idle_for_seconds")
        messages.append(pb.RenewEntry(lease_id=lease_id, idle_for=idle_for))
    return messages


def revoke_request(
    lease_id: str | None, fingerprint: str | None, release: bool
) -> pb.RevokeRequest:
    """Build a ``RevokeRequest`` naming the lease by exactly one of ID or fingerprint.

    Raises:
        ValueError: Both or neither of ``lease_id`` and ``fingerprint`` are given,
            or the one given is empty.
    """
    if (lease_id is None) == (fingerprint is None):
        raise ValueError(
            "revoke needs exactly one of lease_id or fingerprint= "
            "(admins name other principals' leases by fingerprint)"
        )
    if lease_id is not None:
        return pb.RevokeRequest(lease_id=check_lease_id(lease_id), release=release)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError(
            f"fingerprint must be the non-empty fingerprint shown by list_leases, got {fingerprint!r}"
        )
    return pb.RevokeRequest(fingerprint=check_text(fingerprint, "fingerprint"), release=release)


def list_leases_request(
    principal: str, tier: str, page_size: int, page_token: str
) -> pb.ListLeasesRequest:
    """Build a ``ListLeasesRequest``.

    Raises:
        ValueError: ``page_size`` is not an integer in [0, 2**32 - 1]. A
            page size of 0 requests the authority's default.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise ValueError(f"page_size must be an integer, got {page_size!r}")
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(
            f"page_size must be between 0 (server default) and {MAX_PAGE_SIZE}, got {page_size}"
        )
    return pb.ListLeasesRequest(
        principal=check_text(principal, "principal"),
        tier=check_text(tier, "tier"),
        page_size=page_size,
        page_token=check_text(page_token, "page_token"),
    )


def validate_request(lease_id: str, method: str, caller_principal: str) -> pb.ValidateRequest:
    """Build a ``ValidateRequest``.

    Raises:
        ValueError: The lease ID is empty or the method is not a full method
            name such as ``/package.Service/Method``.
    """
    check_lease_id(lease_id)
    if not isinstance(method, str) or not method.startswith("/") or method.count("/") != 2:
        raise ValueError(
            f"method must be a full method name like '/package.Service/Method', got {method!r}"
        )
    return pb.ValidateRequest(
        lease_id=lease_id,
        method=check_text(method, "method"),
        caller_principal=check_text(caller_principal, "caller_principal"),
    )


def watch_request(after_sequence: int, instance_id: str) -> pb.WatchSessionEndsRequest:
    """Build a ``WatchSessionEndsRequest``.

    Raises:
        ValueError: ``after_sequence`` is not an integer in [0, 2**64 - 1],
            or ``instance_id`` is not valid text.
    """
    if isinstance(after_sequence, bool) or not isinstance(after_sequence, int):
        raise ValueError(f"after_sequence must be an integer, got {after_sequence!r}")
    if not 0 <= after_sequence <= MAX_SEQUENCE:
        raise ValueError(
            f"after_sequence must be between 0 (from now) and {MAX_SEQUENCE}, got {after_sequence};"
            " pass the sequence of the last end you handled"
        )
    return pb.WatchSessionEndsRequest(after_sequence=after_sequence, instance_id=check_text(instance_id, "instance_id"))


def renew_result(leases: Sequence[pb.Lease], sent_at_monotonic: float) -> RenewResult:
    """Convert the leases of a ``RenewResponse`` or ``KeepAliveResponse``."""
    return RenewResult(
        leases=[LeaseInfo.from_proto(lease) for lease in leases],
        sent_at_monotonic=sent_at_monotonic,
    )


class PendingBatches(Generic[_FutureT]):
    """Sequence numbers and waiting futures of a ``KeepAlive`` stream.

    Thread-safe: the sync stream calls it from any sender thread and from its
    reader thread; the aio stream calls it from the event loop only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next_sequence = 1
        self._pending: dict[int, tuple[_FutureT, float]] = {}

    def add(self, future: _FutureT, sent_at_monotonic: float) -> int:
        """Register a future and return the sequence number to send with its batch."""
        with self._lock:
            sequence = self._next_sequence
            self._next_sequence += 1
            self._pending[sequence] = (future, sent_at_monotonic)
        return sequence

    def pop(self, sequence: int) -> tuple[_FutureT, float] | None:
        """Remove and return the future and send time for a sequence, or None if unknown."""
        with self._lock:
            return self._pending.pop(sequence, None)

    def drain(self) -> list[_FutureT]:
        """Remove and return every waiting future."""
        with self._lock:
            futures = [future for future, _ in self._pending.values()]
            self._pending.clear()
        return futures

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

"""Authenticators that decide which principal a Grant request comes from."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from session_authority.v1.identity import peer_identity

logger = logging.getLogger(__name__)

AUTHORIZATION_METADATA_KEY = "authorization"
"""Request metadata key that carries ``Bearer <api key>``."""

PRINCIPAL_METADATA_KEY = "x-session-principal"
"""Request metadata key that names the principal in insecure development mode."""

DEV_PRINCIPAL = "dev"
"""The principal of insecure development mode when the caller names none."""

MAX_PRINCIPAL_LENGTH = 256

_PRINCIPAL = re.compile(rf"[!-~]{{1,{MAX_PRINCIPAL_LENGTH}}}")
_PRINCIPAL_RULE = f"a principal is 1 to {MAX_PRINCIPAL_LENGTH} printable ASCII characters without whitespace"
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_FINGERPRINT_LENGTH = 12
# The index of API key hashes is keyed by this many leading hex digits, so that the full
# hash is only ever compared with hmac.compare_digest.
_INDEX_PREFIX_LENGTH = 16
_BEARER_FORM = f'send "{AUTHORIZATION_METADATA_KEY}: Bearer <api key>"'


class AuthenticationError(Exception):
    """The caller of a Grant could not be authenticated.

    The message states what was missing or wrong and how to fix it, and never contains the
    presented key. The servicer returns it as the details of an ``UNAUTHENTICATED`` status.
    """


@dataclass(frozen=True, slots=True)
class CallerInfo:
    """The facts about a call that an authenticator may use, copied from its servicer context.

    Attributes:
        metadata: The invocation metadata as (key, value) pairs. Values of ``-bin`` keys are bytes.
        peer: The peer address as gRPC reports it, such as ``ipv4:127.0.0.1:50312``.
        auth_context: The transport's authentication properties. With TLS client certificates
            it contains the peer's identities (``x509_common_name``,
            ``x509_subject_alternative_name``), which an mTLS authenticator reads.
    """

    metadata: tuple[tuple[str, str | bytes], ...] = ()
    peer: str = ""
    auth_context: Mapping[str, Sequence[bytes]] = field(default_factory=lambda: types.MappingProxyType({}))

    def metadata_values(self, key: str) -> tuple[str | bytes, ...]:
        """Return every value sent under ``key``, compared case-insensitively, in order."""
        key = key.lower()
        return tuple(value for name, value in self.metadata if name.lower() == key)


def caller_info_from_context(context: Any) -> CallerInfo:
    """Copy the caller's metadata, peer and auth context from a servicer context.

    Works for both ``grpc.ServicerContext`` and ``grpc.aio.ServicerContext``, which share
    these three methods. None of them does I/O.
    """
    metadata = tuple((str(item[0]), item[1]) for item in context.invocation_metadata() or ())
    auth_context = {str(name): tuple(values) for name, values in (context.auth_context() or {}).items()}
    return CallerInfo(metadata=metadata, peer=context.peer() or "", auth_context=types.MappingProxyType(auth_context))


@runtime_checkable
class Authenticator(Protocol):
    """Decides which principal a Grant request comes from.

    The aio servicer calls ``authenticate`` on its event loop, so implementations must not
    block or do I/O per call. They may be called from several threads at once and must not
    change state after construction.

    Attributes:
        name: A short name for start-up logs, such as ``"api-key"``.
    """

    name: str

    def authenticate(self, caller: CallerInfo, requested_principal: str) -> str:
        """Return the authenticated principal of a call.

        Args:
            caller: The call's metadata, peer and auth context.
            requested_principal: The ``principal`` of the Grant request, or empty.

        Raises:
            AuthenticationError: The caller is not authenticated, or ``requested_principal``
                differs from the principal that the caller authenticated as.
        """
        ...


def principal_error(text: str) -> str | None:
    """Return why ``text`` is not a valid principal, or None when it is valid."""
    if _PRINCIPAL.fullmatch(text):
        return None
    return f"invalid principal {_quote(text)}: {_PRINCIPAL_RULE}"


def validate_principal(text: str) -> str:
    """Return ``text`` when it is a valid principal.

    A principal is 1 to 256 printable ASCII characters without whitespace.

    Raises:
        AuthenticationError: The text breaks that rule. The message states the rule.
    """
    problem = principal_error(text)
    if problem is not None:
        raise AuthenticationError(problem)
    return text


def generate_api_key() -> str:
    """Return a new random API key (256 bits, URL-safe base64)."""
    return secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Return the SHA-256 of an API key as lower-case hex, the form stored in key files."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def append_api_key(path: str | os.PathLike[str], principal: str) -> str:
    """Generate an API key for ``principal``, append its hash to a key file and return the key.

    The file is created with mode 0600 when missing. Only the hash is stored, so the
    returned key cannot be recovered later. Print it once.

    Raises:
        ValueError: ``principal`` is not a valid principal.
        OSError: The file cannot be opened or written.
    """
    problem = principal_error(principal)
    if problem is not None:
        raise ValueError(problem)
    key = generate_api_key()
    line = f"{hash_api_key(key)} {principal}\n".encode("ascii")

    # In "a+b" mode every write goes to the end, whatever the read position.
    with open(path, "a+b", opener=_open_private) as file:
        size = file.seek(0, os.SEEK_END)
        if size:
            file.seek(size - 1)
            if file.read(1) != b"\n":
                line = b"\n" + line
        file.write(line)
        file.flush()
        os.fsync(file.fileno())
    logger.info("Appended API key %s for principal %s to %s", _fingerprint(key), principal, os.fspath(path))
    return key


class ApiKeyAuthenticator:
    """Authenticates callers by an API key sent as ``authorization: Bearer <key>``.

    Only SHA-256 hashes of keys are stored. The key table is immutable after construction,
    so ``authenticate`` is safe from any thread and does no I/O.
    """

    name = "api-key"

    def __init__(self, principals_by_key_hash: Mapping[str, str]) -> None:
        """Build the authenticator from a mapping of SHA-256 hex key hash to principal.

        Raises:
            ValueError: A hash is not 64 hex digits or a principal is invalid.
        """
        self._index: dict[str, list[tuple[str, str]]] = {}
        for key_hash, principal in principals_by_key_hash.items():
            if not _SHA256_HEX.fullmatch(key_hash):
                raise ValueError(f"invalid API key hash {_quote(key_hash)}: expected 64 hex digits (SHA-256)")
            problem = principal_error(principal)
            if problem is not None:
                raise ValueError(problem)
            key_hash = key_hash.lower()
            self._index.setdefault(key_hash[:_INDEX_PREFIX_LENGTH], []).append((key_hash, principal))
        self._key_count = len(principals_by_key_hash)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> ApiKeyAuthenticator:
        """Read a key file with one ``SHA256HEX PRINCIPAL`` line per key.

        Blank lines and lines starting with ``#`` are ignored, and a line may end with a
        ``# comment``.

        Raises:
            ValueError: A line is malformed, a hash appears twice or the file contains no key.
                The message names the file and the line number.
            OSError: The file cannot be read.
        """
        source = os.fspath(path)
        with open(source, "rb") as file:
            data = file.read()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{source}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc

        principals_by_key_hash: dict[str, str] = {}
        line_by_key_hash: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), start=1):
            fields = line.split()
            if not fields or fields[0].startswith("#"):
                continue
            where = f"{source}:{number}"
            if len(fields) < 2 or (len(fields) > 2 and not fields[2].startswith("#")):
                raise ValueError(f"{where}: expected SHA256HEX PRINCIPAL, got {len(fields)} fields")
            key_hash, principal = fields[0].lower(), fields[1]
            if not _SHA256_HEX.fullmatch(key_hash):
                raise ValueError(f"{where}: the key hash must be 64 hex digits (the SHA-256 of the key)")
            problem = principal_error(principal)
            if problem is not None:
                raise ValueError(f"{where}: {problem}")
            if key_hash in line_by_key_hash:
                raise ValueError(f"{where}: the same key hash is on line {line_by_key_hash[key_hash]}")
            principals_by_key_hash[key_hash] = principal
            line_by_key_hash[key_hash] = number

        if not principals_by_key_hash:
            raise ValueError(
                f"{source}: no API keys; add a line SHA256HEX PRINCIPAL for each key, "
                f"for example with `session-authority keys add PRINCIPAL --file {source}`"
            )
        authenticator = cls(principals_by_key_hash)
        logger.info("Loaded %d API keys from %s", len(principals_by_key_hash), source)
        return authenticator

    def __repr__(self) -> str:
        return f"{type(self).__name__}(<{self._key_count} keys>)"

    def authenticate(self, caller: CallerInfo, requested_principal: str) -> str:
        """Return the principal whose key the caller sent.

        Raises:
            AuthenticationError: The ``authorization`` metadata is missing, repeated or not
                a Bearer key, the key is unknown, or ``requested_principal`` is non-empty and
                differs from the key's principal.
        """
        key = _bearer_key(caller)
        key_hash = hash_api_key(key)

        principal = None
        for stored_hash, stored_principal in self._index.get(key_hash[:_INDEX_PREFIX_LENGTH], ()):
            if hmac.compare_digest(stored_hash, key_hash):
                principal = stored_principal
        if principal is None:
            raise AuthenticationError(
                f"unknown API key (fingerprint {key_hash[:_FINGERPRINT_LENGTH]}); "
                "check the key, or ask an operator to add its hash to the key file"
            )

        if requested_principal and requested_principal != principal:
            raise AuthenticationError(
                f"the API key belongs to principal {_quote(principal)}, but the request names "
                f"{_quote(requested_principal)}; leave the principal empty or use a key of that principal"
            )
        return principal


class MtlsAuthenticator:
    """Authenticates callers by their TLS client certificate.

    The principal is the certificate's SPIFFE ID (``spiffe://`` URI subject alternative
    name) when it has one, else its subject common name. The server must require and verify
    client certificates (``require_client_auth=True``), so that every connection that reaches
    a handler has one. Stateless, so safe from any thread.
    """

    name = "mtls"

    def authenticate(self, caller: CallerInfo, requested_principal: str) -> str:
        """Return the identity of the caller's client certificate.

        Raises:
            AuthenticationError: The connection has no verified client certificate, the
                certificate names no valid principal, or ``requested_principal`` is non-empty
                and differs from the certificate's identity.
        """
        try:
            identity = peer_identity(caller.auth_context)
        except ValueError as exc:
            raise AuthenticationError(str(exc)) from exc
        if identity is None:
            raise AuthenticationError(
                "the connection presented no verified client certificate; connect over TLS"
                " with a client certificate signed by the authority's client CA"
            )
        problem = principal_error(identity)
        if problem is not None:
            raise AuthenticationError(f"the client certificate's identity is not usable: {problem}")

        if requested_principal and requested_principal != identity:
            raise AuthenticationError(
                f"the client certificate belongs to principal {_quote(identity)}, but the request"
                f" names {_quote(requested_principal)}; leave the principal empty or connect with"
                " a certificate of that principal"
            )
        return identity


class InsecureDevAuthenticator:
    """Accepts the principal that the caller names, without authentication. For loopback development only.

    The principal comes from the Grant request, else from the ``x-session-principal``
    metadata, else it is ``"dev"``. Stateless, so safe from any thread.
    """

    name = "insecure-dev"

    def authenticate(self, caller: CallerInfo, requested_principal: str) -> str:
        """Return the principal the caller names, or ``"dev"``.

        Raises:
            AuthenticationError: The principal is invalid, or ``x-session-principal`` is
                repeated or binary.
        """
        if requested_principal:
            return validate_principal(requested_principal)
        values = caller.metadata_values(PRINCIPAL_METADATA_KEY)
        if not values:
            return DEV_PRINCIPAL
        if len(values) > 1:
            raise AuthenticationError(f'"{PRINCIPAL_METADATA_KEY}" metadata is repeated; send it once')
        value = values[0]
        if not isinstance(value, str):
            raise AuthenticationError(f'"{PRINCIPAL_METADATA_KEY}" metadata must be text, got bytes')
        return validate_principal(value)


def is_loopback_address(listen: str) -> bool:
    """Return whether a ``HOST:PORT`` listen address accepts connections from this host only.

    True for ``127.x.x.x:PORT``, ``localhost:PORT`` and ``[::1]:PORT``. False for wildcard
    addresses (``0.0.0.0``, ``[::]``), any other host, and anything that is not ``HOST:PORT``.
    Host names other than ``localhost`` are not resolved.
    """
    host, separator, port = listen.rpartition(":")
    if not separator or not port.isascii() or not port.isdigit() or int(port) > 65535:
        return False
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        # Without brackets, the colons of an IPv6 address cannot be distinguished from the port separator.
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bearer_key(caller: CallerInfo) -> str:
    values = caller.metadata_values(AUTHORIZATION_METADATA_KEY)
    if not values:
        raise AuthenticationError(f'missing "{AUTHORIZATION_METADATA_KEY}" metadata; {_BEARER_FORM}')
    if len(values) > 1:
        raise AuthenticationError(f'"{AUTHORIZATION_METADATA_KEY}" metadata is repeated; {_BEARER_FORM} once')
    value = values[0]
    if not isinstance(value, str):
        raise AuthenticationError(f'"{AUTHORIZATION_METADATA_KEY}" metadata must be text; {_BEARER_FORM}')

    parts = value.split(None, 1)
    if not parts or parts[0].lower() != "bearer":
        raise AuthenticationError(f'"{AUTHORIZATION_METADATA_KEY}" metadata must use the Bearer scheme; {_BEARER_FORM}')
    if len(parts) < 2 or not parts[1].strip():
        raise AuthenticationError(f'"{AUTHORIZATION_METADATA_KEY}" metadata has no key after "Bearer"; {_BEARER_FORM}')
    return parts[1].strip()


def _open_private(path: str, flags: int) -> int:
    return os.open(path, flags, 0o600)


def _fingerprint(key: str) -> str:
    return hash_api_key(key)[:_FINGERPRINT_LENGTH]


def _quote(text: str) -> str:
    if len(text) > 64:
        return json.dumps(text[:64]) + "..."
    return json.dumps(text)

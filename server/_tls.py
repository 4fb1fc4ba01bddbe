"""TLS credentials read from PEM files: the authority's server side, and its client side towards etcd."""

from __future__ import annotations

import os
import pathlib

import grpc


class TlsConfigError(ValueError):
    """A TLS file is missing, unreadable or not PEM; the message names the flag and the file."""


def read_pem(path: str | os.PathLike[str], flag: str) -> bytes:
    """Return the contents of a PEM file.

    Args:
        path: The file to read.
        flag: The option that named the file, such as ``"--tls-cert"``, for the message.

    Raises:
        TlsConfigError: The file cannot be read or contains no PEM block.
    """
    source = pathlib.Path(path)
    try:
        data = source.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"cannot read {flag} {source}: {exc.strerror or exc}") from exc
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"{flag} {source} is not a PEM file (no -----BEGIN line); give the PEM form")
    return data


def server_credentials(
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    client_ca_path: str | os.PathLike[str] | None,
) -> grpc.ServerCredentials:
    """Build TLS server credentials from PEM files.

    Args:
        cert_path: The server's certificate chain.
        key_path: The server certificate's private key.
        client_ca_path: CA bundle that client certificates must chain to. When given, every
            client must present a certificate signed by it, and connections without one fail
            during the TLS handshake. When None, clients need no certificate.

    Raises:
        TlsConfigError: A file cannot be read or is not PEM.
    """
    certificate_chain = read_pem(cert_path, "--tls-cert")
    private_key = read_pem(key_path, "--tls-key")
    root_certificates = None if client_ca_path is None else read_pem(client_ca_path, "--tls-client-ca")
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)],
        root_certificates=root_certificates,
        require_client_auth=root_certificates is not None,
    )


def channel_credentials(
    ca_path: str | os.PathLike[str] | None,
    cert_path: str | os.PathLike[str] | None,
    key_path: str | os.PathLike[str] | None,
    *,
    flags: tuple[str, str, str] = ("--etcd-ca", "--etcd-cert", "--etcd-key"),
) -> grpc.ChannelCredentials:
    """Build TLS channel credentials from PEM files.

    Args:
        ca_path: CA bundle that the server's certificate must chain to; None
            trusts the system's default roots.
        cert_path: The client's certificate chain, for servers that require
            client certificates; None sends none.
        key_path: The client certificate's private key; given exactly when
            ``cert_path`` is.
        flags: The options that named the three files, for messages.

    Raises:
        TlsConfigError: A file cannot be read or is not PEM, or only one of
            the certificate and its key is given.
    """
    ca_flag, cert_flag, key_flag = flags
    if (cert_path is None) != (key_path is None):
        missing = key_flag if key_path is None else cert_flag
        raise TlsConfigError(f"{missing} is missing; give {cert_flag} and {key_flag} together")
    root_certificates = None if ca_path is None else read_pem(ca_path, ca_flag)
    certificate_chain = None if cert_path is None else read_pem(cert_path, cert_flag)
    private_key = None if key_path is None else read_pem(key_path, key_flag)
    return grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)

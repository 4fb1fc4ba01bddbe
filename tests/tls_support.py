"""Short-lived certificates for tests that need TLS or client certificates."""

from __future__ import annotations

import dataclasses
import datetime
import pathlib

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def name_of(common_name: str) -> x509.Name:
    """Return a distinguished name that contains only ``common_name``."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def issue_certificate(
    subject_cn: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    is_ca: bool = False,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """Sign a certificate for ``key`` that is valid from five minutes ago for one hour."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name_of(subject_cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def new_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


@dataclasses.dataclass(frozen=True)
class Identity:
    """A certificate and its key as PEM files."""

    cert: pathlib.Path
    key: pathlib.Path

    def channel_credentials(self, ca: pathlib.Path) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(ca.read_bytes(), self.key.read_bytes(), self.cert.read_bytes())


def write_identity(
    directory: pathlib.Path, name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> Identity:
    """Write ``NAME.crt`` and ``NAME.key`` (PKCS#8, unencrypted) into ``directory``."""
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Identity(cert_path, key_path)


class TestCa:
    """A CA that writes its certificate and the identities it issues into one directory."""

    __test__ = False  # not a test class, despite the name

    def __init__(self, directory: pathlib.Path, common_name: str = "session authority test CA") -> None:
        self.directory = directory
        self._key = new_key()
        self._name = name_of(common_name)
        certificate = issue_certificate(common_name, self._key, self._name, self._key, is_ca=True)
        self.cert = directory / f"{common_name.replace(' ', '-')}.crt"
        self.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))

    def issue(self, name: str, common_name: str, sans: list[x509.GeneralName] | None = None) -> Identity:
        """Issue a leaf certificate and write it as ``NAME.crt`` and ``NAME.key``."""
        key = new_key()
        return write_identity(self.directory, name, issue_certificate(common_name, key, self._name, self._key, sans=sans), key)

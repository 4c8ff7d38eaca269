"""A local certificate authority for the services `clinhub infra` starts, under the git-ignored `.infra/`.

The CA signs each service's certificate with the names its clients verify (`127.0.0.1`, `localhost`,
the host's name). Clients trust the CA file (CLINHUB_KAFKA_SSL_CA_LOCATION), never "any certificate".
Keys are written readable by their owner only. Made once: a second run keeps the CA and re-issues a
service certificate only when its names changed or it is within 30 days of expiry.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
SERVICE_DAYS = 825
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class CertificateFiles:
    """A certificate (PEM, the issuing CA's after it for a service), its private key (PKCS#8 PEM)."""

    cert: Path
    key: Path


def write_private(path: Path, data: bytes) -> None:
    """Write a file no one but its owner can read, from its creation on (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ensure_ca(directory: Path, name: str = "clinhub local CA") -> CertificateFiles:
    """The CA of this checkout: made on the first call, the same one afterwards."""
    files = CertificateFiles(directory / "ca.crt", directory / "ca.key")
    if files.cert.exists() and files.key.exists():
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(files.key, _key_pem(key))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _alternative_names(names: Sequence[str]) -> list[x509.GeneralName]:
    general: list[x509.GeneralName] = []
    for name in names:
        try:
            general.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            general.append(x509.DNSName(name))
    return general


def _still_good(
    files: CertificateFiles,
    ca_cert: x509.Certificate,
    names: Sequence[str],
    usages: Sequence[x509.ObjectIdentifier],
) -> bool:
    if not (files.cert.exists() and files.key.exists()):
        return False
    cert = x509.load_pem_x509_certificates(files.cert.read_bytes())[0]
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    present = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    used = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    return set(present) == set(_alternative_names(names)) and set(used) == set(usages)


def issue_certificate(
    ca: CertificateFiles,
    directory: Path,
    stem: str,
    names: Sequence[str],
    client: bool = False,
    mutual: bool = False,
) -> CertificateFiles:
    """A certificate for `names` (IP addresses or DNS names; the first is also its CN), signed by `ca`:
    for a server, or with `client` for a client (mutual TLS), or with `mutual` for both (a server that
    is its peers' client too: Kafka's controllers). Kept while still good."""
    files = CertificateFiles(directory / f"{stem}.crt", directory / f"{stem}.key")
    ca_cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else [ExtendedKeyUsageOID.SERVER_AUTH]
    if mutual:
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    if _still_good(files, ca_cert, names, usages):
        return files
    ca_key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not the EC key this module makes")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVICE_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_alternative_names(names)), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    write_private(files.key, _key_pem(key))
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca.cert.read_bytes()
    files.cert.write_bytes(chain)
    return files

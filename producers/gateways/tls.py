"""TLS for the gateways' listeners (MLLP, FHIR): the server context, and the institution a verified client
certificate stands for.

With a certificate, TLS 1.2 or later; with a client CA besides, mutual TLS: the handshake requires a client
certificate the CA signed, and its subject CN names the institution, or is mapped to one by the gateway's
`*_tls_client_institutions` (CN -> institution).

For an ASGI server (the FHIR gateway), the connection's TLS facts travel in the request scope as the ASGI
TLS extension (`scope["extensions"]["tls"]`, asgiref's specs/tls.rst, version 0.2): the client certificate
as PEM (`client_cert_chain`, the peer's own certificate only: Python before 3.13 gives no verified chain),
its subject as an RFC 4514 string (`client_cert_name`), the TLS version and the IANA cipher suite number.
`server_cert` is None: Python does not give a server its own certificate back.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

ASGI_TLS = "tls"  # the extension's key in scope["extensions"]
TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}  # the protocol's own numbers, as the extension wants


def server_ssl_context(
    cert_file: Path | None, key_file: Path | None = None, client_ca_file: Path | None = None
) -> ssl.SSLContext | None:
    """None without a certificate; TLS with one (the key in `key_file`, else in the certificate's file);
    mutual TLS (a client certificate of `client_ca_file` required at the handshake) with a client CA."""
    if cert_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file or cert_file))
    if client_ca_file is not None:
        context.load_verify_locations(cafile=str(client_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_mutual(context: ssl.SSLContext | None) -> bool:
    return context is not None and context.verify_mode == ssl.CERT_REQUIRED


def peer_certificate(connection: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate | None:
    """The certificate the peer sent (verified, when the context requires one), or None."""
    der = connection.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def common_name(certificate: x509.Certificate) -> str:
    """The subject's CN ("" for a certificate without one, which names no institution)."""
    for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        value = attribute.value
        return value if isinstance(value, str) else value.decode("utf-8", "replace")
    return ""


def certificate_institution(cn: str, mapped: Mapping[str, str]) -> str:
    """The institution a certificate's CN stands for: its mapping, else the CN itself. The caller checks it
    is an institution it serves."""
    return mapped.get(cn, cn)


def _cipher_suite(connection: ssl.SSLObject | ssl.SSLSocket) -> int | None:
    cipher = connection.cipher()
    if cipher is None:
        return None
    for known in connection.context.get_ciphers():
        if known["name"] == cipher[0]:
            return int(known["id"]) & 0xFFFF  # OpenSSL's id is 0x0300XXXX, XXXX the IANA number
    return None


def asgi_tls_extension(connection: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension's entry for one TLS connection, once its handshake is done."""
    certificate = peer_certificate(connection)
    return {
        "server_cert": None,
        "client_cert_chain": [certificate.public_bytes(Encoding.PEM).decode("ascii")] if certificate else [],
        "client_cert_name": certificate.subject.rfc4514_string() if certificate else None,
        "client_cert_error": None,  # an unverified certificate never gets this far: the handshake fails
        "tls_version": TLS_VERSIONS.get(connection.version() or ""),
        "cipher_suite": _cipher_suite(connection),
    }


def asgi_client_certificate(scope: Mapping[str, Any]) -> x509.Certificate | None:
    """The client certificate of a request's connection, from the ASGI TLS extension; None on a connection
    without TLS, without a client certificate, or from a server that does not give the extension."""
    tls = (scope.get("extensions") or {}).get(ASGI_TLS)
    chain = list(tls.get("client_cert_chain") or ()) if tls else []
    return x509.load_pem_x509_certificate(chain[0].encode("ascii")) if chain else None

"""Certificates for the TLS tests, made by the project's own CA code (clinhub/infra/tls.py).

- `make_pki(directory)`: a test CA, a server certificate for 127.0.0.1 and localhost, and client
  certificates with CN `H001` (an institution) and `stranger-lis.example` (no institution);
- `client_context(pki, stem)`: a client's TLS context trusting the test CA, with that client certificate.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from clinhub.infra.tls import CertificateFiles, ensure_ca, issue_certificate

Pki = dict[str, CertificateFiles]


def make_pki(directory: Path) -> Pki:
    ca = ensure_ca(directory, "clinhub TLS test CA")
    return {
        "ca": ca,
        "server": issue_certificate(ca, directory, "server", ["127.0.0.1", "localhost"]),
        "h001": issue_certificate(ca, directory, "h001", ["H001"], client=True),
        "stranger": issue_certificate(ca, directory, "stranger", ["stranger-lis.example"], client=True),
    }


def client_context(pki: Pki, certificate: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if certificate is not None:
        context.load_cert_chain(str(pki[certificate].cert), str(pki[certificate].key))
    return context

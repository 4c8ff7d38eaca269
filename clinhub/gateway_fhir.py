"""`clinhub gateway fhir`: the FHIR R4 gateway on CLINHUB_GATEWAY_HOST:CLINHUB_GATEWAY_FHIR_PORT.

It builds one publisher per institution of the tokens file (CLINHUB_GATEWAY_FHIR_TOKENS_FILE, lines
`<institution> <sha256 hex of the token>`), the ledger of created resources (`fhir-ledger.sqlite3`
next to CLINHUB_GATEWAY_LEDGER_PATH, so If-None-Exist survives a restart), the app, and serves it with
uvicorn until interrupted: HTTPS with CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE, mutual TLS with
CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE besides (a client certificate is then the institution's credential,
and the tokens file is optional), plain HTTP only on loopback unless CLINHUB_GATEWAY_FHIR_ALLOW_PLAIN_HTTP
(`producers/gateways/fhir/server.py`).

Making a token for an institution (the token is shown once; only its hash is kept):

    .venv/bin/python -m clinhub.gateway_fhir H001
    # prints the token (hand it to H001 once, over a safe channel) and, on the second line, the
    # tokens-file line: append it to the tokens file and restart the gateway

or, from code, `token, line = token_line("H001")`.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry

from core import principals
from core.exceptions import ConfigurationError
from core.settings import HubSettings
from producers.gateways.common import kafka_and_registry_ready
from producers.gateways.fhir.app import create_fhir_app
from producers.gateways.fhir.auth import load_tokens, token_line
from producers.gateways.fhir.ledger import LEDGER_FILE, ResourceLedger
from producers.gateways.fhir.server import fhir_ssl_context, uvicorn_config
from producers.gateways.tls import is_mutual
from producers.publisher import Publisher, make_publisher

__all__ = ["FhirGateway", "build_fhir_gateway", "run_fhir_gateway", "token_line"]


@dataclass
class FhirGateway:
    app: Any
    publishers: dict[str, Publisher]
    ledger: ResourceLedger
    ssl_context: ssl.SSLContext | None = None

    @property
    def scheme(self) -> str:
        return "http" if self.ssl_context is None else "https"

    def server_config(self, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
        """uvicorn serving this gateway (HTTPS with its TLS context, client certificates in the scope)."""
        return uvicorn_config(self.app, host, port, self.ssl_context, log_level)

    def close(self) -> None:
        for publisher in self.publishers.values():
            publisher.close(timeout=5)
        self.ledger.close()


def transactional_id(institution: str, port: int) -> str:
    """Unique to one running gateway (host and port) and institution: a second process with the same
    id would fence this one's transactions; a restart of this one aborts what it left open."""
    return f"{principals.FHIR_TRANSACTIONAL_PREFIX}{socket.gethostname()}-{port}-{institution}"


def build_fhir_gateway(settings: HubSettings, registry: CollectorRegistry | None = None) -> FhirGateway:
    """The gateway for the institutions of its tokens and, with mutual TLS, the hub's
    (CLINHUB_STREAM_INSTITUTIONS) and those client certificates are mapped to. Refuses (ConfigurationError)
    what would not protect their credentials: see `producers.gateways.fhir.server.check_transport`."""
    settings = settings.as_principal(principals.GATEWAYS)
    gateway = settings.gateway
    ssl_context = fhir_ssl_context(gateway)
    mutual_tls = is_mutual(ssl_context)
    tokens: dict[str, str] = {}
    if gateway.fhir_tokens_file is not None:
        try:
            tokens = load_tokens(gateway.fhir_tokens_file)
        except OSError as exc:
            raise ConfigurationError("CLINHUB_GATEWAY_FHIR_TOKENS_FILE", str(exc)) from exc
        if not tokens:
            raise ConfigurationError("CLINHUB_GATEWAY_FHIR_TOKENS_FILE", "holds no token")
    elif not mutual_tls:
        raise ConfigurationError(
            "CLINHUB_GATEWAY_FHIR_TOKENS_FILE",
            "no tokens file (and no client CA for certificates); make a token line with token_line()",
        )
    institutions = set(tokens.values())
    if mutual_tls:
        institutions |= {*settings.stream.institutions, *gateway.fhir_tls_client_institutions.values()}
    publishers = {
        institution: make_publisher(
            settings,
            institution,
            delivery_timeout=gateway.publish_timeout_seconds,
            transactional_id=transactional_id(institution, gateway.fhir_port),
        )
        for institution in sorted(institutions)
    }
    metrics_registry = registry or CollectorRegistry()
    ledger = ResourceLedger(gateway.ledger_path.parent / LEDGER_FILE)
    kafka_config = settings.kafka.client_config()
    registry_config = settings.registry.client_config()

    def readiness() -> str | None:
        return kafka_and_registry_ready(kafka_config, registry_config)

    app = create_fhir_app(
        publishers.__getitem__,
        tokens,
        metrics_registry,
        readiness,
        ledger,
        max_body_bytes=gateway.fhir_max_body_bytes,
        publish_timeout_seconds=gateway.publish_timeout_seconds,
        mutual_tls=mutual_tls,
        certificate_institutions=gateway.fhir_tls_client_institutions,
        institutions=institutions,
    )
    return FhirGateway(app, publishers, ledger, ssl_context)


def run_fhir_gateway(settings: HubSettings) -> None:
    gateway = build_fhir_gateway(settings)
    try:
        uvicorn.Server(gateway.server_config(settings.gateway.host, settings.gateway.fhir_port)).run()
    finally:
        gateway.close()


def main(argv: list[str] | None = None) -> None:
    """`python -m clinhub.gateway_fhir INSTITUTION`: print a new token, then its tokens-file line."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m clinhub.gateway_fhir INSTITUTION")
    token, line = token_line(args[0])
    print(token)
    print(line)


if __name__ == "__main__":
    main()

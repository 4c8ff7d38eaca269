"""How the FHIR gateway is served: HTTPS (TLS 1.2+) with a certificate, mutual TLS with a client CA, plain
HTTP only on loopback (or behind a TLS-terminating proxy, said so explicitly), on uvicorn.

uvicorn does not put the peer's certificate in the ASGI scope. `TLSScopeProtocol` is its h11 protocol,
which adds the ASGI TLS extension (`producers.gateways.tls.asgi_tls_extension`) to the scope of every
request on a TLS connection, from the connection's `ssl_object`; the app reads the client certificate
from there, so it depends on the extension, not on uvicorn.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.exceptions import ConfigurationError
from core.settings import GatewaySettings
from producers.gateways.tls import ASGI_TLS, asgi_tls_extension, server_ssl_context


class TLSScopeProtocol(H11Protocol):
    """uvicorn's h11 protocol, with `scope["extensions"]["tls"]` on a TLS connection (none on plain HTTP,
    as the extension requires). asyncio calls `connection_made` once the handshake is done, so the client
    certificate is known then; each request's scope gets the connection's entry as uvicorn assigns it."""

    _tls: dict[str, Any] | None = None
    _scope: Any = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        connection = transport.get_extra_info("ssl_object")
        self._tls = asgi_tls_extension(connection) if connection is not None else None
        super().connection_made(transport)

    @property
    def scope(self) -> Any:
        return self._scope

    @scope.setter
    def scope(self, scope: Any) -> None:
        if scope is not None and self._tls is not None:
            scope["extensions"] = {**(scope.get("extensions") or {}), ASGI_TLS: dict(self._tls)}
        self._scope = scope


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_transport(gateway: GatewaySettings) -> None:
    """Refuse what would not protect the institutions' credentials or would silently not apply."""
    if gateway.fhir_tls_cert_file is None:
        for setting, value in (
            ("CLINHUB_GATEWAY_FHIR_TLS_KEY_FILE", gateway.fhir_tls_key_file),
            ("CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE", gateway.fhir_tls_client_ca_file),
        ):
            if value is not None:
                raise ConfigurationError(setting, "needs CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE (the server's)")
        if not is_loopback(gateway.host) and not gateway.fhir_allow_plain_http:
            raise ConfigurationError(
                "CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE",
                f"the FHIR gateway would serve plain HTTP on {gateway.host}, beyond loopback: bearer tokens "
                "and health data would travel in clear. Give it a certificate, or set "
                "CLINHUB_GATEWAY_FHIR_ALLOW_PLAIN_HTTP=true when a TLS-terminating proxy is in front",
            )
    if gateway.fhir_tls_client_institutions and gateway.fhir_tls_client_ca_file is None:
        raise ConfigurationError(
            "CLINHUB_GATEWAY_FHIR_TLS_CLIENT_INSTITUTIONS",
            "maps client certificates, but without CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE none is asked for",
        )


def fhir_ssl_context(gateway: GatewaySettings) -> ssl.SSLContext | None:
    """The FHIR port's TLS context (None: plain HTTP), after `check_transport`; a file that cannot be
    read is a ConfigurationError naming its setting."""
    check_transport(gateway)
    files = (
        ("CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE", gateway.fhir_tls_cert_file),
        ("CLINHUB_GATEWAY_FHIR_TLS_KEY_FILE", gateway.fhir_tls_key_file),
        ("CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE", gateway.fhir_tls_client_ca_file),
    )
    for setting, path in files:
        if path is not None and not path.is_file():
            raise ConfigurationError(setting, f"{path} is not a file")
    try:
        return server_ssl_context(
            gateway.fhir_tls_cert_file, gateway.fhir_tls_key_file, gateway.fhir_tls_client_ca_file
        )
    except ssl.SSLError as exc:
        raise ConfigurationError(
            "CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE", f"the certificate, its key or the client CA: {exc}"
        ) from exc


ContextFactory = Callable[[uvicorn.Config, Callable[[], ssl.SSLContext]], ssl.SSLContext]


def _given(context: ssl.SSLContext) -> ContextFactory:
    """uvicorn's hook for a context of one's own: this one, whatever uvicorn would make."""
    return lambda _config, _default: context


def uvicorn_config(
    app: Any, host: str, port: int, ssl_context: ssl.SSLContext | None, log_level: str = "warning"
) -> uvicorn.Config:
    """uvicorn serving `app` on host:port, HTTPS only when `ssl_context` is given, the client certificate
    in each request's scope."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=TLSScopeProtocol,
        ws="none",
        log_level=log_level,
        access_log=False,
        ssl_context_factory=None if ssl_context is None else _given(ssl_context),
    )

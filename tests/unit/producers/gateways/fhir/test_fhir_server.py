"""How the FHIR gateway is served: what it refuses to start with, and uvicorn with the ASGI TLS extension
in the scope (a loopback server, an app that echoes the extension; certificates: tests/certificates.py)."""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509

from clinhub.infra.process import free_port
from core.exceptions import ConfigurationError
from core.settings import GatewaySettings
from producers.gateways.fhir.server import check_transport, fhir_ssl_context, is_loopback, uvicorn_config
from producers.gateways.tls import server_ssl_context
from tests.certificates import Pki, client_context, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),  # noqa: S104 - what is tested
        ("::", False),
        ("10.1.2.3", False),
        ("gateway.example", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plain_http_on_loopback_is_allowed() -> None:
    check_transport(GatewaySettings(host="127.0.0.1"))


def test_plain_http_beyond_loopback_is_refused_naming_the_certificate_setting() -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_transport(GatewaySettings(host="0.0.0.0"))  # noqa: S104 - what is refused
    assert refused.value.setting == "CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE"
    assert "bearer tokens" in refused.value.reason and "in clear" in refused.value.reason
    assert "CLINHUB_GATEWAY_FHIR_ALLOW_PLAIN_HTTP" in refused.value.reason


def test_plain_http_beyond_loopback_when_a_tls_proxy_is_said_to_be_in_front() -> None:
    check_transport(GatewaySettings(host="0.0.0.0", fhir_allow_plain_http=True))  # noqa: S104


def test_a_certificate_allows_any_host(pki: Pki) -> None:
    gateway = GatewaySettings(
        host="0.0.0.0",  # noqa: S104
        fhir_tls_cert_file=pki["server"].cert,
        fhir_tls_key_file=pki["server"].key,
    )
    context = fhir_ssl_context(gateway)
    assert context is not None and context.verify_mode == ssl.CERT_NONE


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"fhir_tls_key_file": Path("k.pem")}, "CLINHUB_GATEWAY_FHIR_TLS_KEY_FILE"),
        ({"fhir_tls_client_ca_file": Path("ca.pem")}, "CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE"),
        ({"fhir_tls_client_institutions": {"lis": "H001"}}, "CLINHUB_GATEWAY_FHIR_TLS_CLIENT_INSTITUTIONS"),
    ],
)
def test_tls_settings_that_would_not_apply_are_refused(settings: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        check_transport(GatewaySettings(host="127.0.0.1", **settings))
    assert refused.value.setting == named


def test_files_that_cannot_be_read_name_their_setting(pki: Pki, tmp_path: Path) -> None:
    missing = GatewaySettings(
        fhir_tls_cert_file=pki["server"].cert,
        fhir_tls_key_file=pki["server"].key,
        fhir_tls_client_ca_file=tmp_path / "no-ca.pem",
    )
    with pytest.raises(ConfigurationError) as refused:
        fhir_ssl_context(missing)
    assert refused.value.setting == "CLINHUB_GATEWAY_FHIR_TLS_CLIENT_CA_FILE"
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigurationError) as refused:
        fhir_ssl_context(GatewaySettings(fhir_tls_cert_file=garbage))
    assert refused.value.setting == "CLINHUB_GATEWAY_FHIR_TLS_CERT_FILE"


async def echo_tls(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app answering with its scope's TLS extension (null when there is none)."""
    if scope["type"] != "http":
        return
    body = json.dumps({"tls": (scope.get("extensions") or {}).get("tls")}).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


@pytest.fixture()
def serve() -> Iterator[Any]:
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(context: ssl.SSLContext | None) -> int:
        port = free_port()
        server = uvicorn.Server(uvicorn_config(echo_tls, "127.0.0.1", port, context))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        servers.append((server, thread))
        return port

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def test_each_request_on_a_mutual_tls_connection_carries_its_client_certificate(pki: Pki, serve: Any) -> None:
    port = serve(server_ssl_context(pki["server"].cert, pki["server"].key, pki["ca"].cert))
    with httpx.Client(verify=client_context(pki, "h001"), timeout=10) as client:
        for _ in range(2):  # the second request on the same connection gets it too
            tls = client.get(f"https://127.0.0.1:{port}/").json()["tls"]
            assert tls["client_cert_name"] == "CN=H001"
            (pem,) = tls["client_cert_chain"]
            sent = x509.load_pem_x509_certificates(pki["h001"].cert.read_bytes())[0]
            assert x509.load_pem_x509_certificate(pem.encode()) == sent
            assert tls["tls_version"] == 0x0304


def test_tls_without_client_ca_has_the_extension_without_certificate(pki: Pki, serve: Any) -> None:
    port = serve(server_ssl_context(pki["server"].cert, pki["server"].key))
    tls = httpx.get(f"https://127.0.0.1:{port}/", verify=client_context(pki), timeout=10).json()["tls"]
    assert tls["client_cert_chain"] == [] and tls["client_cert_name"] is None
    assert tls["tls_version"] in (0x0303, 0x0304)


def test_plain_http_has_no_tls_extension(serve: Any) -> None:
    port = serve(None)
    assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).json() == {"tls": None}


def test_an_https_port_refuses_plain_http(pki: Pki, serve: Any) -> None:
    port = serve(server_ssl_context(pki["server"].cert, pki["server"].key))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = sock.recv(4096)
    assert not answer.startswith(b"HTTP/")  # a TLS alert or nothing, never an HTTP answer

"""The gateways' TLS helpers: the server context, a certificate's CN and institution, and the ASGI TLS
extension, on real handshakes in memory (certificates from tests/certificates.py, no socket)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from cryptography import x509

from producers.gateways.tls import (
    asgi_client_certificate,
    asgi_tls_extension,
    certificate_institution,
    common_name,
    is_mutual,
    peer_certificate,
    server_ssl_context,
)
from tests.certificates import Pki, client_context, make_pki

TLS13_SUITES = {0x1301, 0x1302, 0x1303}  # RFC 8446 B.4, the ones OpenSSL enables


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """Both ends of one TLS handshake over memory BIOs; raises the side's SSLError if it fails."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server_end = server.wrap_bio(to_server, to_client, server_side=True)
    client_out, client_in = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_end = client.wrap_bio(client_in, client_out, server_hostname="127.0.0.1")
    done = {"server": False, "client": False}
    for _ in range(10):
        for name, end in (("client", client_end), ("server", server_end)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
            to_server.write(client_out.read())
            client_in.write(to_client.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a refused client certificate from the client's last flight
            client_end.write(b"x")
            to_server.write(client_out.read())
            server_end.read(1)
            return server_end, client_end
    raise AssertionError("the handshake did not finish")


def test_no_certificate_no_context() -> None:
    assert server_ssl_context(None) is None
    assert not is_mutual(None)


def test_tls_at_least_1_2_and_mutual_only_with_a_client_ca(pki: Pki) -> None:
    plain_tls = server_ssl_context(pki["server"].cert, pki["server"].key)
    assert plain_tls is not None and plain_tls.minimum_version == ssl.TLSVersion.TLSv1_2
    assert not is_mutual(plain_tls)
    mutual = server_ssl_context(pki["server"].cert, pki["server"].key, pki["ca"].cert)
    assert mutual is not None and mutual.verify_mode == ssl.CERT_REQUIRED and is_mutual(mutual)


def test_a_tls_1_1_client_is_refused_by_the_server(pki: Pki) -> None:
    server = server_ssl_context(pki["server"].cert, pki["server"].key)
    assert server is not None
    old = client_context(pki, None)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client would speak TLS 1.1
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(ssl.SSLError, match="UNSUPPORTED_PROTOCOL") as refused:
        handshake(server, old)
    assert refused.value.library == "SSL"


def test_mutual_tls_refuses_a_client_without_certificate(pki: Pki) -> None:
    server = server_ssl_context(pki["server"].cert, pki["server"].key, pki["ca"].cert)
    assert server is not None
    with pytest.raises(ssl.SSLError, match="PEER_DID_NOT_RETURN_A_CERTIFICATE"):
        handshake(server, client_context(pki, None))


def test_extension_of_a_mutual_tls_connection_carries_the_client_certificate(
    pki: Pki,
) -> None:
    server = server_ssl_context(pki["server"].cert, pki["server"].key, pki["ca"].cert)
    assert server is not None
    server_end, _ = handshake(server, client_context(pki, "h001"))
    extension = asgi_tls_extension(server_end)
    sent = x509.load_pem_x509_certificates(pki["h001"].cert.read_bytes())[0]  # the chain file: leaf first
    (pem,) = extension["client_cert_chain"]
    assert x509.load_pem_x509_certificate(pem.encode()) == sent
    assert extension["client_cert_name"] == "CN=H001"
    assert extension["client_cert_error"] is None and extension["server_cert"] is None
    assert extension["tls_version"] == 0x0304
    assert extension["cipher_suite"] in TLS13_SUITES

    scope = {"type": "http", "extensions": {"tls": extension}}
    certificate = asgi_client_certificate(scope)
    assert certificate is not None and certificate == sent == peer_certificate(server_end)
    assert common_name(certificate) == "H001"


def test_extension_without_client_certificate_and_tls_1_2_numbers(pki: Pki) -> None:
    server = server_ssl_context(pki["server"].cert, pki["server"].key)
    assert server is not None
    server.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # IANA 0xC02B (RFC 5289)
    client = client_context(pki, None)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    server_end, _ = handshake(server, client)
    extension = asgi_tls_extension(server_end)
    assert extension["client_cert_chain"] == [] and extension["client_cert_name"] is None
    assert extension["tls_version"] == 0x0303
    assert extension["cipher_suite"] == 0xC02B
    assert asgi_client_certificate({"type": "http", "extensions": {"tls": extension}}) is None


def test_no_extension_no_certificate() -> None:
    assert asgi_client_certificate({"type": "http"}) is None
    assert asgi_client_certificate({"type": "http", "extensions": {}}) is None


def test_a_certificate_without_cn_names_nothing(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "H001 lab")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    assert common_name(certificate) == ""


def test_certificate_institution_maps_or_is_the_cn() -> None:
    assert certificate_institution("H001", {}) == "H001"
    assert certificate_institution("lis-h2.example", {"lis-h2.example": "H002"}) == "H002"
    assert certificate_institution("", {"lis-h2.example": "H002"}) == ""

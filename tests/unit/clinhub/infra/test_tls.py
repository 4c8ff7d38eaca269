"""The local CA: service certificates that verify with the names clients use, keys for their owner only."""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

from cryptography import x509

from clinhub.infra.tls import ensure_ca, issue_certificate, write_private


def handshake(server: ssl.SSLContext, client: ssl.SSLContext, hostname: str) -> str | None:
    """A TLS handshake over a socket pair; the client's error, None when it verified the server."""
    left, right = socket.socketpair()
    errors: list[str] = []

    def serve() -> None:
        try:
            with server.wrap_socket(left, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client.wrap_socket(right, server_hostname=hostname) as tls:
            tls.send(b"x")
    except ssl.SSLCertVerificationError as exc:
        errors.append(exc.verify_message)
    finally:
        right.close()
        thread.join(10)
    return errors[0] if errors else None


def test_a_service_certificate_verifies_against_the_ca_for_each_name(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    broker = issue_certificate(ca, tmp_path, "broker", ["127.0.0.1", "localhost"])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(broker.cert, broker.key)  # the chain and key belong together
    client = ssl.create_default_context(cafile=str(ca.cert))
    assert handshake(server, client, "127.0.0.1") is None
    assert handshake(server, client, "localhost") is None
    assert "mismatch" in str(handshake(server, client, "kafka.example"))
    assert handshake(server, ssl.create_default_context(), "127.0.0.1") is not None, "only our CA"
    cert = x509.load_pem_x509_certificates(broker.cert.read_bytes())[0]
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_keys_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    broker = issue_certificate(ca, tmp_path, "broker", ["127.0.0.1"])
    for key in (ca.key, broker.key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    secret = tmp_path / "secrets" / "admin.password"
    write_private(secret, b"s3cret")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_bytes() == b"s3cret"


def test_a_second_run_keeps_the_ca_and_reissues_only_when_the_names_change(tmp_path: Path) -> None:
    ca = ensure_ca(tmp_path)
    ca_before = ca.cert.read_bytes()
    first = issue_certificate(ca, tmp_path, "broker", ["127.0.0.1", "localhost"]).cert.read_bytes()
    assert ensure_ca(tmp_path).cert.read_bytes() == ca_before
    assert issue_certificate(ca, tmp_path, "broker", ["localhost", "127.0.0.1"]).cert.read_bytes() == first
    changed = issue_certificate(ca, tmp_path, "broker", ["127.0.0.1", "kafka"]).cert.read_bytes()
    assert changed != first
    cert = x509.load_pem_x509_certificates(changed)[0]
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=365)

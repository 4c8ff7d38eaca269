"""docker-compose.yml's secrets, made for real into a directory as its `secrets` service makes them: who may
read what, the names each certificate carries, and a second run that keeps everything."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from clinhub.cli import app
from clinhub.infra.compose_secrets import Owners, Topology, make, roles_sql
from core.exceptions import ConfigurationError

OWNERS = Owners()
ROOT_RUN = os.geteuid() == 0  # the service runs as root; ownership is set only then
INSTITUTIONS = ("H001", "H002", "C003")


def snapshot(root: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file: its bytes, mode and owner."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            found[str(path.relative_to(root))] = (path.read_bytes(), stat.S_IMODE(info.st_mode), info.st_uid)
    return found


@pytest.fixture()
def volume(tmp_path: Path) -> Path:
    root = tmp_path / "secrets"
    make(root, Topology(institutions=INSTITUTIONS))
    return root


def names_of(pem: bytes) -> tuple[set[str], set[x509.ObjectIdentifier], str]:
    cert = x509.load_pem_x509_certificates(pem)[0]
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    dns = set(sans.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return dns | ips, usages, cert.subject.rfc4514_string()


def test_each_server_certificate_names_what_its_clients_verify(volume: Path) -> None:
    for node in (1, 2, 3):
        names, usages, subject = names_of((volume / f"kafka-{node}" / "keystore.pem").read_bytes())
        assert names == {f"kafka-{node}", "127.0.0.1", "localhost"}
        # the controllers show it to each other (mutual TLS) and are super users by this subject
        assert usages == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        assert subject == f"CN=kafka-{node}"
    for directory, host in (("registry-proxy", "registry-proxy"), ("postgres", "postgres")):
        names, usages, _ = names_of((volume / directory / "server.crt").read_bytes())
        assert names == {host, "127.0.0.1", "localhost"}
        assert usages == {ExtendedKeyUsageOID.SERVER_AUTH}
    ca = x509.load_pem_x509_certificate((volume / "ca" / "ca.crt").read_bytes())
    for path in volume.rglob("ca.crt"):
        assert x509.load_pem_x509_certificate(path.read_bytes()) == ca, path
    chain = x509.load_pem_x509_certificates((volume / "postgres" / "server.crt").read_bytes())
    assert chain[0].issuer == ca.subject and chain[1] == ca
    assert ipaddress.ip_address("127.0.0.1")  # (names are compared as text above)


def test_every_service_gets_only_its_own_secrets(volume: Path) -> None:
    def passwords(directory: str) -> set[str]:
        return {str(p.relative_to(volume / directory)) for p in (volume / directory).rglob("*.password")}

    assert passwords("worker-normaliser") == {
        "secrets/kafka/normaliser.password",
        "secrets/registry/normaliser.password",
    }
    assert passwords("worker-clinical") == {
        "secrets/kafka/clinical.password",
        "secrets/registry/clinical.password",
    }
    assert passwords("worker-store") == {
        "secrets/kafka/store.password",
        "secrets/registry/store.password",
        "secrets/postgres/clinhub_store.password",
    }
    assert passwords("simulator") == {
        f"secrets/{kind}/{name}.password" for kind in ("kafka", "registry") for name in INSTITUTIONS
    }
    every = {"admin", "normaliser", "clinical", "store", *INSTITUTIONS}
    assert passwords("admin") == {
        *(f"secrets/{kind}/{name}.password" for kind in ("kafka", "registry") for name in every),
        "secrets/postgres/clinhub_owner.password",
    }
    assert passwords("postgres") == {"postgres.password"}
    assert not passwords("registry") and not passwords("registry-proxy")
    for node in (1, 2, 3):
        assert sorted(p.name for p in (volume / f"kafka-{node}").iterdir()) == [
            "ca.crt",
            "client.properties",
            "jaas.conf",
            "keystore.pem",
            "scram.args",
        ]
    # the copies are the originals
    original = (volume / "admin/secrets/kafka/store.password").read_text()
    assert (volume / "worker-store/secrets/kafka/store.password").read_text() == original
    assert len(original) >= 43  # 256 random bits
    admin = (volume / "admin/secrets/kafka/admin.password").read_text()
    assert f'password="{admin}"' in (volume / "kafka-2/jaas.conf").read_text()
    assert (
        volume / "kafka-2/scram.args"
    ).read_text() == f"--add-scram\nSCRAM-SHA-512=[name=admin,password={admin}]\n"
    registry = (volume / "store/postgres/registry.password").read_text()
    assert (
        (volume / "registry/application.properties")
        .read_text()
        .endswith(f"apicurio.datasource.password={registry}\n")
    )


def test_keys_and_passwords_are_their_readers_alone(volume: Path) -> None:
    readers = {
        "kafka-1": OWNERS.kafka,
        "postgres": OWNERS.postgres,
        "registry": OWNERS.registry,
        "registry-proxy": OWNERS.hub,
        "admin": OWNERS.hub,
        "worker-store": OWNERS.hub,
        "simulator": OWNERS.hub,
        "ca": 0,
        "store": 0,
    }
    for relative, (_, mode, uid) in snapshot(volume).items():
        top = relative.split("/")[0]
        if relative.endswith(".crt"):  # certificates are public; the CA's is readable by all
            assert mode == 0o444 or not relative.endswith("ca.crt") or top == "ca", relative
        else:
            assert mode & 0o077 == 0, f"{relative} is {mode:o}"
        if ROOT_RUN and top in readers:
            assert uid == readers[top], relative
    for path in volume.rglob("*"):
        if path.is_dir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    # what `clinhub institutions add`, run in init, rewrites: its owner may write it
    assert snapshot(volume)["admin/registry/proxy/htpasswd"][1] == 0o600
    assert snapshot(volume)["admin/secrets/kafka/H001.password"][1] == 0o600


def test_a_second_run_keeps_everything(volume: Path) -> None:
    before = snapshot(volume)
    made = make(volume, Topology(institutions=INSTITUTIONS))
    assert made.lines() == ["everything in place"]
    assert snapshot(volume) == before  # the CA, certificates, passwords, even the salted hashes


def test_rotating_a_password_changes_it_and_its_copies_only(volume: Path) -> None:
    before = snapshot(volume)
    made = make(volume, Topology(institutions=INSTITUTIONS), rotate=["kafka/store", "postgres/clinhub_store"])
    assert made.rotated == ["kafka/store", "postgres/clinhub_store"]
    after = snapshot(volume)
    changed = {name for name in after if after[name][0] != before[name][0]}
    assert changed == {
        "admin/secrets/kafka/store.password",
        "worker-store/secrets/kafka/store.password",
        "store/postgres/clinhub_store.password",
        "worker-store/secrets/postgres/clinhub_store.password",
        "postgres/initdb/10-clinhub-roles.sql",  # the new verifier
    }
    with pytest.raises(ConfigurationError, match="old password"):
        make(volume, rotate=["kafka/admin"])
    with pytest.raises(ConfigurationError, match="kafka/<principal>"):
        make(volume, rotate=["ldap/store"])
    with pytest.raises(ConfigurationError, match="no such password"):
        make(volume, rotate=["registry/H009"])


def test_an_institution_added_later_gets_a_registry_user_and_a_dropped_one_leaves_the_simulator(
    volume: Path,
) -> None:
    # `clinhub institutions add H004` in init leaves its password in admin/; the next run hashes it too
    (volume / "admin/secrets/registry/H004.password").write_text("h004-password")
    (volume / "admin/secrets/registry/H004.password").chmod(0o600)
    make(volume, Topology(institutions=("H001", "H002")))
    users = (volume / "admin/registry/proxy/htpasswd").read_text().splitlines()
    assert users[0].startswith("# inputs sha256 ")
    assert sorted(line.split(":")[0] for line in users[1:]) == sorted(
        ["admin", "normaliser", "clinical", "store", "C003", "H001", "H002", "H004"]
    )
    assert all(line.split(":", 1)[1].startswith("$6$") for line in users[1:])
    assert sorted(p.name for p in (volume / "simulator/secrets/kafka").iterdir()) == [
        "H001.password",
        "H002.password",
    ]


def test_the_roles_sql_creates_each_role_and_database_once_and_sends_no_password(volume: Path) -> None:
    passwords = {
        role: (volume / f"store/postgres/{role}.password").read_text()
        for role in ("clinhub_owner", "clinhub_store", "clinhub_console", "registry")
    }
    sql = (volume / "postgres/initdb/10-clinhub-roles.sql").read_text()
    for password in passwords.values():
        assert password not in sql
    assert sql.count("SCRAM-SHA-256$4096:") == 4
    statements = roles_sql(passwords)
    assert 'SELECT \'CREATE DATABASE "clinhub" OWNER "clinhub_owner"\'' in statements[-4]
    assert statements[-4].endswith("\\gexec")
    assert statements[-1] == 'REVOKE ALL ON DATABASE "registry" FROM PUBLIC;'
    hba = (volume / "postgres/pg_hba.conf").read_text().splitlines()
    rules = [line.split() for line in hba if line and not line.startswith("#")]
    assert rules[0] == ["local", "all", "postgres", "peer"]
    assert all(rule[0] in ("local", "hostssl") or rule[-1] == "reject" for rule in rules)
    assert {rule[-1] for rule in rules if rule[0] == "hostssl" and rule[2] != "postgres"} == {"scram-sha-256"}
    assert ["hostssl", "all", "postgres", "all", "reject"] in rules


def test_the_command_line_makes_the_volume(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["infra", "secrets", str(tmp_path / "v"), "--institution", "H001", "--kafka-host", "broker-a"]
    )
    assert result.exit_code == 0, result.output
    assert "created   kafka-1/keystore.pem" in result.output
    assert not (tmp_path / "v" / "kafka-2").exists()
    assert names_of((tmp_path / "v/kafka-1/keystore.pem").read_bytes())[0] == {
        "broker-a",
        "127.0.0.1",
        "localhost",
    }
    for line in result.output.splitlines():  # paths only, never a value
        assert (tmp_path / "v/admin/secrets/kafka/H001.password").read_text() not in line
    again = CliRunner().invoke(
        app, ["infra", "secrets", str(tmp_path / "v"), "--institution", "H001", "--kafka-host", "broker-a"]
    )
    assert again.output.strip() == "everything in place"

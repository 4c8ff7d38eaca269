"""The certificates and credentials of docker-compose.yml, made by its one-shot `secrets` service
(`clinhub infra secrets /secrets`) into the named volume `secrets`, before any other service starts.

One local CA (`clinhub/infra/tls.py`) signs a certificate per server with the names its clients verify:
each broker's (also a client certificate: the controllers authenticate each other by it), the registry
proxy's and PostgreSQL's, each also naming 127.0.0.1 and localhost for the ports published on the host's
loopback. Every Kafka principal, registry user and database role gets a random password of its own
(`clinhub/infra/secrets.py`). The volume holds one directory per service, which that service mounts alone
(a volume subpath), with only what it needs, owned by the user its image runs as and readable by it only:

    ca/                 the CA's key and certificate; mounted nowhere else
    store/postgres/     the database roles' passwords; mounted nowhere else
    admin/              the `init` service (the admin tooling), laid out as CLINHUB_INFRA_HOME: tls/ca.crt,
                        secrets/kafka/ and secrets/registry/ with every principal's password (these are
                        the originals; `clinhub institutions add` writes new ones there),
                        secrets/postgres/clinhub_owner.password, registry/proxy/htpasswd
    kafka-N/            the broker's PEM keystore, the CA, the admin's JAAS file (inter-broker SCRAM),
                        the admin's SCRAM credentials for `kafka-storage format` and the healthcheck's client
    registry-proxy/     nginx.conf, the proxy's certificate and key (the htpasswd comes from admin/)
    registry/           Apicurio's database password (a Quarkus properties file) and the CA
    postgres/           server certificate and key, pg_hba.conf, the superuser's password, initdb/ (the roles)
    worker-<stage>/     the CA, the stage's Kafka and registry passwords (the store's database password)
    simulator/          the CA, the simulated institutions' Kafka and registry passwords

Made once: a second run keeps the CA, every password and every certificate still good, rewrites a derived
file (htpasswd, the roles' SQL) only when its inputs changed, and puts owners and modes right again.
`rotate` replaces chosen passwords ("kafka/<principal>", "registry/<principal>", "postgres/<role>").
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from clinhub.exceptions import ServiceError
from clinhub.infra import registry_proxy
from clinhub.infra.postgres import ROLES, scram_verifier
from clinhub.infra.secrets import ensure_password
from clinhub.infra.tls import CertificateFiles, ensure_ca, issue_certificate
from core import principals
from core.exceptions import ConfigurationError
from core.settings import HubSettings, StreamSettings, read_secret_file
from sinks import privileges

MECHANISM = "SCRAM-SHA-512"
MOUNT = PurePosixPath("/run/clinhub")  # where each service mounts its own directory of the volume
USERS_MOUNT = PurePosixPath("/run/clinhub-users")  # the registry proxy's htpasswd (admin/registry/proxy)
SUPERUSER = "postgres"  # PostgreSQL's own, for its entrypoint's set-up on the local socket only
REGISTRY_ROLE = "registry"  # Apicurio's storage: a database of its own, owned by this role
REGISTRY_DATABASE = "registry"
HUB_DATABASE = "clinhub"
# The principals the compose services connect as (besides the institutions the simulator plays)
STAGES: tuple[str, ...] = principals.STAGES
KAFKA_SERVICE_PRINCIPALS: tuple[str, ...] = (principals.ADMIN, *STAGES)
WORKER_ROLES = {principals.STORE: privileges.STORE}  # stage -> its database role
KINDS = ("kafka", "registry", "postgres")


@dataclass(frozen=True)
class Owners:
    """The users the images run as, who must read their files (numeric: the volume has no names)."""

    kafka: int = 1000  # apache/kafka: appuser
    postgres: int = 999  # postgres:16 (Debian): postgres
    hub: int = 10001  # this project's Dockerfile: clinhub; also the registry proxy's (see docker-compose.yml)
    registry: int = 1001  # apicurio/apicurio-registry


@dataclass(frozen=True)
class Topology:
    """The host names clients use inside the compose network, and the institutions it simulates."""

    kafka: tuple[str, ...] = ("kafka-1", "kafka-2", "kafka-3")
    registry_proxy: str = "registry-proxy"
    registry_proxy_port: int = 8443
    registry_upstream: str = "registry:8080"  # Apicurio itself, on the proxy's internal network only
    postgres: str = "postgres"
    loopback: tuple[str, ...] = ("127.0.0.1", "localhost")  # the ports published on the host
    institutions: tuple[str, ...] = field(default_factory=lambda: StreamSettings().institutions)

    def __post_init__(self) -> None:
        for name in (*self.kafka, self.registry_proxy, self.postgres, *self.institutions):
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
                raise ConfigurationError("clinhub infra secrets", f"not a host name or principal: {name!r}")


@dataclass
class Made:
    """What a run did, by path relative to the volume (never a secret's value)."""

    created: list[str] = field(default_factory=list)
    rewritten: list[str] = field(default_factory=list)
    rotated: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"rotated   {name}" for name in self.rotated]
        out += [f"created   {name}" for name in self.created]
        out += [f"rewritten {name}" for name in self.rewritten]
        return out or ["everything in place"]


class _Volume:
    """Writes files into the volume: atomically, owned by their reader, 0400 (0600 when the reader
    rewrites it), directories 0700 for their owner. Ownership only when we are root (the service is)."""

    def __init__(self, root: Path, made: Made) -> None:
        self.root = root
        self.made = made
        self.chown = os.geteuid() == 0

    def directory(self, relative: str, uid: int) -> Path:
        path = self.root / relative
        path.mkdir(parents=True, exist_ok=True)
        self.own(path, uid, 0o700)
        return path

    def put(self, relative: str, data: bytes, uid: int, mode: int = 0o400) -> Path:
        path = self.root / relative
        if not (path.exists() and path.read_bytes() == data):
            (self.made.rewritten if path.exists() else self.made.created).append(relative)
            temporary = path.with_name(f".{path.name}.new")
            temporary.unlink(missing_ok=True)
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            self.own(temporary, uid, mode)
            temporary.replace(path)
        self.own(path, uid, mode)
        return path

    def derived(self, relative: str, inputs: bytes, render: Callable[[], str], uid: int, mode: int) -> None:
        """A file made from secrets with a random salt (hashes, verifiers): rendered again only when its
        inputs changed, which its first line records as a digest (a comment; nothing to learn from)."""
        path = self.root / relative
        marker = f"inputs sha256 {hashlib.sha256(inputs).hexdigest()}"
        if not (path.exists() and marker in path.read_text(encoding="utf-8").split("\n", 1)[0]):
            comment = "--" if relative.endswith(".sql") else "#"
            self.put(relative, f"{comment} {marker}\n{render()}".encode(), uid, mode)
        self.own(path, uid, mode)

    def prune(self, relative: str, keep: Iterable[str]) -> None:
        """Remove the password files of a service's directory it no longer needs."""
        wanted = set(keep)
        for path in (self.root / relative).glob("*.password"):
            if path.name not in wanted:
                path.unlink()
                self.made.rewritten.append(f"{relative}/{path.name} (removed)")

    def own(self, path: Path, uid: int, mode: int) -> None:
        if self.chown:
            os.chown(path, uid, uid)
        path.chmod(mode)


def _canonical(root: Path, kind: str, name: str) -> Path:
    if kind == "kafka":
        return root / "admin" / "secrets" / "kafka" / f"{name}.password"
    if kind == "registry":
        return root / "admin" / "secrets" / "registry" / f"{name}.password"
    return root / "store" / "postgres" / f"{name}.password"


def _rotate(root: Path, requests: Iterable[str], made: Made) -> None:
    for request in requests:
        kind, _, name = request.partition("/")
        if kind not in KINDS or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ConfigurationError(
                "--rotate", f"{request!r}: say kafka/<principal>, registry/<principal> or postgres/<role>"
            )
        if (kind, name) == ("kafka", principals.ADMIN):
            raise ConfigurationError(
                "--rotate",
                "kafka/admin: the brokers' storage holds the admin's credentials since it was formatted, "
                "and the brokers log in with them; rotating them needs the old password (kafka-configs.sh)",
            )
        path = _canonical(root, kind, name)
        if not path.exists():
            raise ConfigurationError("--rotate", f"{request}: no such password in {root}")
        path.unlink()
        made.rotated.append(request)


def make(
    root: Path, topology: Topology | None = None, owners: Owners | None = None, rotate: Iterable[str] = ()
) -> Made:
    """Every certificate and credential of the compose stack under `root` (the volume), made once."""
    topology = topology or Topology()
    owners = owners or Owners()
    made = Made()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    _rotate(root, rotate, made)
    volume = _Volume(root, made)
    ca = _authority(volume)
    for relative in ("store", "store/postgres"):
        volume.directory(relative, 0)
    kafka_names = [*KAFKA_SERVICE_PRINCIPALS, *topology.institutions]
    passwords = {
        "kafka": _passwords(volume, "kafka", kafka_names, owners.hub, 0o600),
        "registry": _passwords(volume, "registry", kafka_names, owners.hub, 0o600),
        "postgres": _passwords(volume, "postgres", [*ROLES, REGISTRY_ROLE, SUPERUSER], 0, 0o600),
    }
    _admin(volume, ca, passwords, owners)
    for node, host in enumerate(topology.kafka, start=1):
        _broker(volume, ca, f"kafka-{node}", host, topology, passwords["kafka"][principals.ADMIN], owners)
    _registry_proxy(volume, ca, topology, owners)
    _registry(volume, ca, passwords["postgres"][REGISTRY_ROLE], owners)
    _postgres(volume, ca, topology, passwords["postgres"], owners)
    for stage in STAGES:
        roles = [WORKER_ROLES[stage]] if stage in WORKER_ROLES else []
        _hub_service(volume, ca, f"worker-{stage}", [stage], roles, passwords, owners)
    _hub_service(volume, ca, "simulator", list(topology.institutions), [], passwords, owners)
    return made


def _authority(volume: _Volume) -> CertificateFiles:
    before = (volume.root / "ca" / "ca.crt").exists()
    ca = ensure_ca(volume.root / "ca", "clinhub compose CA")
    if not before:
        volume.made.created.append("ca/ca.crt")
    volume.directory("ca", 0)
    volume.directory("ca/issued", 0)
    return ca


def _passwords(volume: _Volume, kind: str, names: Sequence[str], uid: int, mode: int) -> dict[str, str]:
    """The originals, made once (each 256 random bits)."""
    found = {}
    for name in names:
        path = _canonical(volume.root, kind, name)
        if not path.exists():
            volume.made.created.append(str(path.relative_to(volume.root)))
        found[name] = ensure_password(path)
        volume.own(path, uid, mode)
    return found


def _issue(
    volume: _Volume, ca: CertificateFiles, stem: str, names: Sequence[str], mutual: bool = False
) -> bytes:
    """A certificate chain and key, kept while still good; returns key + chain (a PEM keystore)."""
    issued = issue_certificate(ca, volume.root / "ca" / "issued", stem, names, mutual=mutual)
    return issued.key.read_bytes() + issued.cert.read_bytes()


def _issued(volume: _Volume, stem: str) -> tuple[bytes, bytes]:
    directory = volume.root / "ca" / "issued"
    return (directory / f"{stem}.crt").read_bytes(), (directory / f"{stem}.key").read_bytes()


def _admin(
    volume: _Volume, ca: CertificateFiles, passwords: dict[str, dict[str, str]], owners: Owners
) -> None:
    """The init service's infra home: what `clinhub` run as the admin reads (and writes, adding an
    institution): every principal's Kafka and registry password, the owner role's, the proxy's users."""
    uid = owners.hub
    for relative in ("admin", "admin/tls", "admin/secrets", "admin/secrets/kafka", "admin/secrets/registry"):
        volume.directory(relative, uid)
    volume.put("admin/tls/ca.crt", ca.cert.read_bytes(), uid, 0o444)
    volume.directory("admin/secrets/postgres", uid)
    owner = passwords["postgres"][privileges.OWNER]
    volume.put(f"admin/secrets/postgres/{privileges.OWNER}.password", owner.encode(), uid)
    volume.prune("admin/secrets/postgres", [f"{privileges.OWNER}.password"])
    volume.directory("admin/registry", uid)
    volume.directory("admin/registry/proxy", uid)
    registry = volume.root / "admin/secrets/registry"
    # every registry user there: the compose principals and any institution added since
    every = sorted(path.stem for path in registry.glob("*.password"))
    known = {name: passwords["registry"].get(name) or _read(registry / f"{name}.password") for name in every}
    scratch = (
        volume.root / "ca" / "scratch"
    )  # written there, then moved in whole (nginx reads it per request)
    layout = registry_proxy.ProxyLayout(
        home=scratch, port=0, upstream_port=0, tls_dir=volume.root / "ca", secrets_dir=registry
    )

    def users() -> str:
        registry_proxy.write_users(layout, every)  # the local stack's users file: name:SHA-512 crypt
        text = (scratch / "htpasswd").read_text(encoding="utf-8")
        shutil.rmtree(scratch)
        return text

    inputs = "".join(f"{name}\0{password}\n" for name, password in sorted(known.items())).encode()
    volume.derived("admin/registry/proxy/htpasswd", inputs, users, uid, 0o600)


def _read(path: Path) -> str:
    return read_secret_file(path, str(path)).get_secret_value()


def _broker(
    volume: _Volume,
    ca: CertificateFiles,
    directory: str,
    host: str,
    topology: Topology,
    admin_password: str,
    owners: Owners,
) -> None:
    uid = owners.kafka
    volume.directory(directory, uid)
    # one certificate for every listener: clients verify `host` (or 127.0.0.1 from the host), and the
    # controllers present it to each other as clients (mutual TLS; its subject CN=<host> a super user)
    keystore = _issue(volume, ca, directory, [host, *topology.loopback], mutual=True)
    volume.put(f"{directory}/keystore.pem", keystore, uid)
    volume.put(f"{directory}/ca.crt", ca.cert.read_bytes(), uid, 0o444)
    login = (
        f"    org.apache.kafka.common.security.scram.ScramLoginModule required\n"
        f'    username="{principals.ADMIN}"\n    password="{admin_password}";\n'
    )
    # KafkaServer: every SASL listener (the admin's login is used for the inter-broker connections);
    # KafkaClient: the tools run in the container (the healthcheck)
    jaas = f"KafkaServer {{\n{login}}};\nKafkaClient {{\n{login}}};\n"
    volume.put(f"{directory}/jaas.conf", jaas.encode(), uid)
    scram = f"--add-scram\n{MECHANISM}=[name={principals.ADMIN},password={admin_password}]\n"
    volume.put(f"{directory}/scram.args", scram.encode(), uid)
    client = (
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={MECHANISM}\n"
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={MOUNT / 'ca.crt'}\n"
    )
    volume.put(f"{directory}/client.properties", client.encode(), uid)


def _registry_proxy(volume: _Volume, ca: CertificateFiles, topology: Topology, owners: Owners) -> None:
    uid = owners.hub
    volume.directory("registry-proxy", uid)
    _issue(volume, ca, "registry-proxy", [topology.registry_proxy, *topology.loopback])
    cert, key = _issued(volume, "registry-proxy")
    volume.put("registry-proxy/server.crt", cert, uid)
    volume.put("registry-proxy/server.key", key, uid)
    config = registry_proxy.nginx_config(
        listen=str(topology.registry_proxy_port),
        upstream=f"http://{topology.registry_upstream}",
        cert=Path(str(MOUNT / "server.crt")),
        key=Path(str(MOUNT / "server.key")),
        users=Path(str(USERS_MOUNT / "htpasswd")),
        pid=Path("/tmp/nginx.pid"),  # noqa: S108 - in the proxy's container, which runs as a plain user
        error_log="/dev/stderr",
        temp=Path("/tmp"),  # noqa: S108 - the same
    )
    volume.put("registry-proxy/nginx.conf", config.encode(), uid)


def _registry(volume: _Volume, ca: CertificateFiles, password: str, owners: Owners) -> None:
    """Apicurio keeps its schemas in PostgreSQL as the `registry` role (a Quarkus config file: the only
    secret of its settings; the rest is in docker-compose.yml)."""
    uid = owners.registry
    volume.directory("registry", uid)
    volume.put("registry/ca.crt", ca.cert.read_bytes(), uid, 0o444)
    properties = (
        f"# clinhub infra secrets: Apicurio's database password\napicurio.datasource.password={password}\n"
    )
    volume.put("registry/application.properties", properties.encode(), uid)


# Loopback TCP nowhere: the socket is the entrypoint's (the superuser, peer); clients come over TLS with
# scram-sha-256, each role to its own database; the superuser never over the network.
HBA = f"""\
# clinhub infra secrets: docker-compose.yml's PostgreSQL takes TLS and scram-sha-256 only
local    all        {SUPERUSER}                     peer
local    all        all                            reject
hostssl  all        {SUPERUSER}   all              reject
hostssl  {HUB_DATABASE}    {",".join(ROLES)}  all  scram-sha-256
hostssl  {REGISTRY_DATABASE}   {REGISTRY_ROLE}   all              scram-sha-256
host     all        all        all              reject
"""


def roles_sql(passwords: dict[str, str]) -> list[str]:
    """The login roles (passwords as SCRAM verifiers) and the two databases, each owned by its role;
    statements psql runs, again as often as wanted (a rotated password)."""
    lines = []
    for role in (*ROLES, REGISTRY_ROLE):
        lines.append(
            f"DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN "
            f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE; END IF; END $$;'
        )
        lines.append(f"ALTER ROLE \"{role}\" WITH LOGIN PASSWORD '{scram_verifier(passwords[role])}';")
    for database, owner in ((HUB_DATABASE, privileges.OWNER), (REGISTRY_DATABASE, REGISTRY_ROLE)):
        create = f'CREATE DATABASE "{database}" OWNER "{owner}"'
        exists = f"SELECT FROM pg_database WHERE datname = '{database}'"
        lines.append(f"SELECT '{create}' WHERE NOT EXISTS ({exists}) \\gexec")
        lines.append(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC;')
    return lines


def _postgres(
    volume: _Volume, ca: CertificateFiles, topology: Topology, passwords: dict[str, str], owners: Owners
) -> None:
    uid = owners.postgres
    volume.directory("postgres", uid)
    _issue(volume, ca, "postgres", [topology.postgres, *topology.loopback])
    cert, key = _issued(volume, "postgres")
    volume.put("postgres/server.crt", cert, uid)
    volume.put("postgres/server.key", key, uid)  # PostgreSQL wants it its own, for no one else
    volume.put("postgres/pg_hba.conf", HBA.encode(), uid)
    volume.put(f"postgres/{SUPERUSER}.password", passwords[SUPERUSER].encode(), uid)
    volume.directory("postgres/initdb", uid)
    roles = {role: passwords[role] for role in (*ROLES, REGISTRY_ROLE)}
    inputs = "".join(f"{role}\0{password}\n" for role, password in sorted(roles.items())).encode()
    sql = "postgres/initdb/10-clinhub-roles.sql"
    volume.derived(sql, inputs, lambda: "\n".join([*roles_sql(roles), ""]), uid, 0o400)


def _hub_service(
    volume: _Volume,
    ca: CertificateFiles,
    directory: str,
    kafka_principals: Sequence[str],
    database_roles: Sequence[str],
    passwords: dict[str, dict[str, str]],
    owners: Owners,
) -> None:
    """A hub service's own infra home: the CA, its principals' passwords, its database role's."""
    uid = owners.hub
    volume.directory(directory, uid)
    volume.directory(f"{directory}/tls", uid)
    volume.put(f"{directory}/tls/ca.crt", ca.cert.read_bytes(), uid, 0o444)
    volume.directory(f"{directory}/secrets", uid)
    wanted = {"kafka": kafka_principals, "registry": kafka_principals, "postgres": database_roles}
    for kind, names in wanted.items():
        if not names:
            shutil.rmtree(volume.root / directory / "secrets" / kind, ignore_errors=True)
            continue
        volume.directory(f"{directory}/secrets/{kind}", uid)
        for name in names:
            volume.put(f"{directory}/secrets/{kind}/{name}.password", passwords[kind][name].encode(), uid)
        volume.prune(f"{directory}/secrets/{kind}", [f"{name}.password" for name in names])


@dataclass(frozen=True)
class Credentials:
    created: list[str]
    replaced: list[str]


def ensure_kafka_credentials(settings: HubSettings, replace: Iterable[str] = ()) -> Credentials:
    """SCRAM credentials on Kafka, set as the admin, for every principal with a password file in
    CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR that has none yet, and for each of `replace` again (after its
    password was rotated); returns once the brokers hold the new ones."""
    from clinhub.infra.acls import set_passwords, with_credentials

    directory = settings.kafka.principal_secrets_dir
    if directory is None or not directory.is_dir():
        raise ConfigurationError(
            "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR", "name the directory of the principals' password files"
        )
    names = sorted(path.stem for path in directory.glob("*.password"))
    unknown = sorted(set(replace) - set(names))
    if unknown:
        raise ConfigurationError("--replace", f"no password file for {', '.join(unknown)} in {directory}")
    if principals.ADMIN in set(replace):
        raise ConfigurationError(
            "--replace", "the admin's password is the brokers' own (JAAS) too: it cannot be replaced here"
        )
    config = settings.as_principal(principals.ADMIN).kafka.client_config()
    missing = sorted(set(names) - with_credentials(config, names))
    chosen = sorted({*missing, *replace})
    set_passwords(config, {name: _read(directory / f"{name}.password") for name in chosen})
    _until_present(config, missing)
    return Credentials(created=missing, replaced=sorted(set(replace)))


def _until_present(config: dict[str, str], names: Sequence[str], timeout: float = 30.0) -> None:
    import time

    from clinhub.infra.acls import with_credentials

    deadline = time.monotonic() + timeout
    while set(names) - with_credentials(config, names):
        if time.monotonic() > deadline:
            raise ServiceError(
                "kafka", f"credentials of {', '.join(names)} not in force after {timeout:.0f}s"
            )
        time.sleep(0.2)

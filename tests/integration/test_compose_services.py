"""docker-compose.yml's security, run for real without Docker: the `secrets` service's files
(clinhub infra secrets) with the services' own settings read from the compose file (`docker compose config`).

- A Kafka 4.1.1 broker from the project's jars, formatted by deploy/kafka/start.sh with the admin's SCRAM
  credentials and configured from kafka-1's KAFKA_* variables through the image's own translation (its
  kafka.docker.KafkaDockerWrapper), only its host names and ports made local and its replication made 1.
- Debian's PostgreSQL with the compose command's settings, pg_hba.conf and roles' SQL, and Apicurio
  Registry 3.0.9 on it with the compose service's environment.
- Debian's nginx with the compose proxy's nginx.conf, run as the compose proxy's user.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy import text

from clinhub.infra import kafka as kafka_service
from clinhub.infra import postgres as pg_service
from clinhub.infra.compose_secrets import Owners, ensure_kafka_credentials, make
from clinhub.infra.process import ServiceProcess, free_port, spawn, wait_until
from clinhub.infra.tls import ensure_ca
from core.kafka_errors import ClientErrors
from core.settings import (
    DatabaseSettings,
    HubSettings,
    InfraSettings,
    KafkaSettings,
    RegistrySettings,
    SecuritySettings,
    StreamSettings,
)
from sinks.privileges import OWNER, STORE
from sinks.store import engine_for, upgrade
from tests.integration.test_compose import COMPOSE_FILE, run_validator

ROOT = Path(__file__).resolve().parents[2]
KAFKA_LIB = ROOT / ".infra" / "kafka-lib"
APICURIO = ROOT / ".infra" / "registry-app"
MOUNT = "/run/clinhub"

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    result = run_validator("--json", str(COMPOSE_FILE))
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout)["services"]
    return found


@pytest.fixture(scope="module")
def world() -> Iterator[Path]:
    """A directory every service user may enter (pytest's tmp is root's alone)."""
    root = Path(tempfile.mkdtemp(prefix="clinhub-compose-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def server_uid() -> int:
    import pwd

    return pwd.getpwnam("postgres").pw_uid


def remake(root: Path, rotate: tuple[str, ...] = ()) -> None:
    """`clinhub infra secrets`, the local postgres user standing in for the image's (uid 999)."""
    make(root, owners=Owners(postgres=server_uid()), rotate=rotate)
    root.chmod(0o711)  # in Docker each service mounts its directory alone; here they are entered from above


@pytest.fixture(scope="module")
def volume(world: Path) -> Path:
    """The `secrets` volume."""
    remake(world / "secrets")
    return world / "secrets"


def local(value: Any, directory: Path) -> str:
    return str(value).replace(MOUNT, str(directory))


# ---------------------------------------------------------------- Kafka


def client(port: int, ca: Path, username: str | None, password: str | None, host: str = "localhost") -> dict:
    config = {"bootstrap.servers": f"{host}:{port}", "socket.timeout.ms": 3000}
    if username is None:
        return {**config, "security.protocol": "PLAINTEXT"}
    return {
        **config,
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": username,
        "sasl.password": password,
        "ssl.ca.location": str(ca),
    }


def lists_topics(config: dict, timeout: float = 6.0) -> bool:
    errors = ClientErrors(config.get("sasl.username"))
    admin = AdminClient({**config, "error_cb": errors})
    try:
        admin.list_topics(timeout=timeout)
    except KafkaException:
        return False
    return errors.refused is None


@pytest.fixture(scope="module")
def broker(services: dict[str, Any], volume: Path, world: Path) -> Iterator[dict[str, Any]]:
    home = world / "kafka-1"
    (home / "bin").mkdir(parents=True)
    for name in ("defaults", "mounted", "config"):
        (home / name).mkdir()
    java = shutil.which("java")
    classpath = f"{KAFKA_LIB}/*"
    (home / "log4j2.properties").write_text(kafka_service.LOG4J2)
    logging = f"-Dlog4j2.configurationFile={home / 'log4j2.properties'}"
    # the image's kafka-storage.sh, and its entrypoint: the wrapper's setup (config, format: "already
    # formatted" is fine), then the broker (docker/jvm/launch)
    (home / "bin" / "kafka-storage.sh").write_text(
        "#!/usr/bin/env bash\n"
        f'exec {java} $KAFKA_OPTS {logging} -cp "{classpath}" kafka.tools.StorageTool "$@"\n'
    )
    (home / "run").write_text(
        "#!/usr/bin/env bash\n"
        f'result=$({java} {logging} -cp "{classpath}" kafka.docker.KafkaDockerWrapper setup '
        f"--default-configs-dir {home / 'defaults'} --mounted-configs-dir {home / 'mounted'} "
        f'--final-configs-dir {home / "config"} 2>&1) || echo "$result" | grep -qi "already formatted" '
        '|| { echo "$result"; exit 1; }\n'
        f'exec {java} $KAFKA_HEAP_OPTS $KAFKA_OPTS {logging} -cp "{classpath}" kafka.Kafka '
        f"{home / 'config' / 'server.properties'}\n"
    )
    for script in (home / "bin" / "kafka-storage.sh", home / "run"):
        script.chmod(0o755)
    ports = {"INTERNAL": free_port(), "CONTROLLER": free_port(), "EXTERNAL": free_port()}
    secrets = volume / "kafka-1"
    env = {name: local(value, secrets) for name, value in services["kafka-1"]["environment"].items()}
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith("1@kafka-1:9093,")
    env.update(
        # one node on loopback instead of three on the compose network: names, ports, replication
        KAFKA_CONTROLLER_QUORUM_VOTERS=f"1@localhost:{ports['CONTROLLER']}",
        KAFKA_LISTENERS=",".join(f"{name}://127.0.0.1:{port}" for name, port in ports.items()),
        KAFKA_ADVERTISED_LISTENERS=f"INTERNAL://localhost:{ports['INTERNAL']},EXTERNAL://127.0.0.1:{ports['EXTERNAL']}",
        KAFKA_LOG_DIRS=str(home / "data"),
        KAFKA_DEFAULT_REPLICATION_FACTOR="1",
        KAFKA_MIN_INSYNC_REPLICAS="1",
        KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR="1",
        KAFKA_TRANSACTION_STATE_LOG_MIN_ISR="1",
        KAFKA_HEAP_OPTS="-Xms128m -Xmx512m",
        CLINHUB_KAFKA_HOME=str(home),
        CLINHUB_KAFKA_ENTRYPOINT=str(home / "run"),
        CLINHUB_KAFKA_SCRAM_ARGS=str(secrets / "scram.args"),
        PATH=os.environ["PATH"],
    )
    assert services["kafka-1"]["command"][0] == "bash"
    mounted = {v["target"]: v["source"] for v in services["kafka-1"]["volumes"] if v["type"] == "bind"}
    script = mounted[services["kafka-1"]["command"][1]]
    process = spawn("kafka", ["bash", script], home / "broker.log", env=env)
    admin_password = (volume / "admin/secrets/kafka/admin.password").read_text()
    ca = secrets / "ca.crt"
    try:
        wait_until(
            process,
            lambda: lists_topics(client(ports["INTERNAL"], ca, "admin", admin_password)),
            120,
            "serving the admin",
        )
        yield {"ports": ports, "ca": ca, "admin": admin_password, "home": home, "env": env}
    finally:
        process.stop()


def settings_printed(env: dict[str, str]) -> dict[str, str]:
    """What deploy/kafka/start.sh formats with: the broker settings it makes of the environment."""
    printed = subprocess.run(
        ["bash", str(ROOT / "deploy" / "kafka" / "start.sh"), "--print-settings"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in printed.splitlines())


def test_the_start_script_formats_with_the_settings_the_image_makes(
    services: dict[str, Any], broker: dict[str, Any]
) -> None:
    home: Path = broker["home"]
    made = dict(
        line.split("=", 1)
        for line in (home / "config" / "server.properties").read_text().splitlines()
        if "=" in line
    )
    kafka_env = {k: v for k, v in broker["env"].items() if k.startswith("KAFKA_") or k == "CLUSTER_ID"}
    assert settings_printed(kafka_env) == made  # the image's wrapper, from the same environment
    compose = settings_printed({k: str(v) for k, v in services["kafka-1"]["environment"].items()})
    assert compose["listener.name.controller.ssl.client.auth"] == "required"
    assert compose["allow.everyone.if.no.acl.found"] == "false"
    assert "heap.opts" not in compose and "opts" not in compose  # the image's non-settings are left out
    log = (home / "broker.log").read_text()
    assert "Formatting" in log and "admin's SCRAM credentials" in log
    assert broker["admin"] not in log


def test_clients_get_sasl_ssl_with_scram_only(broker: dict[str, Any], volume: Path) -> None:
    ports, ca, admin = broker["ports"], broker["ca"], broker["admin"]
    assert lists_topics(client(ports["EXTERNAL"], ca, "admin", admin, host="127.0.0.1"))
    for port in ports.values():
        assert not lists_topics(client(port, ca, None, None), timeout=4), f"plaintext served on {port}"
    assert not lists_topics(client(ports["INTERNAL"], ca, "admin", "not-the-password"), timeout=4)
    stranger = ensure_ca(volume.parent / "stranger-ca")  # a CA the broker's certificate is not from
    assert not lists_topics(client(ports["INTERNAL"], stranger.cert, "admin", admin), timeout=4)


def test_the_controller_listener_serves_only_a_peer_with_a_certificate_of_the_ca(
    broker: dict[str, Any],
) -> None:
    port, ca = broker["ports"]["CONTROLLER"], broker["ca"]
    context = ssl.create_default_context(cafile=str(ca))
    # Kafka's ApiVersions request (v0), to see whether anything answers
    request = bytes.fromhex("00120000000000010000")
    frame = len(request).to_bytes(4, "big") + request
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(frame)
                answer = tls.recv(4)
        except (ssl.SSLError, ConnectionError):
            answer = b""
    assert answer == b"", "the controller answered a client without a certificate"
    # the broker itself got in: it registered with the controller as User:CN=kafka-1, a super user
    config = client(broker["ports"]["INTERNAL"], ca, "admin", broker["admin"])
    assert [b.id for b in AdminClient(config).list_topics(timeout=10).brokers.values()] == [1]


def settings_for(broker: dict[str, Any], secrets_dir: Path) -> HubSettings:
    kafka = KafkaSettings(
        bootstrap_servers=f"localhost:{broker['ports']['INTERNAL']}",
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        ssl_ca_location=broker["ca"],
        principal_secrets_dir=secrets_dir,
    )
    return HubSettings(
        kafka=kafka,
        registry=RegistrySettings(),
        database=DatabaseSettings(),
        security=SecuritySettings(),
        stream=StreamSettings(),
        infra=InfraSettings(),
    )


def test_init_gives_every_principal_its_credentials_and_nothing_more(
    broker: dict[str, Any], volume: Path
) -> None:
    port, ca = broker["ports"]["INTERNAL"], broker["ca"]
    normaliser = (volume / "worker-normaliser/secrets/kafka/normaliser.password").read_text()
    assert not lists_topics(client(port, ca, "normaliser", normaliser), timeout=4)
    done = ensure_kafka_credentials(settings_for(broker, volume / "admin/secrets/kafka"))
    assert done.created == sorted(["normaliser", "clinical", "store", "H001", "H002", "C003"])
    assert lists_topics(client(port, ca, "normaliser", normaliser))
    # StandardAuthorizer, allow.everyone.if.no.acl.found=false: no ACL, nothing allowed
    admin = AdminClient(client(port, ca, "normaliser", normaliser))
    refused = admin.create_topics([NewTopic("compose-refused", 1, 1)])["compose-refused"]
    with pytest.raises(KafkaException, match="AUTHORIZATION"):
        refused.result(10)
    as_admin = AdminClient(client(port, ca, "admin", broker["admin"]))  # kept while its futures wait
    as_admin.create_topics([NewTopic("compose-ok", 1, 1)])["compose-ok"].result(10)
    assert ensure_kafka_credentials(settings_for(broker, volume / "admin/secrets/kafka")).created == []

    # rotating: a new password file, set again with --replace; the old one no longer works
    old = (volume / "simulator/secrets/kafka/H001.password").read_text()
    remake(volume, ("kafka/H001",))
    new = (volume / "simulator/secrets/kafka/H001.password").read_text()
    assert new != old
    done = ensure_kafka_credentials(settings_for(broker, volume / "admin/secrets/kafka"), replace=["H001"])
    assert done.replaced == ["H001"]
    deadline = time.monotonic() + 15
    while not lists_topics(client(port, ca, "H001", new), timeout=3) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert lists_topics(client(port, ca, "H001", new))
    assert not lists_topics(client(port, ca, "H001", old), timeout=4)


# ---------------------------------------------------------------- PostgreSQL and Apicurio


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv]


@pytest.fixture(scope="module")
def database(services: dict[str, Any], volume: Path, world: Path) -> Iterator[dict[str, Any]]:
    """The compose PostgreSQL: initdb as its entrypoint runs it, the compose command's settings, then
    the roles' SQL from /docker-entrypoint-initdb.d over the local socket (peer)."""
    bindir = pg_service.find_bindir()
    home = world / "postgres"
    (home / "run").mkdir(parents=True)
    (home / "data").mkdir()
    subprocess.run(["chown", "-R", "postgres:postgres", str(home)], check=True)
    (home / "run").chmod(0o700)
    secrets = volume / "postgres"
    environment = services["postgres"]["environment"]
    password_file = local(environment["POSTGRES_PASSWORD_FILE"], secrets)
    subprocess.run(
        as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(home / "data"),
                "-U",
                environment["POSTGRES_USER"],
                f"--pwfile={password_file}",
                *shlex.split(environment["POSTGRES_INITDB_ARGS"]),
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    command = [local(part, secrets) for part in services["postgres"]["command"]]
    assert command[0] == "postgres"
    argv = [
        str(bindir / "postgres"),
        "-D",
        str(home / "data"),
        *command[1:],
        "-p",
        str(port),
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        f"unix_socket_directories={home / 'run'}",
    ]
    process = spawn("postgresql", as_postgres(argv), home / "postgres.log")
    psql = [
        str(bindir / "psql"),
        "-h",
        str(home / "run"),
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-v",
        "ON_ERROR_STOP=1",
        "--no-psqlrc",
    ]
    wait_until(
        process,
        lambda: subprocess.run(as_postgres([*psql, "-Atc", "select 1"]), capture_output=True).returncode == 0,
        60,
        "accepting connections",
    )
    initdb = {v["target"]: v["volume"]["subpath"] for v in services["postgres"]["volumes"] if v.get("volume")}
    scripts = volume / initdb["/docker-entrypoint-initdb.d"]
    run_sql = [*psql, "-f", str(scripts / "10-clinhub-roles.sql")]
    subprocess.run(as_postgres(run_sql), check=True, capture_output=True)
    try:
        yield {"port": port, "bindir": bindir, "run_sql": run_sql, "home": home}
    finally:
        process.stop()


def database_settings(
    database: dict[str, Any], directory: Path, name: str = "clinhub", **extra: Any
) -> DatabaseSettings:
    return DatabaseSettings(
        url=f"postgresql+psycopg://127.0.0.1:{database['port']}/{name}",  # type: ignore[arg-type]
        ssl_mode=extra.pop("ssl_mode", "verify-full"),
        ssl_ca_location=directory / "tls" / "ca.crt",
        role_secrets_dir=directory / "secrets" / "postgres",
        **extra,
    )


def connect(database: dict[str, Any], user: str, password: str, dbname: str, sslmode: str, ca: Path) -> None:
    psycopg.connect(
        host="127.0.0.1",
        port=database["port"],
        user=user,
        password=password,
        dbname=dbname,
        sslmode=sslmode,
        sslrootcert=str(ca),
        connect_timeout=5,
    ).close()


def test_postgres_takes_tls_and_scram_only_and_each_role_its_own_database(
    database: dict[str, Any], volume: Path
) -> None:
    admin, store_dir = volume / "admin", volume / "worker-store"
    # init: `clinhub db upgrade` as the owner, which grants the others theirs
    owner = engine_for(database_settings(database, admin).for_role(OWNER))
    upgrade(owner)
    owner.dispose()
    store = engine_for(database_settings(database, store_dir).for_role(STORE))
    with store.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM observations")).scalar_one() == 0
        with pytest.raises(Exception, match="permission denied"):
            connection.execute(text("CREATE TABLE intruder (id int)"))
    store.dispose()
    ca = admin / "tls" / "ca.crt"
    store_password = (store_dir / "secrets/postgres/clinhub_store.password").read_text()
    with pytest.raises(psycopg.OperationalError, match="no encryption"):
        connect(database, "clinhub_store", store_password, "clinhub", "disable", ca)
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects"):
        connect(database, "clinhub_store", store_password, "registry", "verify-full", ca)
    superuser = (volume / "postgres/postgres.password").read_text()
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects"):
        connect(database, "postgres", superuser, "postgres", "verify-full", ca)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(database, "clinhub_store", "guess", "clinhub", "verify-full", ca)
    registry_password = (volume / "store/postgres/registry.password").read_text()
    connect(database, "registry", registry_password, "registry", "verify-full", ca)
    with pytest.raises(psycopg.OperationalError, match=r"pg_hba\.conf rejects"):
        connect(database, "registry", registry_password, "clinhub", "verify-full", ca)


def test_the_healthcheck_logs_nothing_and_a_rotated_role_password_takes_effect(
    services: dict[str, Any], database: dict[str, Any], volume: Path
) -> None:
    check = shlex.split(services["postgres"]["healthcheck"]["test"][1])
    assert check[0] == "pg_isready"
    before = (database["home"] / "postgres.log").read_text()
    ready = subprocess.run([str(database["bindir"] / "pg_isready"), *check[1:], "-p", str(database["port"])])
    assert ready.returncode == 0
    time.sleep(0.5)
    assert (database["home"] / "postgres.log").read_text() == before
    # rotation: a new password, the roles' SQL run again over the socket (`docker compose exec -u postgres`)
    old = (volume / "worker-store/secrets/postgres/clinhub_store.password").read_text()
    remake(volume, ("postgres/clinhub_store",))
    rerun = subprocess.run(as_postgres(database["run_sql"]), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    new = (volume / "worker-store/secrets/postgres/clinhub_store.password").read_text()
    ca = volume / "admin/tls/ca.crt"
    connect(database, "clinhub_store", new, "clinhub", "verify-full", ca)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(database, "clinhub_store", old, "clinhub", "verify-full", ca)


def test_apicurio_keeps_its_schemas_in_postgres_over_tls_as_its_own_role(
    services: dict[str, Any], database: dict[str, Any], volume: Path, world: Path
) -> None:
    jars = sorted(APICURIO.glob("apicurio-registry-app-*-runner.jar"))
    assert jars, f"no Apicurio in {APICURIO} (clinhub infra fetch)"
    environment = {
        name: local(value, volume / "registry") for name, value in services["registry"]["environment"].items()
    }
    url = environment["APICURIO_DATASOURCE_URL"]
    assert url.startswith("jdbc:postgresql://postgres:5432/registry?sslmode=verify-full&sslrootcert=")
    environment["APICURIO_DATASOURCE_URL"] = url.replace("postgres:5432", f"127.0.0.1:{database['port']}")
    http = free_port()
    env = {**os.environ, **environment, "QUARKUS_HTTP_HOST": "127.0.0.1", "QUARKUS_HTTP_PORT": str(http)}
    process = spawn(
        "registry",
        [shutil.which("java") or "java", "-Xmx256m", "-jar", str(jars[-1])],
        world / "apicurio.log",
        env=env,
        cwd=world,
    )
    base = f"http://127.0.0.1:{http}"
    try:
        wait_until(
            process,
            lambda: urllib.request.urlopen(f"{base}/health/ready", timeout=2).status == 200,  # noqa: S310 - our own local service
            120,
            "ready",
        )
        schema = json.dumps({"schema": json.dumps({"type": "record", "name": "T", "fields": []})}).encode()
        request = urllib.request.Request(  # noqa: S310 - our own local service
            f"{base}/apis/ccompat/v7/subjects/compose-t/versions",
            data=schema,
            headers={"Content-Type": "application/vnd.schemaregistry.v1+json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - our own local service
            assert "id" in json.loads(response.read())
    finally:
        process.stop()
    password = (volume / "store/postgres/registry.password").read_text()
    with psycopg.connect(
        host="127.0.0.1",
        port=database["port"],
        user="registry",
        password=password,
        dbname="registry",
        sslmode="verify-full",
        sslrootcert=str(volume / "registry/ca.crt"),
    ) as connection:
        owners = {
            row[0]
            for row in connection.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")
        }
    assert owners == {"registry"}


# ---------------------------------------------------------------- the registry proxy


class Upstream(BaseHTTPRequestHandler):
    """Stands in for Apicurio: answers every request it is given."""

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = json.dumps({"upstream": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_DELETE = do_PUT = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


def call(
    url: str, ca: Path, user: str | None = None, password: str | None = None, method: str = "GET"
) -> int:
    headers = {"Content-Type": "application/vnd.schemaregistry.v1+json"}
    if user is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    data = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - our own local service
    try:
        with urllib.request.urlopen(  # noqa: S310 - our own local service
            request, timeout=5, context=ssl.create_default_context(cafile=str(ca))
        ) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_the_registry_proxy_runs_as_the_hub_user_and_only_the_admin_registers(
    services: dict[str, Any], volume: Path, world: Path
) -> None:
    proxy = services["registry-proxy"]
    uid, gid = (int(part) for part in proxy["user"].split(":"))
    assert uid == Owners().hub
    mounts = {v["target"]: volume / v["volume"]["subpath"] for v in proxy["volumes"]}
    port, upstream_port = free_port(), free_port()
    temp = world / "nginx"
    temp.mkdir()
    os.chown(temp, uid, gid)
    config = (volume / "registry-proxy" / "nginx.conf").read_text()
    assert "listen 8443 ssl;" in config and "proxy_pass http://registry:8080;" in config
    # Docker hands a container's stderr to its user; here it is root's, so the log goes to a file
    config = (
        config.replace(" /tmp/", f" {temp}/")
        .replace("error_log /dev/stderr", f"error_log {temp}/error.log")
        .replace("listen 8443 ssl;", f"listen 127.0.0.1:{port} ssl;")
        .replace("http://registry:8080", f"http://127.0.0.1:{upstream_port}")
    )
    for target in sorted(mounts, key=len, reverse=True):  # /run/clinhub-users before /run/clinhub
        config = config.replace(target, str(mounts[target]))
    conf = temp / "nginx.conf"
    conf.write_text(config)
    os.chown(conf, uid, gid)
    as_proxy = [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "nginx",
        "-e",
        str(temp / "error.log"),
        "-c",
        str(conf),
    ]
    checked = subprocess.run([*as_proxy, "-t"], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    server = ThreadingHTTPServer(("127.0.0.1", upstream_port), Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    command = [local(part, mounts["/run/clinhub"]) for part in proxy["command"][3:]]
    assert command == ["-g", "daemon off;"]
    process: ServiceProcess = spawn("registry proxy", [*as_proxy, *command], temp / "nginx.log")
    ca = volume / "admin" / "tls" / "ca.crt"
    base = f"https://127.0.0.1:{port}/apis/ccompat/v7"
    try:
        wait_until(process, lambda: call(f"{base}/subjects", ca) == 401, 20, "serving")
        h001 = (volume / "simulator/secrets/registry/H001.password").read_text()
        admin = (volume / "admin/secrets/registry/admin.password").read_text()
        assert call(f"{base}/subjects", ca, "H001", h001) == 200
        assert call(f"{base}/subjects/raw.H001.lab-value", ca, "H001", h001, "POST") == 200  # a lookup
        assert call(f"{base}/subjects/raw.H001.lab-value/versions", ca, "H001", h001, "POST") == 403
        assert call(f"{base}/subjects/raw.H001.lab-value/versions", ca, "admin", admin, "POST") == 200
        assert call(f"{base}/subjects", ca, "H001", "guess") == 401
        with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
            plain.sendall(b"GET /apis/ccompat/v7/subjects HTTP/1.0\r\n\r\n")
            assert b"400" in plain.recv(200)  # plain HTTP on the TLS port
    finally:
        process.stop()
        server.shutdown()

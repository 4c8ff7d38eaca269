"""Apache Kafka 4.x, single node in KRaft mode, from Maven Central jars fetched by `infra/kafka/pom.xml`.

Secure by default: clients reach it only over SASL_SSL with SCRAM-SHA-512, through a certificate of the
local CA (`clinhub/infra/tls.py`) naming 127.0.0.1 and localhost, and the StandardAuthorizer refuses
whatever no ACL allows. The admin principal (the only super user besides the controller's loopback
listener, which is PLAINTEXT and so authenticates as User:ANONYMOUS) is created when the storage is
formatted; every other principal by the admin afterwards (`ensure_principals`).
"""

from __future__ import annotations

import base64
import hashlib
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Final

from clinhub.exceptions import ServiceError
from clinhub.infra.acls import set_passwords, with_credentials
from clinhub.infra.process import (
    ServiceProcess,
    pid_from_file,
    port_open,
    run_checked,
    spawn,
    stop_recorded,
    wait_until,
)
from clinhub.infra.secrets import LocalCredentials, ensure_password
from clinhub.infra.tls import ensure_ca, issue_certificate, write_private
from core.settings import KafkaSettings

POM = Path(__file__).resolve().parents[2] / "infra" / "kafka" / "pom.xml"
ADMIN = "admin"
MECHANISM: Final = "SCRAM-SHA-512"
ANSWERING = "answering metadata requests"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"
PID_FILE = "broker.pid"

LOG4J2 = """\
status = warn
appender.file.type = Console
appender.file.name = STDOUT
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = STDOUT
logger.kafka.name = kafka
logger.kafka.level = WARN
logger.kafkaorg.name = org.apache.kafka
logger.kafkaorg.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
"""


@dataclass(frozen=True)
class KafkaLayout(LocalCredentials):
    """Where one broker keeps its jars, configuration, data and log."""

    SECRETS_KIND: ClassVar[str] = "kafka"

    home: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"
    shared_lib: Path | None = None
    secure: bool = True  # SASL_SSL, SCRAM and ACLs; False only for a plaintext broker on purpose
    tls_home: Path | None = None  # the local CA and service certificates; default beside home
    secrets_home: Path | None = None  # the principals' password files; default beside home

    @property
    def lib_dir(self) -> Path:
        """Jars are shared by every broker of this checkout, so Maven fetches them once."""
        return self.shared_lib or self.home.parent / "kafka-lib"

    @property
    def config_path(self) -> Path:
        return self.home / "server.properties"

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def log_path(self) -> Path:
        return self.home / "broker.log"

    @property
    def pid_path(self) -> Path:
        return self.home / PID_FILE

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def settings_for(self, principal: str) -> KafkaSettings:
        """Client settings of one principal of this broker (its password made on first use)."""
        if not self.secure:
            return KafkaSettings(bootstrap_servers=self.bootstrap, security_protocol="PLAINTEXT")
        ensure_password(self.password_file(principal))
        return KafkaSettings(
            bootstrap_servers=self.bootstrap,
            security_protocol="SASL_SSL",
            sasl_mechanism=MECHANISM,
            sasl_username=principal,
            sasl_password_file=self.password_file(principal),
            ssl_ca_location=self.ca_file,
        )

    def admin_config(self) -> dict[str, Any]:
        return self.settings_for(ADMIN).client_config()


def ensure_jars(lib_dir: Path, pom: Path = POM) -> Path:
    """Copy Kafka and its runtime dependencies from Maven Central once per pom version."""
    stamp = lib_dir / ".pom-sha256"
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return lib_dir
    if shutil.which("mvn") is None:
        raise ServiceError("kafka", "Maven (mvn) is needed to fetch Kafka from Maven Central; install it")
    if lib_dir.exists():
        shutil.rmtree(lib_dir)
    run_checked(
        [
            "mvn",
            "-B",
            "-q",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            f"-DoutputDirectory={lib_dir}",
            "-DincludeScope=runtime",
        ],
        "kafka (maven fetch)",
    )
    if not any(lib_dir.glob("kafka_2.13-*.jar")):
        raise ServiceError("kafka", f"maven ran but left no kafka_2.13 jar in {lib_dir}")
    stamp.write_text(digest)
    return lib_dir


def _listeners(layout: KafkaLayout) -> list[str]:
    controller = f"CONTROLLER://127.0.0.1:{layout.controller_port}"
    if not layout.secure:
        return [
            f"listeners=PLAINTEXT://127.0.0.1:{layout.port},{controller}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{layout.port}",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        ]
    admin_password = ensure_password(layout.password_file(ADMIN))
    return [
        f"listeners=SASL_SSL://127.0.0.1:{layout.port},{controller}",
        f"advertised.listeners=SASL_SSL://127.0.0.1:{layout.port}",
        "inter.broker.listener.name=SASL_SSL",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL",
        f"sasl.enabled.mechanisms={MECHANISM}",
        f"sasl.mechanism.inter.broker.protocol={MECHANISM}",
        # the broker's own connections to itself, as the admin
        f"listener.name.sasl_ssl.{MECHANISM.lower()}.sasl.jaas.config="
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{ADMIN}" password="{admin_password}";',
        "ssl.keystore.type=PEM",
        f"ssl.keystore.location={layout.home / 'broker-keystore.pem'}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={layout.ca_file}",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        # ANONYMOUS: the controller listener, PLAINTEXT on loopback; without it the broker never opens
        f"super.users=User:{ADMIN};User:ANONYMOUS",
    ]


def _server_properties(layout: KafkaLayout) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{layout.controller_port}",
            *_listeners(layout),
            "controller.listener.names=CONTROLLER",
            f"log.dirs={layout.data_dir}",
            "num.partitions=3",
            "auto.create.topics.enable=false",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "min.insync.replicas=1",
            # two of each (Kafka: 3 and 8) for a local broker on a couple of cores: at 1,000 events/s
            # a tenth of its CPU was the kernel switching between eleven (async-profiler); with two
            # of each it took 41% of a core instead of 57%
            "num.network.threads=2",
            "num.io.threads=2",
            "",
        ]
    )


def _certificates(layout: KafkaLayout) -> None:
    """The broker's key and certificate chain in one PEM file, as Kafka's PEM keystore reads it."""
    ca = ensure_ca(layout.tls_dir)
    broker = issue_certificate(ca, layout.tls_dir, "kafka", ["127.0.0.1", "localhost"])
    write_private(layout.home / "broker-keystore.pem", broker.key.read_bytes() + broker.cert.read_bytes())


def _java(layout: KafkaLayout, main: str, *args: str) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise ServiceError("kafka", "Java 17+ is needed to run Kafka; install a JDK")
    return [
        java,
        f"-Xmx{layout.heap}",
        "-Xms128m",
        "-XX:+UseG1GC",
        # Both compilers, two compiler threads. C1 alone (the way before) starts cheaper, but leaves TLS
        # to Java's own AES-GCM (GHASH.blockMult, AESCrypt: a quarter of the broker's samples under
        # async-profiler); C2 uses the CPU's AES and carry-less multiply. At 1,000 events/s the broker
        # spent 285 us of CPU per event on C1 and 191 us on C2 after 90 s of load (242 us after 60 s;
        # `benchmarks/simulate_bench.py --rates 1000,1000 --seconds 30 --warm-up 60`); compiling costs
        # more in the first minute (the demo ~10 s more CPU). Two compiler threads at most.
        "-XX:CICompilerCount=2",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={layout.home / 'log4j2.properties'}",
        "-cp",
        f"{layout.lib_dir}/*",
        main,
        *args,
    ]


def cluster_id() -> str:
    """A random KRaft cluster id that the storage tool's argument parser accepts.

    About one id in 64 starts with "-", which argparse takes for an option; Kafka's own
    ``Uuid.randomUuid`` redraws those too.
    """
    while True:
        candidate = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not candidate.startswith("-"):
            return candidate


def prepare(layout: KafkaLayout) -> None:
    """Fetch jars, write configuration and format storage if it is not formatted yet."""
    ensure_jars(layout.lib_dir)
    layout.home.mkdir(parents=True, exist_ok=True)
    if layout.secure:
        _certificates(layout)
    write_private(layout.config_path, _server_properties(layout).encode())  # holds the admin's password
    (layout.home / "log4j2.properties").write_text(LOG4J2)
    marker = layout.data_dir / ".clinhub-secure"  # formatted with the admin's SCRAM credentials
    formatted = (layout.data_dir / "meta.properties").exists()
    if formatted and layout.secure and not marker.exists():
        raise ServiceError(
            "kafka",
            f"{layout.data_dir} was formatted before the broker was secured (no admin credentials in its "
            "metadata); stop it (`clinhub infra down`), remove that directory and the workers' table "
            "state (CLINHUB_STREAM_DATA_DIR, .data/faust by default), local data only, then start again",
        )
    if not formatted:
        scram: list[str] = []
        secrets: list[str] = []
        if layout.secure:
            password = ensure_password(layout.password_file(ADMIN))
            scram = ["--add-scram", f"{MECHANISM}=[name={ADMIN},password={password}]"]
            secrets = [password]
        run_checked(
            _java(
                layout,
                STORAGE_TOOL,
                "format",
                "--cluster-id",
                cluster_id(),
                "-c",
                str(layout.config_path),
                "--standalone",
                *scram,
            ),
            "kafka (format storage)",
            secrets=secrets,
        )
        if layout.secure:
            marker.write_text("SASL_SSL, SCRAM-SHA-512 admin created at format\n")


def broker_answers(client_config: dict[str, Any]) -> bool:
    """True once the broker serves a metadata request (to the admin, when secured)."""
    from confluent_kafka.admin import AdminClient

    host, _, port = client_config["bootstrap.servers"].split(",")[0].rpartition(":")
    if not port_open(int(port), host):
        return False
    admin = AdminClient({**client_config, "socket.timeout.ms": 2000})
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)


def ensure_principals(layout: KafkaLayout, principals: list[str], timeout: float = 30.0) -> None:
    """SCRAM credentials for each principal that has none, its password made once under the layout's
    secrets; returns once the broker holds them (a client connecting at once is not refused). Existing
    credentials are left alone: replacing them would race clients authenticating meanwhile."""
    if not layout.secure:
        return
    admin = layout.admin_config()
    missing = sorted(set(principals) - with_credentials(admin, principals))
    if not missing:
        return
    set_passwords(admin, {name: ensure_password(layout.password_file(name)) for name in missing})
    deadline = time.monotonic() + timeout
    while set(missing) - with_credentials(admin, missing):
        if time.monotonic() > deadline:
            raise ServiceError(
                "kafka", f"credentials of {', '.join(missing)} not in force after {timeout:.0f}s"
            )
        time.sleep(0.1)


def start(layout: KafkaLayout, timeout: float = 120.0) -> ServiceProcess:
    """Start the broker (unless already running) and return once it answers metadata requests."""
    running = running_pid(layout)
    if running is not None:
        proc = ServiceProcess("kafka", running, layout.log_path)
        wait_until(proc, lambda: broker_answers(layout.admin_config()), timeout, ANSWERING)
        return proc
    prepare(layout)
    proc = spawn(
        "kafka", _java(layout, MAIN_CLASS, str(layout.config_path)), layout.log_path, layout.pid_path
    )
    wait_until(proc, lambda: broker_answers(layout.admin_config()), timeout, ANSWERING)
    return proc


def running_pid(layout: KafkaLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: KafkaLayout) -> bool:
    return stop_recorded(layout.pid_path)

"""Apache Kafka 4.x, single node in KRaft mode, from Maven Central jars fetched by `infra/kafka/pom.xml`."""

from __future__ import annotations

import base64
import hashlib
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from clinhub.exceptions import ServiceError
from clinhub.infra.process import (
    ServiceProcess,
    pid_from_file,
    port_open,
    run_checked,
    spawn,
    stop_recorded,
    wait_until,
)

POM = Path(__file__).resolve().parents[2] / "infra" / "kafka" / "pom.xml"
MAIN_CLASS = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"

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
class KafkaLayout:
    """Where one broker keeps its jars, configuration, data and log."""

    home: Path
    port: int = 9092
    controller_port: int = 9093
    heap: str = "768m"
    shared_lib: Path | None = None

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
        return self.home / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


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


def _server_properties(layout: KafkaLayout) -> str:
    return "\n".join(
        [
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.bootstrap.servers=127.0.0.1:{layout.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{layout.port},CONTROLLER://127.0.0.1:{layout.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{layout.port}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
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
            "",
        ]
    )


def _java(layout: KafkaLayout, main: str, *args: str) -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise ServiceError("kafka", "Java 17+ is needed to run Kafka; install a JDK")
    return [
        java,
        f"-Xmx{layout.heap}",
        "-Xms128m",
        "-XX:+UseG1GC",
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
    layout.config_path.write_text(_server_properties(layout))
    (layout.home / "log4j2.properties").write_text(LOG4J2)
    if not (layout.data_dir / "meta.properties").exists():
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
            ),
            "kafka (format storage)",
        )


def broker_answers(bootstrap: str) -> bool:
    """True once the broker serves a metadata request."""
    from confluent_kafka.admin import AdminClient

    host, _, port = bootstrap.rpartition(":")
    if not port_open(int(port), host):
        return False
    admin = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 2000})
    metadata = admin.list_topics(timeout=2)
    return bool(metadata.brokers)


def start(layout: KafkaLayout, timeout: float = 120.0) -> ServiceProcess:
    """Start the broker (unless already running) and return once it answers metadata requests."""
    running = running_pid(layout)
    if running is not None:
        proc = ServiceProcess("kafka", running, layout.log_path)
        wait_until(proc, lambda: broker_answers(layout.bootstrap), timeout, "answering metadata requests")
        return proc
    prepare(layout)
    proc = spawn(
        "kafka", _java(layout, MAIN_CLASS, str(layout.config_path)), layout.log_path, layout.pid_path
    )
    wait_until(proc, lambda: broker_answers(layout.bootstrap), timeout, "answering metadata requests")
    return proc


def running_pid(layout: KafkaLayout) -> int | None:
    return pid_from_file(layout.pid_path)


def stop(layout: KafkaLayout) -> bool:
    return stop_recorded(layout.pid_path)

"""Real services for integration tests, started once per session from the project's own files.

A service that cannot start fails the session loudly (ServiceError with its log tail); nothing skips.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from pydantic import SecretStr
from sqlalchemy import Engine

from clinhub.infra import kafka, postgres, registry
from clinhub.infra.process import ServiceProcess, free_port
from clinhub.infra.registry_proxy import add_user
from clinhub.provision import add_institution, provision
from core import principals
from core.contract import TopicNames
from core.settings import (
    HubSettings,
    InfraSettings,
    SecuritySettings,
    StreamSettings,
)
from schemas.registration import register_standard
from schemas.wire import AvroDecoder, ConfluentRegistry
from sinks.store import engine_for, upgrade

PROJECT_ROOT = Path(__file__).resolve().parents[2]
INFRA_HOME = PROJECT_ROOT / ".infra"
TEST_INSTITUTIONS = ("H001", "H002", "C003")  # each a principal of its own on every test broker


def broker_layout(home: Path, **options: Any) -> kafka.KafkaLayout:
    """A secured broker of its own in `home`, on free ports, with the jars every test broker shares. The
    session's is one; a test that stops or kills its broker makes another, so no other test is hurt."""
    return kafka.KafkaLayout(
        home=home,
        port=free_port(),
        controller_port=free_port(),
        shared_lib=INFRA_HOME / "kafka-lib",
        **options,
    )


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kafka.KafkaLayout]:
    layout = broker_layout(tmp_path_factory.mktemp("kafka"))
    process = kafka.start(layout)
    yield layout
    process.stop()


@pytest.fixture(scope="session")
def schema_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[registry.RegistryLayout]:
    """Apicurio behind its authenticating TLS proxy, with the standard registered by the admin (the
    others may only look schemas up)."""
    layout = registry.RegistryLayout(
        home=tmp_path_factory.mktemp("registry"),
        port=free_port(),
        persistent=False,
        shared_app=INFRA_HOME / "registry-app",
        upstream_port=free_port(),
    )
    registry.start(layout, [*principals.SERVICE_PRINCIPALS, *TEST_INSTITUTIONS])
    register_standard(ConfluentRegistry(layout.settings_for(principals.ADMIN).client_config()))
    yield layout
    registry.stop(layout)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[postgres.PostgresLayout]:
    # Not under pytest's tmp dir: that is private to root, and the server runs as the postgres user.
    # Its CA and the roles' passwords beside it, in tls/ and secrets/ (the roles' readable by us only).
    root = Path(tempfile.mkdtemp(prefix="clinhub-pg-"))
    root.chmod(0o755)
    layout = postgres.PostgresLayout(home=root / "postgres", port=free_port())
    process: ServiceProcess = postgres.start(layout)
    yield layout
    # The server running now, by its pid file: a fault test stops it and starts a new process, which
    # `process` is not (stopping only `process` left that one running after every integration run).
    if not postgres.stop(layout):
        process.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def postgres_engine(postgres_cluster: postgres.PostgresLayout) -> Iterator[Engine]:
    """A fresh, migrated database per test, as its owner (the migration role)."""
    engine = engine_for(postgres.create_database(postgres_cluster, f"t_{uuid.uuid4().hex[:12]}"))
    upgrade(engine)
    yield engine
    engine.dispose()


@dataclass
class HubEnv:
    """One test's own slice of the real stack: its topic prefix, app id, database and settings."""

    settings: HubSettings
    topics: TopicNames
    engine: Engine  # the owner's (the migration role): tests read and arrange anything through it
    workdir: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    schema_registry: registry.RegistryLayout | None = None

    def add_institution(self, institution: str) -> Any:
        """`clinhub institutions add`: its Kafka principal, raw topics, ACLs and registry user."""
        proxy = self.schema_registry.proxy if self.schema_registry is not None else None
        return add_institution(
            self.settings, institution, (lambda name: add_user(proxy, name)) if proxy else None
        )

    def env(self) -> dict[str, str]:
        """A worker's environment: the same cluster, connecting as its own principal (no username)."""
        s = self.settings
        security = {
            "CLINHUB_KAFKA_SECURITY_PROTOCOL": s.kafka.security_protocol,
            "CLINHUB_KAFKA_SASL_MECHANISM": s.kafka.sasl_mechanism,
            "CLINHUB_KAFKA_SSL_CA_LOCATION": s.kafka.ssl_ca_location,
            "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR": s.kafka.principal_secrets_dir,
            "CLINHUB_REGISTRY_SSL_CA_LOCATION": s.registry.ssl_ca_location,
            "CLINHUB_REGISTRY_PRINCIPAL_SECRETS_DIR": s.registry.principal_secrets_dir,
            "CLINHUB_DATABASE_SSL_CA_LOCATION": s.database.ssl_ca_location,
            "CLINHUB_DATABASE_ROLE_SECRETS_DIR": s.database.role_secrets_dir,
        }
        inherited = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(
                (
                    "CLINHUB_KAFKA_SASL_",
                    "CLINHUB_REGISTRY_BASIC_AUTH_",
                    "CLINHUB_DATABASE_USERNAME",
                    "CLINHUB_DATABASE_PASSWORD",
                )
            )
        }
        return {
            **inherited,
            **{name: str(value) for name, value in security.items() if value is not None},
            "CLINHUB_KAFKA_BOOTSTRAP_SERVERS": s.kafka.bootstrap_servers,
            "CLINHUB_REGISTRY_URL": s.registry.url,
            "CLINHUB_DATABASE_URL": s.database.url.get_secret_value(),  # no credentials in it
            "CLINHUB_STREAM_TOPIC_PREFIX": s.stream.topic_prefix,
            "CLINHUB_STREAM_APP_ID": s.stream.app_id,
            "CLINHUB_STREAM_INSTITUTIONS": '["H001","H002"]',
            "CLINHUB_STREAM_DATA_DIR": str(self.workdir / "faust"),
            "CLINHUB_STREAM_SINK_RETRY_MAX_SECONDS": "2",
            "CLINHUB_STREAM_SESSION_TIMEOUT_SECONDS": "10",  # a killed worker's partitions move in 10 s
            "CLINHUB_STREAM_STALL_PATIENCE_SECONDS": "10",  # a partition Faust lost is read again soon
            "CLINHUB_STREAM_STALL_CHECK_SECONDS": "2",
            "CLINHUB_SECURITY_PSEUDONYM_KEY": s.security.pseudonym_key.get_secret_value()
            if s.security.pseudonym_key
            else "",
            "CLINHUB_INFRA_METRICS_PORT": "0",
            "CLINHUB_LOG_LEVEL": "INFO",
        }

    def start_worker(self, extra_env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # Each worker its own table store (RocksDB locks its directory); pass CLINHUB_STREAM_DATA_DIR
        # in extra_env to restart a worker on the state another one left.
        index = len(list(self.workdir.glob("worker-*.log")))  # stopped workers' files are kept
        log = (self.workdir / f"worker-{index}.log").open("ab")
        own_state = {"CLINHUB_STREAM_DATA_DIR": str(self.workdir / f"faust-{index}")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "clinhub.cli", "stream", "worker"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env(), **own_state, **(extra_env or {})},
            start_new_session=True,
            cwd=self.workdir,
        )
        self.workers.append(proc)
        return proc

    def stop_worker(self, proc: subprocess.Popen[bytes], kill: bool = False) -> None:
        """Stop one worker on purpose (SIGTERM, or SIGKILL for crash tests); it is no longer watched."""
        if kill:
            proc.kill()
        else:
            proc.terminate()
        proc.wait(60)
        self.workers.remove(proc)

    def worker_log(self) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-4000:] for p in sorted(self.workdir.glob("worker-*.log"))
        )

    def stop_workers(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)

    def producer(self) -> Producer:
        """The admin's producer: writes any topic, as a test must to publish raw bytes."""
        return Producer({**self.settings.kafka.client_config(), "enable.idempotence": True, "acks": "all"})

    def consume_all(self, topic: str, timeout: float, until: Callable[[list[Any]], bool]) -> list[Any]:
        """Read a topic from the beginning until `until(messages)` holds or time runs out."""
        consumer = Consumer(
            {
                **self.settings.kafka.client_config(),
                "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
            }
        )
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not until(messages):
            msg = consumer.poll(0.3)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        consumer.close()
        return messages

    def caught_up(self, group: str, topic: str) -> bool:
        """True when `group` has committed offsets at the end of every partition of `topic`."""
        consumer = Consumer({**self.settings.kafka.client_config(), "group.id": group})
        try:
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            for tp in committed:
                high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
                if high > 0 and tp.offset < high:
                    return False
            return True
        finally:
            consumer.close()

    def decoder(self) -> AvroDecoder:
        return AvroDecoder(ConfluentRegistry(self.settings.registry.client_config()))


def make_hub(
    broker: kafka.KafkaLayout,
    schema_registry: registry.RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    workdir: Path,
) -> HubEnv:
    """A private topic prefix, consumer group and database on the given broker, with the ACLs of every
    principal for them; workers started on demand. The test's own clients are the admin's."""
    kafka.ensure_principals(broker, [*principals.SERVICE_PRINCIPALS, *TEST_INSTITUTIONS])
    prefix = f"t{uuid.uuid4().hex[:8]}."
    database = postgres.create_database(postgres_cluster, f"hub_{uuid.uuid4().hex[:12]}")
    engine = engine_for(database)
    upgrade(engine)
    settings = HubSettings(
        kafka=broker.settings_for(principals.ADMIN).model_copy(
            update={"principal_secrets_dir": broker.secrets_dir if broker.secure else None}
        ),
        registry=schema_registry.settings_for(principals.ADMIN).model_copy(
            update={"principal_secrets_dir": schema_registry.proxy.secrets_dir}
        ),
        database=database,
        security=SecuritySettings(pseudonym_key=SecretStr(secrets.token_hex(32))),
        stream=StreamSettings(
            topic_prefix=prefix,
            app_id=f"clinhub-test-{prefix[:-1]}",
            institutions=("H001", "H002"),
            data_dir=workdir / "faust",
        ),
        infra=InfraSettings(metrics_port=0),
    )
    topics = TopicNames(prefix=prefix)
    provision(settings)  # topics and ACLs, as `clinhub topics` makes them
    return HubEnv(
        settings=settings,
        topics=topics,
        engine=engine,
        workdir=workdir,
        schema_registry=schema_registry,
    )


@pytest.fixture()
def hub(
    kafka_broker: kafka.KafkaLayout,
    schema_registry: registry.RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    tmp_path: Path,
) -> Iterator[HubEnv]:
    """A private topic prefix, consumer group and database for one test; workers started on demand."""
    with running_hub(kafka_broker, schema_registry, postgres_cluster, tmp_path) as env:
        yield env


@contextmanager
def running_hub(
    broker: kafka.KafkaLayout,
    schema_registry: registry.RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    workdir: Path,
) -> Iterator[HubEnv]:
    """`make_hub`, with its workers stopped and its connections closed afterwards."""
    env = make_hub(broker, schema_registry, postgres_cluster, workdir)
    try:
        yield env
    finally:
        env.stop_workers()
        env.engine.dispose()

"""Kafka and the schema registry of a benchmark run: its own, on free ports, from the jars the project
fetched into .infra/ (`make bootstrap`), stopped at the end. The broker is secured as the local stack
is (SASL_SSL, SCRAM, ACLs): benchmarks measure what a deployment runs."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from confluent_kafka.admin import AdminClient

from clinhub.infra import kafka, registry
from clinhub.infra.process import free_port, pid_from_file
from core import principals
from core.settings import KafkaSettings, RegistrySettings

ROOT = Path(__file__).resolve().parents[1]
INSTITUTIONS = ("H001", "H002", "C003")


def broker_home(workdir: Path) -> Path:
    return workdir / "kafka"


def broker_pid(workdir: Path) -> int:
    """The pid of the broker `services(workdir)` started: its CPU is part of what an event costs."""
    pid = pid_from_file(broker_home(workdir) / kafka.PID_FILE)
    if pid is None:
        raise SystemExit(f"no broker pid under {broker_home(workdir)}")
    return pid


@contextmanager
def services(workdir: Path) -> Iterator[tuple[KafkaSettings, RegistrySettings]]:
    """The admin's Kafka and registry settings (each component then its own principal) of a broker and
    registry started in `workdir`."""
    broker = kafka.KafkaLayout(
        broker_home(workdir), free_port(), free_port(), shared_lib=ROOT / ".infra" / "kafka-lib"
    )
    schema_registry = registry.RegistryLayout(
        workdir / "registry",
        free_port(),
        persistent=False,
        shared_app=ROOT / ".infra" / "registry-app",
        upstream_port=free_port(),
    )
    broker_process = kafka.start(broker)
    kafka.ensure_principals(broker, [*principals.SERVICE_PRINCIPALS, *INSTITUTIONS])
    registry.start(schema_registry, [*principals.SERVICE_PRINCIPALS, *INSTITUTIONS])
    try:
        admin = broker.settings_for(principals.ADMIN)
        registry_admin = schema_registry.settings_for(principals.ADMIN)
        yield (
            admin.model_copy(update={"principal_secrets_dir": broker.secrets_dir}),
            registry_admin.model_copy(update={"principal_secrets_dir": schema_registry.proxy.secrets_dir}),
        )
    finally:
        _SHARED_ADMINS.clear()  # destroyed while the broker still answers, not at exit against a dead port
        registry.stop(schema_registry)
        broker_process.stop()


_SHARED_ADMINS: dict[tuple[tuple[str, str], ...], AdminClient] = {}


def shared_admin(client: dict[str, str]) -> AdminClient:
    """One admin client per client configuration while the services run: a client made and closed for
    each question was often closed mid-handshake, and librdkafka logged a SASL "transport failure"."""
    key = tuple(sorted(client.items()))
    admin = _SHARED_ADMINS.get(key)
    if admin is None:
        admin = _SHARED_ADMINS[key] = AdminClient(dict[str, str | int | float | bool](client))
    return admin


def worker_env(kafka_settings: KafkaSettings, registry_settings: RegistrySettings) -> dict[str, str]:
    """A worker's Kafka and registry environment: its own principal's secrets (no username)."""
    values = {
        "CLINHUB_REGISTRY_URL": registry_settings.url,
        "CLINHUB_REGISTRY_SSL_CA_LOCATION": registry_settings.ssl_ca_location,
        "CLINHUB_REGISTRY_PRINCIPAL_SECRETS_DIR": registry_settings.principal_secrets_dir,
        "CLINHUB_KAFKA_BOOTSTRAP_SERVERS": kafka_settings.bootstrap_servers,
        "CLINHUB_KAFKA_SECURITY_PROTOCOL": kafka_settings.security_protocol,
        "CLINHUB_KAFKA_SASL_MECHANISM": kafka_settings.sasl_mechanism,
        "CLINHUB_KAFKA_SSL_CA_LOCATION": kafka_settings.ssl_ca_location,
        "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR": kafka_settings.principal_secrets_dir,
    }
    return {name: str(value) for name, value in values.items() if value is not None}

"""Kafka and the schema registry of a benchmark run: its own, on free ports, from the jars the project
fetched into .infra/ (`make bootstrap`), stopped at the end."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clinhub.infra import kafka, registry
from clinhub.infra.process import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def services(workdir: Path) -> Iterator[tuple[str, str]]:
    """(bootstrap servers, registry URL) of a broker and registry started in `workdir`."""
    broker = kafka.KafkaLayout(
        workdir / "kafka", free_port(), free_port(), shared_lib=ROOT / ".infra" / "kafka-lib"
    )
    schema_registry = registry.RegistryLayout(
        workdir / "registry", free_port(), persistent=False, shared_app=ROOT / ".infra" / "registry-app"
    )
    broker_process = kafka.start(broker)
    registry_process = registry.start(schema_registry)
    try:
        yield broker.bootstrap, schema_registry.url
    finally:
        registry_process.stop()
        broker_process.stop()

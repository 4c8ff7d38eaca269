"""The local stack as `clinhub infra` and the test fixtures start it: Kafka, registry, PostgreSQL."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from clinhub.infra import kafka, postgres, registry
from core.settings import InfraSettings


@dataclass(frozen=True)
class Stack:
    kafka: kafka.KafkaLayout
    registry: registry.RegistryLayout
    postgres: postgres.PostgresLayout


def stack_for(infra: InfraSettings, home: Path | None = None) -> Stack:
    root = home or infra.home
    return Stack(
        kafka=kafka.KafkaLayout(root / "kafka", infra.kafka_port, infra.kafka_controller_port),
        registry=registry.RegistryLayout(
            root / "registry", infra.registry_port, upstream_port=infra.registry_upstream_port
        ),
        postgres=postgres.PostgresLayout(root / "postgres", infra.postgres_port),
    )

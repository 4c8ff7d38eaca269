"""What every gateway shares: deterministic event ids (a resent message makes the same events, which the
hub de-duplicates), the metrics, and the readiness check (Kafka and the registry answer)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from schemas.exceptions import SchemaError
from schemas.wire import ConfluentRegistry

# The namespace of every gateway event id: uuid5(GATEWAY_NAMESPACE, "<gateway>|<institution>|<source id>|<n>")
GATEWAY_NAMESPACE = uuid.UUID("6f1c1f0e-2b7d-5c44-9a57-3f0c1b9d2e41")


def event_id_for(gateway: str, institution: str, source_id: str, index: int) -> str:
    """The id of the index-th event made from one source message (an HL7 control id, a FHIR resource, a
    CSV row): the same message again gives the same ids, so the store keeps each event once."""
    return str(uuid.uuid5(GATEWAY_NAMESPACE, f"{gateway}|{institution}|{source_id}|{index}"))


@dataclass(frozen=True)
class GatewayMetrics:
    received: Counter
    accepted: Counter
    rejected: Counter
    events: Counter
    response_seconds: Histogram


def make_gateway_metrics(registry: CollectorRegistry) -> GatewayMetrics:
    """Labels: gateway (mllp, fhir, csv), institution (configured, bounded), reason (a short error class)."""
    return GatewayMetrics(
        received=Counter(
            "clinhub_gateway_messages_received",
            "Messages received by a gateway",
            ["gateway", "institution"],
            registry=registry,
        ),
        accepted=Counter(
            "clinhub_gateway_messages_accepted",
            "Messages whose every event Kafka durably accepted",
            ["gateway", "institution"],
            registry=registry,
        ),
        rejected=Counter(
            "clinhub_gateway_messages_rejected",
            "Messages refused (content error) or not processed now (broker unavailable), by reason",
            ["gateway", "institution", "reason"],
            registry=registry,
        ),
        events=Counter(
            "clinhub_gateway_events_published",
            "Regional events published from gateway messages, by kind",
            ["gateway", "institution", "kind"],
            registry=registry,
        ),
        response_seconds=Histogram(
            "clinhub_gateway_response_seconds",
            "From a message received to its ACK or HTTP response",
            ["gateway"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry,
        ),
    )


def kafka_and_registry_ready(
    kafka_config: dict[str, Any], registry_config: dict[str, str], timeout: float = 3.0
) -> str | None:
    """None when the broker lists its topics and the registry answers this principal; else what is not
    ready (a refused credential included)."""
    from confluent_kafka.admin import AdminClient

    try:
        AdminClient({**kafka_config, "log_level": 3}).list_topics(timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported as text
        return f"kafka: {exc}"
    try:
        ConfluentRegistry({**registry_config, "timeout": max(1.0, timeout)}).subjects()
    except SchemaError as exc:
        return f"registry: {exc}"
    return None

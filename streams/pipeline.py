"""One batch of raw messages in, normalised events and dead letters out. No Kafka, no Faust, no database."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.exceptions import RegistryUnavailableError, SchemaError
from streams.codes import CodeMaps
from streams.events import NormalisedEvent, link_key, normalise_event
from streams.exceptions import RejectedEvent
from streams.identity import RegionalIdentity
from streams.reference import ReferenceData

DEADLETTER_NAMESPACE = uuid.UUID("0b7a3c55-2f4e-4a8e-b3d1-9c2e6f1a4d77")


@dataclass(frozen=True)
class RawMessage:
    """A message as read from Kafka, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Rejection:
    message: RawMessage
    error_class: str
    field: str | None
    reason: str
    institution_id: str | None = None
    correlation_id: str | None = None


def institution_from_topic(topic: str) -> str | None:
    """`raw.<institution>.<kind>` (optionally behind a prefix) -> institution; None for other names."""
    parts = topic.split(".")
    if len(parts) >= 3 and parts[-3].endswith("raw"):
        return parts[-2]
    return None


def _rejection(
    message: RawMessage, exc: Exception, field_name: str | None, reason: str, record: dict[str, Any] | None
) -> Rejection:
    envelope = (record or {}).get("envelope") or {}
    return Rejection(
        message=message,
        error_class=type(exc).__name__,
        field=field_name,
        reason=reason,
        # The topic names the sender that Kafka ACLs actually authenticated; the payload only claims one.
        institution_id=institution_from_topic(message.topic) or envelope.get("institution_id"),
        correlation_id=envelope.get("correlation_id"),
    )


def dead_letter_record(rejection: Rejection, processor: str, now: dt.datetime) -> dict[str, Any]:
    """The DeadLetter Avro record; its id is derived from the message position, so replays agree."""
    message = rejection.message
    return {
        "deadletter_id": str(
            uuid.uuid5(DEADLETTER_NAMESPACE, f"{message.topic}|{message.partition}|{message.offset}")
        ),
        "original_topic": message.topic,
        "original_partition": message.partition,
        "original_offset": message.offset,
        "original_key": message.key,
        "original_value": message.value,
        "error_class": rejection.error_class,
        "field": rejection.field,
        "reason": rejection.reason,
        "institution_id": rejection.institution_id,
        "correlation_id": rejection.correlation_id,
        "failed_time": now,
        "processor": processor,
    }


def kind_from_topic(topic: str) -> str | None:
    """`raw.<institution>.<kind>` (optionally behind a prefix) -> kind."""
    parts = topic.split(".")
    if len(parts) >= 3 and parts[-3].endswith("raw"):
        return parts[-1]
    return None


@dataclass
class NormaliseOutcome:
    events: list[tuple[RawMessage, NormalisedEvent]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)  # link-table updates made by this batch


def normalise_batch(
    messages: Iterable[RawMessage],
    decoders: Mapping[str, Callable[[bytes | None], dict[str, Any]]],
    reference: ReferenceData,
    codes: CodeMaps,
    identity: RegionalIdentity,
    known_link: Callable[[str], str | None],
    now: dt.datetime,
) -> NormaliseOutcome:
    """Decode and normalise raw events of any kind; per-message failures become rejections.

    Links learnt earlier in the same batch are visible to later messages of the batch.
    RegistryUnavailableError propagates so that the whole batch is retried.
    """
    outcome = NormaliseOutcome()

    def lookup(key: str) -> str | None:
        return outcome.links.get(key) or known_link(key)

    for message in messages:
        record: dict[str, Any] | None = None
        kind = kind_from_topic(message.topic)
        try:
            if kind is None or kind not in decoders:
                raise RejectedEvent(
                    "topic", f"{message.topic!r} is not a raw.<institution>.<kind> topic of a known kind"
                )
            record = decoders[kind](message.value)
            event = normalise_event(
                kind, record, reference, codes, identity, lookup, institution_from_topic(message.topic), now
            )
            if event.identity.remember is not None:
                institution = event.record["envelope"]["institution_id"]
                outcome.links[link_key(institution, event.record["patient_mrn"])] = event.identity.remember
            outcome.events.append((message, event))
        except RegistryUnavailableError:
            raise
        except (SchemaError, RejectedEvent) as exc:
            outcome.rejections.append(_rejection(message, exc, exc.field, exc.reason, record))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            outcome.rejections.append(_rejection(message, exc, None, f"{type(exc).__name__}: {exc}", record))
    return outcome

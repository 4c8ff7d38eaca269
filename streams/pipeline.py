"""One batch of raw lab messages in, store items and dead letters out. No Kafka, no Faust, no database."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from schemas.exceptions import RegistryUnavailableError, SchemaError
from sinks.base import SinkItem
from streams.codes import CodeMaps
from streams.events import NormalisedEvent, link_key, normalise_event
from streams.exceptions import RejectedEvent
from streams.identity import RegionalIdentity
from streams.normalise import normalise_lab
from streams.reference import ReferenceData
from streams.rules import AlertDraft, evaluate_thresholds

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


@dataclass
class BatchOutcome:
    items: list[SinkItem] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    item_messages: list[RawMessage] = field(default_factory=list)  # the message each item came from

    def reject_item(self, index: int, error_class: str, reason: str) -> None:
        """Move an item the store refused to the rejections, keeping its original message."""
        item = self.items.pop(index)
        message = self.item_messages.pop(index)
        self.rejections.append(
            Rejection(message, error_class, None, reason, item.lab.institution_id, item.lab.correlation_id)
        )

    @property
    def alerts(self) -> list[AlertDraft]:
        return [alert for item in self.items for alert in item.alerts]


def institution_from_topic(topic: str) -> str | None:
    """`raw.<institution>.<kind>` (optionally behind a prefix) -> institution; None for other names."""
    parts = topic.split(".")
    if len(parts) >= 3 and parts[-3].endswith("raw"):
        return parts[-2]
    return None


def process_lab_batch(
    messages: Iterable[RawMessage],
    decode: Callable[[bytes | None], dict[str, Any]],
    reference: ReferenceData,
    identity: RegionalIdentity,
    now: dt.datetime,
) -> BatchOutcome:
    """Decode, normalise and evaluate each message; any per-message failure becomes a rejection.

    A registry outage is not the message's fault, so RegistryUnavailableError propagates and the
    whole batch is retried instead of being dead-lettered.
    """
    outcome = BatchOutcome()
    for message in messages:
        record: dict[str, Any] | None = None
        try:
            record = decode(message.value)
            lab = normalise_lab(record, reference, identity, institution_from_topic(message.topic), now)
            alerts = evaluate_thresholds(lab, reference.rules, now)
            outcome.items.append(SinkItem(lab=lab, alerts=tuple(alerts)))
            outcome.item_messages.append(message)
        except RegistryUnavailableError:
            raise
        except (SchemaError, RejectedEvent) as exc:
            outcome.rejections.append(_rejection(message, exc, exc.field, exc.reason, record))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            outcome.rejections.append(_rejection(message, exc, None, f"{type(exc).__name__}: {exc}", record))
    return outcome


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


def alert_record(alert: AlertDraft | Mapping[str, Any]) -> dict[str, Any]:
    """The CriticalValueAlert Avro record from a draft or a stored outbox row."""
    source = alert.__dict__ if isinstance(alert, AlertDraft) else alert
    keys = (
        "alert_id",
        "source_event_id",
        "regional_patient_id",
        "institution_id",
        "loinc_code",
        "analyte",
        "value",
        "unit",
        "limit_kind",
        "limit_value",
        "severity",
        "message",
        "rule_source",
        "result_time",
        "raised_time",
        "deadline_time",
        "correlation_id",
    )
    record = {key: source[key] for key in keys}
    for key in ("result_time", "raised_time", "deadline_time"):
        if record[key].tzinfo is None:  # SQLite hands back naive UTC
            record[key] = record[key].replace(tzinfo=dt.UTC)
    record.update({"ward": None, "previous_value": None, "previous_time": None})
    return record


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

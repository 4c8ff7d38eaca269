"""Messages as the stages see them: a Kafka message with its position, and why one was rejected."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.contract import RAW_TIMESTAMP_HEADER

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
    timestamp_ms: int | None = None  # the message's Kafka timestamp (epoch ms), when it has one


def kafka_timestamp_ms(seconds: float | None) -> int | None:
    """A Kafka timestamp Faust gives in seconds (float), as the milliseconds the broker keeps; None when
    the message has none (Kafka's -1, or 0)."""
    return round(seconds * 1000) if seconds is not None and seconds > 0 else None


def raw_event_headers(message: RawMessage) -> dict[str, bytes]:
    """The header for what is made of raw `message`: its own broker timestamp. A header of that name the
    institution sent is ignored (the raw event's timestamp is the broker's word, not the sender's)."""
    if message.timestamp_ms is None:
        return {}
    return {RAW_TIMESTAMP_HEADER: str(message.timestamp_ms).encode()}


def carried_headers(message: RawMessage) -> dict[str, bytes]:
    """The raw event's timestamp header `message` carries (a normalised record), for what is made of it."""
    carried = message.headers.get(RAW_TIMESTAMP_HEADER)
    return {RAW_TIMESTAMP_HEADER: carried} if carried is not None else {}


def seconds_since_raw_event(headers: Mapping[str, bytes], now: dt.datetime) -> float | None:
    """Seconds from the raw event's broker timestamp (its header) to `now`, never negative (clocks of
    brokers and workers may differ by a little); None without a readable header."""
    carried = headers.get(RAW_TIMESTAMP_HEADER)
    if carried is None:
        return None
    try:
        raw_ms = int(carried)
    except ValueError:
        return None
    return max(0.0, (now.timestamp() * 1000 - raw_ms) / 1000)


@dataclass(frozen=True)
class Rejection:
    """One message the hub cannot accept as it is, with the field and the reason for its dead letter.

    `loinc_code` is the analyte a rejected lab result was for, when known; `possibly_critical` says
    that analyte has critical limits, which the rules could not apply to it: possibly critical,
    unreadable.
    """

    message: RawMessage
    error_class: str
    field: str | None
    reason: str
    institution_id: str | None = None
    correlation_id: str | None = None
    possibly_critical: bool = False
    loinc_code: str | None = None


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
        "possibly_critical": rejection.possibly_critical,
        "loinc_code": rejection.loinc_code,
    }


def positions(messages: Sequence[RawMessage]) -> str:
    """Where a batch came from, per partition (`topic[partition]@first-last`), for log lines.

    Positions only: never a key, which on raw topics carries the institution's patient number.
    """
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for message in messages:
        where = (message.topic, message.partition)
        low, high = spans.get(where, (message.offset, message.offset))
        spans[where] = (min(low, message.offset), max(high, message.offset))
    return ", ".join(
        f"{topic}[{partition}]@{low}" + (f"-{high}" if high != low else "")
        for (topic, partition), (low, high) in sorted(spans.items())
    )

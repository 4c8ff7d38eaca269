"""Dead letters: the record a rejection becomes, and its stable id."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from schemas import standard
from schemas.wire import validate_record
from streams.runtime.messages import RawMessage, Rejection, dead_letter_record, positions

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def rejection(topic: str = "raw.H001.lab", partition: int = 0, offset: int = 5, **kw: Any) -> Rejection:
    fields: dict[str, Any] = {"error_class": "MagicByteError", "field": "header", "reason": "first byte is 1"}
    fields.update(kw)
    return Rejection(message=RawMessage(topic, partition, offset, key=None, value=b"\x01abc"), **fields)


@pytest.mark.parametrize(
    "r",
    [
        rejection(),
        rejection(field=None, institution_id="H001", correlation_id="corr-1"),
        rejection(partition=2**31 - 1, offset=2**63 - 1, reason="原因: 值不可能"),
    ],
)
def test_dead_letter_record_matches_the_schema(r: Rejection) -> None:
    """The dead letter is a valid DeadLetter record and carries the original bytes for replay."""
    record = dead_letter_record(r, "clinhub-streams", NOW)
    validate_record(record, standard.load(standard.DEAD_LETTER))
    assert record["original_value"] == r.message.value
    assert (record["original_topic"], record["original_partition"], record["original_offset"]) == (
        r.message.topic,
        r.message.partition,
        r.message.offset,
    )
    assert (record["error_class"], record["field"], record["reason"]) == (r.error_class, r.field, r.reason)
    assert record["processor"] == "clinhub-streams"


def test_dead_letter_id_depends_only_on_position() -> None:
    """Replaying the same message gives the same dead-letter id, whatever the reason or time."""
    first = dead_letter_record(rejection(), "p", NOW)["deadletter_id"]
    again = dead_letter_record(rejection(reason="other", error_class="X"), "q", NOW + dt.timedelta(days=1))
    assert again["deadletter_id"] == first
    assert uuid.UUID(first).version == 5
    others = {
        dead_letter_record(rejection(offset=6), "p", NOW)["deadletter_id"],
        dead_letter_record(rejection(partition=1), "p", NOW)["deadletter_id"],
        dead_letter_record(rejection(topic="raw.H002.lab"), "p", NOW)["deadletter_id"],
    }
    assert first not in others and len(others) == 3


def test_positions_name_each_partition_and_offset_range_but_no_key() -> None:
    batch = [
        RawMessage("raw.H001.lab", 1, 7, b"H001|MRN-SECRET", b"v"),
        RawMessage("raw.H001.lab", 1, 9, b"H001|MRN-SECRET", b"v"),
        RawMessage("norm.lab", 0, 3, b"rp-1", b"v"),
    ]
    assert positions(batch) == "norm.lab[0]@3, raw.H001.lab[1]@7-9"
    assert "MRN" not in positions(batch)

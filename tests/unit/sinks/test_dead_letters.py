"""Dead letters in the store: the converter (a DeadLetter record -> a dead_letters row without its bytes,
text cut to size), and the store stage's rule that a dead letter it cannot take is logged, counted and
acknowledged, never dead-lettered again onto the topic it reads (that would loop for ever)."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select

from schemas.wire import ConfluentRegistry
from sinks.base import StoreRecord, StoreWriteResult
from sinks.exceptions import StoreRejectedError
from sinks.records import DEAD_LETTER_COLUMNS, TRUNCATED, clip, prepare
from sinks.sql import DEAD_LETTERS, SqlStoreSink
from sinks.store import make_engine, upgrade
from streams.runtime.messages import RawMessage
from streams.runtime.outputs import Output
from streams.runtime.store import UNSTORABLE, StoreHandler
from tests.unit.sinks.factory import NOW, dead_letter
from tests.unit.streams.runtime.test_app import make_components, stage_of

LATER = NOW + dt.timedelta(minutes=3)


def converted(record: dict[str, Any]) -> dict[str, Any]:
    prepared = prepare(0, StoreRecord("deadletter", record), LATER)
    assert prepared.kind == "deadletter" and prepared.log_id is None and prepared.patient is None
    (row,) = prepared.rows["dead_letters"]
    return row


# -- the converter ---------------------------------------------------------------------------------


def test_a_dead_letter_becomes_one_row_without_its_bytes() -> None:
    record = dead_letter("t123.raw.H001.lab", 2, 41)
    prepared = prepare(5, StoreRecord("deadletter", record), LATER)
    assert (prepared.index, prepared.time) == (5, NOW)
    assert prepared.rows == {
        "dead_letters": [
            {
                "deadletter_id": str(record["deadletter_id"]),
                "original_topic": "t123.raw.H001.lab",
                "original_partition": 2,
                "original_offset": 41,
                "kind": "lab",
                "error_class": "RejectedEvent",
                "field": "unit",
                "reason": record["reason"],
                "institution_id": "H001",
                "correlation_id": record["correlation_id"],
                "processor": "streams.normaliser",
                "possibly_critical": True,
                "loinc_code": "2823-3",
                "failed_time": NOW,
                "ingested_time": LATER,
            }
        ]
    }
    assert set(prepared.rows["dead_letters"][0]) == set(DEAD_LETTER_COLUMNS.keys())


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("raw.H002.vitals", "vitals"),
        ("ci-7-norm.medication", "medication"),
        ("t9.norm.identity", None),
        ("alerts.critical", None),
        ("t9.deadletter", None),
    ],
)
def test_the_kind_is_the_clinical_kind_of_the_original_topic(topic: str, kind: str | None) -> None:
    assert converted(dead_letter(topic))["kind"] == kind


def test_the_id_is_kept_as_canonical_uuid_text_and_the_time_as_utc() -> None:
    ident = uuid.uuid4()
    tokyo = dt.timezone(dt.timedelta(hours=9))
    row = converted(dead_letter(deadletter_id=str(ident).upper(), failed_time=NOW.astimezone(tokyo)))
    assert row["deadletter_id"] == str(ident)
    assert row["failed_time"] == NOW and row["failed_time"].tzinfo == dt.UTC


def test_what_a_dead_letter_may_lack_is_stored_empty_never_refused() -> None:
    record = dead_letter()
    for name in ("field", "institution_id", "correlation_id", "loinc_code", "possibly_critical"):
        del record[name]
    row = converted({**record, "error_class": None, "processor": None, "reason": None})
    assert (row["field"], row["institution_id"], row["correlation_id"], row["loinc_code"]) == (None,) * 4
    assert (row["error_class"], row["processor"], row["reason"]) == ("unknown", "unknown", "")
    assert row["possibly_critical"] is False
    assert converted(dead_letter(possibly_critical="yes"))["possibly_critical"] is False, "only True is"


def test_every_text_is_cut_to_its_column() -> None:
    long = dead_letter(
        "x" * 300 + ".raw.H001.lab",
        error_class="E" * 500,
        field="f" * 1000,
        institution_id="I" * 100,
        correlation_id="c" * 200,
        processor="p" * 300,
        loinc_code="9" * 40,
        reason="r" * 20_000,
    )
    row = converted(long)
    assert row["kind"] == "lab", "read from the whole topic, before it is cut"
    for column in ("original_topic", "error_class", "field", "institution_id", "correlation_id", "processor"):
        length = DEAD_LETTER_COLUMNS[column].type.length
        assert len(row[column]) == length and row[column].endswith(TRUNCATED), column
    assert row["loinc_code"] == "9" * 15 + TRUNCATED
    assert row["reason"] == "r" * 20_000, "text without a size is kept whole"


def test_clip_leaves_what_fits_alone() -> None:
    assert clip(None, "field") is None
    assert clip("H001", "institution_id") == "H001"
    assert clip("x" * 32, "institution_id") == "x" * 32
    assert clip("x" * 33, "institution_id") == "x" * 31 + TRUNCATED


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"deadletter_id": None}, "deadletter_id"),
        ({"deadletter_id": "not-a-uuid"}, "deadletter_id"),
        ({"original_topic": ""}, "original_topic"),
        ({"original_partition": -1}, "original_partition"),
        ({"original_offset": "12"}, "original_offset"),
        ({"original_offset": True}, "original_offset"),
        ({"failed_time": NOW.replace(tzinfo=None)}, "failed_time"),
        ({"failed_time": None}, "failed_time"),
    ],
)
def test_a_dead_letter_that_says_not_what_it_was_is_refused_naming_the_field(
    change: dict[str, Any], field: str
) -> None:
    with pytest.raises(StoreRejectedError, match=f"\\(deadletter\\): {field}"):
        prepare(0, StoreRecord("deadletter", {**dead_letter(), **change}), LATER)


# -- the store stage: no dead letter of a dead letter ----------------------------------------------


class RefusingPoison(SqlStoreSink):
    """The real sink, refusing any batch holding a dead letter whose reason says "poison", as a database
    refuses a row it cannot take."""

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        if any(item.kind == "deadletter" and "poison" in item.record["reason"] for item in batch):
            raise StoreRejectedError("database refused the batch: CheckViolation: poison")
        return super().write_records(batch)


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    return engine


def test_a_dead_letter_the_store_cannot_take_is_logged_counted_and_never_dead_lettered_again(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    components = make_components(ConfluentRegistry({"url": f"mock://dead-letters-{uuid.uuid4().hex}"}))
    components.sink = RefusingPoison(engine, clock=lambda: LATER)
    published: list[Output] = []

    async def publish(outputs: Sequence[Output]) -> None:
        published.extend(outputs)

    handler = StoreHandler(stage_of("store", components, publish))
    assert "deadletter" in handler.records_of.values(), "the store stage reads the dead-letter topic"
    good = dead_letter("raw.H001.lab", 0, 10)
    poison = dead_letter("raw.H002.lab", 0, 11, reason="poison", institution_id="H002")
    encode = components.codecs.encode
    messages = [
        RawMessage("deadletter", 0, 100, b"H001|MRN", encode("deadletter", good)),
        RawMessage("deadletter", 0, 101, b"H001|MRN", b"\x00\x00\x00\x00\x63 not avro"),  # undecodable
        RawMessage("deadletter", 1, 102, None, None),  # no value at all
        RawMessage("deadletter", 1, 103, b"H002|MRN", encode("deadletter", poison)),  # refused
        RawMessage("norm.lab", 2, 7, b"rp-1", b"\x01junk"),  # a standard record: dead-lettered as ever
    ]

    with caplog.at_level(logging.ERROR, logger="clinhub.streams.store"):
        asyncio.run(handler.handle(messages))

    assert [output.topic for output in published] == ["deadletter"]
    (again,) = [components.codecs.decode("deadletter", output.value) for output in published]
    assert (again["original_topic"], again["original_offset"]) == ("norm.lab", 7)

    with engine.connect() as connection:
        stored = connection.execute(select(DEAD_LETTERS)).all()
    assert [(row.original_topic, row.original_offset, row.kind) for row in stored] == [
        ("raw.H001.lab", 10, "lab")
    ]

    events = components.metrics.events
    assert events.labels(institution="?", kind="deadletter", outcome=UNSTORABLE)._value.get() == 2
    assert events.labels(institution="H002", kind="deadletter", outcome=UNSTORABLE)._value.get() == 1
    assert events.labels(institution="*", kind="deadletter", outcome="stored")._value.get() == 1
    lines = [
        record.getMessage() for record in caplog.records if "not dead-lettered again" in record.getMessage()
    ]
    assert len(lines) == 3
    assert any("deadletter[1]@103" in line and "poison" in line for line in lines)
    assert components.metrics.stage_up.labels(stage="store")._value.get() == 1, "the stage goes on"


def test_a_dead_letter_is_stored_once_however_often_it_is_read(engine: Engine) -> None:
    """A replay of the dead-letter topic (a new consumer group, a crash before the commit) adds nothing."""
    components = make_components(ConfluentRegistry({"url": f"mock://dead-letters-{uuid.uuid4().hex}"}))
    components.sink = SqlStoreSink(engine, clock=lambda: LATER)

    async def publish(outputs: Sequence[Output]) -> None:
        raise AssertionError(f"nothing is dead-lettered: {outputs}")

    handler = StoreHandler(stage_of("store", components, publish))
    value = components.codecs.encode("deadletter", dead_letter("norm.lab", 1, 5))
    message = RawMessage("deadletter", 0, 1, None, value)
    asyncio.run(handler.handle([message, message]))
    asyncio.run(handler.handle([message]))
    with engine.connect() as connection:
        assert len(connection.execute(select(DEAD_LETTERS)).all()) == 1
    events = components.metrics.events
    assert events.labels(institution="*", kind="deadletter", outcome="stored")._value.get() == 1
    assert events.labels(institution="*", kind="deadletter", outcome="unchanged")._value.get() == 2

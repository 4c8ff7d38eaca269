"""The SQL sink on a SQLite file: idempotent batches, the alert outbox, and the migration guard."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from schemas import standard
from schemas.wire import validate_record
from sinks.base import SinkItem, WriteResult
from sinks.exceptions import StoreOutOfDateError, StoreUnavailableError
from sinks.sql import ALERTS, OBSERVATIONS, SqlStoreSink, is_transient
from sinks.store import current_revision, ensure_current, head_revision, make_engine, upgrade
from streams.identity import RegionalIdentity
from streams.normalise import normalise_lab
from streams.pipeline import alert_record
from streams.reference import load_reference
from streams.rules import evaluate_thresholds

REFERENCE = load_reference()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
NID = "11010519491231002X"


class Clock:
    """A settable clock, so stored times are known exactly."""

    def __init__(self, now: dt.datetime) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


def item(
    local_code: str = "K",
    value: float = 4.2,
    unit: str = "mmol/L",
    minutes_ago: int = 5,
    national_id: str | None = NID,
) -> SinkItem:
    when = NOW - dt.timedelta(minutes=minutes_ago)
    record = {
        "envelope": {
            "event_id": uuid.uuid4(),
            "institution_id": "H001",
            "source_system": "LIS",
            "event_time": when,
            "correlation_id": f"corr-{uuid.uuid4().hex[:8]}",
        },
        "result_id": f"H001-R{uuid.uuid4().hex[:8]}",
        "patient_mrn": "MRN0000042",
        "patient_national_id": national_id,
        "local_code": local_code,
        "value_numeric": value,
        "unit": unit,
        "status": "final",
        "result_time": when,
    }
    lab = normalise_lab(record, REFERENCE, IDENTITY, "H001", now=NOW)
    # raise alerts at the result time so their outbox order is known
    return SinkItem(lab=lab, alerts=tuple(evaluate_thresholds(lab, REFERENCE.rules, when)))


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store' / 'clinhub.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def clock() -> Clock:
    return Clock(NOW)


@pytest.fixture
def sink(engine: Engine, clock: Clock) -> SqlStoreSink:
    return SqlStoreSink(engine, clock=clock)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def test_writing_a_batch_twice_stores_it_once(sink: SqlStoreSink, engine: Engine) -> None:
    """Redelivery after a crash must not duplicate results or alerts; the second write reports nothing new."""
    batch = [item(value=4.2), item(value=7.5), item(local_code="GLU", value=40.0, unit="mg/dL")]
    event_ids = {i.lab.event_id for i in batch}
    alert_ids = {a.alert_id for i in batch for a in i.alerts}
    assert len(alert_ids) == 2

    first = sink.write(batch)
    second = sink.write(batch)

    assert first == WriteResult(frozenset(event_ids), frozenset(alert_ids))
    assert second.new_event_ids == frozenset() and second.new_alert_ids == frozenset()
    assert count(engine, OBSERVATIONS) == 3
    assert count(engine, ALERTS) == 2


def test_overlapping_batch_reports_only_the_new_items(sink: SqlStoreSink, engine: Engine) -> None:
    """A batch that partly repeats an earlier one stores and reports only what is new."""
    old, new = item(value=7.5), item(value=2.1)
    sink.write([old])
    result = sink.write([old, new])
    assert result.new_event_ids == {new.lab.event_id}
    assert result.new_alert_ids == {a.alert_id for a in new.alerts}
    assert count(engine, OBSERVATIONS) == 2


def test_duplicates_inside_one_batch_are_written_once(sink: SqlStoreSink, engine: Engine) -> None:
    """The same event twice in one batch (redelivered within the window) is one row."""
    one = item(value=7.5)
    result = sink.write([one, one])
    assert result.new_event_ids == {one.lab.event_id}
    assert (count(engine, OBSERVATIONS), count(engine, ALERTS)) == (1, 1)


def test_empty_batch_changes_nothing(sink: SqlStoreSink, engine: Engine) -> None:
    """An empty batch is a no-op, not an error."""
    assert sink.write([]) == WriteResult()
    assert count(engine, OBSERVATIONS) == 0


def test_stored_row_has_canonical_value_and_no_national_id(sink: SqlStoreSink, engine: Engine) -> None:
    """The store holds SI values and a pseudonym, never the raw national identifier."""
    glucose = item(local_code="GLU", value=90.0, unit="mg/dL")
    sink.write([glucose])
    with engine.connect() as connection:
        row = connection.execute(select(OBSERVATIONS)).one()._mapping
    assert row["value"] == pytest.approx(90.0 * 0.05551)
    assert (row["unit"], row["original_value"], row["original_unit"]) == ("mmol/L", 90.0, "mg/dL")
    assert row["regional_patient_id"] == IDENTITY.from_national_id(NID)
    assert all(NID not in str(value) for value in row.values())


def test_outbox_cycle(sink: SqlStoreSink, clock: Clock) -> None:
    """Alerts wait in the outbox, oldest first, until marked published; marking twice is harmless."""
    older, newer = item(value=7.5, minutes_ago=30), item(value=1.5, minutes_ago=5)
    sink.write([newer, older])
    pending = sink.unpublished_alerts()
    assert [a["alert_id"] for a in pending] == [older.alerts[0].alert_id, newer.alerts[0].alert_id]
    assert all(a["published_time"] is None for a in pending)

    clock.now = NOW + dt.timedelta(seconds=3)
    sink.mark_published([older.alerts[0].alert_id])
    assert [a["alert_id"] for a in sink.unpublished_alerts()] == [newer.alerts[0].alert_id]

    sink.mark_published([newer.alerts[0].alert_id, older.alerts[0].alert_id])
    sink.mark_published([])
    assert sink.unpublished_alerts() == []


def test_outbox_limit(sink: SqlStoreSink) -> None:
    """The publisher can take the outbox in slices."""
    sink.write([item(value=7.5, minutes_ago=m) for m in (1, 2, 3, 4)])
    assert len(sink.unpublished_alerts(limit=3)) == 3


def test_publishing_stamps_the_clock_time(sink: SqlStoreSink, engine: Engine, clock: Clock) -> None:
    """published_time records when Kafka confirmed the alert."""
    critical = item(value=7.5)
    sink.write([critical])
    clock.now = NOW + dt.timedelta(minutes=1)
    sink.mark_published([a.alert_id for a in critical.alerts])
    with engine.connect() as connection:
        stamped = connection.execute(select(ALERTS.c.published_time)).scalar_one()
    assert stamped.replace(tzinfo=stamped.tzinfo or dt.UTC) == clock.now


def test_alert_read_back_from_the_outbox_is_a_valid_alert_record(sink: SqlStoreSink) -> None:
    """Rows come back with naive SQLite datetimes; alert_record still yields a valid CriticalValueAlert."""
    critical = item(value=7.5)
    sink.write([critical])
    (row,) = sink.unpublished_alerts()
    record = alert_record(row)
    validate_record(record, standard.load(standard.CRITICAL_VALUE_ALERT))
    draft = critical.alerts[0]
    assert record["result_time"] == draft.result_time
    assert record["deadline_time"] == draft.deadline_time
    assert {k: record[k] for k in ("alert_id", "value", "limit_value")} == {
        k: v for k, v in dataclasses.asdict(draft).items() if k in ("alert_id", "value", "limit_value")
    }


def test_ensure_current_refuses_an_empty_database(tmp_path: Path) -> None:
    """The hub refuses to run against a database that was never migrated, and runs once it is."""
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.sqlite3'}")
    try:
        with pytest.raises(StoreOutOfDateError) as info:
            ensure_current(engine)
        assert (info.value.current, info.value.head) == (None, head_revision())
        upgrade(engine)
        ensure_current(engine)
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_unreachable_database_is_transient(tmp_path: Path) -> None:
    """A database that cannot be opened raises StoreUnavailableError, so the batch is retried, not dropped."""
    engine = create_engine(f"sqlite:///{tmp_path / 'no-such-dir' / 'x.sqlite3'}")
    try:
        with pytest.raises(StoreUnavailableError):
            SqlStoreSink(engine).write([item()])
    finally:
        engine.dispose()


@pytest.mark.parametrize(
    ("exc", "transient"),
    [
        (OperationalError("INSERT", {}, Exception("database is locked")), True),
        (IntegrityError("INSERT", {}, Exception("NOT NULL constraint failed")), False),
        (
            DBAPIError(
                "SELECT 1", {}, Exception("server closed the connection"), connection_invalidated=True
            ),
            True,
        ),
        (DBAPIError("SELECT 1", {}, Exception("bad data")), False),
        (ValueError("not a database error"), False),
    ],
)
def test_is_transient(exc: BaseException, transient: bool) -> None:
    """Only connection-level failures are retried; data and constraint errors would fail forever."""
    assert is_transient(exc) is transient

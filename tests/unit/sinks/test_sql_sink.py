"""The SQL sink on a SQLite file: what the normaliser and the rules hand over is stored once, and the
migration guard."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError

from sinks.base import StoreRecord
from sinks.exceptions import StoreOutOfDateError, StoreUnavailableError
from sinks.sql import ALERTS, OBSERVATIONS, SqlStoreSink, is_transient
from sinks.store import current_revision, ensure_current, head_revision, make_engine, upgrade
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import normalise_event
from streams.domain.reference import load_reference
from streams.domain.rules import LabFacts, alert_record, evaluate
from tests.factories import lab_record

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
NID = "11010519491231002X"


def delivery(
    local_code: str = "K",
    value: float = 4.2,
    unit: str = "mmol/L",
    minutes_ago: int = 5,
    national_id: str | None = NID,
) -> list[StoreRecord]:
    """One raw lab result as the store agent receives it: the normalised record, then the alerts the
    rules raised for it (a patient without history), as published on their topics."""
    when = NOW - dt.timedelta(minutes=minutes_ago)
    raw = lab_record(
        "H001",
        local_code,
        value,
        unit,
        mrn="MRN0000042",
        at=when,
        event_id=uuid.uuid4(),
        patient_national_id=national_id,
        patient_birth_year=None,
        patient_sex=None,
    )
    event = normalise_event("lab", raw, REFERENCE, CODES, IDENTITY, lambda _key: None, "H001", NOW)
    facts = LabFacts.from_record(event.record)
    alerts = () if facts is None else evaluate(facts, None, REFERENCE.rulebook, when, REFERENCE.policy).alerts
    return [StoreRecord("lab", event.record), *(StoreRecord("alert", alert_record(a)) for a in alerts)]


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store' / 'clinhub.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sink(engine: Engine) -> SqlStoreSink:
    return SqlStoreSink(engine, clock=lambda: NOW)


def count(engine: Engine, table: Any) -> int:
    with engine.connect() as connection:
        return int(connection.execute(select(func.count()).select_from(table)).scalar_one())


def _key(record: StoreRecord) -> tuple[str, str]:
    data = record.record
    return record.kind, str(data["alert_id"] if record.kind == "alert" else data["envelope"]["event_id"])


# (local code, value, unit): normal, critical high, critical low after conversion, critical low
RESULTS = [("K", 4.2, "mmol/L"), ("K", 7.5, "mmol/L"), ("GLU", 40.0, "mg/dL"), ("K", 2.1, "mmol/L")]
DELIVERIES = {  # description -> (results delivered earlier, results of the batch under test)
    "a first delivery": ([], [0, 1, 2]),
    "the same batch again": ([0, 1, 2], [0, 1, 2]),
    "the same batch again, reversed": ([0, 1, 2], [2, 1, 0]),
    "a batch overlapping an earlier one": ([1], [1, 3]),
    "the same result twice in one batch": ([], [1, 1]),
    "a redelivered result twice in one batch": ([1], [1, 1, 0]),
}


@pytest.mark.parametrize("case", sorted(DELIVERIES))
def test_redelivery_stores_once_and_reports_only_what_is_new(
    sink: SqlStoreSink, engine: Engine, case: str
) -> None:
    """A crash and replay must not duplicate results or alerts; each write reports only what it added."""
    earlier, now = DELIVERIES[case]
    results = [delivery(*spec) for spec in RESULTS]
    if earlier:
        sink.write_records([record for i in earlier for record in results[i]])
    batch = [record for i in now for record in results[i]]

    result = sink.write_records(batch)

    stored_before = {_key(record) for i in earlier for record in results[i]}
    new = {_key(record) for record in batch} - stored_before
    assert result.written == Counter(kind for kind, _ in new)
    assert result.unchanged == Counter(record.kind for record in batch) - Counter(kind for kind, _ in new)
    everything = Counter(
        kind for kind, _ in {_key(record) for i in {*earlier, *now} for record in results[i]}
    )
    assert everything["alert"] >= 1, "every case carries a critical result"
    assert (count(engine, OBSERVATIONS), count(engine, ALERTS)) == (everything["lab"], everything["alert"])


@pytest.mark.parametrize(
    ("local_code", "value", "unit"), [("GLU", 90.0, "mg/dL"), ("HGB", 12.5, "g/dL"), ("K", 4.2, "mmol/L")]
)
def test_stored_row_has_canonical_value_and_no_national_id(
    sink: SqlStoreSink, engine: Engine, local_code: str, value: float, unit: str
) -> None:
    """The store holds SI values, the value as sent and a pseudonym, never the raw national identifier."""
    sink.write_records(delivery(local_code, value, unit)[:1])
    with engine.connect() as connection:
        row = connection.execute(select(OBSERVATIONS)).one()._mapping
    analyte = REFERENCE.analytes[REFERENCE.terminology["H001"][local_code]]
    assert row["value"] == pytest.approx(value * analyte.factors[unit])
    assert (row["unit"], row["original_value"], row["original_unit"]) == (analyte.canonical_unit, value, unit)
    assert row["regional_patient_id"] == IDENTITY.from_national_id(NID)
    assert all(NID not in str(column) for column in row.values())


def test_a_stored_alert_keeps_every_field_it_was_raised_with(sink: SqlStoreSink, engine: Engine) -> None:
    """SQLite hands times back naive; read as UTC they, and every other field, are what the rules raised."""
    batch = delivery(value=7.5)
    (alert,) = [record.record for record in batch if record.kind == "alert"]
    sink.write_records(batch)
    with engine.connect() as connection:
        row = connection.execute(select(ALERTS)).one()._mapping
    stored = {
        name: value.replace(tzinfo=value.tzinfo or dt.UTC) if isinstance(value, dt.datetime) else value
        for name, value in row.items()
        if name in alert
    }
    assert stored == alert


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
            SqlStoreSink(engine).write_records(delivery())
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

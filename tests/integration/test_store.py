"""The regional store on a real PostgreSQL: every behaviour test of tests/unit/sinks/test_store_behaviour.py
(run there on SQLite) runs here again, plus what only a server shows: column limits, a refused
connection, and concurrent writers of the same events."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DBAPIError

from clinhub.infra import postgres
from clinhub.infra.process import free_port
from sinks.base import StoreRecord, write_records_isolating
from sinks.exceptions import StoreRejectedError, StoreUnavailableError
from sinks.models import AuditEntry
from sinks.sql import SqlStoreSink
from sinks.store import engine_for, make_engine, upgrade
from tests.unit.sinks import test_store_behaviour as shared
from tests.unit.sinks.factory import first, realistic_batch, snapshot
from tests.unit.sinks.test_store_behaviour import clock, sink  # noqa: F401 - fixtures, resolved against ours

# The shared behaviour tests, collected here too; their `engine` and `blank_engine` are the fixtures below.
globals().update({name: getattr(shared, name) for name in dir(shared) if name.startswith("test_")})


@pytest.fixture
def engine(postgres_engine: Engine) -> Engine:
    assert postgres_engine.dialect.name == "postgresql"
    return postgres_engine


@pytest.fixture
def blank_engine(postgres_cluster: postgres.PostgresLayout) -> Iterator[Engine]:
    engine = engine_for(postgres.create_database(postgres_cluster, f"b_{uuid.uuid4().hex[:12]}"))
    yield engine
    engine.dispose()


def test_the_shared_tests_run_here_on_postgresql(request: pytest.FixtureRequest) -> None:
    """Guard against the re-export silently collecting nothing."""
    collected = {item.name.split("[")[0] for item in request.session.items if item.module is request.module}
    shared_names = {name for name in dir(shared) if name.startswith("test_")}
    assert len(shared_names) > 30
    assert shared_names <= collected


def test_a_value_longer_than_its_column_is_refused_and_isolated(engine: Engine) -> None:
    """PostgreSQL enforces lengths (SQLite does not): the batch is refused, bisection finds the record."""
    store = SqlStoreSink(engine)
    batch = realistic_batch(seed=101, count=40)
    lab = first(batch, "lab")
    index = next(i for i, r in enumerate(batch) if r.kind == "lab")
    batch[index] = StoreRecord("lab", {**lab, "abnormal_flag": "HIGH-HIGH-HIGH"})
    with pytest.raises(StoreRejectedError) as refused:
        store.write_records(batch)
    assert "StringDataRightTruncation" in refused.value.reason
    assert lab["regional_patient_id"] not in refused.value.reason, "no patient data in the reason"
    assert "INSERT" not in refused.value.reason, "no statement in the reason"

    result, isolated = write_records_isolating(store, batch)
    assert [i for i, _ in isolated] == [index]
    assert sum(result.written.values()) == len(batch) - 1


def test_a_refused_connection_is_transient() -> None:
    engine = make_engine(f"postgresql+psycopg://clinhub@127.0.0.1:{free_port()}/nothing")
    try:
        with pytest.raises(StoreUnavailableError):
            SqlStoreSink(engine).write_records(realistic_batch(seed=102, count=5))
    finally:
        engine.dispose()


def test_concurrent_writers_of_the_same_events_store_them_once(engine: Engine) -> None:
    """Two workers (e.g. during a rebalance) write the same events in different batch cuts at once; the
    store ends exactly as after one writer, and transient conflicts (if any) succeed on retry."""
    batch = realistic_batch(seed=103, count=400)
    cuts: list[list[list[StoreRecord]]] = [
        [batch[i : i + 50] for i in range(0, len(batch), 50)],
        [batch[i : i + 70] for i in reversed(range(0, len(batch), 70))],
    ]
    errors: list[BaseException] = []

    def work(chunks: list[list[StoreRecord]]) -> None:
        store = SqlStoreSink(engine)
        try:
            for chunk in chunks:
                for _attempt in range(5):
                    try:
                        store.write_records(chunk)
                        break
                    except StoreUnavailableError:
                        continue
                else:
                    raise AssertionError("a chunk kept failing")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(chunks,)) for chunks in cuts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    concurrent = _without_ingest_times(snapshot(engine))

    reference = make_engine("sqlite://")
    try:
        upgrade(reference)
        SqlStoreSink(reference).write_records(batch)
        expected = _without_ingest_times(snapshot(reference))
    finally:
        reference.dispose()
    assert {name: len(rows) for name, rows in concurrent.items()} == {
        name: len(rows) for name, rows in expected.items()
    }
    assert concurrent["observations"] == expected["observations"]


def _without_ingest_times(tables: dict[str, list[tuple[Any, ...]]]) -> dict[str, list[tuple[Any, ...]]]:
    """Comparable across dialects: drop the write-time columns and make times naive UTC."""
    from sinks.models import Base

    out = {}
    for name, rows in tables.items():
        columns = [c.name for c in Base.metadata.tables[name].columns]
        keep = [i for i, c in enumerate(columns) if c not in ("ingested_time", "created_time")]
        out[name] = [tuple(_naive(row[i]) for i in keep) for row in rows]
    return out


def _naive(value: Any) -> Any:
    import datetime as dt

    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def test_the_audit_log_refuses_truncate_on_postgresql(engine: Engine) -> None:
    """PostgreSQL's TRUNCATE skips row triggers; migration 0005's statement trigger refuses it too."""
    shared._audit_row(engine)
    with pytest.raises(DBAPIError, match="append-only: TRUNCATE refused"), engine.begin() as connection:
        connection.exec_driver_sql("TRUNCATE audit_log")
    with engine.connect() as connection:
        assert connection.execute(select(func.count()).select_from(AuditEntry)).scalar_one() == 1

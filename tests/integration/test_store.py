"""The regional store on a real PostgreSQL: every behaviour test of tests/unit/sinks/test_store_behaviour.py
(run there on SQLite) runs here again, plus what only a server shows: column limits, a refused
connection, and concurrent writers of the same events."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool

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


def test_a_patient_identifier_too_long_for_its_column_is_refused_without_being_quoted(engine: Engine) -> None:
    """COPY refuses it in the staging table; the server's context quotes the line, the reason must not."""
    store = SqlStoreSink(engine)
    batch = realistic_batch(seed=104, count=30)
    index, lab = next(
        (i, r.record) for i, r in enumerate(batch) if r.kind == "lab" and r.record.get("patient_family_name")
    )
    mrn = "MRN-" + "7" * 80
    batch[index] = StoreRecord("lab", {**lab, "patient_mrn": mrn})
    with pytest.raises(StoreRejectedError) as refused:
        store.write_records(batch)
    assert refused.value.reason.startswith("database refused the batch: StringDataRightTruncation: ")
    assert "7777" not in refused.value.reason and "CONTEXT" not in refused.value.reason

    result, isolated = write_records_isolating(store, batch)
    assert [i for i, _ in isolated] == [index]
    assert "7777" not in isolated[0][1].reason
    assert sum(result.written.values()) == len(batch) - 1


def test_an_integer_out_of_its_column_s_range_is_refused_not_wrapped(engine: Engine) -> None:
    """Integers are staged as bigint (binary COPY would wrap them into a 4-byte integer); the INSERT's cast
    refuses one out of range, as the server always did, and bisection isolates its record."""
    store = SqlStoreSink(engine)
    batch = realistic_batch(seed=106, count=20)
    index = next(i for i, r in enumerate(batch) if r.kind == "lab")
    batch[index] = StoreRecord("lab", {**batch[index].record, "patient_birth_year": 2**40})
    result, isolated = write_records_isolating(store, batch)
    assert [i for i, _ in isolated] == [index]
    assert "NumericValueOutOfRange: integer out of range" in isolated[0][1].reason
    assert sum(result.written.values()) == len(batch) - 1
    with engine.connect() as connection:
        years = connection.execute(text("SELECT DISTINCT birth_year FROM patients")).scalars().all()
    assert 2**40 % 2**32 not in years and all(year is None or 1900 < year < 2030 for year in years)


WHEN = dt.datetime(2026, 12, 2, 3, 0, tzinfo=dt.UTC)


def _staged_rows(connection: Any, table: str) -> int | None:
    """Rows in this session's staging twin of `table`; None when the session has none."""
    if connection.execute(text(f"SELECT to_regclass('pg_temp.clinhub_stage_{table}')")).scalar() is None:
        return None
    return int(connection.execute(text(f"SELECT count(*) FROM pg_temp.clinhub_stage_{table}")).scalar_one())  # noqa: S608


def test_batches_go_through_the_session_s_staging_tables_which_every_commit_empties(engine: Engine) -> None:
    """One session (a pool of one): its twins made once, empty after each commit, made again after a
    rollback took back the CREATE, and what it stores the same as SQLite stores."""
    single = create_engine(engine.url, poolclass=StaticPool)
    batch = realistic_batch(seed=105, count=60)
    try:
        store = SqlStoreSink(single, clock=lambda: WHEN)
        lab = first(batch, "lab")
        others = [item for item in batch[:6] if item.kind != "lab"]
        bad = [*others, StoreRecord("lab", {**lab, "abnormal_flag": "HIGH-HIGH-HIGH"})]
        with pytest.raises(StoreRejectedError):
            store.write_records(bad)  # the session's first transaction, rolled back with its CREATEs
        with single.connect() as connection:
            assert _staged_rows(connection, "ingest_log") is None
        written = store.write_records(batch)
        assert store.write_records(batch).total_written == 0, "a redelivery"
        with single.connect() as connection:
            assert [_staged_rows(connection, table) for table in ("ingest_log", "observations")] == [0, 0]
    finally:
        single.dispose()

    reference = make_engine("sqlite://")
    try:
        upgrade(reference)
        assert SqlStoreSink(reference, clock=lambda: WHEN).write_records(batch) == written
        expected = _without_ingest_times(snapshot(reference))
    finally:
        reference.dispose()
    assert _without_ingest_times(snapshot(engine)) == expected


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

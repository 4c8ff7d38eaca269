"""The PostgreSQL staging tables: their statements, and when a session makes, refills and keeps them (a
fake psycopg connection here; tests/integration/test_store.py runs them on the server)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy.exc import DataError, OperationalError

from sinks.sql import DEAD_LETTERS, OBSERVATIONS, reason_of
from sinks.staging import (
    INFO_KEY,
    Staging,
    copy_statement,
    create_statement,
    staging_table,
    values_of,
    wire_type,
)


def test_a_twin_has_the_table_s_columns_and_types_and_lives_in_the_session() -> None:
    twin = staging_table(OBSERVATIONS)
    assert (twin.schema, twin.name) == ("pg_temp", "clinhub_stage_observations")
    assert [(c.name, repr(c.type)) for c in twin.columns] == [
        (c.name, repr(c.type)) for c in OBSERVATIONS.columns
    ]
    assert not twin.primary_key.columns, "no key: the table's own key decides, at the INSERT"
    assert staging_table(OBSERVATIONS) is twin
    assert create_statement(DEAD_LETTERS) == (
        'CREATE TEMPORARY TABLE IF NOT EXISTS "clinhub_stage_dead_letters" ON COMMIT DELETE ROWS AS SELECT '
        '"deadletter_id", "original_topic", "original_partition"::bigint AS "original_partition", '
        '"original_offset"::bigint AS "original_offset", "kind", "error_class", "field", "reason", '
        '"institution_id", "correlation_id", "processor", "possibly_critical", "loinc_code", "failed_time", '
        '"ingested_time" FROM "dead_letters" WITH NO DATA'
    ), "every integer staged as a bigint: the INSERT's cast refuses what is out of range"
    assert copy_statement(OBSERVATIONS, ("unit", "value")) == (
        'COPY "pg_temp"."clinhub_stage_observations" ("unit", "value") FROM STDIN (FORMAT BINARY)'
    )
    with pytest.raises(KeyError):
        copy_statement(OBSERVATIONS, ("unit", "no_such_column"))


def test_values_of_is_always_a_tuple() -> None:
    row = {"a": 1, "b": 2, "c": 3}
    assert values_of(("c", "a"))(row) == (3, 1)
    assert values_of(("b",))(row) == (2,)


class FakeDriverError(Exception):
    pass


class Cursor:
    def __init__(self, log: list[Any], fail: BaseException | None) -> None:
        self.log, self.fail = log, fail

    description = None  # the statements here return nothing

    def execute(self, statement: str) -> None:
        self.log.append(statement.split(" ")[0])

    @contextmanager
    def copy(self, statement: str) -> Iterator[Cursor]:
        self.log.append("COPY")
        yield self
        if self.fail is not None:
            raise self.fail

    def set_types(self, types: tuple[str, ...]) -> None:
        self.log.append(types)

    def write_row(self, values: tuple[Any, ...]) -> None:
        self.log.append(values)

    def close(self) -> None:
        self.log.append("close")


class Dialect:
    dbapi_exception_translation_map: dict[str, str] = {}

    class loaded_dbapi:  # as SQLAlchemy names it
        Error = FakeDriverError


class Connection:
    """What Staging uses of SQLAlchemy's Connection: the pool record's info and the driver's cursor."""

    def __init__(self, info: dict[str, Any], fail: BaseException | None = None) -> None:
        self.info, self.log, self.fail = info, [], fail
        self.dialect = Dialect()
        self.connection = self

    @property
    def driver_connection(self) -> Connection:
        return self

    def cursor(self) -> Cursor:
        return Cursor(self.log, self.fail)


def staging(connection: Connection) -> Staging:
    return Staging(connection)  # type: ignore[arg-type]


INSERT = "INSERT INTO observations SELECT ... FROM pg_temp.clinhub_stage_observations"


def test_a_session_makes_a_twin_once_and_only_a_commit_keeps_it() -> None:
    info: dict[str, Any] = {}
    rows = [{"unit": "mmol/L", "value": 4.2}, {"unit": "g/L", "value": 120.0}]
    first = Connection(info)
    assert staging(first).write(OBSERVATIONS, ("unit", "value"), rows, INSERT) == []
    assert first.log == [
        "CREATE",
        "COPY",
        ("text", "float8"),  # binary COPY, in the types of the table's columns
        ("mmol/L", 4.2),
        ("g/L", 120.0),
        "INSERT",
        "close",
    ]
    assert INFO_KEY not in info, "not committed: a rollback takes the CREATE back"

    again = Connection(info)
    kept = staging(again)
    kept.write(OBSERVATIONS, ("unit",), rows[:1], INSERT)
    kept.committed()
    assert again.log[0] == "CREATE"
    assert info[INFO_KEY] == {"observations"}

    later = Connection(info)
    batch = staging(later)
    batch.write(OBSERVATIONS, ("unit",), rows[:1], INSERT)
    batch.write(OBSERVATIONS, ("unit",), rows[1:], INSERT)  # a second fill in one transaction empties it
    assert [entry for entry in later.log if isinstance(entry, str)] == [
        *("COPY", "INSERT", "close"),
        *("DELETE", "COPY", "INSERT", "close"),
    ]


def test_every_column_type_of_the_store_has_its_binary_copy_type() -> None:
    from sinks.models import Base

    found = {wire_type(column.type) for table in Base.metadata.tables.values() for column in table.columns}
    assert found == {"int8", "bool", "float8", "timestamptz", "text"}  # integers staged as bigint
    assert wire_type(OBSERVATIONS.c.original_value.type) == "float8"
    with pytest.raises(TypeError):
        wire_type(object())


@pytest.mark.parametrize("wrapped", [DataError, OperationalError])
def test_a_driver_error_of_copy_is_wrapped_as_sqlalchemy_wraps_a_statement_s(
    wrapped: type[Exception],
) -> None:
    """The sink tells refused data (DataError) from a server gone (OperationalError) by these classes."""
    kind = type(wrapped.__name__, (FakeDriverError,), {})  # named as the DBAPI's classes are
    connection = Connection({}, fail=kind("refused"))
    with pytest.raises(wrapped) as raised:
        staging(connection).write(OBSERVATIONS, ("unit",), [{"unit": "x"}], INSERT)
    assert isinstance(raised.value.orig, kind)  # type: ignore[attr-defined]
    assert connection.log[-1] == "close"


class Diagnostic:
    def __init__(self, primary: str | None) -> None:
        self.message_primary = primary


class ServerError(Exception):
    def __init__(self, message: str, primary: str | None) -> None:
        super().__init__(message)
        self.diag = Diagnostic(primary)


def test_a_reason_is_the_server_s_primary_message_without_the_values_it_quotes() -> None:
    full = (
        "value too long for type character varying(64)\n"
        'CONTEXT:  COPY clinhub_stage_patient_names, line 3, column patient_mrn: "MRN-0042-..."'
    )
    refused = DataError("COPY ...", None, ServerError(full, "value too long for type character varying(64)"))
    assert reason_of(refused) == "ServerError: value too long for type character varying(64)"
    unbound = DataError("INSERT ...", None, ServerError("cannot adapt   type  X", None))
    assert reason_of(unbound) == "ServerError: cannot adapt type X"

"""PostgreSQL bulk rows through COPY: a batch's rows of a table are copied into the session's temporary
twin of that table, then moved into it by one INSERT ... SELECT ... ON CONFLICT (sinks.sql).

Why COPY: psycopg formats COPY rows in C, in binary (nothing to print as text, nor for the server to parse),
while the array parameters of an unnest() statement, the way before, were adapted value by value in
Python: most of the writer's time (benchmarks/sink_bench.py --profile).

The twin, `pg_temp.clinhub_stage_<table>`, has the table's column types, a varchar its length (a value
too long is refused at COPY, as the table itself would), except that every integer is a bigint: a value
out of an integer column's range is refused by the INSERT's cast, never wrapped by the binary format. It
has no constraint, default or index: a null where the table takes none is refused by the INSERT too. It
lives in the database session (the pooled connection), is emptied at every commit (ON COMMIT DELETE ROWS)
and, with a rolled-back batch, loses that batch's rows too. It is made on first use in a session, which
needs the TEMPORARY privilege on the database (sinks.privileges.DATABASE_PRIVILEGES).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, MutableMapping
from functools import cache
from operator import itemgetter
from typing import Any

from sqlalchemy import Boolean, Column, DateTime, Float, Integer, MetaData, String, Table
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

PREFIX = "clinhub_stage_"
SCHEMA = "pg_temp"
# Where a session's connection record keeps the names of the tables whose twins it has made
INFO_KEY = "clinhub_staging_tables"
_METADATA = MetaData()


def staging_name(table: Table) -> str:
    return f"{PREFIX}{table.name}"


@cache  # tables and column tuples are few, and fixed
def staging_table(table: Table) -> Table:
    """The twin as SQLAlchemy Core sees it, to select from (its columns typed as the table's)."""
    return Table(
        staging_name(table),
        _METADATA,
        *[Column(column.name, column.type) for column in table.columns],
        schema=SCHEMA,
    )


def create_statement(table: Table) -> str:
    """The twin made from the table itself (CREATE TABLE AS copies types and lengths, not constraints)."""
    create = f'CREATE TEMPORARY TABLE IF NOT EXISTS "{staging_name(table)}" ON COMMIT DELETE ROWS'
    columns = ", ".join(
        f'"{column.name}"::bigint AS "{column.name}"'
        if isinstance(column.type, Integer)
        else f'"{column.name}"'
        for column in table.columns
    )
    return f'{create} AS SELECT {columns} FROM "{table.name}" WITH NO DATA'  # noqa: S608 - the schema's


@cache
def copy_statement(table: Table, columns: tuple[str, ...]) -> str:
    names = ", ".join(f'"{table.c[column].name}"' for column in columns)  # an unknown column: KeyError
    return f'COPY "{SCHEMA}"."{staging_name(table)}" ({names}) FROM STDIN (FORMAT BINARY)'


def values_of(columns: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """A row's values in `columns` order, always a tuple."""
    if len(columns) == 1:
        (column,) = columns
        return lambda row: (row[column],)
    return itemgetter(*columns)


# SQLAlchemy type -> the PostgreSQL type whose binary form COPY sends: the twin's (an integer as bigint)
WIRE_TYPES = (
    (Integer, "int8"),
    (Boolean, "bool"),
    (Float, "float8"),
    (DateTime, "timestamptz"),
    (String, "text"),
)


@cache
def wire_types(table: Table, columns: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(wire_type(table.c[column].type) for column in columns)


def wire_type(kind: Any) -> str:
    for sqlalchemy_type, name in WIRE_TYPES:
        if isinstance(kind, sqlalchemy_type):
            return name
    raise TypeError(f"no COPY type for {kind!r}")


class Staging:
    """The staging twins of one transaction's connection. The twins it makes count as made for the session
    only once the transaction commits (`committed`, called while the connection is still held): a
    rolled-back CREATE leaves none."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        # the pool's record of the DBAPI connection: cleared when the pool connects it again
        self._made: MutableMapping[str, Any] = connection.info
        self._made_now: set[str] = set()
        self._filled: set[str] = set()

    def _exists(self, table: Table) -> bool:
        return table.name in self._made.get(INFO_KEY, ()) or table.name in self._made_now

    def write(
        self, table: Table, columns: tuple[str, ...], rows: Iterable[Mapping[str, Any]], statement: str
    ) -> list[tuple[Any, ...]]:
        """COPY the rows' `columns` into the table's twin (made first if this session has none, emptied
        first if this transaction filled it already), then run `statement`, an INSERT ... SELECT from the
        twin (`staging_table`) without parameters, on the same cursor; the rows it returns."""
        cursor = self._connection.connection.driver_connection.cursor()  # type: ignore[union-attr]
        running = copy_statement(table, columns)
        try:
            if not self._exists(table):
                cursor.execute(create_statement(table))
                self._made_now.add(table.name)
            elif table.name in self._filled:
                cursor.execute(f'DELETE FROM "{SCHEMA}"."{staging_name(table)}"')  # noqa: S608 - fixed names
            self._filled.add(table.name)
            values = values_of(columns)
            with cursor.copy(running) as copy:
                copy.set_types(wire_types(table, columns))
                for row in rows:
                    copy.write_row(values(row))
            running = statement
            cursor.execute(statement)
            return cursor.fetchall() if cursor.description is not None else []
        except self._connection.dialect.loaded_dbapi.Error as exc:
            # as SQLAlchemy wraps a statement's error, so the sink tells refused data from a lost server
            raise DBAPIError.instance(
                running,
                None,
                exc,
                self._connection.dialect.loaded_dbapi.Error,
                dialect=self._connection.dialect,
            ) from exc
        finally:
            cursor.close()

    def committed(self) -> None:
        """The transaction committed: the twins it made exist in the session from now on."""
        if self._made_now:
            self._made[INFO_KEY] = {*self._made.get(INFO_KEY, ()), *self._made_now}
            self._made_now = set()

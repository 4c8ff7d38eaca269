"""How a table of the store takes rows, as data: the key two rows collide on, which of them wins, and what
the winner changes in the stored row.

`sinks.sql` declares one `WritePolicy` per table and builds every INSERT ... ON CONFLICT from it; the
batch's own copies of a key are settled here, before any SQL, by the same rule the database applies to
the stored row, so a batch and a stream of single writes end in the same state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any, TypeVar

from sqlalchemy import Table

from sinks.records import Row

Key = tuple[Any, ...]
Entry = TypeVar("Entry")


def _picker(columns: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Key]:
    """The values of `columns` of a row, always as a tuple (itemgetter alone gives a bare value for one)."""
    if len(columns) == 1:
        (column,) = columns
        return lambda row: (row[column],)
    if not columns:
        return lambda row: ()
    return itemgetter(*columns)


def _oldest_first(columns: tuple[str, ...]) -> Callable[[Mapping[str, Any]], Key]:
    """A sort key of the values of `columns` in which a null comes before any value."""
    if len(columns) == 1:
        (column,) = columns
        return lambda row: (row[column] is not None, row[column])
    return lambda row: tuple(part for column in columns for part in (row[column] is not None, row[column]))


@dataclass(frozen=True)
class Precedence:
    """Which of two rows with the same `key` wins: the one whose `version` columns compare higher, in order.

    A tie, and every pair when there is no version, keeps the row seen first: a redelivered copy never
    displaces the original.
    """

    key: tuple[str, ...]
    version: tuple[str, ...] = ()

    @cached_property
    def key_of(self) -> Callable[[Mapping[str, Any]], Key]:
        return _picker(self.key)

    @cached_property
    def version_of(self) -> Callable[[Mapping[str, Any]], Key]:
        return _picker(self.version)

    @cached_property
    def oldest_first(self) -> Callable[[Mapping[str, Any]], Key]:
        """Sorts rows by version, a null version being the oldest."""
        return _oldest_first(self.version)


@dataclass(frozen=True)
class WritePolicy:
    """One table's write rule: its conflict key and versions (`precedence`) and what a newer row changes.

    Without a version a stored row is never changed (insert-or-ignore). With one, a newer row replaces the
    `replaces` columns (None: every column but the key) and the `fills` columns, where its null keeps the
    stored value. `returning`: the statement reports the key of every row it wrote, which is how the sink
    knows which records changed the store.
    """

    table: Table
    precedence: Precedence
    replaces: tuple[str, ...] | None = None
    fills: tuple[str, ...] = ()
    returning: bool = True

    @property
    def name(self) -> str:
        return self.table.name

    @property
    def replaced_columns(self) -> tuple[str, ...]:
        """The columns a newer row overwrites outright (none when rows are never replaced)."""
        if not self.precedence.version:
            return ()
        if self.replaces is not None:
            return self.replaces
        return tuple(column.name for column in self.table.columns if column.name not in self.precedence.key)


def keep_newest(pairs: Iterable[tuple[Entry, Row]], precedence: Precedence) -> dict[Key, tuple[Entry, Row]]:
    """Each key's winning (entry, row) of a batch under `precedence`: the one the stored row would keep."""
    key_of, version_of = precedence.key_of, precedence.version_of
    kept: dict[Key, tuple[Entry, Row]] = {}
    for pair in pairs:
        key = key_of(pair[1])
        current = kept.get(key)
        if current is None or version_of(pair[1]) > version_of(current[1]):
            kept[key] = pair
    return kept


def merge_newest(rows: Iterable[Row], policy: WritePolicy) -> dict[Key, Row]:
    """Each key's rows folded oldest first (a null version is the oldest): a later row wins, except that
    its null in a `fills` column keeps the earlier value. For tables whose rows each carry part of a fact
    (a patient's demographics come from many records, some with no demographics at all)."""
    key_of, fills = policy.precedence.key_of, policy.fills
    merged: dict[Key, Row] = {}
    for row in sorted(rows, key=policy.precedence.oldest_first):
        key = key_of(row)
        previous = merged.get(key)
        if previous is not None:
            gaps = [column for column in fills if row[column] is None]
            if gaps:
                row = {**row, **{column: previous[column] for column in gaps}}
        merged[key] = row
    return merged

"""The SQLAlchemy sink: one transaction per batch, insert-or-ignore keyed by event id and alert id."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Engine, Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, OperationalError

from sinks.base import Sink, SinkItem, WriteResult
from sinks.exceptions import StoreRejectedError, StoreUnavailableError
from sinks.models import Alert, Observation
from streams.rules import AlertDraft

OBSERVATIONS: Table = Observation.__table__  # type: ignore[assignment]
ALERTS: Table = Alert.__table__  # type: ignore[assignment]


def _observation_row(item: SinkItem, now: dt.datetime) -> dict[str, Any]:
    lab = item.lab
    return {
        "event_id": lab.event_id,
        "institution_id": lab.institution_id,
        "source_system": lab.source_system,
        "result_id": lab.result_id,
        "regional_patient_id": lab.regional_patient_id,
        "encounter_id": lab.encounter_id,
        "local_code": lab.local_code,
        "loinc_code": lab.loinc_code,
        "analyte": lab.analyte,
        "value": lab.value,
        "unit": lab.unit,
        "original_value": lab.original_value,
        "original_unit": lab.original_unit,
        "value_text": lab.value_text,
        "status": lab.status,
        "abnormal_flag": lab.abnormal_flag,
        "flags": ",".join(lab.flags),
        "result_time": lab.result_time,
        "event_time": lab.event_time,
        "specimen_collected_time": lab.specimen_collected_time,
        "ingested_time": now,
    }


def _alert_row(alert: AlertDraft) -> dict[str, Any]:
    row = dataclasses.asdict(alert)
    row["published_time"] = None
    return row


def is_transient(exc: BaseException) -> bool:
    """Connection loss and server shutdown are transient; constraint and data errors are not."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


class SqlStoreSink(Sink):
    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime] | None = None) -> None:
        self._engine = engine
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        dialect = engine.dialect.name
        if dialect == "postgresql":
            self._insert: Any = postgresql.insert
        elif dialect == "sqlite":
            self._insert = sqlite.insert
        else:
            raise ValueError(f"unsupported database dialect {dialect!r}; use PostgreSQL or SQLite")

    def _insert_new(self, connection: Any, table: Table, key: str, rows: list[dict[str, Any]]) -> set[str]:
        if not rows:
            return set()
        stmt = self._insert(table).on_conflict_do_nothing(index_elements=[key]).returning(table.c[key])
        return {row[0] for row in connection.execute(stmt, rows)}

    def write(self, batch: Sequence[SinkItem]) -> WriteResult:
        if not batch:
            return WriteResult()
        now = self._clock()
        observations = list({item.lab.event_id: _observation_row(item, now) for item in batch}.values())
        alerts = list({a.alert_id: _alert_row(a) for item in batch for a in item.alerts}.values())
        try:
            with self._engine.begin() as connection:
                new_events = self._insert_new(connection, OBSERVATIONS, "event_id", observations)
                new_alerts = self._insert_new(connection, ALERTS, "alert_id", alerts)
        except DBAPIError as exc:
            if is_transient(exc):
                raise StoreUnavailableError(f"database unavailable: {exc.orig!r}") from exc
            raise StoreRejectedError(
                f"database refused the batch: {type(exc.orig).__name__}: {exc.orig}"
            ) from exc
        return WriteResult(frozenset(new_events), frozenset(new_alerts))

    def unpublished_alerts(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The outbox: alerts committed to the store but not yet confirmed on Kafka."""
        try:
            with self._engine.connect() as connection:
                rows = connection.execute(
                    select(ALERTS)
                    .where(ALERTS.c.published_time.is_(None))
                    .order_by(ALERTS.c.raised_time)
                    .limit(limit)
                )
                return [dict(row._mapping) for row in rows]
        except DBAPIError as exc:
            if is_transient(exc):
                raise StoreUnavailableError(f"database unavailable: {exc.orig!r}") from exc
            raise

    def mark_published(self, alert_ids: Iterable[str]) -> None:
        ids = list(alert_ids)
        if not ids:
            return
        try:
            with self._engine.begin() as connection:
                connection.execute(
                    update(ALERTS).where(ALERTS.c.alert_id.in_(ids)).values(published_time=self._clock())
                )
        except DBAPIError as exc:
            if is_transient(exc):
                raise StoreUnavailableError(f"database unavailable: {exc.orig!r}") from exc
            raise

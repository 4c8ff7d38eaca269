"""The SQLAlchemy sink: one transaction per batch, set-based upserts per table, on PostgreSQL and SQLite.

Per batch, in one transaction and a handful of statements (each an INSERT ... ON CONFLICT over all the
batch's rows for that table, sent as multi-row VALUES):
1. ingest_log takes the batch's event ids (clinical envelopes, escalations, acknowledgements); ids it
   already had are redeliveries and go no further.
2. Versioned tables (observations, encounters, medication_orders, diagnoses) take each natural key's
   newest version in the batch, and replace the stored row only when newer by (event_time, event_id).
3. History and append-only tables insert-or-ignore; alerts keep the highest suppressed_repeats and are
   refreshed from their escalations and acknowledgements; identity links and aliases keep the latest.
Rows are sent sorted by key so that concurrent writers lock in the same order.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    ARRAY,
    Engine,
    String,
    Table,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError, StatementError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from sinks.base import Sink, StoreRecord, StoreWriteResult
from sinks.exceptions import StoreRejectedError, StoreUnavailableError
from sinks.metrics import SinkMetrics
from sinks.models import (
    VITAL_SIGNS,
    Alert,
    AlertAcknowledgement,
    AlertEscalation,
    Diagnosis,
    Encounter,
    EncounterEvent,
    IdentifierLink,
    IngestLog,
    MedicationOrder,
    Observation,
    Patient,
    PatientAlias,
)
from sinks.records import (
    ENCOUNTER_STATUS,
    STATUS_KEEPING_EVENTS,
    Prepared,
    Row,
    prepare,
)


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


OBSERVATIONS = _table(Observation)
ALERTS = _table(Alert)
PATIENTS = _table(Patient)
LINKS = _table(IdentifierLink)
ALIASES = _table(PatientAlias)
INGEST_LOG = _table(IngestLog)
ENCOUNTERS = _table(Encounter)
ENCOUNTER_EVENTS = _table(EncounterEvent)
MEDICATIONS = _table(MedicationOrder)
DIAGNOSES = _table(Diagnosis)
ESCALATIONS = _table(AlertEscalation)
ACKS = _table(AlertAcknowledgement)

VERSIONED = {  # table -> natural key
    "observations": ("institution_id", "category", "result_id", "component"),
    "medication_orders": ("institution_id", "order_id"),
    "diagnoses": ("institution_id", "diagnosis_id"),
}
LATEST_LINKED = {  # table -> key; the latest linked_time wins
    "identifier_links": ("institution_id", "patient_mrn"),
    "patient_aliases": ("alias_id",),
}
APPEND_ONLY = {  # table -> key; a second copy is ignored
    "encounter_events": "event_id",
    "alert_escalations": "escalation_id",
    "alert_acknowledgements": "ack_id",
}
TABLES = {
    table.name: table
    for table in (
        OBSERVATIONS,
        ALERTS,
        PATIENTS,
        LINKS,
        ALIASES,
        INGEST_LOG,
        ENCOUNTERS,
        ENCOUNTER_EVENTS,
        MEDICATIONS,
        DIAGNOSES,
        ESCALATIONS,
        ACKS,
    )
}
ALIAS_COMPRESSION_ROUNDS = 8


def is_transient(exc: BaseException) -> bool:
    """Connection loss and server shutdown are transient; constraint and data errors are not."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _error_class(exc: StatementError) -> str:
    return type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__


def _reason(exc: StatementError, limit: int = 300) -> str:
    """The driver's own message, without the statement or its parameters (they hold patient data)."""
    text = " ".join(str(exc.orig if exc.orig is not None else exc.args[0] if exc.args else "").split())
    return f"{_error_class(exc)}: {text[:limit]}"


def _newer(excluded: Any, table: Table) -> Any:
    """The incoming version is newer: later event time, ties broken by the larger event id."""
    return or_(
        excluded.event_time > table.c.event_time,
        and_(excluded.event_time == table.c.event_time, excluded.event_id > table.c.event_id),
    )


def _version(row: Row) -> tuple[dt.datetime, str]:
    return (row["event_time"], row["event_id"])


def _element(table: Table, column: str) -> Any:
    """Array element type for unnest(): strings without their length, because an explicit cast to
    varchar(n) silently truncates, while storing into a varchar(n) column refuses what is too long."""
    kind = table.c[column].type
    return String() if isinstance(kind, String) else kind


def _on_conflict(name: str, insert_: Any) -> Any:
    """The conflict rule and RETURNING of each bulk statement, over any row source (VALUES or unnest)."""
    table, excluded = TABLES[name], insert_.excluded
    if name == "ingest_log":
        return insert_.on_conflict_do_nothing(index_elements=["event_id"]).returning(table.c.event_id)
    if name in VERSIONED:
        key = VERSIONED[name]
        return insert_.on_conflict_do_update(
            index_elements=list(key),
            set_={c.name: excluded[c.name] for c in table.columns if c.name not in key},
            where=_newer(excluded, table),
        ).returning(*[table.c[k] for k in key])
    if name == "encounters":  # created here, its state derived from the history (_encounter_state)
        return insert_.on_conflict_do_nothing(index_elements=["institution_id", "encounter_id"])
    if name in APPEND_ONLY:
        key_name = APPEND_ONLY[name]
        return insert_.on_conflict_do_nothing(index_elements=[key_name]).returning(table.c[key_name])
    if name == "alerts":
        return insert_.on_conflict_do_update(
            index_elements=["alert_id"],
            set_={"suppressed_repeats": excluded.suppressed_repeats},
            where=excluded.suppressed_repeats > table.c.suppressed_repeats,
        ).returning(table.c.alert_id)
    if name == "patients":
        return insert_.on_conflict_do_update(
            index_elements=["regional_patient_id"],
            set_={
                "birth_year": func.coalesce(excluded.birth_year, table.c.birth_year),
                "sex": func.coalesce(excluded.sex, table.c.sex),
                "demographics_time": excluded.demographics_time,
            },
            where=and_(
                excluded.demographics_time.is_not(None),
                or_(
                    table.c.demographics_time.is_(None),
                    excluded.demographics_time > table.c.demographics_time,
                ),
            ),
        ).returning(table.c.regional_patient_id)
    if name in LATEST_LINKED:
        key = LATEST_LINKED[name]
        return insert_.on_conflict_do_update(
            index_elements=list(key),
            set_={
                "regional_patient_id": excluded.regional_patient_id,
                "linked_time": excluded.linked_time,
                "ingested_time": excluded.ingested_time,
            },
            where=excluded.linked_time > table.c.linked_time,
        ).returning(*[table.c[k] for k in key])
    raise KeyError(name)


def _encounter_state() -> Any:
    """UPDATE encounters from their history: each field from the latest event (event time, then event id)
    that carries it, so the state does not depend on the order events were delivered in."""
    e, enc = ENCOUNTER_EVENTS, ENCOUNTERS

    def latest(column: Any, *conditions: Any) -> Any:
        return (
            select(column)
            .where(
                e.c.institution_id == enc.c.institution_id,
                e.c.encounter_id == enc.c.encounter_id,
                *conditions,
            )
            .order_by(e.c.event_time.desc(), e.c.event_id.desc())
            .limit(1)
            .scalar_subquery()
        )

    status = case(
        *[(e.c.event_type == event, value) for event, value in ENCOUNTER_STATUS.items()], else_="unknown"
    )
    return (
        update(enc)
        .where(tuple_(enc.c.institution_id, enc.c.encounter_id).in_(bindparam("keys", expanding=True)))
        .values(
            event_id=latest(e.c.event_id),
            event_time=latest(e.c.event_time),
            regional_patient_id=latest(e.c.regional_patient_id),
            last_event_type=latest(e.c.event_type),
            occurred_time=latest(e.c.occurred_time),
            status=func.coalesce(latest(status, e.c.event_type.not_in(STATUS_KEEPING_EVENTS)), "unknown"),
            encounter_class=func.coalesce(
                latest(e.c.encounter_class, e.c.encounter_class != "UNKNOWN"), "UNKNOWN"
            ),
            ward=latest(e.c.ward, e.c.ward.is_not(None)),
            bed=latest(e.c.bed, e.c.ward.is_not(None)),
            attending_clinician=latest(e.c.attending_clinician, e.c.attending_clinician.is_not(None)),
            admit_time=latest(e.c.admit_time, e.c.admit_time.is_not(None)),
            discharge_time=latest(e.c.discharge_time, e.c.discharge_time.is_not(None)),
            ingested_time=bindparam("now", type_=enc.c.ingested_time.type),
        )
    )


class _Outcome:
    """What one transaction did: records written, new log ids, rows per table."""

    def __init__(self) -> None:
        self.written: set[int] = set()
        self.new_log_ids: set[str] = set()
        self.rows: dict[str, int] = defaultdict(int)


class SqlStoreSink(Sink):
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], dt.datetime] | None = None,
        metrics: SinkMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._metrics = metrics
        self._dialect = engine.dialect.name
        if self._dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database dialect {self._dialect!r}; use PostgreSQL or SQLite")
        self._insert: Any = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        # SQLite: one multi-row VALUES statement per table and batch (SQLAlchemy's insertmanyvalues).
        # PostgreSQL: one array parameter per column, unnest()ed; a 500-row VALUES list costs the server
        # more to parse and plan than to execute (measured ~3x slower), an unnest() statement does not.
        self._statements: dict[Any, Any] = {}
        self._encounter_state = _encounter_state()

    # -- statements ---------------------------------------------------------------------------------

    def _bulk(self, connection: Connection, name: str, rows: list[Row]) -> Any:
        """Run the bulk statement `name` (see _on_conflict) over rows that all have the same keys."""
        table = TABLES[name]
        if self._dialect == "sqlite":
            stmt = self._statements.get(name)
            if stmt is None:
                stmt = self._statements[name] = _on_conflict(name, self._insert(table))
            return connection.execute(stmt, rows)
        columns = tuple(rows[0])
        stmt = self._statements.get((name, columns))
        if stmt is None:
            arrays = [
                cast(
                    bindparam(f"a_{column}", type_=ARRAY(_element(table, column))),
                    ARRAY(_element(table, column)),
                )
                for column in columns
            ]
            source = select(*func.unnest(*arrays).table_valued(*columns).render_derived().columns)
            stmt = _on_conflict(name, self._insert(table).from_select(list(columns), source))
            self._statements[(name, columns)] = stmt
        return connection.execute(stmt, {f"a_{column}": [row[column] for row in rows] for column in columns})

    # -- public API ---------------------------------------------------------------------------------

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        started = time.perf_counter()
        if not batch:
            return StoreWriteResult()
        now = self._clock()
        prepared = [prepare(index, item, now) for index, item in enumerate(batch)]
        outcome = self._transaction(prepared)
        committed = self._clock()
        written: dict[str, int] = defaultdict(int)
        unchanged: dict[str, int] = defaultdict(int)
        for entry in prepared:
            (written if entry.index in outcome.written else unchanged)[entry.kind] += 1
        self._observe(prepared, outcome, committed, time.perf_counter() - started)
        return StoreWriteResult(dict(written), dict(unchanged))

    # -- the transaction ----------------------------------------------------------------------------

    def _transaction(self, prepared: list[Prepared]) -> _Outcome:
        try:
            with self._engine.begin() as connection:
                return self._apply(connection, prepared)
        except DBAPIError as exc:
            if is_transient(exc):
                self._count_retry(_error_class(exc))
                raise StoreUnavailableError(f"database unavailable: {_reason(exc)}") from exc
            raise StoreRejectedError(f"database refused the batch: {_reason(exc)}") from exc
        except StatementError as exc:  # a value the driver could not even bind
            raise StoreRejectedError(f"database refused the batch: {_reason(exc)}") from exc
        except PoolTimeoutError as exc:
            self._count_retry("PoolTimeout")
            raise StoreUnavailableError(f"no database connection free: {exc}") from exc
        except SQLAlchemyError as exc:  # anything else is not the data's fault: retry
            self._count_retry(type(exc).__name__)
            raise StoreUnavailableError(f"database error: {exc!r}") from exc

    def _apply(self, connection: Connection, prepared: list[Prepared]) -> _Outcome:
        outcome = _Outcome()
        live = self._skip_logged(connection, prepared, outcome)
        by_table: dict[str, list[tuple[Prepared, Row]]] = defaultdict(list)
        for entry in live:
            for table_name, rows in entry.rows.items():
                by_table[table_name].extend((entry, row) for row in rows)

        observations = by_table.pop("observations", [])
        if observations:
            self._versioned(connection, "observations", self._newest_sets(observations), outcome)
            if any(row["category"] == VITAL_SIGNS for _, row in observations):
                self._supersede_dropped_measurements(connection, observations)
        for name in ("medication_orders", "diagnoses"):
            if by_table.get(name):
                self._versioned(connection, name, by_table.pop(name), outcome)
        new_encounter_events: set[str] = set()
        for name in APPEND_ONLY:
            if by_table.get(name):
                added = self._append_only(connection, name, by_table.pop(name), outcome)
                if name == "encounter_events":
                    new_encounter_events = added
        if by_table.get("encounters"):
            self._encounters(connection, by_table.pop("encounters"), new_encounter_events, outcome)
        touched_alerts: set[str] = set()
        if by_table.get("alerts"):
            touched_alerts |= self._alerts(connection, by_table.pop("alerts"), outcome)
        touched_alerts |= {
            entry.rows[name][0]["alert_id"]
            for entry in live
            for name in ("alert_escalations", "alert_acknowledgements")
            if name in entry.rows
        }
        if touched_alerts:
            self._refresh_alert_state(connection, touched_alerts)
        if by_table.get("identifier_links"):
            self._identities(
                connection, by_table.pop("identifier_links"), by_table.pop("patient_aliases", []), outcome
            )
        patients = [entry.patient for entry in live if entry.patient is not None]
        if patients:
            self._patients(connection, patients, outcome)
        return outcome

    def _skip_logged(
        self, connection: Connection, prepared: list[Prepared], outcome: _Outcome
    ) -> list[Prepared]:
        """Log the batch's event ids; records whose id was already logged (or repeated) are redeliveries."""
        logs: dict[str, Row] = {}
        for entry in prepared:
            if entry.log_id is not None and entry.log is not None:
                logs.setdefault(entry.log_id, entry.log)
        if logs:
            rows = [logs[key] for key in sorted(logs)]
            outcome.new_log_ids = {row[0] for row in self._bulk(connection, "ingest_log", rows)}
            outcome.rows["ingest_log"] += len(outcome.new_log_ids)
        live: list[Prepared] = []
        claimed: set[str] = set()
        for entry in prepared:
            if entry.log_id is None:
                live.append(entry)
            elif entry.log_id in outcome.new_log_ids and entry.log_id not in claimed:
                claimed.add(entry.log_id)
                live.append(entry)
        return live

    @staticmethod
    def _newest_sets(pairs: list[tuple[Prepared, Row]]) -> list[tuple[Prepared, Row]]:
        """Vitals come as sets: only the newest version of each set in the batch counts."""
        newest: dict[tuple[str, str], Prepared] = {}
        for entry, _row in pairs:
            if entry.set_key is not None:
                current = newest.get(entry.set_key)
                if current is None or (entry.version or ()) > (current.version or ()):
                    newest[entry.set_key] = entry
        return [
            (entry, row) for entry, row in pairs if entry.set_key is None or newest[entry.set_key] is entry
        ]

    def _versioned(
        self, connection: Connection, name: str, pairs: list[tuple[Prepared, Row]], outcome: _Outcome
    ) -> None:
        key_columns = VERSIONED[name]
        newest: dict[tuple[Any, ...], tuple[Prepared, Row]] = {}
        for entry, row in pairs:
            key = tuple(row[k] for k in key_columns)
            current = newest.get(key)
            if current is None or _version(row) > _version(current[1]):
                newest[key] = (entry, row)
        ordered = [newest[key] for key in sorted(newest)]
        returned = self._bulk(connection, name, [row for _, row in ordered]).all()
        outcome.rows[name] += len(returned)
        for key in returned:
            outcome.written.add(newest[tuple(key)][0].index)

    def _supersede_dropped_measurements(
        self, connection: Connection, pairs: list[tuple[Prepared, Row]]
    ) -> None:
        """A newer version of a vitals set replaces the whole set: measurements it no longer has retire."""
        sets = {
            (row["institution_id"], row["result_id"]) for _, row in pairs if row["category"] == VITAL_SIGNS
        }
        o, newer = OBSERVATIONS, OBSERVATIONS.alias("newer")
        stmt = (
            update(o)
            .where(
                o.c.category == VITAL_SIGNS,
                o.c.status != "superseded",
                o.c.institution_id.in_({institution for institution, _ in sets}),
                o.c.result_id.in_({result for _, result in sets}),
                exists().where(
                    newer.c.institution_id == o.c.institution_id,
                    newer.c.category == o.c.category,
                    newer.c.result_id == o.c.result_id,
                    or_(
                        newer.c.event_time > o.c.event_time,
                        and_(newer.c.event_time == o.c.event_time, newer.c.event_id > o.c.event_id),
                    ),
                ),
            )
            .values(status="superseded")
        )
        connection.execute(stmt)

    def _encounters(
        self,
        connection: Connection,
        pairs: list[tuple[Prepared, Row]],
        new_events: set[str],
        outcome: _Outcome,
    ) -> None:
        """Encounters with a new event get their state derived again from their whole history."""
        rows = {
            (row["institution_id"], row["encounter_id"]): row
            for _, row in pairs
            if row["event_id"] in new_events
        }
        if not rows:
            return
        keys = sorted(rows)
        self._bulk(connection, "encounters", [rows[key] for key in keys])
        result = connection.execute(
            self._encounter_state,
            {"keys": keys, "now": next(iter(rows.values()))["ingested_time"]},
        )
        outcome.rows["encounters"] += result.rowcount

    def _append_only(
        self, connection: Connection, name: str, pairs: list[tuple[Prepared, Row]], outcome: _Outcome
    ) -> set[str]:
        key_name = APPEND_ONLY[name]
        first: dict[str, tuple[Prepared, Row]] = {}
        for entry, row in pairs:
            first.setdefault(row[key_name], (entry, row))
        returned = self._bulk(connection, name, [first[k][1] for k in sorted(first)]).all()
        outcome.rows[name] += len(returned)
        for (key,) in returned:
            outcome.written.add(first[key][0].index)
        return {key for (key,) in returned}

    def _alerts(
        self, connection: Connection, pairs: list[tuple[Prepared, Row]], outcome: _Outcome
    ) -> set[str]:
        highest: dict[str, tuple[Prepared, Row]] = {}
        for entry, row in pairs:
            current = highest.get(row["alert_id"])
            if current is None or row["suppressed_repeats"] > current[1]["suppressed_repeats"]:
                highest[row["alert_id"]] = (entry, row)
        returned = self._bulk(connection, "alerts", [highest[k][1] for k in sorted(highest)]).all()
        outcome.rows["alerts"] += len(returned)
        for (alert_id,) in returned:
            outcome.written.add(highest[alert_id][0].index)
        return {alert_id for (alert_id,) in returned}

    def _refresh_alert_state(self, connection: Connection, alert_ids: set[str]) -> None:
        """Escalation level and first acknowledgement from their tables (they may come before the alert)."""
        a, e, k = ALERTS, ESCALATIONS, ACKS

        def top_escalation(column: Any) -> Any:
            return (
                select(column)
                .where(e.c.alert_id == a.c.alert_id)
                .order_by(e.c.level.desc(), e.c.escalated_time.desc())
                .limit(1)
                .scalar_subquery()
            )

        def first_ack(column: Any) -> Any:
            return (
                select(column)
                .where(k.c.alert_id == a.c.alert_id)
                .order_by(k.c.acknowledged_time, k.c.ack_id)
                .limit(1)
                .scalar_subquery()
            )

        connection.execute(
            update(a)
            .where(a.c.alert_id.in_(sorted(alert_ids)))
            .values(
                escalation_level=func.coalesce(top_escalation(e.c.level), literal(0)),
                escalated_time=top_escalation(e.c.escalated_time),
                escalation_recipient=top_escalation(e.c.recipient),
                next_deadline_time=top_escalation(e.c.next_deadline_time),
                acknowledged_time=first_ack(k.c.acknowledged_time),
                acknowledged_by=first_ack(k.c.acknowledged_by),
                ack_channel=first_ack(k.c.channel),
            )
        )

    def _identities(
        self,
        connection: Connection,
        links: list[tuple[Prepared, Row]],
        aliases: list[tuple[Prepared, Row]],
        outcome: _Outcome,
    ) -> None:
        latest: dict[tuple[str, str], tuple[Prepared, Row]] = {}
        for entry, row in links:
            key = (row["institution_id"], row["patient_mrn"])
            if key not in latest or row["linked_time"] > latest[key][1]["linked_time"]:
                latest[key] = (entry, row)
        returned = self._bulk(connection, "identifier_links", [latest[k][1] for k in sorted(latest)]).all()
        outcome.rows["identifier_links"] += len(returned)
        for key in returned:
            outcome.written.add(latest[tuple(key)][0].index)
        if not aliases:
            return
        newest_alias: dict[str, tuple[Prepared, Row]] = {}
        for entry, row in aliases:
            current = newest_alias.get(row["alias_id"])
            if current is None or row["linked_time"] > current[1]["linked_time"]:
                newest_alias[row["alias_id"]] = (entry, row)
        rows = [newest_alias[k][1] for k in sorted(newest_alias)]
        # A target is canonical from its link time on: an older alias row of the target itself goes.
        connection.execute(
            delete(ALIASES).where(
                ALIASES.c.alias_id == bindparam("target", type_=ALIASES.c.alias_id.type),
                ALIASES.c.linked_time < bindparam("linked", type_=ALIASES.c.linked_time.type),
            ),
            [{"target": row["regional_patient_id"], "linked": row["linked_time"]} for row in rows],
        )
        returned = self._bulk(connection, "patient_aliases", rows).all()
        outcome.rows["patient_aliases"] += len(returned)
        for (alias_id,) in returned:
            outcome.written.add(newest_alias[alias_id][0].index)
        self._compress_aliases(connection)

    @staticmethod
    def _compress_aliases(connection: Connection) -> None:
        """Keep every alias one hop from a canonical id: A->B, B->C becomes A->C, B->C."""
        hop = ALIASES.alias("hop")
        for _ in range(ALIAS_COMPRESSION_ROUNDS):
            result = connection.execute(
                update(ALIASES)
                .where(ALIASES.c.regional_patient_id.in_(select(hop.c.alias_id)))
                .values(
                    regional_patient_id=select(hop.c.regional_patient_id)
                    .where(hop.c.alias_id == ALIASES.c.regional_patient_id)
                    .scalar_subquery()
                )
            )
            if not result.rowcount:
                break
        connection.execute(delete(ALIASES).where(ALIASES.c.alias_id == ALIASES.c.regional_patient_id))

    def _patients(self, connection: Connection, patients: list[Row], outcome: _Outcome) -> None:
        merged: dict[str, Row] = {}
        oldest = dt.datetime.min.replace(tzinfo=dt.UTC)
        for row in sorted(patients, key=lambda r: r["demographics_time"] or oldest):
            key = row["regional_patient_id"]
            if key in merged:
                previous = merged[key]
                row = {
                    **row,
                    "birth_year": row["birth_year"]
                    if row["birth_year"] is not None
                    else previous["birth_year"],
                    "sex": row["sex"] if row["sex"] is not None else previous["sex"],
                    "demographics_time": row["demographics_time"] or previous["demographics_time"],
                }
            merged[key] = row
        returned = self._bulk(connection, "patients", [merged[k] for k in sorted(merged)]).all()
        outcome.rows["patients"] += len(returned)

    # -- metrics ------------------------------------------------------------------------------------

    def _count_retry(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.retries.labels(reason=reason).inc()

    def _observe(
        self, prepared: list[Prepared], outcome: _Outcome, committed: dt.datetime, seconds: float
    ) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        metrics.batch_records.observe(len(prepared))
        metrics.batch_seconds.observe(seconds)
        for table_name, count in outcome.rows.items():
            if count:
                metrics.rows_written.labels(table=table_name).inc(count)
        for entry in prepared:
            if entry.index in outcome.written:
                metrics.end_to_end_seconds.labels(kind=entry.kind).observe(
                    max(0.0, (committed - entry.time).total_seconds())
                )
            else:
                metrics.records_unchanged.labels(kind=entry.kind).inc()

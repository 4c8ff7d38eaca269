"""The SQLAlchemy sink: one transaction per batch, set-based upserts per table, on PostgreSQL and SQLite.

Each table's rule is data, a `WritePolicy` (sinks.write_policy): its conflict key, the version that
decides which of two rows wins, and what a newer row changes. From it come both the batch's own choice of
one row per key (`keep_newest`) and the INSERT ... ON CONFLICT sent for the batch's rows of that table:
- ingest_log takes the batch's event ids (clinical envelopes, escalations, acknowledgements); ids it
  already had are redeliveries and go no further;
- versioned tables (observations, medication_orders, diagnoses) keep each natural key's newest version by
  (event_time, event_id); alerts keep the highest suppressed_repeats; identity links and aliases the
  latest link; patients fill in demographics from their newest record; patient_names keep, per
  institution and MRN, the name of the newest event (event_time, event_id) that carried one;
- history and append-only tables insert-or-ignore (alert_history by state id, so a redelivered state
  change adds nothing; dead_letters by dead-letter id, derived from the rejected message's position).
Around the policies, a few steps of their own: vitals sets replace whole sets, encounters take their state
from their history, alerts are refreshed from their escalations, acknowledgements and state changes,
aliases stay one hop from a canonical id. An alerts row the batch inserts or changes gets the batch's time
in `changed_time` (the console's live feed); one it leaves as it was keeps its time. Rows are sent sorted by
key so that concurrent writers lock in the same order. The console's own tables (sinks.models.CONSOLE_TABLES)
are never written here.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Engine,
    Table,
    and_,
    bindparam,
    case,
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
from sinks.exceptions import StoreAccessError, StoreRejectedError, StoreUnavailableError
from sinks.metrics import SinkMetrics
from sinks.models import (
    VITAL_SIGNS,
    Alert,
    AlertAcknowledgement,
    AlertEscalation,
    AlertHistory,
    DeadLetterRow,
    Diagnosis,
    Encounter,
    EncounterEvent,
    IdentifierLink,
    IngestLog,
    MedicationOrder,
    Observation,
    Patient,
    PatientAlias,
    PatientName,
)
from sinks.records import (
    ENCOUNTER_STATUS,
    STATUS_KEEPING_EVENTS,
    Prepared,
    Row,
    check_converters,
    prepare,
)
from sinks.staging import Staging, staging_table
from sinks.write_policy import Key, Precedence, WritePolicy, keep_newest, merge_newest


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


EVENT_VERSION = ("event_time", "event_id")  # the later event time wins, a tie the larger event id
LINK_VERSION = ("linked_time",)  # the latest link wins

# Every table's write policy, in the order a batch writes the tables: all writers lock in one order.
INGEST_LOG_WRITES = WritePolicy(_table(IngestLog), Precedence(("event_id",)))
OBSERVATION_WRITES = WritePolicy(
    _table(Observation), Precedence(("institution_id", "category", "result_id", "component"), EVENT_VERSION)
)
MEDICATION_WRITES = WritePolicy(
    _table(MedicationOrder), Precedence(("institution_id", "order_id"), EVENT_VERSION)
)
DIAGNOSIS_WRITES = WritePolicy(
    _table(Diagnosis), Precedence(("institution_id", "diagnosis_id"), EVENT_VERSION)
)
ENCOUNTER_EVENT_WRITES = WritePolicy(_table(EncounterEvent), Precedence(("event_id",)))
ESCALATION_WRITES = WritePolicy(_table(AlertEscalation), Precedence(("escalation_id",)))
ACK_WRITES = WritePolicy(_table(AlertAcknowledgement), Precedence(("ack_id",)))
ALERT_HISTORY_WRITES = WritePolicy(_table(AlertHistory), Precedence(("state_id",)))
ALERT_WRITES = WritePolicy(
    _table(Alert),
    Precedence(("alert_id",), ("suppressed_repeats",)),
    replaces=("suppressed_repeats", "changed_time"),
)
LINK_WRITES = WritePolicy(_table(IdentifierLink), Precedence(("institution_id", "patient_mrn"), LINK_VERSION))
# The name of the newest event that carried one, both parts from it: a late older event changes nothing.
PATIENT_NAME_WRITES = WritePolicy(
    _table(PatientName), Precedence(("institution_id", "patient_mrn"), EVENT_VERSION)
)
# The id is derived from the rejected message's position: a replayed rejection is the dead letter kept.
DEAD_LETTER_WRITES = WritePolicy(_table(DeadLetterRow), Precedence(("deadletter_id",)))
# Created here with do-nothing; its state is derived from the encounter's history (_encounter_state).
ENCOUNTER_WRITES = WritePolicy(
    _table(Encounter), Precedence(("institution_id", "encounter_id")), returning=False
)
ALIAS_WRITES = WritePolicy(_table(PatientAlias), Precedence(("alias_id",), LINK_VERSION))
# Demographics come from many records, some with none: a newer one fills in, its nulls keep what is known.
PATIENT_WRITES = WritePolicy(
    _table(Patient),
    Precedence(("regional_patient_id",), ("demographics_time",)),
    replaces=(),
    fills=("birth_year", "sex", "demographics_time"),
)
WRITE_POLICIES: tuple[WritePolicy, ...] = (
    INGEST_LOG_WRITES,
    OBSERVATION_WRITES,
    MEDICATION_WRITES,
    DIAGNOSIS_WRITES,
    ENCOUNTER_EVENT_WRITES,
    ESCALATION_WRITES,
    ACK_WRITES,
    ALERT_HISTORY_WRITES,
    ALERT_WRITES,
    LINK_WRITES,
    PATIENT_NAME_WRITES,
    DEAD_LETTER_WRITES,
    ENCOUNTER_WRITES,
    ALIAS_WRITES,
    PATIENT_WRITES,
)
POLICIES: dict[str, WritePolicy] = {policy.name: policy for policy in WRITE_POLICIES}
# A vitals set is replaced as a whole: only the newest version of each set in a batch counts.
VITALS_SET = Precedence(("institution_id", "category", "result_id"), EVENT_VERSION)

# The tables tests and benchmarks read.
OBSERVATIONS = OBSERVATION_WRITES.table
ALERTS = ALERT_WRITES.table
ALERT_HISTORY = ALERT_HISTORY_WRITES.table
PATIENTS = PATIENT_WRITES.table
INGEST_LOG = INGEST_LOG_WRITES.table
ENCOUNTERS = ENCOUNTER_WRITES.table
PATIENT_NAMES = PATIENT_NAME_WRITES.table
DEAD_LETTERS = DEAD_LETTER_WRITES.table
ALIAS_COMPRESSION_ROUNDS = 8


# SQLSTATE classes of a refused role: 28 invalid authorization (a wrong password), 42501 a missing grant
ACCESS_SQLSTATES = ("28", "42501")
# A refusal while connecting carries no SQLSTATE, only the server's FATAL message (in English: the
# server's lc_messages; the local stack's is C)
ACCESS_REFUSED_AT_CONNECT = (
    "password authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects connection",
    "permission denied for database",
    "does not exist",  # role "..." does not exist
)


def access_refused(exc: BaseException) -> bool:
    """Whether the server refused the role itself, not the data and not for a while."""
    orig = getattr(exc, "orig", None)
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith(ACCESS_SQLSTATES)
    message = str(orig)
    return (
        isinstance(exc, OperationalError)
        and "FATAL:" in message
        and any(phrase in message for phrase in ACCESS_REFUSED_AT_CONNECT)
    )


def is_transient(exc: BaseException) -> bool:
    """Connection loss and server shutdown are transient; constraint and data errors are not."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def _error_class(exc: StatementError) -> str:
    return type(exc.orig).__name__ if exc.orig is not None else type(exc).__name__


def reason_of(exc: StatementError, limit: int = 300) -> str:
    """The driver's own message, without the statement or its parameters (they hold patient data), nor
    the server's detail and context: they quote a row's values (a key that is taken, a COPY line)."""
    orig = exc.orig
    primary = getattr(getattr(orig, "diag", None), "message_primary", None)
    if isinstance(primary, str) and primary:
        text = primary
    else:  # not the server's error (no connection, a value the driver could not bind)
        text = str(orig if orig is not None else exc.args[0] if exc.args else "")
    return f"{_error_class(exc)}: {' '.join(text.split())[:limit]}"


def _later(incoming: Any, stored: Any, version: tuple[str, ...]) -> Any:
    """SQL for "incoming has the higher version": the columns compared in order, as Precedence does;
    where the stored column may be null, a null is older than any value and never newer."""
    first, rest = version[0], version[1:]
    new, old = incoming[first], stored[first]
    higher = new > old
    if stored[first].nullable:
        higher = and_(new.is_not(None), or_(old.is_(None), higher))
    if not rest:
        return higher
    return or_(higher, and_(new == old, _later(incoming, stored, rest)))


def _rows(kept: Mapping[Key, tuple[Prepared, Row]]) -> dict[Key, Row]:
    return {key: row for key, (_, row) in kept.items()}


def _on_conflict(policy: WritePolicy, insert_: Any) -> Any:
    """A policy as the conflict rule and RETURNING of its bulk statement, over VALUES or staged rows."""
    stored, key = policy.table.c, list(policy.precedence.key)
    if policy.precedence.version:
        excluded = insert_.excluded
        statement = insert_.on_conflict_do_update(
            index_elements=key,
            set_={
                **{column: excluded[column] for column in policy.replaced_columns},
                **{column: func.coalesce(excluded[column], stored[column]) for column in policy.fills},
            },
            where=_later(excluded, stored, policy.precedence.version),
        )
    else:
        statement = insert_.on_conflict_do_nothing(index_elements=key)
    return statement.returning(*[stored[column] for column in key]) if policy.returning else statement


def _encounter_state() -> Any:
    """UPDATE encounters from their history: each field from the latest event (event time, then event id)
    that carries it, so the state does not depend on the order events were delivered in."""
    e, enc = ENCOUNTER_EVENT_WRITES.table, ENCOUNTERS

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
    """What one transaction did: records written, new log ids, rows per table; on PostgreSQL, the
    staging tables its rows went through."""

    def __init__(self, staging: Staging | None = None) -> None:
        self.written: set[int] = set()
        self.new_log_ids: set[str] = set()
        self.rows: dict[str, int] = defaultdict(int)
        self.staging = staging


class SqlStoreSink(Sink):
    def __init__(
        self,
        engine: Engine,
        clock: Callable[[], dt.datetime] | None = None,
        metrics: SinkMetrics | None = None,
    ) -> None:
        check_converters()
        self._engine = engine
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self._metrics = metrics
        self._dialect = engine.dialect.name
        if self._dialect not in ("postgresql", "sqlite"):
            raise ValueError(f"unsupported database dialect {self._dialect!r}; use PostgreSQL or SQLite")
        self._insert: Any = postgresql.insert if self._dialect == "postgresql" else sqlite.insert
        # SQLite: one multi-row VALUES statement per table and batch (SQLAlchemy's insertmanyvalues).
        # PostgreSQL: the rows COPYed into a staging table (sinks.staging), then one INSERT ... SELECT
        # from it; a 500-row VALUES list costs the server more to parse and plan than to execute, and
        # unnest() of array parameters (the way before) cost psycopg a Python call per value.
        if self._dialect == "postgresql" and engine.dialect.driver != "psycopg":
            raise ValueError(
                f"PostgreSQL through psycopg 3 only (postgresql+psycopg://...), not {engine.dialect.driver!r}"
            )
        self._statements: dict[Any, Any] = {}
        self._encounter_state = _encounter_state()

    # -- statements ---------------------------------------------------------------------------------

    def _bulk(
        self, connection: Connection, policy: WritePolicy, rows: list[Row], staging: Staging | None
    ) -> list[Key]:
        """Run the policy's bulk statement (see _on_conflict) over rows that all have the same keys; the
        keys it returns."""
        table = policy.table
        if staging is None:
            stmt = self._statements.get(policy.name)
            if stmt is None:
                stmt = self._statements[policy.name] = _on_conflict(policy, self._insert(table))
            result = connection.execute(stmt, rows)
            return [tuple(key) for key in result] if policy.returning else []
        columns = tuple(rows[0])
        sql = self._statements.get((policy.name, columns))
        if sql is None:
            staged = staging_table(table)
            source = select(*[staged.c[column] for column in columns]).order_by(
                *[staged.c[column] for column in policy.precedence.key]
            )
            compiled = _on_conflict(policy, self._insert(table).from_select(list(columns), source)).compile(
                dialect=connection.dialect
            )
            sql = str(compiled)
            if compiled.params or "%" in sql:  # sent as it is: no parameter, nothing to escape
                raise ValueError(f"the staged statement of {policy.name} is not plain SQL: {sql}")
            self._statements[(policy.name, columns)] = sql
        return staging.write(table, columns, rows, sql)

    def _store(
        self, connection: Connection, policy: WritePolicy, rows: Mapping[Key, Row], outcome: _Outcome
    ) -> list[Key]:
        """Send one row per key, sorted by key (so concurrent writers lock in the same order: the staged
        rows are selected in key order too); the keys of the rows the database wrote, when the policy
        returns them."""
        if not rows:
            return []
        written = self._bulk(connection, policy, [rows[key] for key in sorted(rows)], outcome.staging)
        outcome.rows[policy.name] += len(written)
        return written

    def _write(
        self,
        connection: Connection,
        policy: WritePolicy,
        pairs: list[tuple[Prepared, Row]],
        outcome: _Outcome,
    ) -> set[Key]:
        """The batch's winning row per key, by the policy; a record whose row was written counts written."""
        kept = keep_newest(pairs, policy.precedence)
        written = self._store(connection, policy, _rows(kept), outcome)
        outcome.written.update(kept[key][0].index for key in written)
        return set(written)

    # -- public API ---------------------------------------------------------------------------------

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        started = time.perf_counter()
        if not batch:
            return StoreWriteResult()
        now = self._clock()
        prepared = [prepare(index, item, now) for index, item in enumerate(batch)]
        outcome = self._transaction(prepared, now)
        committed = self._clock()
        written: dict[str, int] = defaultdict(int)
        unchanged: dict[str, int] = defaultdict(int)
        for entry in prepared:
            (written if entry.index in outcome.written else unchanged)[entry.kind] += 1
        self._observe(prepared, outcome, committed, time.perf_counter() - started)
        return StoreWriteResult(dict(written), dict(unchanged))

    # -- the transaction ----------------------------------------------------------------------------

    def _transaction(self, prepared: list[Prepared], now: dt.datetime) -> _Outcome:
        try:
            with self._engine.connect() as connection:
                staging = Staging(connection) if self._dialect == "postgresql" else None
                with connection.begin():
                    outcome = self._apply(connection, _Outcome(staging), prepared, now)
                if staging is not None:
                    staging.committed()
                return outcome
        except DBAPIError as exc:
            if access_refused(exc):
                raise StoreAccessError(self._engine.url.username, reason_of(exc)) from exc
            if is_transient(exc):
                self._count_retry(_error_class(exc))
                raise StoreUnavailableError(f"database unavailable: {reason_of(exc)}") from exc
            raise StoreRejectedError(f"database refused the batch: {reason_of(exc)}") from exc
        except StatementError as exc:  # a value the driver could not even bind
            raise StoreRejectedError(f"database refused the batch: {reason_of(exc)}") from exc
        except PoolTimeoutError as exc:
            self._count_retry("PoolTimeout")
            raise StoreUnavailableError(f"no database connection free: {exc}") from exc
        except SQLAlchemyError as exc:  # anything else is not the data's fault: retry
            self._count_retry(type(exc).__name__)
            raise StoreUnavailableError(f"database error: {exc!r}") from exc

    def _apply(
        self, connection: Connection, outcome: _Outcome, prepared: list[Prepared], now: dt.datetime
    ) -> _Outcome:
        """The tables with steps of their own, every other table by its policy alone (in the order of
        WRITE_POLICIES), then what is derived from what was written."""
        live = self._skip_logged(connection, prepared, outcome)
        by_table: dict[str, list[tuple[Prepared, Row]]] = defaultdict(list)
        for entry in live:
            for table_name, rows in entry.rows.items():
                by_table[table_name].extend((entry, row) for row in rows)
        self._observations(connection, by_table.pop(OBSERVATION_WRITES.name, []), outcome)
        encounters = by_table.pop(ENCOUNTER_WRITES.name, [])
        aliases = by_table.pop(ALIAS_WRITES.name, [])
        unknown = by_table.keys() - POLICIES.keys()
        if unknown:
            raise LookupError(f"rows for tables without a write policy: {sorted(unknown)}")
        stored_keys = {
            policy.name: self._write(connection, policy, by_table[policy.name], outcome)
            for policy in WRITE_POLICIES
            if by_table.get(policy.name)
        }
        new_events = {event_id for (event_id,) in stored_keys.get(ENCOUNTER_EVENT_WRITES.name, ())}
        self._encounters(connection, encounters, new_events, outcome)
        # Alerts whose row or whose escalation, acknowledgement or state change this batch wrote are
        # changed; those with only redelivered ones are refreshed too, but change only if their state does.
        changed_alerts = {alert_id for (alert_id,) in stored_keys.get(ALERT_WRITES.name, ())}
        touched_alerts = set(changed_alerts)
        for policy in (ESCALATION_WRITES, ACK_WRITES, ALERT_HISTORY_WRITES):
            written = stored_keys.get(policy.name, set())
            for _, row in by_table[policy.name]:
                touched_alerts.add(row["alert_id"])
                if policy.precedence.key_of(row) in written:
                    changed_alerts.add(row["alert_id"])
        if touched_alerts:
            self._refresh_alert_state(connection, touched_alerts, changed_alerts, now)
        self._aliases(connection, aliases, outcome)
        self._patients(connection, [entry.patient for entry in live if entry.patient is not None], outcome)
        return outcome

    def _skip_logged(
        self, connection: Connection, prepared: list[Prepared], outcome: _Outcome
    ) -> list[Prepared]:
        """Log the batch's event ids; records whose id was already logged (or repeated) are redeliveries."""
        logs = keep_newest(
            ((entry, entry.log) for entry in prepared if entry.log is not None), INGEST_LOG_WRITES.precedence
        )
        new_log_ids = self._store(connection, INGEST_LOG_WRITES, _rows(logs), outcome)
        outcome.new_log_ids = {log_id for (log_id,) in new_log_ids}
        live: list[Prepared] = []
        claimed: set[str] = set()
        for entry in prepared:
            if entry.log_id is None:
                live.append(entry)
            elif entry.log_id in outcome.new_log_ids and entry.log_id not in claimed:
                claimed.add(entry.log_id)
                live.append(entry)
        return live

    def _observations(
        self, connection: Connection, pairs: list[tuple[Prepared, Row]], outcome: _Outcome
    ) -> None:
        """Lab results and vitals sets; a vitals set is replaced as a whole, so only the newest version of
        each set in the batch counts, and measurements a newer version no longer has retire."""
        if not pairs:
            return
        vitals = [(entry, row) for entry, row in pairs if row["category"] == VITAL_SIGNS]
        newest_sets = {entry.index for entry, _ in keep_newest(vitals, VITALS_SET).values()}
        self._write(
            connection,
            OBSERVATION_WRITES,
            [
                (entry, row)
                for entry, row in pairs
                if row["category"] != VITAL_SIGNS or entry.index in newest_sets
            ],
            outcome,
        )
        if vitals:
            self._supersede_dropped_measurements(connection, vitals)

    @staticmethod
    def _supersede_dropped_measurements(connection: Connection, vitals: list[tuple[Prepared, Row]]) -> None:
        """Measurements of a set that a newer version of the set (in the store) no longer has."""
        sets = {(row["institution_id"], row["result_id"]) for _, row in vitals}
        o, newer = OBSERVATIONS, OBSERVATIONS.alias("newer")
        stmt = (
            update(o)
            .where(
                o.c.category == VITAL_SIGNS,
                o.c.status != "superseded",
                o.c.institution_id.in_({institution for institution, _ in sets}),
                o.c.result_id.in_({result for _, result in sets}),
                exists().where(
                    *[newer.c[column] == o.c[column] for column in VITALS_SET.key],
                    _later(newer.c, o.c, VITALS_SET.version),
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
        kept = keep_newest(
            ((entry, row) for entry, row in pairs if row["event_id"] in new_events),
            ENCOUNTER_WRITES.precedence,
        )
        if not kept:
            return
        rows = _rows(kept)
        self._store(connection, ENCOUNTER_WRITES, rows, outcome)
        result = connection.execute(
            self._encounter_state,
            {"keys": sorted(rows), "now": next(iter(rows.values()))["ingested_time"]},
        )
        outcome.rows[ENCOUNTER_WRITES.name] += result.rowcount

    def _refresh_alert_state(
        self, connection: Connection, alert_ids: set[str], changed: set[str], now: dt.datetime
    ) -> None:
        """Escalation level and first acknowledgement from their tables, suppressed repeats the highest of
        the row's and its state changes' (any of them may come before the alert). The rows updated, those
        `changed` (something new of theirs was written) and those whose state this changes, take `now` as
        changed_time; the others are left alone, so a redelivery leaves the row, and the console's live
        feed, as they were."""
        a, e, k, h = ALERTS, ESCALATION_WRITES.table, ACK_WRITES.table, ALERT_HISTORY
        repeats = (
            select(func.max(h.c.suppressed_repeats)).where(h.c.alert_id == a.c.alert_id).scalar_subquery()
        )

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

        state = {
            # a null (no state change yet) compares as not higher
            "suppressed_repeats": case(
                (repeats > a.c.suppressed_repeats, repeats), else_=a.c.suppressed_repeats
            ),
            "escalation_level": func.coalesce(top_escalation(e.c.level), literal(0)),
            "escalated_time": top_escalation(e.c.escalated_time),
            "escalation_recipient": top_escalation(e.c.recipient),
            "next_deadline_time": top_escalation(e.c.next_deadline_time),
            "acknowledged_time": first_ack(k.c.acknowledged_time),
            "acknowledged_by": first_ack(k.c.acknowledged_by),
            "ack_channel": first_ack(k.c.channel),
        }
        differs = [value.is_distinct_from(a.c[column]) for column, value in state.items()]
        connection.execute(
            update(a)
            .where(a.c.alert_id.in_(sorted(alert_ids)), or_(a.c.alert_id.in_(sorted(changed)), *differs))
            .values(**state, changed_time=bindparam("now", now, type_=a.c.changed_time.type))
        )

    def _aliases(self, connection: Connection, pairs: list[tuple[Prepared, Row]], outcome: _Outcome) -> None:
        """Aliases by their policy; a target is canonical from its link time on, so an older alias row of
        the target itself goes first, and every alias is kept one hop from a canonical id."""
        if not pairs:
            return
        kept = keep_newest(pairs, ALIAS_WRITES.precedence)
        aliases = ALIAS_WRITES.table
        connection.execute(
            delete(aliases).where(
                aliases.c.alias_id == bindparam("target", type_=aliases.c.alias_id.type),
                aliases.c.linked_time < bindparam("linked", type_=aliases.c.linked_time.type),
            ),
            [
                {"target": row["regional_patient_id"], "linked": row["linked_time"]}
                for _, row in (kept[key] for key in sorted(kept))
            ],
        )
        written = self._store(connection, ALIAS_WRITES, _rows(kept), outcome)
        outcome.written.update(kept[key][0].index for key in written)
        self._compress_aliases(connection)

    @staticmethod
    def _compress_aliases(connection: Connection) -> None:
        """Keep every alias one hop from a canonical id: A->B, B->C becomes A->C, B->C."""
        aliases = ALIAS_WRITES.table
        hop = aliases.alias("hop")
        for _ in range(ALIAS_COMPRESSION_ROUNDS):
            result = connection.execute(
                update(aliases)
                .where(aliases.c.regional_patient_id.in_(select(hop.c.alias_id)))
                .values(
                    regional_patient_id=select(hop.c.regional_patient_id)
                    .where(hop.c.alias_id == aliases.c.regional_patient_id)
                    .scalar_subquery()
                )
            )
            if not result.rowcount:
                break
        connection.execute(delete(aliases).where(aliases.c.alias_id == aliases.c.regional_patient_id))

    def _patients(self, connection: Connection, patients: list[Row], outcome: _Outcome) -> None:
        """Patients change no record's count: they follow from the records that name them."""
        if patients:
            self._store(connection, PATIENT_WRITES, merge_newest(patients, PATIENT_WRITES), outcome)

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
                metrics.clinical_age_seconds.labels(kind=entry.kind).observe(
                    max(0.0, (committed - entry.time).total_seconds())
                )
            else:
                metrics.records_unchanged.labels(kind=entry.kind).inc()

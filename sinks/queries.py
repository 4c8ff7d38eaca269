"""Read side of the regional store: a patient's timeline across institutions, and latest values.

Both resolve aliases: asking with an alias id or with the canonical id gives the same answer, made of
everything stored under the canonical id or any of its aliases. Retracted rows (cancelled results,
superseded measurements, cancelled or entered-in-error orders, cancelled encounters) are left out.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields
from typing import Any

from sqlalchemy import Engine, Float, String, and_, case, cast, func, literal, null, or_, select, union_all
from sqlalchemy.engine import Connection

from sinks.models import (
    CANCELLED_ENCOUNTER,
    LAB,
    RETRACTED_MEDICATION,
    RETRACTED_OBSERVATION,
    VITAL_SIGNS,
    Alert,
    Diagnosis,
    Encounter,
    EncounterEvent,
    MedicationOrder,
    Observation,
    PatientAlias,
    UtcDateTime,
)

MAX_LIMIT = 1000


@dataclass(frozen=True)
class TimelineEntry:
    """One thing that happened to the patient. `entry_id` is unique within `kind`."""

    time: dt.datetime
    kind: str
    entry_id: str
    institution_id: str
    code: str | None  # LOINC, ICD-10, drug code, ADT event type
    display: str | None
    value: float | None
    unit: str | None
    status: str | None
    event_id: str  # the source event (alerts: the alert id)
    stored_patient_id: str  # the id it was stored under (an alias or the canonical id)


@dataclass(frozen=True)
class TimelinePage:
    entries: list[TimelineEntry]
    next_cursor: str | None  # None: nothing after this page


@dataclass(frozen=True)
class LatestValue:
    loinc_code: str
    category: str  # laboratory or vital-signs
    analyte: str | None
    value: float | None
    unit: str | None
    value_text: str | None
    status: str
    effective_time: dt.datetime
    institution_id: str
    event_id: str


class InvalidCursorError(ValueError):
    """The cursor was not made by patient_timeline (or was made for another ordering)."""


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)  # SQLite gives naive UTC


def _encode_cursor(entry: TimelineEntry, newest_first: bool) -> str:
    payload = [entry.time.astimezone(dt.UTC).isoformat(), entry.kind, entry.entry_id, newest_first]
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def _decode_cursor(cursor: str, newest_first: bool) -> tuple[dt.datetime, str, str]:
    try:
        when, kind, entry_id, direction = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        moment = dt.datetime.fromisoformat(when)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise InvalidCursorError(f"not a timeline cursor: {cursor!r}") from exc
    if direction != newest_first or moment.tzinfo is None:
        raise InvalidCursorError("cursor belongs to a timeline read in the other direction")
    return moment, str(kind), str(entry_id)


def patient_ids(connection: Connection, regional_patient_id: str) -> tuple[str, list[str]]:
    """The canonical id for an id (itself unless it is an alias) and every id stored for that patient."""
    aliases = PatientAlias.__table__
    canonical = connection.execute(
        select(aliases.c.regional_patient_id).where(aliases.c.alias_id == regional_patient_id)
    ).scalar_one_or_none()
    canonical = canonical or regional_patient_id
    others = connection.execute(
        select(aliases.c.alias_id).where(aliases.c.regional_patient_id == canonical)
    ).scalars()
    return canonical, [canonical, *sorted(others)]


# A timeline source: for the patient's ids and the kinds asked of it, a select with the columns of
# TimelineEntry (see _entries) and its where conditions.
SourceQuery = Callable[[list[str], Collection[str]], tuple[Any, list[Any]]]


@dataclass(frozen=True)
class TimelineSource:
    """Where the timeline entries of some kinds come from."""

    kinds: tuple[str, ...]
    query: SourceQuery


# Filled by @_timeline_source below; the timeline's kinds are the kinds of its sources.
TIMELINE_SOURCES: list[TimelineSource] = []


def _timeline_source(*kinds: str) -> Callable[[SourceQuery], SourceQuery]:
    """Register the query of the table the entries of `kinds` come from."""

    def register(query: SourceQuery) -> SourceQuery:
        TIMELINE_SOURCES.append(TimelineSource(kinds, query))
        return query

    return register


def _entries(**columns: Any) -> Any:
    """A source's select: one expression per TimelineEntry field, labelled and ordered as its fields, so
    that every source's select has the same columns for the union."""
    return select(
        *(columns[entry_field.name].label(entry_field.name) for entry_field in fields(TimelineEntry))
    )


NO_VALUE = cast(null(), Float)
NO_TEXT = cast(null(), String)


@_timeline_source("lab", "vitals")
def _observations(ids: list[str], kinds: Collection[str]) -> tuple[Any, list[Any]]:
    o = Observation.__table__
    conditions: list[Any] = [o.c.regional_patient_id.in_(ids), o.c.status.not_in(RETRACTED_OBSERVATION)]
    if len(kinds) == 1:
        conditions.append(o.c.category == (LAB if "lab" in kinds else VITAL_SIGNS))
    query = _entries(
        time=o.c.effective_time,
        kind=case((o.c.category == LAB, literal("lab")), else_=literal("vitals")),
        entry_id=o.c.institution_id + ":" + o.c.result_id + ":" + o.c.component,
        institution_id=o.c.institution_id,
        code=func.coalesce(o.c.loinc_code, o.c.local_code),
        display=o.c.analyte,
        value=func.coalesce(o.c.value, o.c.original_value),
        unit=func.coalesce(o.c.unit, o.c.original_unit),
        status=o.c.status,
        event_id=o.c.event_id,
        stored_patient_id=o.c.regional_patient_id,
    )
    return query, conditions


@_timeline_source("encounter")
def _encounter_events(ids: list[str], kinds: Collection[str]) -> tuple[Any, list[Any]]:
    e, enc = EncounterEvent.__table__, Encounter.__table__
    query = _entries(
        time=e.c.occurred_time,
        kind=literal("encounter"),
        entry_id=e.c.event_id,
        institution_id=e.c.institution_id,
        code=e.c.event_type,
        display=func.coalesce(e.c.ward, e.c.encounter_class),
        value=NO_VALUE,
        unit=NO_TEXT,
        status=e.c.encounter_class,
        event_id=e.c.event_id,
        stored_patient_id=e.c.regional_patient_id,
    ).join(enc, and_(enc.c.institution_id == e.c.institution_id, enc.c.encounter_id == e.c.encounter_id))
    return query, [
        e.c.regional_patient_id.in_(ids),
        e.c.event_type != "CANCEL",
        enc.c.status != CANCELLED_ENCOUNTER,
    ]


@_timeline_source("medication")
def _medication_orders(ids: list[str], kinds: Collection[str]) -> tuple[Any, list[Any]]:
    m = MedicationOrder.__table__
    query = _entries(
        time=m.c.ordered_time,
        kind=literal("medication"),
        entry_id=m.c.institution_id + ":" + m.c.order_id,
        institution_id=m.c.institution_id,
        code=func.coalesce(m.c.regional_drug_code, m.c.drug_code),
        display=m.c.drug_display,
        value=m.c.dose_value,
        unit=m.c.dose_unit,
        status=m.c.status,
        event_id=m.c.event_id,
        stored_patient_id=m.c.regional_patient_id,
    )
    return query, [m.c.regional_patient_id.in_(ids), m.c.status.not_in(RETRACTED_MEDICATION)]


@_timeline_source("diagnosis")
def _diagnoses(ids: list[str], kinds: Collection[str]) -> tuple[Any, list[Any]]:
    d = Diagnosis.__table__
    query = _entries(
        time=d.c.recorded_time,
        kind=literal("diagnosis"),
        entry_id=d.c.institution_id + ":" + d.c.diagnosis_id,
        institution_id=d.c.institution_id,
        code=d.c.icd10_code,
        display=d.c.display,
        value=NO_VALUE,
        unit=NO_TEXT,
        status=d.c.kind,
        event_id=d.c.event_id,
        stored_patient_id=d.c.regional_patient_id,
    )
    return query, [d.c.regional_patient_id.in_(ids)]


@_timeline_source("alert")
def _alerts(ids: list[str], kinds: Collection[str]) -> tuple[Any, list[Any]]:
    a = Alert.__table__
    query = _entries(
        time=a.c.raised_time,
        kind=literal("alert"),
        entry_id=a.c.alert_id,
        institution_id=a.c.institution_id,
        code=a.c.loinc_code,
        display=a.c.message,
        value=a.c.value,
        unit=a.c.unit,
        status=a.c.severity,
        event_id=a.c.alert_id,
        stored_patient_id=a.c.regional_patient_id,
    )
    return query, [a.c.regional_patient_id.in_(ids)]


# What a timeline can show: every kind some source gives entries of.
TIMELINE_KINDS: tuple[str, ...] = tuple(kind for source in TIMELINE_SOURCES for kind in source.kinds)


def patient_timeline(
    engine: Engine,
    regional_patient_id: str,
    kinds: Collection[str] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    limit: int = 100,
    cursor: str | None = None,
    *,
    newest_first: bool = False,
) -> TimelinePage:
    """One page of the patient's timeline over all institutions, ordered by (time, kind, entry id).

    `start` is inclusive and `end` exclusive. Pass the returned `next_cursor` to get the next page;
    paging is keyset-based, so rows stored meanwhile never shift or repeat entries already returned.
    """
    chosen = set(TIMELINE_KINDS if kinds is None else kinds)
    unknown = chosen - set(TIMELINE_KINDS)
    if unknown:
        raise ValueError(f"unknown timeline kinds {sorted(unknown)}; choose from {TIMELINE_KINDS}")
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be between 1 and {MAX_LIMIT}")
    after = _decode_cursor(cursor, newest_first) if cursor else None
    with engine.connect() as connection:
        _, ids = patient_ids(connection, regional_patient_id)
        parts = []
        for source in TIMELINE_SOURCES:
            wanted = chosen.intersection(source.kinds)
            if not wanted:
                continue
            query, conditions = source.query(ids, wanted)
            columns = query.selected_columns
            time_col, kind_col, id_col = columns.time, columns.kind, columns.entry_id
            where = list(conditions)
            if start is not None:
                where.append(time_col >= literal(start, UtcDateTime))
            if end is not None:
                where.append(time_col < literal(end, UtcDateTime))
            if after is not None:
                where.append(_beyond(time_col, kind_col, id_col, after, newest_first))
            order = [time_col, kind_col, id_col]
            ordered = [c.desc() for c in order] if newest_first else order
            parts.append(select(query.where(*where).order_by(*ordered).limit(limit + 1).subquery()))
        if not parts:
            return TimelinePage([], None)
        merged = union_all(*parts).subquery()
        keys = [merged.c.time, merged.c.kind, merged.c.entry_id]
        rows = connection.execute(
            select(merged).order_by(*([k.desc() for k in keys] if newest_first else keys)).limit(limit + 1)
        ).all()
    entries = [
        TimelineEntry(
            time=_aware(row.time),
            kind=row.kind,
            entry_id=row.entry_id,
            institution_id=row.institution_id,
            code=row.code,
            display=row.display,
            value=row.value,
            unit=row.unit,
            status=row.status,
            event_id=row.event_id,
            stored_patient_id=row.stored_patient_id,
        )
        for row in rows[:limit]
    ]
    more = len(rows) > limit
    return TimelinePage(entries, _encode_cursor(entries[-1], newest_first) if more else None)


def _beyond(
    time_col: Any, kind_col: Any, id_col: Any, after: tuple[dt.datetime, str, str], newest_first: bool
) -> Any:
    when, kind, entry_id = literal(after[0], UtcDateTime), after[1], after[2]
    if newest_first:
        return or_(
            time_col < when,
            and_(time_col == when, or_(kind_col < kind, and_(kind_col == kind, id_col < entry_id))),
        )
    return or_(
        time_col > when,
        and_(time_col == when, or_(kind_col > kind, and_(kind_col == kind, id_col > entry_id))),
    )


def latest_by_analyte(engine: Engine, regional_patient_id: str) -> list[LatestValue]:
    """The latest non-retracted lab or vital value per LOINC code, over all institutions, by LOINC code."""
    o = Observation.__table__
    with engine.connect() as connection:
        _, ids = patient_ids(connection, regional_patient_id)
        rank = (
            func.row_number()
            .over(
                partition_by=o.c.loinc_code,
                order_by=(o.c.effective_time.desc(), o.c.event_time.desc(), o.c.event_id.desc()),
            )
            .label("rank")
        )
        ranked = (
            select(
                o.c.loinc_code,
                o.c.category,
                o.c.analyte,
                o.c.value,
                o.c.unit,
                o.c.value_text,
                o.c.status,
                o.c.effective_time,
                o.c.institution_id,
                o.c.event_id,
                rank,
            )
            .where(
                o.c.regional_patient_id.in_(ids),
                o.c.loinc_code.is_not(None),
                o.c.status.not_in(RETRACTED_OBSERVATION),
            )
            .subquery()
        )
        rows = connection.execute(
            select(ranked).where(ranked.c.rank == 1).order_by(ranked.c.loinc_code)
        ).all()
    return [
        LatestValue(
            loinc_code=row.loinc_code,
            category=row.category,
            analyte=row.analyte,
            value=row.value,
            unit=row.unit,
            value_text=row.value_text,
            status=row.status,
            effective_time=_aware(row.effective_time),
            institution_id=row.institution_id,
            event_id=row.event_id,
        )
        for row in rows
    ]

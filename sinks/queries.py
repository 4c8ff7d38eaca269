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
from collections.abc import Collection
from dataclasses import dataclass
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

TIMELINE_KINDS = ("lab", "vitals", "encounter", "medication", "diagnosis", "alert")
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


def _branches(ids: list[str], kinds: Collection[str]) -> list[tuple[str, Any, list[Any]]]:
    """(kind tag for filtering, select, extra where) per source; every select has the same columns."""
    o, e, enc = Observation.__table__, EncounterEvent.__table__, Encounter.__table__
    m, d, a = MedicationOrder.__table__, Diagnosis.__table__, Alert.__table__
    no_value = cast(null(), Float)
    no_text = cast(null(), String)
    branches: list[tuple[str, Any, list[Any]]] = []
    obs_kinds = [k for k in ("lab", "vitals") if k in kinds]
    if obs_kinds:
        kind = case((o.c.category == LAB, literal("lab")), else_=literal("vitals"))
        branches.append(
            (
                "observations",
                select(
                    o.c.effective_time.label("time"),
                    kind.label("kind"),
                    (o.c.institution_id + ":" + o.c.result_id + ":" + o.c.component).label("entry_id"),
                    o.c.institution_id,
                    func.coalesce(o.c.loinc_code, o.c.local_code).label("code"),
                    o.c.analyte.label("display"),
                    func.coalesce(o.c.value, o.c.original_value).label("value"),
                    func.coalesce(o.c.unit, o.c.original_unit).label("unit"),
                    o.c.status.label("status"),
                    o.c.event_id,
                    o.c.regional_patient_id.label("stored_patient_id"),
                ),
                [
                    o.c.regional_patient_id.in_(ids),
                    o.c.status.not_in(RETRACTED_OBSERVATION),
                    *(
                        [o.c.category == (LAB if obs_kinds == ["lab"] else VITAL_SIGNS)]
                        if len(obs_kinds) == 1
                        else []
                    ),
                ],
            )
        )
    if "encounter" in kinds:
        branches.append(
            (
                "encounter",
                select(
                    e.c.occurred_time.label("time"),
                    literal("encounter").label("kind"),
                    e.c.event_id.label("entry_id"),
                    e.c.institution_id,
                    e.c.event_type.label("code"),
                    func.coalesce(e.c.ward, e.c.encounter_class).label("display"),
                    no_value.label("value"),
                    no_text.label("unit"),
                    e.c.encounter_class.label("status"),
                    e.c.event_id,
                    e.c.regional_patient_id.label("stored_patient_id"),
                ).join(
                    enc,
                    and_(enc.c.institution_id == e.c.institution_id, enc.c.encounter_id == e.c.encounter_id),
                ),
                [
                    e.c.regional_patient_id.in_(ids),
                    e.c.event_type != "CANCEL",
                    enc.c.status != CANCELLED_ENCOUNTER,
                ],
            )
        )
    if "medication" in kinds:
        branches.append(
            (
                "medication",
                select(
                    m.c.ordered_time.label("time"),
                    literal("medication").label("kind"),
                    (m.c.institution_id + ":" + m.c.order_id).label("entry_id"),
                    m.c.institution_id,
                    func.coalesce(m.c.regional_drug_code, m.c.drug_code).label("code"),
                    m.c.drug_display.label("display"),
                    m.c.dose_value.label("value"),
                    m.c.dose_unit.label("unit"),
                    m.c.status.label("status"),
                    m.c.event_id,
                    m.c.regional_patient_id.label("stored_patient_id"),
                ),
                [m.c.regional_patient_id.in_(ids), m.c.status.not_in(RETRACTED_MEDICATION)],
            )
        )
    if "diagnosis" in kinds:
        branches.append(
            (
                "diagnosis",
                select(
                    d.c.recorded_time.label("time"),
                    literal("diagnosis").label("kind"),
                    (d.c.institution_id + ":" + d.c.diagnosis_id).label("entry_id"),
                    d.c.institution_id,
                    d.c.icd10_code.label("code"),
                    d.c.display.label("display"),
                    no_value.label("value"),
                    no_text.label("unit"),
                    d.c.kind.label("status"),
                    d.c.event_id,
                    d.c.regional_patient_id.label("stored_patient_id"),
                ),
                [d.c.regional_patient_id.in_(ids)],
            )
        )
    if "alert" in kinds:
        branches.append(
            (
                "alert",
                select(
                    a.c.raised_time.label("time"),
                    literal("alert").label("kind"),
                    a.c.alert_id.label("entry_id"),
                    a.c.institution_id,
                    a.c.loinc_code.label("code"),
                    a.c.message.label("display"),
                    a.c.value.label("value"),
                    a.c.unit.label("unit"),
                    a.c.severity.label("status"),
                    a.c.alert_id.label("event_id"),
                    a.c.regional_patient_id.label("stored_patient_id"),
                ),
                [a.c.regional_patient_id.in_(ids)],
            )
        )
    return branches


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
        for _name, query, conditions in _branches(ids, chosen):
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

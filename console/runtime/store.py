"""What the console reads of the regional store: alerts as the queue shows them, a patient's summary
and lab trends, unprocessable results, and the figures of time to acknowledge. Read-only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, exists, func, literal, or_, select

from sinks.models import (
    LAB,
    RETRACTED_OBSERVATION,
    Alert,
    AlertAcknowledgement,
    AlertHistory,
    DeadLetterRow,
    Encounter,
    IdentifierLink,
    Observation,
    Patient,
    PatientName,
)
from sinks.queries import patient_ids

ALERTS = Alert.__table__
ACKS = AlertAcknowledgement.__table__
HISTORY = AlertHistory.__table__
PATIENTS = Patient.__table__
LINKS = IdentifierLink.__table__
OBSERVATIONS = Observation.__table__
ENCOUNTERS = Encounter.__table__
DEAD_LETTERS = DeadLetterRow.__table__
NAMES = PatientName.__table__


def aware(value: dt.datetime | None) -> dt.datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def _must(value: dt.datetime | None) -> dt.datetime:
    assert value is not None  # noqa: S101 - a NOT NULL column
    return aware(value)  # type: ignore[return-value]


@dataclass(frozen=True)
class AlertView:
    """An alert with what the queue shows beside it. `mrn` is the patient's MRN at the alert's own
    institution, `family_name` and `given_name` the name that institution sent for that MRN: the web
    layer shows them only to users of that institution (`access.sees_local_identity`)."""

    alert_id: str
    institution_id: str
    ward: str | None
    regional_patient_id: str
    birth_year: int | None
    sex: str | None
    mrn: str | None
    family_name: str | None
    given_name: str | None
    loinc_code: str
    analyte: str
    value: float
    value_comparator: str | None
    unit: str
    sent_value: float | None
    sent_unit: str | None
    sent_text: str | None
    limit_kind: str
    limit_value: float
    rule_source: str
    severity: str
    message: str
    previous_value: float | None
    previous_time: dt.datetime | None
    result_time: dt.datetime
    raised_time: dt.datetime
    deadline_time: dt.datetime
    escalation_level: int
    escalation_recipient: str | None
    next_deadline_time: dt.datetime | None
    acknowledged_time: dt.datetime | None
    acknowledged_by: str | None
    suppressed_repeats: int
    changed_time: dt.datetime | None
    action_noted: bool

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_time is not None

    @property
    def pending_deadline(self) -> dt.datetime | None:
        """When it escalates next unless acknowledged."""
        if self.acknowledged:
            return None
        return self.next_deadline_time or self.deadline_time


@dataclass(frozen=True)
class AckView:
    ack_id: str
    acknowledged_by: str
    role: str | None
    channel: str
    read_back: bool
    acknowledged_time: dt.datetime
    note: str | None


@dataclass(frozen=True)
class HistoryView:
    change: str
    status: str
    escalation_level: int
    recipient: str | None
    changed_time: dt.datetime
    acknowledged_by: str | None
    note: str | None


def _alert_select() -> Any:
    a, o = ALERTS, OBSERVATIONS
    mrn = (
        select(func.min(LINKS.c.patient_mrn))
        .where(
            LINKS.c.institution_id == a.c.institution_id,
            LINKS.c.regional_patient_id == a.c.regional_patient_id,
        )
        .correlate(a)  # to the alert row even when nested in the name's subquery (else: every alert)
        .scalar_subquery()
    )
    # the result as sent, by the alert's natural coordinates (indexed), not the version's event id
    sent = and_(
        o.c.regional_patient_id == a.c.regional_patient_id,
        o.c.loinc_code == a.c.loinc_code,
        o.c.effective_time == a.c.result_time,
        o.c.institution_id == a.c.institution_id,
        o.c.category == LAB,
    )

    def sent_column(column: Any) -> Any:
        return select(column).where(sent).order_by(o.c.ingested_time.desc()).limit(1).scalar_subquery()

    def name_column(column: Any) -> Any:
        """The name the alert's institution sent for the MRN shown."""
        return (
            select(column)
            .where(NAMES.c.institution_id == a.c.institution_id, NAMES.c.patient_mrn == mrn)
            .correlate(a)
            .scalar_subquery()
        )

    noted = exists(
        select(ACKS.c.ack_id).where(
            ACKS.c.alert_id == a.c.alert_id, ACKS.c.note.is_not(None), ACKS.c.note != ""
        )
    )
    return select(
        a,
        PATIENTS.c.birth_year,
        PATIENTS.c.sex,
        mrn.label("mrn"),
        name_column(NAMES.c.family_name).label("family_name"),
        name_column(NAMES.c.given_name).label("given_name"),
        sent_column(o.c.original_value).label("sent_value"),
        sent_column(o.c.original_unit).label("sent_unit"),
        sent_column(o.c.value_text).label("sent_text"),
        noted.label("action_noted"),
    ).select_from(a.outerjoin(PATIENTS, PATIENTS.c.regional_patient_id == a.c.regional_patient_id))


def _view(row: Any) -> AlertView:
    return AlertView(
        alert_id=row.alert_id,
        institution_id=row.institution_id,
        ward=row.ward,
        regional_patient_id=row.regional_patient_id,
        birth_year=row.birth_year,
        sex=row.sex,
        mrn=row.mrn,
        family_name=row.family_name,
        given_name=row.given_name,
        loinc_code=row.loinc_code,
        analyte=row.analyte,
        value=row.value,
        value_comparator=row.value_comparator,
        unit=row.unit,
        sent_value=row.sent_value,
        sent_unit=row.sent_unit,
        sent_text=row.sent_text,
        limit_kind=row.limit_kind,
        limit_value=row.limit_value,
        rule_source=row.rule_source,
        severity=row.severity,
        message=row.message,
        previous_value=row.previous_value,
        previous_time=aware(row.previous_time),
        result_time=_must(row.result_time),
        raised_time=_must(row.raised_time),
        deadline_time=_must(row.deadline_time),
        escalation_level=row.escalation_level or 0,
        escalation_recipient=row.escalation_recipient,
        next_deadline_time=aware(row.next_deadline_time),
        acknowledged_time=aware(row.acknowledged_time),
        acknowledged_by=row.acknowledged_by,
        suppressed_repeats=row.suppressed_repeats or 0,
        changed_time=aware(row.changed_time),
        action_noted=bool(row.action_noted),
    )


class ConsoleReads:
    """The console's queries over the regional store; each is one short read (call off the event loop)."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        return self._engine

    def alerts(
        self,
        *,
        institutions: Collection[str] | None = None,
        open_only: bool = True,
        since: dt.datetime | None = None,
        severities: Collection[str] | None = None,
        wards: Collection[str] | None = None,
        alert_ids: Collection[str] | None = None,
        regional_patient_ids: Collection[str] | None = None,
        acknowledged_by: str | None = None,
        acknowledged_since: dt.datetime | None = None,
        limit: int = 500,
    ) -> list[AlertView]:
        a = ALERTS
        conditions: list[Any] = []
        if acknowledged_by is not None:
            conditions.append(a.c.acknowledged_by == acknowledged_by)
        if acknowledged_since is not None:
            conditions.append(
                a.c.acknowledged_time >= literal(acknowledged_since, a.c.acknowledged_time.type)
            )
        if institutions is not None:
            conditions.append(a.c.institution_id.in_(sorted(institutions)))
        if open_only:
            conditions.append(a.c.acknowledged_time.is_(None))
        if since is not None:
            conditions.append(a.c.changed_time >= literal(since, a.c.changed_time.type))
        if severities:
            conditions.append(a.c.severity.in_(sorted(severities)))
        if wards:
            conditions.append(or_(a.c.ward.in_(sorted(wards)), a.c.ward.is_(None)))
        if alert_ids is not None:
            conditions.append(a.c.alert_id.in_(sorted(alert_ids)))
        if regional_patient_ids is not None:
            conditions.append(a.c.regional_patient_id.in_(sorted(regional_patient_ids)))
        order = [a.c.changed_time] if since is not None else [a.c.result_time, a.c.alert_id]
        with self._engine.connect() as connection:
            rows = connection.execute(_alert_select().where(*conditions).order_by(*order).limit(limit)).all()
        return [_view(row) for row in rows]

    def alert(self, alert_id: str) -> AlertView | None:
        found = self.alerts(open_only=False, alert_ids=[alert_id], limit=1)
        return found[0] if found else None

    def acknowledgements(self, alert_id: str) -> list[AckView]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(ACKS)
                .where(ACKS.c.alert_id == alert_id)
                .order_by(ACKS.c.acknowledged_time, ACKS.c.ack_id)
            ).all()
        return [
            AckView(
                ack_id=row.ack_id,
                acknowledged_by=row.acknowledged_by,
                role=row.role,
                channel=row.channel,
                read_back=bool(row.read_back),
                acknowledged_time=_must(row.acknowledged_time),
                note=row.note,
            )
            for row in rows
        ]

    def history(self, alert_id: str) -> list[HistoryView]:
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(HISTORY).where(HISTORY.c.alert_id == alert_id).order_by(HISTORY.c.changed_time)
            ).all()
        return [
            HistoryView(
                change=row.change,
                status=row.status,
                escalation_level=row.escalation_level,
                recipient=row.recipient,
                changed_time=_must(row.changed_time),
                acknowledged_by=row.acknowledged_by,
                note=row.note,
            )
            for row in rows
        ]

    def latest_change(self) -> dt.datetime | None:
        with self._engine.connect() as connection:
            return aware(connection.execute(select(func.max(ALERTS.c.changed_time))).scalar_one_or_none())

    # patients

    def patient_ids(self, regional_patient_id: str) -> tuple[str, list[str]]:
        with self._engine.connect() as connection:
            return patient_ids(connection, regional_patient_id)

    def known_at(self, regional_patient_id: str, institution_id: str) -> bool:
        """Whether the patient is one of the institution's: it holds an MRN for them or an encounter."""
        _, ids = self.patient_ids(regional_patient_id)
        with self._engine.connect() as connection:
            linked = connection.execute(
                select(LINKS.c.patient_mrn)
                .where(LINKS.c.institution_id == institution_id, LINKS.c.regional_patient_id.in_(ids))
                .limit(1)
            ).first()
            if linked:
                return True
            return (
                connection.execute(
                    select(ENCOUNTERS.c.encounter_id)
                    .where(
                        ENCOUNTERS.c.institution_id == institution_id,
                        ENCOUNTERS.c.regional_patient_id.in_(ids),
                    )
                    .limit(1)
                ).first()
                is not None
            )

    def find_by_mrn(self, institution_id: str, mrn: str) -> str | None:
        """The regional id the institution's MRN links to (only the institution's own users may ask)."""
        with self._engine.connect() as connection:
            return connection.execute(
                select(LINKS.c.regional_patient_id).where(
                    LINKS.c.institution_id == institution_id, LINKS.c.patient_mrn == mrn
                )
            ).scalar_one_or_none()

    def exists(self, regional_patient_id: str) -> bool:
        _, ids = self.patient_ids(regional_patient_id)
        with self._engine.connect() as connection:
            return any(
                connection.execute(select(column).where(column.in_(ids)).limit(1)).first()
                for column in (
                    PATIENTS.c.regional_patient_id,
                    LINKS.c.regional_patient_id,
                    OBSERVATIONS.c.regional_patient_id,
                    ALERTS.c.regional_patient_id,
                )
            )

    def patient_summary(self, regional_patient_id: str, institution_id: str | None) -> PatientSummary:
        canonical, ids = self.patient_ids(regional_patient_id)
        with self._engine.connect() as connection:
            demo = connection.execute(
                select(PATIENTS.c.birth_year, PATIENTS.c.sex)
                .where(PATIENTS.c.regional_patient_id.in_(ids))
                .order_by(PATIENTS.c.demographics_time.desc())
                .limit(1)
            ).first()
            institutions = sorted(
                set(
                    connection.execute(
                        select(LINKS.c.institution_id).where(LINKS.c.regional_patient_id.in_(ids)).distinct()
                    ).scalars()
                )
            )
            mrns: list[str] = []
            names: dict[str, PatientNameView] = {}
            if institution_id:
                mrns = sorted(
                    connection.execute(
                        select(LINKS.c.patient_mrn).where(
                            LINKS.c.institution_id == institution_id, LINKS.c.regional_patient_id.in_(ids)
                        )
                    ).scalars()
                )
                names = {
                    row.patient_mrn: PatientNameView(row.patient_mrn, row.family_name, row.given_name)
                    for row in connection.execute(
                        select(NAMES.c.patient_mrn, NAMES.c.family_name, NAMES.c.given_name).where(
                            NAMES.c.institution_id == institution_id, NAMES.c.patient_mrn.in_(mrns)
                        )
                    )
                }
        return PatientSummary(
            regional_patient_id=canonical,
            birth_year=demo.birth_year if demo else None,
            sex=demo.sex if demo else None,
            institutions=institutions,
            mrns_here=mrns,
            names_here=[names[mrn] for mrn in mrns if mrn in names],
        )

    def lab_series(self, regional_patient_id: str, per_analyte: int = 30) -> list[LabSeries]:
        """The latest results of each analyte (canonical unit), oldest first, for the trend plots."""
        _, ids = self.patient_ids(regional_patient_id)
        o = OBSERVATIONS
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(
                    o.c.loinc_code, o.c.analyte, o.c.unit, o.c.value, o.c.effective_time, o.c.institution_id
                )
                .where(
                    o.c.regional_patient_id.in_(ids),
                    o.c.category == LAB,
                    o.c.value.is_not(None),
                    o.c.loinc_code.is_not(None),
                    o.c.status.not_in(RETRACTED_OBSERVATION),
                )
                .order_by(o.c.loinc_code, o.c.effective_time.desc())
            ).all()
        series: dict[tuple[str, str | None], list[tuple[dt.datetime, float, str]]] = {}
        names: dict[tuple[str, str | None], str | None] = {}
        for row in rows:
            key = (row.loinc_code, row.unit)
            points = series.setdefault(key, [])
            names.setdefault(key, row.analyte)
            if len(points) < per_analyte:
                points.append((_must(row.effective_time), float(row.value), row.institution_id))
        return [
            LabSeries(
                loinc_code=loinc, unit=unit, analyte=names[(loinc, unit)], points=list(reversed(points))
            )
            for (loinc, unit), points in sorted(
                series.items(), key=lambda item: (names[item[0]] or "", item[0])
            )
        ]

    # unprocessable results

    def unprocessable(
        self, institution_id: str, *, before: dt.datetime | None = None, limit: int = 100
    ) -> list[Unprocessable]:
        d = DEAD_LETTERS
        conditions = [d.c.institution_id == institution_id]
        if before is not None:
            conditions.append(d.c.failed_time < literal(before, d.c.failed_time.type))
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(d).where(*conditions).order_by(d.c.failed_time.desc(), d.c.deadletter_id).limit(limit)
            ).all()
        return [
            Unprocessable(
                deadletter_id=row.deadletter_id,
                kind=row.kind,
                original_topic=row.original_topic,
                original_partition=row.original_partition,
                original_offset=row.original_offset,
                error_class=row.error_class,
                field=row.field,
                reason=row.reason,
                possibly_critical=bool(row.possibly_critical),
                loinc_code=row.loinc_code,
                processor=row.processor,
                correlation_id=row.correlation_id,
                failed_time=_must(row.failed_time),
            )
            for row in rows
        ]

    # figures

    def acknowledged_since(self, since: dt.datetime) -> list[tuple[str, str, float]]:
        """(institution, severity, minutes from result to acknowledgement) of alerts acknowledged since."""
        a = ALERTS
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(a.c.institution_id, a.c.severity, a.c.result_time, a.c.acknowledged_time).where(
                    a.c.acknowledged_time.is_not(None),
                    a.c.acknowledged_time >= literal(since, a.c.acknowledged_time.type),
                )
            ).all()
        return [
            (
                row.institution_id,
                row.severity,
                max(0.0, (_must(row.acknowledged_time) - _must(row.result_time)).total_seconds() / 60.0),
            )
            for row in rows
        ]

    def open_alerts(self) -> list[tuple[str, str, dt.datetime]]:
        """(institution, severity, result time) of every open alert."""
        a = ALERTS
        with self._engine.connect() as connection:
            rows = connection.execute(
                select(a.c.institution_id, a.c.severity, a.c.result_time).where(
                    a.c.acknowledged_time.is_(None)
                )
            ).all()
        return [(row.institution_id, row.severity, _must(row.result_time)) for row in rows]


@dataclass(frozen=True)
class PatientNameView:
    """The name an institution sent for one of its MRNs."""

    mrn: str
    family_name: str | None
    given_name: str | None


@dataclass(frozen=True)
class PatientSummary:
    regional_patient_id: str
    birth_year: int | None
    sex: str | None
    institutions: list[str]
    mrns_here: list[str]  # at the viewer's institution
    names_here: list[PatientNameView]  # the names it sent for them (not every MRN has one)


@dataclass(frozen=True)
class LabSeries:
    loinc_code: str
    unit: str | None
    analyte: str | None
    points: list[tuple[dt.datetime, float, str]]  # (time, value, institution), oldest first


@dataclass(frozen=True)
class Unprocessable:
    deadletter_id: str
    kind: str | None
    original_topic: str
    original_partition: int
    original_offset: int
    error_class: str
    field: str | None
    reason: str
    possibly_critical: bool
    loinc_code: str | None
    processor: str
    correlation_id: str | None
    failed_time: dt.datetime

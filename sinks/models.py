"""SQLAlchemy 2 models of the regional store. No raw national identifier is ever stored.

A patient's name is stored per institution, only in `patient_names`: the name an institution sent for
its own MRN, which the console shows only to that institution's users, beside that MRN. No other table
holds a name (the clinical rows, alerts, escalations, dead letters and notifications carry the
pseudonymous regional id), and the name is never in a log line or a metric label.

Versioned tables (observations, encounters, medication_orders, diagnoses) keep one row per natural key:
the version with the latest (event_time, event_id) wins, whatever order deliveries arrive in. All times
are stored as UTC instants (SQLite keeps them as naive UTC text, which sorts chronologically).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UnicodeText,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, synonym

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

LAB = "laboratory"
VITAL_SIGNS = "vital-signs"
# Observation statuses that take a row out of timelines and latest values.
RETRACTED_OBSERVATION = ("cancelled", "superseded")
RETRACTED_MEDICATION = ("CANCELLED", "ENTERED_IN_ERROR")
CANCELLED_ENCOUNTER = "cancelled"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


UtcDateTime = DateTime(timezone=True)


class Patient(Base):
    """A regional patient: the pseudonymous id and coarse demographics only."""

    __tablename__ = "patients"

    regional_patient_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    birth_year: Mapped[int | None] = mapped_column(Integer)
    sex: Mapped[str | None] = mapped_column(String(16))
    demographics_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)  # event time they came from
    created_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class IdentifierLink(Base):
    """A local MRN at an institution belongs to a regional patient id (latest link wins)."""

    __tablename__ = "identifier_links"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    patient_mrn: Mapped[str] = mapped_column(String(64), primary_key=True)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    linked_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id"),)


class PatientName(Base):
    """The patient's name as an institution wrote it, for its MRN: from the newest event (by event time,
    then event id) that carried a name, so an older event arriving late never overwrites a newer name.
    Both parts come from that one event (a name sent without a given name has none). Shown only to users
    of that institution, where its MRN is shown; never in an alert, a notification, a log line or a metric
    label. `regional_patient_id` is the one that event resolved to."""

    __tablename__ = "patient_names"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    patient_mrn: Mapped[str] = mapped_column(String(64), primary_key=True)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    family_name: Mapped[str | None] = mapped_column(UnicodeText)
    given_name: Mapped[str | None] = mapped_column(UnicodeText)
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)  # of the event the name came from
    event_id: Mapped[str] = mapped_column(String(36))
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id"),)


class PatientAlias(Base):
    """An older regional id that now resolves to another one; always points at a canonical id (one hop)."""

    __tablename__ = "patient_aliases"

    alias_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    linked_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id"),)


class IngestLog(Base):
    """Every event id the store has taken (clinical envelope ids, escalation ids, acknowledgement ids)."""

    __tablename__ = "ingest_log"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    institution_id: Mapped[str | None] = mapped_column(String(32))
    event_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class Observation(Base):
    """One lab result, or one measurement of a vital-signs set, at its latest version.

    Natural key: (institution, category, result id, component); for labs `result_id` is the result id
    and `component` is empty, for vitals `result_id` is the set's observation id and `component` the
    measurement's local code.
    """

    __tablename__ = "observations"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    category: Mapped[str] = mapped_column(String(16), primary_key=True)
    result_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    component: Mapped[str] = mapped_column(String(64), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    source_system: Mapped[str] = mapped_column(String(64))
    correlation_id: Mapped[str | None] = mapped_column(String(64))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    encounter_id: Mapped[str | None] = mapped_column(String(128))
    local_code: Mapped[str] = mapped_column(String(64))
    loinc_code: Mapped[str | None] = mapped_column(String(16))
    analyte: Mapped[str | None] = mapped_column(Text)
    value: Mapped[float | None] = mapped_column(Float)
    value_comparator: Mapped[str | None] = mapped_column(String(2))  # <, <=, >=, >: value is a bound
    unit: Mapped[str | None] = mapped_column(String(32))
    original_value: Mapped[float | None] = mapped_column(Float)
    original_unit: Mapped[str | None] = mapped_column(String(32))
    value_text: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    abnormal_flag: Mapped[str | None] = mapped_column(String(8))
    flags: Mapped[str] = mapped_column(String(256), default="")
    effective_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)  # result released / measured
    specimen_collected_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    device_id: Mapped[str | None] = mapped_column(String(64))
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)  # when this version was stored

    result_time = synonym("effective_time")  # the 0001 name, still used by the demo

    __table_args__ = (
        Index(None, "regional_patient_id", "effective_time"),
        Index(None, "regional_patient_id", "loinc_code", "effective_time"),
    )


class Encounter(Base):
    """An encounter's current state, derived from its ADT history (encounter_events), so it is the same
    whatever order the events arrive in: each field comes from the latest event (by event time, then
    event id) that carries it; UPDATE and UNKNOWN events do not change the status."""

    __tablename__ = "encounters"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    encounter_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    encounter_class: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    last_event_type: Mapped[str] = mapped_column(String(16))
    ward: Mapped[str | None] = mapped_column(String(64))
    bed: Mapped[str | None] = mapped_column(String(64))
    attending_clinician: Mapped[str | None] = mapped_column(String(64))
    occurred_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    admit_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    discharge_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id"),)


class EncounterEvent(Base):
    """Every ADT event as received (history of the encounters table)."""

    __tablename__ = "encounter_events"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(32))
    encounter_id: Mapped[str] = mapped_column(String(128))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(16))
    encounter_class: Mapped[str] = mapped_column(String(16))
    ward: Mapped[str | None] = mapped_column(String(64))
    bed: Mapped[str | None] = mapped_column(String(64))
    prior_ward: Mapped[str | None] = mapped_column(String(64))
    prior_bed: Mapped[str | None] = mapped_column(String(64))
    attending_clinician: Mapped[str | None] = mapped_column(String(64))
    occurred_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    admit_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    discharge_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index(None, "regional_patient_id", "occurred_time"),
        Index(None, "institution_id", "encounter_id"),
    )


class MedicationOrder(Base):
    __tablename__ = "medication_orders"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    encounter_id: Mapped[str | None] = mapped_column(String(128))
    drug_code: Mapped[str] = mapped_column(String(64))
    drug_code_system: Mapped[str | None] = mapped_column(String(64))
    drug_display: Mapped[str | None] = mapped_column(Text)
    regional_drug_code: Mapped[str | None] = mapped_column(String(64))
    dose_value: Mapped[float | None] = mapped_column(Float)
    dose_unit: Mapped[str | None] = mapped_column(String(32))
    route: Mapped[str | None] = mapped_column(String(32))
    frequency: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(24))
    ordered_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    start_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    end_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    prescriber: Mapped[str | None] = mapped_column(String(64))
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id", "ordered_time"),)


class Diagnosis(Base):
    __tablename__ = "diagnoses"

    institution_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    diagnosis_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    event_id: Mapped[str] = mapped_column(String(36))
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    encounter_id: Mapped[str | None] = mapped_column(String(128))
    icd10_code: Mapped[str] = mapped_column(String(16))
    code_system: Mapped[str] = mapped_column(String(16))
    display: Mapped[str | None] = mapped_column(Text)
    kind: Mapped[str] = mapped_column(String(16))
    recorded_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    clinician: Mapped[str | None] = mapped_column(String(64))
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id", "recorded_time"),)


class Alert(Base):
    """A critical-value alert as published on the alerts topic, with its escalation and acknowledgement;
    its suppressed repeats are the highest its state changes (alert_history) or its record carried."""

    __tablename__ = "alerts"

    alert_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source_event_id: Mapped[str] = mapped_column(String(36))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    institution_id: Mapped[str] = mapped_column(String(32))
    loinc_code: Mapped[str] = mapped_column(String(16))
    analyte: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    value_comparator: Mapped[str | None] = mapped_column(String(2))  # <, <=, >=, >: value is a bound
    unit: Mapped[str] = mapped_column(String(32))
    limit_kind: Mapped[str] = mapped_column(String(8))
    limit_value: Mapped[float] = mapped_column(Float)
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    rule_source: Mapped[str] = mapped_column(Text)
    correlation_id: Mapped[str] = mapped_column(String(64))
    result_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    raised_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    deadline_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ward: Mapped[str | None] = mapped_column(String(64))
    previous_value: Mapped[float | None] = mapped_column(Float)
    previous_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    suppressed_repeats: Mapped[int] = mapped_column(Integer, server_default="0")
    escalation_level: Mapped[int] = mapped_column(Integer, server_default="0")
    escalated_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    escalation_recipient: Mapped[str | None] = mapped_column(String(128))
    next_deadline_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    acknowledged_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    ack_channel: Mapped[str | None] = mapped_column(String(16))
    # When the store last wrote this row (raised, escalated, acknowledged, repeated): the console's live
    # feed reads the rows changed since a client's last event by it. Null for rows stored before 0005.
    changed_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "regional_patient_id", "raised_time"), Index(None, "changed_time"))


class AlertHistory(Base):
    """One state change of an alert (an AlertState record from alerts.state): the alert after it was
    opened, repeated, noted, escalated or acknowledged. One row per state id, so a replay adds none."""

    __tablename__ = "alert_history"

    state_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(36))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    institution_id: Mapped[str] = mapped_column(String(32))
    change: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    suppressed_repeats: Mapped[int] = mapped_column(Integer)
    escalation_level: Mapped[int] = mapped_column(Integer)
    recipient: Mapped[str | None] = mapped_column(String(128))
    next_deadline_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64))
    acknowledged_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    note: Mapped[str | None] = mapped_column(Text)
    changed_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    correlation_id: Mapped[str | None] = mapped_column(String(64))
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "alert_id", "changed_time"),)


class AlertEscalation(Base):
    __tablename__ = "alert_escalations"

    escalation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(36))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    institution_id: Mapped[str] = mapped_column(String(32))
    level: Mapped[int] = mapped_column(Integer)
    recipient: Mapped[str] = mapped_column(String(128))
    severity: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    escalated_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    next_deadline_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "alert_id"),)


class AlertAcknowledgement(Base):
    __tablename__ = "alert_acknowledgements"

    ack_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    alert_id: Mapped[str] = mapped_column(String(36))
    regional_patient_id: Mapped[str | None] = mapped_column(String(40))
    acknowledged_by: Mapped[str] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(16))
    read_back: Mapped[bool] = mapped_column(Boolean)
    acknowledged_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    note: Mapped[str | None] = mapped_column(Text)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "alert_id"),)


class DeadLetterRow(Base):
    """A rejected message as the dead-letter topic carries it, without its bytes (they stay on Kafka to be
    fixed and replayed): what the institution's integration staff see as "unprocessable". Written by the
    store stage, one row per dead-letter id (insert-or-ignore), its text cut to the column sizes."""

    __tablename__ = "dead_letters"

    deadletter_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    original_topic: Mapped[str] = mapped_column(String(255))
    original_partition: Mapped[int] = mapped_column(Integer)
    original_offset: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str | None] = mapped_column(String(16))  # of a raw.<institution>.<kind> or norm.<kind> topic
    error_class: Mapped[str] = mapped_column(String(128))
    field: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    institution_id: Mapped[str | None] = mapped_column(String(32))
    correlation_id: Mapped[str | None] = mapped_column(String(64))
    processor: Mapped[str] = mapped_column(String(64))
    possibly_critical: Mapped[bool] = mapped_column(Boolean, server_default="0")
    loinc_code: Mapped[str | None] = mapped_column(String(16))
    failed_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (Index(None, "institution_id", "failed_time"),)


# The console's own tables: accounts, sessions, the audit log and notification deliveries. None holds
# clinical data; the audit log is append-only (triggers refuse UPDATE and DELETE, migration 0005).

CLINICIAN, INTEGRATION, OPERATOR, ADMIN = "clinician", "integration", "operator", "admin"
ROLES = (CLINICIAN, INTEGRATION, OPERATOR, ADMIN)


class ConsoleUser(Base):
    """A console account. `chain_level` is the user's place in the escalation chain of `wards` (0: the
    responsible clinician, 1: attending physician, ...); `wards` empty means every ward of the institution."""

    __tablename__ = "console_users"

    username: Mapped[str] = mapped_column(String(64), primary_key=True)
    display_name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    institution_id: Mapped[str | None] = mapped_column(String(32))
    wards: Mapped[str] = mapped_column(Text, server_default="")  # comma-separated
    chain_level: Mapped[int | None] = mapped_column(Integer)
    password_hash: Mapped[str] = mapped_column(Text)
    disabled: Mapped[bool] = mapped_column(Boolean, server_default="0")
    created_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    changed_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)


class ConsoleSession(Base):
    """A login (kind "browser", cookie) or an API token (kind "api", bearer). Only a hash of the secret
    is kept, so a copy of the table logs nobody in."""

    __tablename__ = "console_sessions"

    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    expires_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    last_seen_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    remote_addr: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "username"),)


class AuditEntry(Base):
    """Who did or tried what, to which patient or alert, when and from where. Append-only."""

    __tablename__ = "audit_log"

    audit_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    username: Mapped[str | None] = mapped_column(String(64))
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))  # ok, denied, failed
    regional_patient_id: Mapped[str | None] = mapped_column(String(40))
    alert_id: Mapped[str | None] = mapped_column(String(36))
    institution_id: Mapped[str | None] = mapped_column(String(32))
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "time"), Index(None, "username", "time"))


class NotificationDelivery(Base):
    """One alert or escalation to send on one channel: pending until delivered or given up."""

    __tablename__ = "notification_deliveries"

    delivery_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    channel: Mapped[str] = mapped_column(String(64))
    channel_kind: Mapped[str] = mapped_column(String(16))  # webhook, email
    alert_id: Mapped[str] = mapped_column(String(36))
    institution_id: Mapped[str] = mapped_column(String(32))
    ward: Mapped[str | None] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))
    event: Mapped[str] = mapped_column(String(16))  # alert, escalation
    payload: Mapped[str] = mapped_column(Text)  # JSON: regional id and result only, never a name
    status: Mapped[str] = mapped_column(String(16))  # pending, delivered, failed
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    next_attempt_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    created_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    delivered_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "status", "next_attempt_time"), Index(None, "alert_id"))


class NotificationAttempt(Base):
    """Each try of a delivery, kept: the console shows failures, the metrics count them."""

    __tablename__ = "notification_attempts"

    attempt_id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(String(36))
    channel: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    outcome: Mapped[str] = mapped_column(String(16))  # delivered, failed
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float] = mapped_column(Float)

    __table_args__ = (Index(None, "delivery_id"), Index(None, "time"))


# Tables the console writes and the store stage never does: no write policy, no converter fills them
# (sinks.sql.WRITE_POLICIES covers every other table).
CONSOLE_TABLES: tuple[str, ...] = tuple(
    model.__tablename__
    for model in (ConsoleUser, ConsoleSession, AuditEntry, NotificationDelivery, NotificationAttempt)
)

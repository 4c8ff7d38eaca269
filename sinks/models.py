"""SQLAlchemy 2 models of the regional store. No raw national identifier is ever stored."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import DateTime, Float, Index, MetaData, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


UtcDateTime = DateTime(timezone=True)


class Observation(Base):
    """A lab result (later also vitals) after normalisation; one row per source event."""

    __tablename__ = "observations"

    event_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    institution_id: Mapped[str] = mapped_column(String(32))
    source_system: Mapped[str] = mapped_column(String(64))
    result_id: Mapped[str] = mapped_column(String(128))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    encounter_id: Mapped[str | None] = mapped_column(String(128))
    local_code: Mapped[str] = mapped_column(String(64))
    loinc_code: Mapped[str | None] = mapped_column(String(16))
    analyte: Mapped[str | None] = mapped_column(String(128))
    value: Mapped[float | None] = mapped_column(Float)
    unit: Mapped[str | None] = mapped_column(String(32))
    original_value: Mapped[float | None] = mapped_column(Float)
    original_unit: Mapped[str | None] = mapped_column(String(32))
    value_text: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    abnormal_flag: Mapped[str | None] = mapped_column(String(8))
    flags: Mapped[str] = mapped_column(String(128), default="")
    result_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    event_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)
    specimen_collected_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)
    ingested_time: Mapped[dt.datetime] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index(None, "regional_patient_id", "result_time"),
        Index(None, "institution_id", "result_id"),
    )


class Alert(Base):
    """A critical-value alert; also the outbox from which alerts are published to Kafka."""

    __tablename__ = "alerts"

    alert_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    source_event_id: Mapped[str] = mapped_column(String(36))
    regional_patient_id: Mapped[str] = mapped_column(String(40))
    institution_id: Mapped[str] = mapped_column(String(32))
    loinc_code: Mapped[str] = mapped_column(String(16))
    analyte: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
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
    published_time: Mapped[dt.datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        Index(None, "regional_patient_id", "raised_time"),
        Index(None, "published_time"),
    )

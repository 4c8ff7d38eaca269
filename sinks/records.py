"""Decoded records of the regional standard -> rows of the store's tables. Pure functions, no database.

Anything wrong with a record raises StoreRejectedError naming the kind and field, before any SQL runs,
so `write_records_isolating` can isolate it like a record the database refused.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.contract import topic_kind
from sinks.base import KINDS, StoreRecord
from sinks.exceptions import StoreRejectedError
from sinks.models import LAB, VITAL_SIGNS, DeadLetterRow

Row = dict[str, Any]

# HL7 ADT event -> encounter status (FHIR Encounter.status); UPDATE and UNKNOWN leave the status as it is.
ENCOUNTER_STATUS = {
    "ADMIT": "in-progress",
    "TRANSFER": "in-progress",
    "DISCHARGE": "finished",
    "REGISTER": "arrived",
    "CANCEL": "cancelled",
}
STATUS_KEEPING_EVENTS = ("UPDATE", "UNKNOWN")


@dataclass
class Prepared:
    """One record turned into rows; `log_id` is its idempotency key in ingest_log (None: not logged)."""

    index: int
    kind: str
    time: dt.datetime  # the record's own time (event time, raised, escalated, acknowledged, linked)
    log_id: str | None = None
    log: Row | None = None
    rows: dict[str, list[Row]] = field(default_factory=dict)  # table name -> rows
    patient: Row | None = None


Converter = Callable[[int, Mapping[str, Any], dt.datetime], Prepared]
# Record kind -> the function that turns its records into rows; filled by @converts below.
CONVERTERS: dict[str, Converter] = {}


def converts(kind: str) -> Callable[[Converter], Converter]:
    """Register the converter of one kind of stored record, so no list of kinds is kept by hand."""

    def register(converter: Converter) -> Converter:
        if kind in CONVERTERS:
            raise ValueError(
                f"two converters for {kind!r}: {CONVERTERS[kind].__name__} and {converter.__name__}"
            )
        CONVERTERS[kind] = converter
        return converter

    return register


def check_converters() -> None:
    """Every kind the store keeps (core.contract.STORED_RECORDS) has a converter, and nothing else has:
    a kind added to the contract without one fails where the sink is built, not on its first record."""
    missing, unknown = set(KINDS) - set(CONVERTERS), set(CONVERTERS) - set(KINDS)
    if missing or unknown:
        raise LookupError(
            f"store converters do not match the stored records: missing {sorted(missing)}, "
            f"not a stored record {sorted(unknown)}"
        )


class _Refused(Exception):
    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field_name = field_name
        self.reason = reason


def _get(record: Mapping[str, Any], name: str) -> Any:
    try:
        value = record[name]
    except KeyError:
        raise _Refused(name, "missing") from None
    if value is None:
        raise _Refused(name, "must not be null")
    return value


def _text(record: Mapping[str, Any], name: str) -> str:
    value = _get(record, name)
    if value.__class__ is str and value.strip():  # the usual case first, without the generic checks
        return value
    if not isinstance(value, str) or not value.strip():
        raise _Refused(name, f"expected a non-empty string, got {value!r}")
    return value


def _optional_text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None or value.__class__ is str:
        return value
    if not isinstance(value, str):
        raise _Refused(name, f"expected a string, got {type(value).__name__}")
    return value


def _number(value: Any, name: str) -> float | None:
    if value is None or value.__class__ is float:
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refused(name, f"expected a number, got {value!r}")
    return float(value)


def utc(value: Any, name: str) -> dt.datetime:
    """An aware datetime as UTC; naive or non-datetime values are refused (the standard carries instants)."""
    if value.__class__ is dt.datetime and value.tzinfo is dt.UTC:  # as fastavro decodes them: as it is
        return value
    if not isinstance(value, dt.datetime):
        raise _Refused(name, f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise _Refused(name, "time has no time zone; the standard carries UTC instants")
    return value.astimezone(dt.UTC)


def _time(record: Mapping[str, Any], name: str) -> dt.datetime:
    return utc(_get(record, name), name)


def _optional_time(record: Mapping[str, Any], name: str) -> dt.datetime | None:
    value = record.get(name)
    return None if value is None else utc(value, name)


def uuid_text(value: Any, name: str) -> str:
    """Canonical lower-case text of a UUID given as uuid.UUID or text."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise _Refused(name, f"expected a UUID, got {value!r}")


def _patient_id(record: Mapping[str, Any]) -> str:
    if record.get("patient_national_id"):
        raise _Refused("patient_national_id", "the store never takes a national identifier; drop it first")
    return _text(record, "regional_patient_id")


def _enum(value: Any) -> str:
    """fastavro decodes enums to their symbol (str); accept objects with a .name too."""
    return str(getattr(value, "name", value))


class _Envelope:
    def __init__(self, record: Mapping[str, Any]) -> None:
        envelope = _get(record, "envelope")
        if not isinstance(envelope, Mapping):
            raise _Refused("envelope", "expected a record")
        try:
            self.event_id = uuid_text(_get(envelope, "event_id"), "event_id")
            self.institution_id = _text(envelope, "institution_id")
            self.source_system = _text(envelope, "source_system")
            self.event_time = _time(envelope, "event_time")
            self.correlation_id = _optional_text(envelope, "correlation_id")
        except _Refused as exc:
            raise _Refused(f"envelope.{exc.field_name}", exc.reason) from None

    def log_row(self, kind: str, now: dt.datetime) -> Row:
        return {
            "event_id": self.event_id,
            "kind": kind,
            "institution_id": self.institution_id,
            "event_time": self.event_time,
            "ingested_time": now,
        }


def _clinical(
    index: int, kind: str, record: Mapping[str, Any], now: dt.datetime
) -> tuple[Prepared, _Envelope]:
    envelope = _Envelope(record)
    patient_id = _patient_id(record)
    birth_year = record.get("patient_birth_year")
    if birth_year is not None and (isinstance(birth_year, bool) or not isinstance(birth_year, int)):
        raise _Refused("patient_birth_year", f"expected an int, got {birth_year!r}")
    prepared = Prepared(
        index=index,
        kind=kind,
        time=envelope.event_time,
        log_id=envelope.event_id,
        log=envelope.log_row(kind, now),
        patient={
            "regional_patient_id": patient_id,
            "birth_year": birth_year,
            "sex": _optional_text(record, "patient_sex"),
            "demographics_time": envelope.event_time,
            "created_time": now,
        },
    )
    name = _patient_name(record, envelope, patient_id, now)
    if name is not None:
        prepared.rows["patient_names"] = [name]
    return prepared, envelope


def _patient_name(
    record: Mapping[str, Any], envelope: _Envelope, patient_id: str, now: dt.datetime
) -> Row | None:
    """The patient_names row of an event that carries a name (either part), as sent; None otherwise.
    A refusal names the field, never its value."""
    family = _optional_text(record, "patient_family_name")
    given = _optional_text(record, "patient_given_name")
    if not family and not given:
        return None
    return {
        "institution_id": envelope.institution_id,
        "patient_mrn": _text(record, "patient_mrn").strip(),
        "regional_patient_id": patient_id,
        "family_name": family,
        "given_name": given,
        "event_time": envelope.event_time,
        "event_id": envelope.event_id,
        "ingested_time": now,
    }


def _observation(envelope: _Envelope, patient_id: str, now: dt.datetime) -> Row:
    return {
        "institution_id": envelope.institution_id,
        "event_id": envelope.event_id,
        "event_time": envelope.event_time,
        "source_system": envelope.source_system,
        "correlation_id": envelope.correlation_id,
        "regional_patient_id": patient_id,
        "ingested_time": now,
    }


@converts("lab")
def _lab(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    prepared, envelope = _clinical(index, "lab", record, now)
    assert prepared.patient is not None  # noqa: S101 - set by _clinical
    flags = record.get("normalisation_flags") or ()
    prepared.rows["observations"] = [
        {
            **_observation(envelope, prepared.patient["regional_patient_id"], now),
            "category": LAB,
            "result_id": _text(record, "result_id"),
            "component": "",
            "encounter_id": _optional_text(record, "encounter_id"),
            "local_code": _text(record, "local_code").strip(),
            "loinc_code": _optional_text(record, "loinc_code"),
            "analyte": _optional_text(record, "local_display"),
            "value": _number(record.get("canonical_value"), "canonical_value"),
            "value_comparator": _comparator(record),
            "unit": _optional_text(record, "canonical_unit"),
            "original_value": _number(record.get("value_numeric"), "value_numeric"),
            "original_unit": _optional_text(record, "unit"),
            "value_text": _optional_text(record, "value_text"),
            "status": _enum(record.get("status") or "final"),
            "abnormal_flag": _optional_text(record, "abnormal_flag"),
            "flags": ",".join(map(str, flags)),
            "effective_time": _time(record, "result_time"),
            "specimen_collected_time": _optional_time(record, "specimen_collected_time"),
            "device_id": None,
        }
    ]
    return prepared


@converts("vitals")
def _vitals(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    prepared, envelope = _clinical(index, "vitals", record, now)
    assert prepared.patient is not None  # noqa: S101 - set by _clinical
    observation_id = _text(record, "observation_id")
    measurements = _get(record, "measurements")
    if not measurements:
        raise _Refused("measurements", "a vital-signs set needs at least one measurement")
    common = {
        **_observation(envelope, prepared.patient["regional_patient_id"], now),
        "category": VITAL_SIGNS,
        "result_id": observation_id,
        "encounter_id": _optional_text(record, "encounter_id"),
        "analyte": None,
        "value_text": None,
        "status": _enum(record.get("status") or "final"),
        "abnormal_flag": None,
        "flags": "",
        "effective_time": _time(record, "measured_time"),
        "specimen_collected_time": None,
        "device_id": _optional_text(record, "device_id"),
    }
    by_code: dict[str, Row] = {}
    for position, measurement in enumerate(measurements):
        try:
            code = _text(measurement, "local_code").strip()
            value = _number(_get(measurement, "value"), "value")
            unit = _optional_text(measurement, "unit")
            by_code[code] = {
                **common,
                "component": code,
                "local_code": code,
                "loinc_code": _optional_text(measurement, "loinc_code"),
                "value": value,
                "value_comparator": None,
                "unit": unit,
                "original_value": value,
                "original_unit": unit,
            }
        except _Refused as exc:
            raise _Refused(f"measurements[{position}].{exc.field_name}", exc.reason) from None
    prepared.rows["observations"] = list(by_code.values())
    return prepared


@converts("encounter")
def _encounter(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    prepared, envelope = _clinical(index, "encounter", record, now)
    assert prepared.patient is not None  # noqa: S101 - set by _clinical
    patient_id = prepared.patient["regional_patient_id"]
    encounter_id = _text(record, "encounter_id")
    event_type = _enum(_get(record, "event_type"))
    encounter_class = _enum(record.get("encounter_class") or "UNKNOWN")
    occurred = _time(record, "occurred_time")
    ward, bed = _optional_text(record, "ward"), _optional_text(record, "bed")
    attending = _optional_text(record, "attending_clinician")
    admit, discharge = _optional_time(record, "admit_time"), _optional_time(record, "discharge_time")
    prepared.rows["encounter_events"] = [
        {
            "event_id": envelope.event_id,
            "institution_id": envelope.institution_id,
            "encounter_id": encounter_id,
            "regional_patient_id": patient_id,
            "event_type": event_type,
            "encounter_class": encounter_class,
            "ward": ward,
            "bed": bed,
            "prior_ward": _optional_text(record, "prior_ward"),
            "prior_bed": _optional_text(record, "prior_bed"),
            "attending_clinician": attending,
            "occurred_time": occurred,
            "admit_time": admit,
            "discharge_time": discharge,
            "event_time": envelope.event_time,
            "ingested_time": now,
        }
    ]
    prepared.rows["encounters"] = [
        {
            "institution_id": envelope.institution_id,
            "encounter_id": encounter_id,
            "event_id": envelope.event_id,
            "event_time": envelope.event_time,
            "regional_patient_id": patient_id,
            "encounter_class": encounter_class,
            "status": ENCOUNTER_STATUS.get(event_type, "unknown"),
            "last_event_type": event_type,
            "ward": ward,
            "bed": bed,
            "attending_clinician": attending,
            "occurred_time": occurred,
            "admit_time": admit,
            "discharge_time": discharge,
            "ingested_time": now,
        }
    ]
    return prepared


@converts("medication")
def _medication(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    prepared, envelope = _clinical(index, "medication", record, now)
    assert prepared.patient is not None  # noqa: S101 - set by _clinical
    prepared.rows["medication_orders"] = [
        {
            "institution_id": envelope.institution_id,
            "order_id": _text(record, "order_id"),
            "event_id": envelope.event_id,
            "event_time": envelope.event_time,
            "regional_patient_id": prepared.patient["regional_patient_id"],
            "encounter_id": _optional_text(record, "encounter_id"),
            "drug_code": _text(record, "drug_code"),
            "drug_code_system": _optional_text(record, "drug_code_system"),
            "drug_display": _optional_text(record, "drug_display"),
            "regional_drug_code": _optional_text(record, "regional_drug_code"),
            "dose_value": _number(record.get("dose_value"), "dose_value"),
            "dose_unit": _optional_text(record, "dose_unit"),
            "route": _optional_text(record, "route"),
            "frequency": _optional_text(record, "frequency"),
            "status": _enum(record.get("status") or "UNKNOWN"),
            "ordered_time": _time(record, "ordered_time"),
            "start_time": _optional_time(record, "start_time"),
            "end_time": _optional_time(record, "end_time"),
            "prescriber": _optional_text(record, "prescriber"),
            "ingested_time": now,
        }
    ]
    return prepared


@converts("diagnosis")
def _diagnosis(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    prepared, envelope = _clinical(index, "diagnosis", record, now)
    assert prepared.patient is not None  # noqa: S101 - set by _clinical
    prepared.rows["diagnoses"] = [
        {
            "institution_id": envelope.institution_id,
            "diagnosis_id": _text(record, "diagnosis_id"),
            "event_id": envelope.event_id,
            "event_time": envelope.event_time,
            "regional_patient_id": prepared.patient["regional_patient_id"],
            "encounter_id": _optional_text(record, "encounter_id"),
            "icd10_code": _text(record, "icd10_code"),
            "code_system": _optional_text(record, "code_system") or "ICD-10",
            "display": _optional_text(record, "display"),
            "kind": _enum(record.get("kind") or "UNKNOWN"),
            "recorded_time": _time(record, "recorded_time"),
            "clinician": _optional_text(record, "clinician"),
            "ingested_time": now,
        }
    ]
    return prepared


ALERT_STATUSES = ("OPEN", "ACKNOWLEDGED")
ALERT_CHANGES = ("OPENED", "REPEAT", "NOTE", "ESCALATED", "ACKNOWLEDGED", "OTHER")


def _count(record: Mapping[str, Any], name: str) -> int:
    value = record.get(name) or 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refused(name, f"expected a count, got {value!r}")
    return value


def _symbol(record: Mapping[str, Any], name: str, symbols: tuple[str, ...]) -> str:
    value = _enum(_get(record, name))
    if value not in symbols:
        raise _Refused(name, f"expected one of {', '.join(symbols)}, got {value!r}")
    return value


def _comparator(record: Mapping[str, Any]) -> str | None:
    comparator = _optional_text(record, "value_comparator")
    if comparator not in (None, "<", "<=", ">=", ">"):
        raise _Refused("value_comparator", f"expected <, <=, >= or >, got {comparator!r}")
    return comparator


@converts("alert")
def _alert(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    """A raised alert; `changed_time` is when the store wrote it, by which the console's feed finds it."""
    raised = _time(record, "raised_time")
    repeats = _count(record, "suppressed_repeats")
    row = {
        "alert_id": uuid_text(_get(record, "alert_id"), "alert_id"),
        "source_event_id": uuid_text(_get(record, "source_event_id"), "source_event_id"),
        "regional_patient_id": _text(record, "regional_patient_id"),
        "institution_id": _text(record, "institution_id"),
        "loinc_code": _text(record, "loinc_code"),
        "analyte": _text(record, "analyte"),
        "value": _number(_get(record, "value"), "value"),
        "value_comparator": _comparator(record),
        "unit": _text(record, "unit"),
        "limit_kind": _enum(_get(record, "limit_kind")),
        "limit_value": _number(_get(record, "limit_value"), "limit_value"),
        "severity": _enum(_get(record, "severity")),
        "message": _text(record, "message"),
        "rule_source": _text(record, "rule_source"),
        "correlation_id": _text(record, "correlation_id"),
        "result_time": _time(record, "result_time"),
        "raised_time": raised,
        "deadline_time": _time(record, "deadline_time"),
        "ward": _optional_text(record, "ward"),
        "previous_value": _number(record.get("previous_value"), "previous_value"),
        "previous_time": _optional_time(record, "previous_time"),
        "suppressed_repeats": repeats,
        "escalation_level": 0,
        "changed_time": now,
    }
    return Prepared(index=index, kind="alert", time=raised, rows={"alerts": [row]})


@converts("escalation")
def _escalation(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    escalated = _time(record, "escalated_time")
    level = _get(record, "level")
    if isinstance(level, bool) or not isinstance(level, int):
        raise _Refused("level", f"expected an int, got {level!r}")
    escalation_id = uuid_text(_get(record, "escalation_id"), "escalation_id")
    institution = _text(record, "institution_id")
    row = {
        "escalation_id": escalation_id,
        "alert_id": uuid_text(_get(record, "alert_id"), "alert_id"),
        "regional_patient_id": _text(record, "regional_patient_id"),
        "institution_id": institution,
        "level": level,
        "recipient": _text(record, "recipient"),
        "severity": _enum(_get(record, "severity")),
        "message": _text(record, "message"),
        "escalated_time": escalated,
        "next_deadline_time": _time(record, "next_deadline_time"),
        "ingested_time": now,
    }
    log = {
        "event_id": escalation_id,
        "kind": "escalation",
        "institution_id": institution,
        "event_time": escalated,
        "ingested_time": now,
    }
    return Prepared(
        index=index,
        kind="escalation",
        time=escalated,
        log_id=escalation_id,
        log=log,
        rows={"alert_escalations": [row]},
    )


@converts("ack")
def _ack(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    acknowledged = _time(record, "acknowledged_time")
    ack_id = uuid_text(_get(record, "ack_id"), "ack_id")
    read_back = record.get("read_back", False)
    if not isinstance(read_back, bool):
        raise _Refused("read_back", f"expected a boolean, got {read_back!r}")
    row = {
        "ack_id": ack_id,
        "alert_id": uuid_text(_get(record, "alert_id"), "alert_id"),
        "regional_patient_id": _optional_text(record, "regional_patient_id"),
        "acknowledged_by": _text(record, "acknowledged_by"),
        "role": _optional_text(record, "role"),
        "channel": _enum(record.get("channel") or "OTHER"),
        "read_back": read_back,
        "acknowledged_time": acknowledged,
        "note": _optional_text(record, "note"),
        "ingested_time": now,
    }
    log = {
        "event_id": ack_id,
        "kind": "ack",
        "institution_id": None,
        "event_time": acknowledged,
        "ingested_time": now,
    }
    return Prepared(
        index=index,
        kind="ack",
        time=acknowledged,
        log_id=ack_id,
        log=log,
        rows={"alert_acknowledgements": [row]},
    )


@converts("alert_state")
def _alert_state(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    """One state change of an alert: a row of its history (the alerts row takes its repeats from them)."""
    changed = _time(record, "changed_time")
    row = {
        "state_id": uuid_text(_get(record, "state_id"), "state_id"),
        "alert_id": uuid_text(_get(record, "alert_id"), "alert_id"),
        "regional_patient_id": _text(record, "regional_patient_id"),
        "institution_id": _text(record, "institution_id"),
        "change": _symbol(record, "change", ALERT_CHANGES),
        "status": _symbol(record, "status", ALERT_STATUSES),
        "suppressed_repeats": _count(record, "suppressed_repeats"),
        "escalation_level": _count(record, "escalation_level"),
        "recipient": _optional_text(record, "recipient"),
        "next_deadline_time": _optional_time(record, "next_deadline_time"),
        "acknowledged_by": _optional_text(record, "acknowledged_by"),
        "acknowledged_time": _optional_time(record, "acknowledged_time"),
        "note": _optional_text(record, "note"),
        "changed_time": changed,
        "correlation_id": _optional_text(record, "correlation_id"),
        "ingested_time": now,
    }
    return Prepared(index=index, kind="alert_state", time=changed, rows={"alert_history": [row]})


@converts("identity")
def _identity(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    linked = _time(record, "linked_time")
    regional = _text(record, "regional_patient_id")
    alias_of = _optional_text(record, "alias_of")
    rows: dict[str, list[Row]] = {
        "identifier_links": [
            {
                "institution_id": _text(record, "institution_id"),
                "patient_mrn": _text(record, "patient_mrn").strip(),
                "regional_patient_id": regional,
                "linked_time": linked,
                "ingested_time": now,
            }
        ]
    }
    if alias_of and alias_of != regional:
        rows["patient_aliases"] = [
            {
                "alias_id": alias_of,
                "regional_patient_id": regional,
                "linked_time": linked,
                "ingested_time": now,
            }
        ]
    patient = {
        "regional_patient_id": regional,
        "birth_year": None,
        "sex": None,
        "demographics_time": None,
        "created_time": now,
    }
    return Prepared(index=index, kind="identity", time=linked, rows=rows, patient=patient)


DEAD_LETTER_COLUMNS = DeadLetterRow.__table__.columns
TRUNCATED = "…"


def clip(value: str | None, column: str) -> str | None:
    """Text cut to its dead_letters column (a mark at the end says so): a reason or topic longer than the
    schema allows must not cost the whole dead letter, nor be refused and so lost."""
    length = getattr(DEAD_LETTER_COLUMNS[column].type, "length", None)
    if value is None or length is None or len(value) <= length:
        return value
    return value[: length - len(TRUNCATED)] + TRUNCATED


def _position(record: Mapping[str, Any], name: str) -> int:
    value = _get(record, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Refused(name, f"expected a partition or offset, got {value!r}")
    return value


def _lenient_text(record: Mapping[str, Any], name: str) -> str | None:
    """Optional text of a dead letter: whatever is there, as text (a dead letter is kept as it came)."""
    value = record.get(name)
    return None if value is None else clip(str(value), name)


@converts("deadletter")
def _dead_letter(index: int, record: Mapping[str, Any], now: dt.datetime) -> Prepared:
    """A dead letter without its bytes, with the clinical kind its original topic carried. Only what
    locates it (id, topic, position, time) is required; text is cut to size, never refused for length."""
    topic = _text(record, "original_topic")
    failed = _time(record, "failed_time")
    row = {
        "deadletter_id": uuid_text(_get(record, "deadletter_id"), "deadletter_id"),
        "original_topic": clip(topic, "original_topic"),
        "original_partition": _position(record, "original_partition"),
        "original_offset": _position(record, "original_offset"),
        "kind": topic_kind(topic),
        "error_class": _lenient_text(record, "error_class") or "unknown",
        "field": _lenient_text(record, "field"),
        "reason": _lenient_text(record, "reason") or "",
        "institution_id": _lenient_text(record, "institution_id"),
        "correlation_id": _lenient_text(record, "correlation_id"),
        "processor": _lenient_text(record, "processor") or "unknown",
        "possibly_critical": record.get("possibly_critical") is True,
        "loinc_code": _lenient_text(record, "loinc_code"),
        "failed_time": failed,
        "ingested_time": now,
    }
    return Prepared(index=index, kind="deadletter", time=failed, rows={"dead_letters": [row]})


def prepare(index: int, item: StoreRecord, now: dt.datetime) -> Prepared:
    """Rows for one record, or StoreRejectedError naming the record's kind, position and field."""
    converter = CONVERTERS.get(item.kind)
    if converter is None:
        raise StoreRejectedError(
            f"record {index}: unknown kind {item.kind!r}; expected one of {', '.join(KINDS)}"
        )
    if not isinstance(item.record, Mapping):
        raise StoreRejectedError(
            f"record {index} ({item.kind}): expected a mapping, got {type(item.record).__name__}"
        )
    try:
        return converter(index, item.record, now)
    except _Refused as exc:
        raise StoreRejectedError(f"record {index} ({item.kind}): {exc.field_name}: {exc.reason}") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise StoreRejectedError(f"record {index} ({item.kind}): {type(exc).__name__}: {exc}") from None

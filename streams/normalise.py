"""Lab results to the regional standard: LOINC codes, canonical units, UTC times, regional patient id."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.exceptions import ImplausibleTimeError, ImplausibleValueError, RejectedEvent, UnknownUnitError
from streams.identity import RegionalIdentity, normalise_national_id
from streams.reference import ReferenceData

EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
FUTURE_TOLERANCE = dt.timedelta(minutes=10)

FLAG_UNMAPPED_CODE = "unmapped_code"
FLAG_INVALID_NATIONAL_ID = "invalid_national_id"


@dataclass(frozen=True)
class NormalisedLab:
    """A lab result as the region stores it. Holds no raw national identifier."""

    event_id: str
    institution_id: str
    source_system: str
    correlation_id: str
    result_id: str
    regional_patient_id: str
    patient_mrn: str
    encounter_id: str | None
    local_code: str
    loinc_code: str | None
    analyte: str | None
    value: float | None
    unit: str | None
    original_value: float | None
    original_unit: str | None
    value_text: str | None
    status: str
    abnormal_flag: str | None
    result_time: dt.datetime
    event_time: dt.datetime
    specimen_collected_time: dt.datetime | None
    flags: tuple[str, ...]


def checked_utc(value: dt.datetime, field: str, now: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ImplausibleTimeError(field, "time has no time zone; the standard carries UTC instants")
    value = value.astimezone(dt.UTC)
    if value < EARLIEST:
        raise ImplausibleTimeError(field, f"{value.isoformat()} is before 1900")
    if value > now + FUTURE_TOLERANCE:
        raise ImplausibleTimeError(field, f"{value.isoformat()} is in the future (now {now.isoformat()})")
    return value


def convert(value: float, unit: str | None, loinc: str, reference: ReferenceData) -> tuple[float, str]:
    """Value in the analyte's canonical unit; an unknown unit is an error, never a guess."""
    analyte = reference.analytes.get(loinc)
    if analyte is None:
        raise UnknownUnitError("loinc_code", f"no canonical unit is configured for LOINC {loinc}")
    key = (unit or "").strip()
    factor = analyte.factors.get(key)
    if factor is None:
        accepted = ", ".join(sorted(u for u in analyte.factors if u)) or "(none)"
        raise UnknownUnitError(
            "unit", f"unit {key!r} is not accepted for {analyte.name} ({loinc}); accepted: {accepted}"
        )
    return value * factor, analyte.canonical_unit


def normalise_lab(
    record: Mapping[str, Any],
    reference: ReferenceData,
    identity: RegionalIdentity,
    topic_institution: str | None = None,
    now: dt.datetime | None = None,
    regional_patient_id: str | None = None,
) -> NormalisedLab:
    """Normalise one decoded LabResult or raise RejectedEvent naming the field and the reason."""
    now = now or dt.datetime.now(dt.UTC)
    envelope = record["envelope"]
    institution = envelope["institution_id"]
    if topic_institution is not None and institution != topic_institution:
        raise RejectedEvent(
            "envelope.institution_id",
            f"payload claims institution {institution!r} on a topic of {topic_institution!r}",
        )
    result_time = checked_utc(record["result_time"], "result_time", now)
    event_time = checked_utc(envelope["event_time"], "envelope.event_time", now)
    collected = record.get("specimen_collected_time")
    collected_utc = checked_utc(collected, "specimen_collected_time", now) if collected is not None else None

    flags: list[str] = []
    local_code = record["local_code"].strip()
    loinc = record.get("loinc_code") or reference.terminology.get(institution, {}).get(local_code)
    if loinc is None:
        flags.append(FLAG_UNMAPPED_CODE)

    original_value = record.get("value_numeric")
    original_unit = record.get("unit")
    value: float | None = None
    unit: str | None = original_unit
    analyte_name: str | None = None
    if loinc is not None and original_value is not None:
        value, unit = convert(float(original_value), original_unit, loinc, reference)
        analyte = reference.analytes[loinc]
        analyte_name = analyte.name
        if not analyte.plausible_low <= value <= analyte.plausible_high:
            raise ImplausibleValueError(
                "value_numeric",
                f"{analyte.name} {original_value} {original_unit} = {value:g} {unit} is outside the possible "
                f"range {analyte.plausible_low:g}-{analyte.plausible_high:g} {unit}",
            )
    elif loinc is None:
        value = original_value

    mrn = record["patient_mrn"].strip()
    if not mrn:
        raise RejectedEvent("patient_mrn", "empty local patient identifier")
    if regional_patient_id is not None:
        regional_id = regional_patient_id  # resolved by the caller (streams.events), with its flags
    else:
        regional_id = identity.from_local(institution, mrn)
        raw_nid = record.get("patient_national_id")
        if raw_nid:
            nid = normalise_national_id(raw_nid)
            if nid is None:
                flags.append(FLAG_INVALID_NATIONAL_ID)
            else:
                regional_id = identity.from_national_id(nid)

    return NormalisedLab(
        event_id=str(envelope["event_id"]),
        institution_id=institution,
        source_system=envelope["source_system"],
        correlation_id=envelope["correlation_id"],
        result_id=record["result_id"],
        regional_patient_id=regional_id,
        patient_mrn=mrn,
        encounter_id=record.get("encounter_id"),
        local_code=local_code,
        loinc_code=loinc,
        analyte=analyte_name,
        value=value,
        unit=unit,
        original_value=original_value,
        original_unit=original_unit,
        value_text=record.get("value_text"),
        status=record.get("status") or "final",
        abnormal_flag=record.get("abnormal_flag"),
        result_time=result_time,
        event_time=event_time,
        specimen_collected_time=collected_utc,
        flags=tuple(flags),
    )

"""Clinical records for tests and benchmarks, built in one place.

- `lab_record`: a raw LabResult as an institution's SDK sends it (before the hub touches it);
- `normalised`: what the real normaliser (`streams.domain.normalise.normalise_event`) publishes for a
  raw event of any kind, in the form the store agent decodes it (event id as uuid.UUID, times aware UTC);
- `regional_id`: the regional patient id the normaliser derives, with the same pseudonym key.

Importable from benchmarks too (they put the project root on sys.path, as `tests` is not installed).
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from typing import Any

from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import normalise_event, resolve_identity
from streams.domain.reference import load_reference

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)

ENVELOPE_FIELDS = frozenset(
    {
        "event_id",
        "institution_id",
        "source_system",
        "source_message_id",
        "event_time",
        "produced_time",
        "schema_version",
        "correlation_id",
    }
)


def lab_record(
    institution: str,
    code: str,
    value: float | None,
    unit: str | None,
    /,
    *,
    mrn: str = "MRN0000001",
    at: dt.datetime | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A final raw lab result of a known adult patient (born 1960, female), every other optional field null.

    Event id and correlation id are fresh UUIDs (text, as the SDK sends them), the result id is fresh;
    event, produced and result time are `at`, by default now (aware UTC, whole seconds). Any field of
    the record or of its envelope may be overridden by name: `event_id=...`, `status="cancelled"`,
    `unit=None`, `patient_birth_year=None`; an unknown name is an error.
    """
    when = at if at is not None else dt.datetime.now(dt.UTC).replace(microsecond=0)
    record: dict[str, Any] = {
        "envelope": {
            "event_id": str(uuid.uuid4()),
            "institution_id": institution,
            "source_system": "LIS",
            "source_message_id": None,
            "event_time": when,
            "produced_time": when,
            "schema_version": "1",
            "correlation_id": str(uuid.uuid4()),
        },
        "result_id": f"R-{uuid.uuid4().hex[:10]}",
        "patient_mrn": mrn,
        "patient_national_id": None,
        "patient_birth_year": 1960,
        "patient_sex": "female",
        "patient_family_name": None,
        "patient_given_name": None,
        "encounter_id": None,
        "local_code": code,
        "local_code_system": None,
        "local_display": None,
        "loinc_code": None,
        "value_numeric": value,
        "value_comparator": None,
        "value_text": None,
        "unit": unit,
        "reference_low": None,
        "reference_high": None,
        "abnormal_flag": None,
        "status": "final",
        "specimen_collected_time": None,
        "result_time": when,
        "performing_lab": None,
        "ordering_clinician": None,
    }
    for name, override in overrides.items():
        if name in ENVELOPE_FIELDS:
            record["envelope"][name] = override
        elif name in record and name != "envelope":
            record[name] = override
        else:
            raise TypeError(f"a LabResult has no field {name!r}")
    return record


def regional_id(institution: str, mrn: str, national_id: str | None = None) -> str:
    """The regional patient id the normaliser gives (institution, MRN) with no link known yet."""
    return resolve_identity(IDENTITY, None, institution, mrn, national_id, NOW).regional_patient_id


def normalised(kind: str, raw: dict[str, Any], now: dt.datetime = NOW) -> dict[str, Any]:
    """The record the normaliser publishes on `norm.<kind>` for a raw event (the raw one is left alone),
    as the store agent decodes it: event id as uuid.UUID, times in UTC (the normaliser converts the
    kind's times; Avro the produced time)."""
    record = copy.deepcopy(raw)
    institution = record["envelope"]["institution_id"]
    no_links: dict[str, str] = {}  # a patient seen for the first time
    out = normalise_event(kind, record, REFERENCE, CODES, IDENTITY, no_links.get, institution, now).record
    envelope = out["envelope"]
    envelope["event_id"] = uuid.UUID(str(envelope["event_id"]))
    envelope["produced_time"] = envelope["produced_time"].astimezone(dt.UTC)
    return out


def alert_record(raised: dt.datetime | None = None, **changes: Any) -> dict[str, Any]:
    """A CriticalValueAlert as fastavro decodes it (uuid fields as UUIDs): a potassium of 6.9 mmol/L at
    H001's ICU, its result two minutes before `raised` (default: now), acknowledgement due 15 minutes
    after. Any field may be overridden by name."""
    now = raised if raised is not None else dt.datetime.now(dt.UTC).replace(microsecond=0)
    record: dict[str, Any] = {
        "alert_id": uuid.uuid4(),
        "source_event_id": uuid.uuid4(),
        "regional_patient_id": "rp-7c21",
        "institution_id": "H001",
        "ward": "ICU",
        "loinc_code": "2823-3",
        "analyte": "Potassium",
        "value": 6.9,
        "value_comparator": None,
        "unit": "mmol/L",
        "limit_kind": "HIGH",
        "limit_value": 6.2,
        "severity": "CRITICAL",
        "message": "Potassium 6.90 mmol/L above critical high 6.2",
        "rule_source": "test rules",
        "previous_value": None,
        "previous_time": None,
        "result_time": now - dt.timedelta(minutes=2),
        "raised_time": now,
        "deadline_time": now + dt.timedelta(minutes=15),
        "correlation_id": "corr-1",
        "suppressed_repeats": 0,
    }
    unknown = set(changes) - set(record)
    if unknown:
        raise TypeError(f"a CriticalValueAlert has no field {sorted(unknown)}")
    record.update(changes)
    return record

"""Store records as the normaliser hands them to the sink, built from the simulator's realistic traffic.

Records look like fastavro's output: uuid fields as uuid.UUID, times as aware UTC datetimes, the
regional patient id filled in and the national id removed.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import uuid
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, select

from producers.simulator import simulate_events
from sinks.base import StoreRecord
from sinks.models import Base

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
NAMESPACE = uuid.UUID("2b3f1e0c-9d7a-4c55-8e61-3f0a1b2c4d5e")

# (institution, local code) -> (LOINC, factor to the canonical unit, canonical unit); the simulator's tests.
LAB_CODES = {
    ("H001", "K"): ("2823-3", 1.0, "mmol/L"),
    ("H001", "NA"): ("2951-2", 1.0, "mmol/L"),
    ("H001", "GLU"): ("2345-7", 0.05551, "mmol/L"),
    ("H001", "HGB"): ("718-7", 10.0, "g/L"),
    ("H001", "CREA"): ("2160-0", 88.42, "umol/L"),
    ("H002", "LAB0101"): ("2823-3", 1.0, "mmol/L"),
    ("H002", "LAB0102"): ("2951-2", 1.0, "mmol/L"),
    ("H002", "LAB0201"): ("2345-7", 1.0, "mmol/L"),
    ("H002", "LAB0301"): ("718-7", 1.0, "g/L"),
    ("H002", "LAB0302"): ("777-3", 1.0, "10*9/L"),
    ("C003", "K+"): ("2823-3", 1.0, "mmol/L"),
    ("C003", "GLUC"): ("2345-7", 0.05551, "mmol/L"),
}
TIME_FIELDS = (
    "event_time",
    "produced_time",
    "result_time",
    "specimen_collected_time",
    "measured_time",
    "occurred_time",
    "admit_time",
    "discharge_time",
    "ordered_time",
    "start_time",
    "end_time",
    "recorded_time",
)


def regional_id(institution: str, mrn: str, national_id: str | None = None) -> str:
    """Stand-in for the normaliser's keyed pseudonym: from the national id when known, else the MRN."""
    material = f"nid:{national_id}" if national_id else f"mrn:{institution}:{mrn}"
    return "rp-" + hashlib.sha256(material.encode()).hexdigest()[:32]


def _as_decoded(record: dict[str, Any]) -> dict[str, Any]:
    for name in TIME_FIELDS:
        if isinstance(record.get(name), dt.datetime):
            record[name] = record[name].astimezone(dt.UTC)
    return record


def normalised(kind: str, raw: dict[str, Any]) -> dict[str, Any]:
    """What the normaliser publishes for a simulated record."""
    record = copy.deepcopy(raw)
    envelope = _as_decoded(record["envelope"])
    envelope["event_id"] = uuid.UUID(envelope["event_id"])
    institution = envelope["institution_id"]
    record["regional_patient_id"] = regional_id(
        institution, record["patient_mrn"], record["patient_national_id"]
    )
    record["patient_national_id"] = None
    if kind == "lab":
        loinc, factor, unit = LAB_CODES[(institution, record["local_code"])]
        record.update(
            loinc_code=loinc,
            canonical_value=record["value_numeric"] * factor,
            canonical_unit=unit,
            normalisation_flags=[],
        )
    return _as_decoded(record)


def simulated(
    seed: int, count: int, patients: int = 12, kinds: dict[str, float] | None = None
) -> list[StoreRecord]:
    return [
        StoreRecord(kind, normalised(kind, record))
        for kind, record in simulate_events(seed, count, patients=patients, now=NOW, kinds=kinds)
    ]


def alert_for(lab: dict[str, Any], suppressed_repeats: int = 0) -> dict[str, Any]:
    envelope = lab["envelope"]
    raised = envelope["event_time"] + dt.timedelta(seconds=1)
    return {
        "alert_id": uuid.uuid5(NAMESPACE, f"alert|{envelope['event_id']}"),
        "source_event_id": envelope["event_id"],
        "regional_patient_id": lab["regional_patient_id"],
        "institution_id": envelope["institution_id"],
        "ward": "ICU",
        "loinc_code": lab["loinc_code"],
        "analyte": lab["local_display"],
        "value": lab["canonical_value"],
        "unit": lab["canonical_unit"],
        "limit_kind": "HIGH",
        "limit_value": 6.2,
        "severity": "CRITICAL",
        "message": f"{lab['local_display']} {lab['canonical_value']:.2f} {lab['canonical_unit']} above 6.2",
        "rule_source": "test rules",
        "previous_value": None,
        "previous_time": None,
        "result_time": lab["result_time"],
        "raised_time": raised,
        "deadline_time": raised + dt.timedelta(minutes=15),
        "correlation_id": envelope["correlation_id"],
        "suppressed_repeats": suppressed_repeats,
    }


def escalation_for(alert: dict[str, Any], level: int) -> dict[str, Any]:
    escalated = alert["deadline_time"] + dt.timedelta(minutes=15 * (level - 1))
    return {
        "escalation_id": uuid.uuid5(NAMESPACE, f"escalation|{alert['alert_id']}|{level}"),
        "alert_id": alert["alert_id"],
        "regional_patient_id": alert["regional_patient_id"],
        "institution_id": alert["institution_id"],
        "level": level,
        "recipient": ["attending physician", "department head", "medical director"][min(level, 3) - 1],
        "severity": alert["severity"],
        "message": alert["message"],
        "escalated_time": escalated,
        "next_deadline_time": escalated + dt.timedelta(minutes=15),
    }


def ack_for(alert: dict[str, Any], minutes: int, by: str = "DR0042") -> dict[str, Any]:
    return {
        "ack_id": uuid.uuid5(NAMESPACE, f"ack|{alert['alert_id']}|{minutes}|{by}"),
        "alert_id": alert["alert_id"],
        "acknowledged_by": by,
        "role": "attending",
        "channel": "PHONE",
        "read_back": True,
        "acknowledged_time": alert["raised_time"] + dt.timedelta(minutes=minutes),
        "note": None,
        "regional_patient_id": alert["regional_patient_id"],
    }


def identity(
    institution: str, mrn: str, regional: str, alias_of: str | None = None, linked: dt.datetime = NOW
) -> dict[str, Any]:
    return {
        "link_id": uuid.uuid5(NAMESPACE, f"{institution}|{mrn}|{regional}"),
        "institution_id": institution,
        "patient_mrn": mrn,
        "regional_patient_id": regional,
        "alias_of": alias_of,
        "linked_time": linked,
    }


def realistic_batch(seed: int, count: int) -> list[StoreRecord]:
    """Every kind: simulated clinical events, alerts for critical-looking labs with escalations and
    acknowledgements, and an identity link per (institution, MRN)."""
    records = simulated(seed, count)
    extra: list[StoreRecord] = []
    links: dict[tuple[str, str], str] = {}
    for n, item in enumerate(records):
        record = item.record
        links[(record["envelope"]["institution_id"], record["patient_mrn"])] = record["regional_patient_id"]
        if item.kind == "lab" and record["abnormal_flag"] is not None and n % 3 == 0:
            alert = alert_for(dict(record), suppressed_repeats=n % 4)
            extra.append(StoreRecord("alert", alert))
            if n % 2 == 0:
                extra.append(StoreRecord("escalation", escalation_for(alert, 1)))
            if n % 5 == 0:
                extra.append(StoreRecord("ack", ack_for(alert, 20)))
    extra.extend(
        StoreRecord("identity", identity(inst, mrn, regional))
        for (inst, mrn), regional in sorted(links.items())
    )
    return records + extra


def revised(record: dict[str, Any], minutes_later: float, **changes: Any) -> dict[str, Any]:
    """A new version of a clinical record: new event id, later (or earlier) event time, some changes."""
    copy_ = copy.deepcopy(record)
    envelope = copy_["envelope"]
    envelope["event_id"] = uuid.uuid4()
    envelope["event_time"] = envelope["event_time"] + dt.timedelta(minutes=minutes_later)
    copy_.update(changes)
    return copy_


def first(records: Iterable[StoreRecord], kind: str, index: int = 0) -> dict[str, Any]:
    return dict([item.record for item in records if item.kind == kind][index])


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in primary-key order."""
    with engine.connect() as connection:
        return {
            table.name: [
                tuple(row) for row in connection.execute(select(table).order_by(*table.primary_key.columns))
            ]
            for table in Base.metadata.sorted_tables
        }

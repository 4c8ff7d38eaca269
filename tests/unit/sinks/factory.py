"""Store records as the normaliser hands them to the sink, built from the simulator's realistic traffic.

Clinical records are the real normaliser's output (tests.factories.normalised), as fastavro decodes
it: event ids as uuid.UUID, times as aware UTC datetimes, the regional patient id filled in and the
national id removed.
"""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, select

from core.contract import KINDS
from producers.simulator import simulate_events
from sinks.base import StoreRecord
from sinks.models import Base
from tests.factories import NOW, normalised

NAMESPACE = uuid.UUID("2b3f1e0c-9d7a-4c55-8e61-3f0a1b2c4d5e")


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


def state_for(
    alert: dict[str, Any],
    change: str,
    repeats: int = 0,
    minutes: float = 0,
    *,
    level: int = 0,
    acknowledged_by: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """An AlertState of the alert, `minutes` after it was raised, as fastavro decodes it."""
    changed = alert["raised_time"] + dt.timedelta(minutes=minutes)
    acknowledged = acknowledged_by is not None
    return {
        "state_id": uuid.uuid5(NAMESPACE, f"state|{alert['alert_id']}|{change}|{repeats}|{minutes}"),
        "alert_id": alert["alert_id"],
        "regional_patient_id": alert["regional_patient_id"],
        "institution_id": alert["institution_id"],
        "status": "ACKNOWLEDGED" if acknowledged else "OPEN",
        "change": change,
        "suppressed_repeats": repeats,
        "escalation_level": level,
        "recipient": "attending physician" if level else None,
        "next_deadline_time": None if acknowledged else alert["deadline_time"],
        "acknowledged_by": acknowledged_by,
        "acknowledged_time": changed if acknowledged else None,
        "note": note,
        "changed_time": changed,
        "correlation_id": alert["correlation_id"] if change in ("OPENED", "REPEAT", "NOTE") else None,
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


def dead_letter(
    topic: str = "raw.H001.lab", partition: int = 0, offset: int = 0, **fields: Any
) -> dict[str, Any]:
    """A DeadLetter as fastavro decodes it: by default the normaliser's for a potassium in an unknown unit."""
    record: dict[str, Any] = {
        "deadletter_id": uuid.uuid5(NAMESPACE, f"deadletter|{topic}|{partition}|{offset}"),
        "original_topic": topic,
        "original_partition": partition,
        "original_offset": offset,
        "original_key": b"H001|MRN0000001",
        "original_value": b"\x00\x00\x00\x00\x01 the raw event",
        "error_class": "RejectedEvent",
        "field": "unit",
        "reason": "unit 'mmol/dL' is not one the hub converts for 2823-3",
        "institution_id": "H001",
        "correlation_id": str(uuid.uuid5(NAMESPACE, f"correlation|{topic}|{offset}")),
        "failed_time": NOW,
        "processor": "streams.normaliser",
        "possibly_critical": True,
        "loinc_code": "2823-3",
    }
    unknown = set(fields) - set(record)
    if unknown:
        raise TypeError(f"not a DeadLetter field: {sorted(unknown)}")
    record.update(fields)
    return record


# Names as institutions write them (a GB 18030 system's 區 and 瑋 have `^` and `|` as second byte)
NAMES = (("區", "瑋東"), ("王", "丽"), ("SMITH", "John Paul"), ("欧阳", None))


def named(records: list[StoreRecord]) -> list[StoreRecord]:
    """Every other clinical event carries its patient's name (one per institution and MRN)."""
    out = []
    for n, item in enumerate(records):
        record = item.record
        if n % 2 == 0 and item.kind in KINDS:
            family, given = NAMES[sum(map(ord, record["patient_mrn"])) % len(NAMES)]
            record = {**record, "patient_family_name": family, "patient_given_name": given}
        out.append(StoreRecord(item.kind, record))
    return out


def realistic_batch(seed: int, count: int) -> list[StoreRecord]:
    """Every kind: simulated clinical events (every other one with the patient's name), alerts for
    critical-looking labs with their states (opened, repeats), escalations and acknowledgements, the dead
    letters of a few rejected raw events and of one record the store itself refused, and last an
    identity link per (institution, MRN)."""
    records = named(simulated(seed, count))
    extra: list[StoreRecord] = []
    links: dict[tuple[str, str], str] = {}
    for n, item in enumerate(records):
        record = item.record
        links[(record["envelope"]["institution_id"], record["patient_mrn"])] = record["regional_patient_id"]
        if item.kind == "lab" and record["abnormal_flag"] is not None and n % 3 == 0:
            alert = alert_for(dict(record), suppressed_repeats=n % 4)
            extra.append(StoreRecord("alert", alert))
            extra.append(StoreRecord("alert_state", state_for(alert, "OPENED")))
            extra.extend(
                StoreRecord("alert_state", state_for(alert, "REPEAT", repeats, repeats))
                for repeats in range(1, n % 5 + 1)
            )
            if n % 2 == 0:
                extra.append(StoreRecord("escalation", escalation_for(alert, 1)))
            if n % 5 == 0:
                extra.append(StoreRecord("ack", ack_for(alert, 20)))
    extra.extend(
        StoreRecord("deadletter", dead_letter(f"raw.H00{1 + n % 2}.lab", n % 3, seed * 100 + n))
        for n in range(max(1, count // 50))
    )
    extra.append(
        StoreRecord(
            "deadletter",
            dead_letter(
                "norm.medication",
                1,
                seed,
                error_class="StoreRejectedError",
                field=None,
                reason="database refused the batch",
                processor="streams.store",
                possibly_critical=False,
                loinc_code=None,
            ),
        )
    )
    extra.extend(
        StoreRecord("identity", identity(inst, mrn, regional))
        for (inst, mrn), regional in sorted(links.items())
    )
    return records + extra


def revised(record: Mapping[str, Any], minutes_later: float, **changes: Any) -> dict[str, Any]:
    """A new version of a clinical record: new event id, later (or earlier) event time, some changes."""
    copy_ = copy.deepcopy(dict(record))
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

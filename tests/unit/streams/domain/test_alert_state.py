"""AlertState records from plain values: what each change publishes as the alert's whole current state."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import fastavro
import pytest

from schemas import standard
from streams.domain.alert_state import AlertChange, alert_state_record, repeat_change, state_id_for, untracked
from streams.domain.escalation import OpenAlertState
from streams.domain.rules import AlertDraft, epoch_ms

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
ALERT_ID = str(uuid.uuid5(uuid.NAMESPACE_URL, "alert-state"))
DEADLINE = NOW + dt.timedelta(minutes=15)
OPEN = OpenAlertState(
    alert_id=ALERT_ID,
    severity="CRITICAL",
    message="Critical potassium",
    institution_id="H001",
    regional_patient_id="rp-1",
    level=0,
    deadline_ms=epoch_ms(DEADLINE),
)
ESCALATED = dataclasses.replace(
    OPEN, level=1, recipient="attending physician", deadline_ms=epoch_ms(DEADLINE + dt.timedelta(minutes=15))
)
REPEATED = dataclasses.replace(OPEN, suppressed_repeats=3, note="a late result came in")
ACKED = dataclasses.replace(
    ESCALATED, acknowledged_ms=epoch_ms(NOW + dt.timedelta(minutes=20)), acknowledged_by="DR0042"
)


def _draft(**changes: Any) -> AlertDraft:
    draft = AlertDraft(
        alert_id=ALERT_ID,
        source_event_id="6f1c2d9e-58a3-4c1b-9a57-0c6f5e2b7d10",
        regional_patient_id="rp-1",
        institution_id="H001",
        loinc_code="2823-3",
        analyte="Potassium",
        value=6.9,
        unit="mmol/L",
        limit_kind="HIGH",
        limit_value=6.2,
        severity="CRITICAL",
        message="Critical potassium",
        rule_source="ARUP",
        result_time=NOW,
        raised_time=NOW,
        deadline_time=DEADLINE,
        correlation_id="c-1",
    )
    return dataclasses.replace(draft, **changes)


# entry, change, expected fields (besides ids, institution, patient, changed_time, correlation_id)
CASES = [
    (
        OPEN,
        AlertChange.OPENED,
        {
            "status": "OPEN",
            "change": "OPENED",
            "suppressed_repeats": 0,
            "escalation_level": 0,
            "recipient": None,
            "next_deadline_time": DEADLINE,
            "acknowledged_by": None,
            "acknowledged_time": None,
            "note": None,
        },
    ),
    (
        REPEATED,
        AlertChange.REPEAT,
        {
            "status": "OPEN",
            "change": "REPEAT",
            "suppressed_repeats": 3,
            "escalation_level": 0,
            "recipient": None,
            "next_deadline_time": DEADLINE,
            "acknowledged_by": None,
            "acknowledged_time": None,
            "note": "a late result came in",
        },
    ),
    (
        ESCALATED,
        AlertChange.ESCALATED,
        {
            "status": "OPEN",
            "change": "ESCALATED",
            "suppressed_repeats": 0,
            "escalation_level": 1,
            "recipient": "attending physician",
            "next_deadline_time": DEADLINE + dt.timedelta(minutes=15),
            "acknowledged_by": None,
            "acknowledged_time": None,
            "note": None,
        },
    ),
    (
        ACKED,
        AlertChange.ACKNOWLEDGED,
        {
            "status": "ACKNOWLEDGED",
            "change": "ACKNOWLEDGED",
            "suppressed_repeats": 0,
            "escalation_level": 1,
            "recipient": "attending physician",
            "next_deadline_time": None,  # nothing is due once acknowledged
            "acknowledged_by": "DR0042",
            "acknowledged_time": NOW + dt.timedelta(minutes=20),
            "note": None,
        },
    ),
]


@pytest.mark.parametrize(("entry", "change", "expected"), CASES, ids=[str(case[1]) for case in CASES])
def test_a_record_carries_the_whole_current_state_of_the_alert(
    entry: OpenAlertState, change: AlertChange, expected: dict[str, Any]
) -> None:
    changed = NOW + dt.timedelta(minutes=5, microseconds=1500)
    record = alert_state_record(entry, change, "cause-1", changed, correlation_id="c-9")
    assert {key: record[key] for key in expected} == expected
    assert record["alert_id"] == ALERT_ID
    assert (record["regional_patient_id"], record["institution_id"]) == ("rp-1", "H001")
    assert record["changed_time"] == NOW + dt.timedelta(minutes=5, microseconds=1000)  # milliseconds
    assert record["correlation_id"] == "c-9"
    assert record["state_id"] == state_id_for(ALERT_ID, change, "cause-1")


@pytest.mark.parametrize(("entry", "change", "expected"), CASES, ids=[str(case[1]) for case in CASES])
def test_every_record_is_valid_against_the_schema(
    entry: OpenAlertState, change: AlertChange, expected: dict[str, Any]
) -> None:
    schema = fastavro.parse_schema(json.loads(standard.load(standard.ALERT_STATE).text))
    record = alert_state_record(entry, change, "cause-1", NOW)
    fields = [field["name"] for field in json.loads(standard.load(standard.ALERT_STATE).text)["fields"]]
    assert list(record) == fields, "exactly the schema's fields, in its order"
    assert fastavro.validate(record, schema, raise_errors=True)


def test_a_state_id_is_the_same_for_a_replayed_change_and_differs_for_any_other() -> None:
    one = state_id_for(ALERT_ID, AlertChange.REPEAT, "event-1")
    assert one == state_id_for(ALERT_ID, AlertChange.REPEAT, "event-1")
    others = {
        state_id_for(ALERT_ID, AlertChange.REPEAT, "event-2"),
        state_id_for(ALERT_ID, AlertChange.NOTE, "event-1"),
        state_id_for(str(uuid.uuid4()), AlertChange.REPEAT, "event-1"),
    }
    assert one not in others and len(others) == 3


@pytest.mark.parametrize(
    ("repeats", "note", "before", "change"),
    [
        (3, None, 2, AlertChange.REPEAT),  # a repeat
        (3, "late result", 2, AlertChange.REPEAT),  # a repeat that also carries a note
        (2, "late result", 2, AlertChange.NOTE),  # only the note changed
        (2, None, 2, AlertChange.REPEAT),  # nothing to tell it by: the rules report repeats
        (2, "late result", None, AlertChange.REPEAT),  # count before unknown
    ],
)
def test_an_update_is_a_repeat_unless_only_its_note_changed(
    repeats: int, note: str | None, before: int | None, change: AlertChange
) -> None:
    assert repeat_change(_draft(suppressed_repeats=repeats, note=note), before) is change


def test_an_untracked_alert_is_described_by_its_update() -> None:
    entry = untracked(_draft(suppressed_repeats=4, note="n"))
    record = alert_state_record(entry, AlertChange.REPEAT, "event-1", NOW)
    assert (record["status"], record["suppressed_repeats"], record["note"]) == ("OPEN", 4, "n")
    assert (record["escalation_level"], record["next_deadline_time"]) == (0, DEADLINE)

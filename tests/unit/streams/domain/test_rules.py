"""Critical-value rules: limit boundaries, conversion before comparison, cancelled results, stable alert ids.

Clinical expectations are taken from the source tables in shared/reference/clinical.md.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from schemas import standard
from schemas.wire import validate_record
from streams.domain.reference import ThresholdRule, load_reference
from streams.domain.rules import AlertDraft, LabFacts, alert_id_for, alert_record, crossed_limit, evaluate
from tests.factories import lab_record, normalised

REFERENCE = load_reference()
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def rule(
    low: float | None = 10.0,
    high: float | None = 20.0,
    low_inclusive: bool = False,
    high_inclusive: bool = False,
) -> ThresholdRule:
    return ThresholdRule(
        loinc="0000-0",
        analyte="Test",
        low=low,
        high=high,
        low_inclusive=low_inclusive,
        high_inclusive=high_inclusive,
        severity="CRITICAL",
        message="Critical test",
        source="T: test",
    )


BELOW, ABOVE = 9.999999, 20.000001


@pytest.mark.parametrize(
    ("low_inclusive", "high_inclusive", "value", "expected"),
    [
        # exclusive limits: the limit itself is not critical (< / >)
        (False, False, 10.0, None),
        (False, False, BELOW, ("LOW", 10.0)),
        (False, False, 10.000001, None),
        (False, False, 20.0, None),
        (False, False, ABOVE, ("HIGH", 20.0)),
        (False, False, 19.999999, None),
        # inclusive limits: the limit itself is critical (<= / >=)
        (True, True, 10.0, ("LOW", 10.0)),
        (True, True, BELOW, ("LOW", 10.0)),
        (True, True, 10.000001, None),
        (True, True, 20.0, ("HIGH", 20.0)),
        (True, True, ABOVE, ("HIGH", 20.0)),
        (True, True, 19.999999, None),
        # mixed, as glucose (<=low, >high) and lactate (>=high) are
        (True, False, 10.0, ("LOW", 10.0)),
        (True, False, 20.0, None),
        (False, True, 10.0, None),
        (False, True, 20.0, ("HIGH", 20.0)),
        # far outside
        (False, False, -1e300, ("LOW", 10.0)),
        (False, False, 1e300, ("HIGH", 20.0)),
        (False, False, 15.0, None),
    ],
)
def test_limit_boundaries(
    low_inclusive: bool, high_inclusive: bool, value: float, expected: tuple[str, float] | None
) -> None:
    """Inclusive means the limit value itself is critical; exclusive means only beyond it."""
    assert crossed_limit(value, rule(low_inclusive=low_inclusive, high_inclusive=high_inclusive)) == expected


@pytest.mark.parametrize(
    ("low", "high", "value", "expected"),
    [
        (None, 5.0, -100.0, None),  # INR has no low limit
        (None, 5.0, 5.5, ("HIGH", 5.0)),
        (5.33, None, 1e6, None),  # pO2 has no high limit
        (5.33, None, 5.0, ("LOW", 5.33)),
        (None, None, 0.0, None),
    ],
)
def test_missing_limits_never_fire(
    low: float | None, high: float | None, value: float, expected: tuple[str, float] | None
) -> None:
    """A one-sided rule only alerts on its own side."""
    assert crossed_limit(value, rule(low=low, high=high)) == expected


def raw_lab(local_code: str, value: float, unit: str, status: str = "final") -> dict[str, Any]:
    """A result of MRN0000007 at H001 (no known age or sex) with a fixed event id, sent at NOW."""
    return lab_record(
        "H001",
        local_code,
        value,
        unit,
        mrn="MRN0000007",
        at=NOW,
        status=status,
        event_id=uuid.UUID("2b0e7d4a-8c1f-4e59-9d3a-6f7b8c9d0e1f"),
        source_system="LIS-Cerner",
        correlation_id="corr-rules",
        result_id="H001-R7",
        patient_birth_year=None,
        patient_sex=None,
    )


def judge(lab: dict[str, Any], now: dt.datetime = NOW) -> list[AlertDraft]:
    """The alerts a normalised result raises for a patient with no history (no state, nothing to suppress)."""
    facts = LabFacts.from_record(lab)
    if facts is None:
        return []
    return list(evaluate(facts, None, REFERENCE.rulebook, now, REFERENCE.policy).alerts)


def alerts_for(local_code: str, value: float, unit: str, status: str = "final") -> list[AlertDraft]:
    return judge(normalised("lab", raw_lab(local_code, value, unit, status), NOW))


def test_an_alert_carries_no_patient_name() -> None:
    """A named patient's critical potassium: the alert (the schema has no name field) names nobody."""
    raw = raw_lab("K", 6.9, "mmol/L")
    raw.update(patient_family_name="區", patient_given_name="瑋東")
    (draft,) = judge(normalised("lab", raw, NOW))
    record = alert_record(draft)
    validate_record(record, standard.load(standard.CRITICAL_VALUE_ALERT))
    fields = {f["name"] for f in standard.load(standard.CRITICAL_VALUE_ALERT).parsed["fields"]}
    assert not {name for name in fields if "name" in name}
    assert "區" not in repr(record) and "瑋東" not in repr(record) and "瑋東" not in draft.message


# (H001 local code, value as sent, unit as sent, expected limit kind); limits as the cited sources print them.
SOURCE_BOUNDARIES = [
    ("K", 3.0, "mmol/L", None),  # ARUP <3.0
    ("K", 2.99, "mmol/L", "LOW"),
    ("K", 6.1, "mmol/L", None),  # ARUP >6.1
    ("K", 6.11, "mmol/L", "HIGH"),
    ("NA", 120.0, "mmol/L", None),  # ARUP <120 / >160
    ("NA", 119.9, "mmol/L", "LOW"),
    ("NA", 160.0, "mEq/L", None),
    ("NA", 160.1, "mEq/L", "HIGH"),
    ("GLU", 40.0, "mg/dL", "LOW"),  # HM <=50 mg/dL: 40 mg/dL is 2.22 mmol/L
    ("GLU", 50.0, "mg/dL", "LOW"),
    ("GLU", 51.0, "mg/dL", None),
    ("GLU", 401.0, "mg/dL", "HIGH"),  # HM >400 mg/dL
    ("GLU", 399.0, "mg/dL", None),
    ("CA", 5.9, "mg/dL", "LOW"),  # ARUP <6.0 / >13.0 mg/dL
    ("CA", 13.1, "mg/dL", "HIGH"),
    ("HGB", 6.0, "g/dL", "LOW"),  # Mayo <=6.0 / >=20.0 g/dL
    ("HGB", 6.1, "g/dL", None),
    ("HGB", 20.0, "g/dL", "HIGH"),
    ("HGB", 19.9, "g/dL", None),
    ("HGB", 60.0, "g/L", "LOW"),
    ("PLT", 20.0, "10*3/uL", None),  # ARUP <20 / >1000 x10^3/uL
    ("PLT", 19.0, "10*3/uL", "LOW"),
    ("PLT", 1000.0, "10^3/uL", None),
    ("PLT", 1001.0, "10^3/uL", "HIGH"),
    ("WBC", 2.0, "10*3/uL", None),  # ARUP <2.0 / >40
    ("WBC", 40.5, "10*3/uL", "HIGH"),
    ("INR", 5.0, "", None),  # ARUP >5.0
    ("INR", 5.1, "", "HIGH"),
    ("LAC", 3.5, "mmol/L", "HIGH"),  # HM >=3.5 mmol/L
    ("LAC", 3.49, "mmol/L", None),
    ("PH", 7.25, "[pH]", None),  # ARUP <7.25 / >7.6
    ("PH", 7.24, "[pH]", "LOW"),
    ("PH", 7.6, "[pH]", None),
    ("PH", 7.61, "[pH]", "HIGH"),
    ("PO2", 40.0, "mmHg", None),  # ARUP <40 mmHg
    ("PO2", 39.0, "mmHg", "LOW"),
    ("TNI", 0.30, "ng/mL", None),  # ARUP >0.30 ng/mL
    ("TNI", 0.31, "ng/mL", "HIGH"),
    ("CREA", 20.0, "mg/dL", None),  # no creatinine rule: high creatinine alone never alerts
]


@pytest.mark.parametrize(("local_code", "value", "unit", "kind"), SOURCE_BOUNDARIES)
def test_limits_after_conversion_match_the_cited_sources(
    local_code: str, value: float, unit: str, kind: str | None
) -> None:
    """Results in conventional units are converted first, then judged against the published limits."""
    alerts = alerts_for(local_code, value, unit)
    assert [a.limit_kind for a in alerts] == ([kind] if kind else [])


@pytest.mark.parametrize(
    ("local_code", "value", "unit"),
    [
        ("GLU", 400.0, "mg/dL"),  # HM >400: 400 itself is not critical
        ("GLU", 50.05, "mg/dL"),  # HM <=50: 50.05 is not critical
        ("CA", 6.0, "mg/dL"),  # ARUP <6.0
        ("CA", 13.0, "mg/dL"),  # ARUP >13.0
    ],
)
def test_values_exactly_at_a_conventional_limit_do_not_alert(
    local_code: str, value: float, unit: str
) -> None:
    """A value at a source's exclusive limit (or just past an inclusive one) is not critical in any unit."""
    assert alerts_for(local_code, value, unit) == []


@pytest.mark.parametrize("status", ["final", "preliminary", "corrected", "unknown"])
def test_any_live_status_alerts(status: str) -> None:
    """A preliminary critical result matters as much as a final one."""
    assert len(alerts_for("K", 7.5, "mmol/L", status)) == 1


@pytest.mark.parametrize(("value", "unit"), [(7.5, "mmol/L"), (1.5, "mmol/L")])
def test_cancelled_results_never_alert(value: float, unit: str) -> None:
    """A cancelled result was withdrawn by the lab; alerting on it sends a clinician after nothing."""
    assert alerts_for("K", value, unit, status="cancelled") == []


def _lab(**changes: Any) -> dict[str, Any]:
    """A normalised potassium of 7.5 mmol/L, with fields of the normalised record changed."""
    return {**normalised("lab", raw_lab("K", 7.5, "mmol/L"), NOW), **changes}


@pytest.mark.parametrize(
    "changes",
    [
        {"canonical_value": None, "value_text": "haemolysed"},
        {"loinc_code": None},
        {"canonical_unit": None},
        {"loinc_code": "2160-0"},  # creatinine: no rule
    ],
)
def test_nothing_to_judge_means_no_alert(changes: dict[str, Any]) -> None:
    """Without value, unit, code or rule there is nothing to compare, so no alert."""
    assert judge(_lab(**changes)) == []


def test_same_event_gives_the_same_alert_id() -> None:
    """Reprocessing after a crash must not raise a second alert: the id depends on the event, not time."""
    lab = _lab()
    first = judge(lab)
    again = judge(lab, NOW + dt.timedelta(hours=3))
    assert [a.alert_id for a in first] == [a.alert_id for a in again]
    assert uuid.UUID(first[0].alert_id).version == 5


def test_alert_ids_differ_by_event_analyte_and_side() -> None:
    """Distinct alerts must never share an id, or one would swallow the other in the store."""
    event = "2b0e7d4a-8c1f-4e59-9d3a-6f7b8c9d0e1f"
    ids = {
        alert_id_for(event, "2823-3", "HIGH"),
        alert_id_for(event, "2823-3", "LOW"),
        alert_id_for(event, "2951-2", "HIGH"),
        alert_id_for(str(uuid.uuid4()), "2823-3", "HIGH"),
    }
    assert len(ids) == 4


def test_alert_carries_what_the_clinician_needs() -> None:
    """Value, limit, source and an acknowledgement deadline travel with the alert."""
    (alert,) = judge(_lab())
    assert (alert.limit_kind, alert.limit_value, alert.value, alert.unit) == ("HIGH", 6.1, 7.5, "mmol/L")
    assert alert.rule_source.startswith("ARUP")
    assert alert.raised_time == NOW
    assert alert.deadline_time == NOW + dt.timedelta(minutes=15)  # clinical.md: critical, 15 minutes
    assert "> 6.1" in alert.message
    assert alert.correlation_id == "corr-rules"


def test_alert_record_matches_the_alert_schema() -> None:
    """The draft turns into a CriticalValueAlert the registry schema accepts."""
    (alert,) = judge(_lab())
    validate_record(alert_record(alert), standard.load(standard.CRITICAL_VALUE_ALERT))

"""The stateful rule engine: thresholds through `evaluate`, conversion, delta checks, suppression, ordering.

Limits come from the shipped critical_rules.json, whose numbers are those of shared/reference/clinical.md
(ARUP, Mayo, Houston Methodist) and KDIGO; expected outcomes below are worked out from those numbers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import pytest

from schemas import standard
from schemas.wire import validate_record
from streams.domain.reference import AlertPolicy, DeltaRule, RuleBook, load_reference
from streams.domain.rules import (
    RECENT_EVENTS,
    AlertDraft,
    AnalyteState,
    Decision,
    LabFacts,
    alert_id_for,
    alert_record,
    epoch_ms,
    evaluate,
    from_epoch_ms,
)
from tests.factories import lab_record, normalised

REFERENCE = load_reference()
RULES = REFERENCE.rulebook
POLICY = REFERENCE.policy
ALERT_SCHEMA = standard.load(standard.CRITICAL_VALUE_ALERT)
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
EVENTS = uuid.UUID("3d9b7c1e-0a54-4f0e-8d6b-2f1c9e7a5b30")

K, HB, GLU, CREA = "2823-3", "718-7", "2345-7", "2160-0"
UNITS = {K: "mmol/L", HB: "g/L", GLU: "mmol/L", CREA: "umol/L"}


def hours(h: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=h)


def lab(
    loinc: str,
    value: float,
    at: float = 0.0,
    *,
    status: str = "final",
    result: str | None = None,
    birth_year: int | None = None,
    sex: str | None = None,
    ward: str | None = "ICU-2",
    patient: str = "RP-0001",
) -> LabFacts:
    """A result `at` hours after T0; the event id is derived from the arguments: equal calls, same event."""
    key = f"{patient}|{loinc}|{value!r}|{at!r}|{status}|{result}|{birth_year}|{sex}"
    return LabFacts(
        event_id=str(uuid.uuid5(EVENTS, key)),
        regional_patient_id=patient,
        institution_id="H001",
        loinc_code=loinc,
        value=value,
        unit=UNITS[loinc],
        status=status,
        result_time=hours(at),
        correlation_id=f"corr-{key}"[:60],
        birth_year=birth_year,
        sex=sex,
        ward=ward,
        result_id=result if result is not None else f"H001|R-{key}",
    )


def run(*results: LabFacts, rules: RuleBook = RULES, policy: AlertPolicy = POLICY) -> list[Decision]:
    """Evaluate results in arrival order, each a minute after its result time, threading the state."""
    decisions: list[Decision] = []
    state: AnalyteState | None = None
    for facts in results:
        decision = evaluate(facts, state, rules, facts.result_time + dt.timedelta(minutes=1), policy)
        decisions.append(decision)
        state = decision.state
    return decisions


def kinds(decision: Decision) -> list[str]:
    return [alert.limit_kind for alert in decision.alerts]


# --- thresholds through evaluate -------------------------------------------------------------------

THRESHOLDS = [
    # (LOINC, canonical value, expected kinds); limits as the cited sources print them
    (K, 3.0, []),  # ARUP <3.0: exclusive
    (K, 2.99, ["LOW"]),
    (K, 6.1, []),  # ARUP >6.1: exclusive
    (K, 6.11, ["HIGH"]),
    (HB, 60.0, ["LOW"]),  # Mayo <=6.0 g/dL = 60 g/L: inclusive
    (HB, 60.1, []),
    (HB, 200.0, ["HIGH"]),  # Mayo >=20.0 g/dL = 200 g/L: inclusive
    (HB, 199.9, []),
    (GLU, 50 * 0.05551, ["LOW"]),  # HM <=50 mg/dL, in mmol/L with the clinical.md factor
    (GLU, 400 * 0.05551, []),  # HM >400 mg/dL
    (GLU, 401 * 0.05551, ["HIGH"]),
    (CREA, 900.0, []),  # no creatinine threshold rule
]


@pytest.mark.parametrize(("loinc", "value", "expected"), THRESHOLDS)
def test_thresholds_at_and_around_the_published_limits(loinc: str, value: float, expected: list[str]) -> None:
    """Inclusive limits fire at the limit itself, exclusive ones only beyond it."""
    (decision,) = run(lab(loinc, value))
    assert kinds(decision) == expected


def _raw_lab(local_code: str, value: float, unit: str) -> dict[str, Any]:
    return lab_record(
        "H001",
        local_code,
        value,
        unit,
        mrn="MRN55",
        at=T0,
        event_id=uuid.UUID("5a0c6e2d-7b3f-4c81-9e2a-1d4f6b8c0e97"),
        schema_version="2",
        correlation_id="corr-engine",
        result_id="R-55",
    )


@pytest.mark.parametrize(
    ("local_code", "value", "unit", "expected"),
    [
        ("GLU", 50.0, "mg/dL", ["LOW"]),  # HM <=50 mg/dL = 2.7755 mmol/L
        ("GLU", 50.05, "mg/dL", []),
        ("GLU", 2.7, "mmol/L", ["LOW"]),
        ("GLU", 400.0, "mg/dL", []),  # HM >400 mg/dL
        ("HGB", 6.0, "g/dL", ["LOW"]),  # Mayo <=6.0 g/dL
        ("HGB", 61.0, "g/L", []),
        ("CA", 5.9, "mg/dL", ["LOW"]),  # ARUP <6.0 mg/dL
        ("PO2", 39.0, "mmHg", ["LOW"]),  # ARUP <40 mmHg
        ("TNI", 0.31, "ng/mL", ["HIGH"]),  # ARUP >0.30 ng/mL = 300 ng/L
        ("TNI", 300.0, "ng/L", []),
    ],
)
def test_results_are_converted_before_thresholds(
    local_code: str, value: float, unit: str, expected: list[str]
) -> None:
    """Facts built from a normalised result carry the canonical value the limits were converted to."""
    facts = LabFacts.from_record(normalised("lab", _raw_lab(local_code, value, unit), T0), ward="W1")
    assert facts is not None and facts.unit == REFERENCE.analytes[facts.loinc_code].canonical_unit
    assert facts.result_id == "H001|R-55"
    decision = evaluate(facts, None, RULES, T0, POLICY)
    assert kinds(decision) == expected


def test_nothing_to_judge_gives_no_facts() -> None:
    """A text-only result has no value, so there are no facts to evaluate."""
    record = normalised("lab", _raw_lab("K", 4.0, "mmol/L"), T0)
    assert LabFacts.from_record({**record, "canonical_value": None, "value_text": "haemolysed"}) is None


def test_alert_carries_what_the_clinician_and_the_schema_need() -> None:
    """Value, limit, source, ward, previous value and a severity-based deadline travel with the alert."""
    first, second = run(lab(K, 4.2, 0), lab(K, 7.5, 2))
    assert first.alerts == ()
    (alert,) = second.alerts
    raised = hours(2) + dt.timedelta(minutes=1)
    assert (alert.limit_kind, alert.limit_value, alert.value, alert.unit) == ("HIGH", 6.1, 7.5, "mmol/L")
    assert (alert.previous_value, alert.previous_time) == (4.2, T0)
    assert (alert.ward, alert.suppressed_repeats, alert.severity) == ("ICU-2", 0, "CRITICAL")
    assert alert.raised_time == raised
    assert alert.deadline_time == raised + dt.timedelta(minutes=15)  # clinical.md: escalate after 15 min
    assert alert.rule_source.startswith("ARUP")
    assert alert.message == "Critical potassium: 7.5 mmol/L (> 6.1 mmol/L)"
    assert alert.alert_id == alert_id_for(alert.source_event_id, K, "HIGH")
    validate_record(alert_record(alert), ALERT_SCHEMA)


def test_alert_ids_are_stable_across_reprocessing() -> None:
    """The same event judged again later, from scratch, yields the same alert id (uuid5)."""
    facts = lab(K, 7.5)
    first = evaluate(facts, None, RULES, T0, POLICY).alerts[0]
    again = evaluate(facts, None, RULES, T0 + dt.timedelta(hours=5), POLICY).alerts[0]
    assert first.alert_id == again.alert_id
    assert uuid.UUID(first.alert_id).version == 5


def test_alert_record_has_exactly_the_schema_fields() -> None:
    """alert_record emits every CriticalValueAlert v2 field and nothing else."""
    _, decision = run(lab(HB, 125.0, 0), lab(HB, 55.0, 3))
    names = {f["name"] for f in json.loads(ALERT_SCHEMA.text)["fields"]}
    for alert in decision.alerts:
        record = alert_record(alert)
        assert set(record) == names
        validate_record(record, ALERT_SCHEMA)


# --- age and sex bands ------------------------------------------------------------------------------

NEWBORN_BOOK = RuleBook.build([*RULES.thresholds[GLU], *REFERENCE.example_rules])
MG_DL = 0.05551


@pytest.mark.parametrize(
    ("birth_year", "mg_dl", "expected"),
    [
        (2026, 40.0, []),  # newborn: HM <=30 mg/dL, so 40 is not critical
        (2026, 30.0, ["LOW"]),
        (2026, 260.0, ["HIGH"]),  # newborn: HM >=250
        (2026, 250.0, ["HIGH"]),
        (2025, 40.0, ["LOW"]),  # age 1: the adult HM <=50 applies
        (2025, 260.0, []),  # adult HM >400
        (None, 40.0, ["LOW"]),  # unknown age: the unbanded rule
        (2030, 40.0, ["LOW"]),  # impossible birth year: treated as unknown
    ],
)
def test_age_band_selection_with_the_cited_newborn_limits(
    birth_year: int | None, mg_dl: float, expected: list[str]
) -> None:
    """The Houston Methodist newborn band applies only to age 0 (result year - birth year)."""
    (decision,) = run(lab(GLU, mg_dl * MG_DL, birth_year=birth_year), rules=NEWBORN_BOOK)
    assert kinds(decision) == expected
    if expected:
        newborn = birth_year == 2026
        assert decision.alerts[0].message.startswith(
            "Critical newborn glucose" if newborn else "Critical glucose ("
        )


def _synthetic(limit: float, **band: Any) -> Any:
    (default,) = (rule for rule in RULES.thresholds[K] if rule.specificity == 0)
    return dataclasses.replace(default, low=limit, message=f"band {limit:g}", **band)


# Synthetic potassium bands (limits are labels, not clinical values) to pin down the precedence.
BANDED = RuleBook.build(
    [
        _synthetic(3.0),
        _synthetic(3.1, sex="female"),
        _synthetic(3.2, sex="female", age_max=17),
        _synthetic(3.3, sex="male", age_min=65),
    ]
)


@pytest.mark.parametrize(
    ("age", "sex", "chosen"),
    [
        (None, None, 3.0),
        (30, None, 3.0),
        (None, "female", 3.1),  # sex known, age unknown: the sex rule
        (10, "female", 3.2),  # sex and age beat sex alone
        (17, "female", 3.2),  # age_max is inclusive
        (18, "female", 3.1),
        (10, "male", 3.0),
        (64, "male", 3.0),
        (65, "male", 3.3),  # age_min is inclusive
        (90, "other", 3.0),
        (90, "unknown", 3.0),
    ],
)
def test_most_specific_band_wins(age: int | None, sex: str | None, chosen: float) -> None:
    """sex+age > sex or age > unbanded; a patient outside every band gets the unbanded rule."""
    rule = BANDED.threshold_for(K, age, sex)
    assert rule is not None and rule.low == chosen


@pytest.mark.parametrize(
    ("birth_year", "sex", "chosen"),
    [
        (2009, "Female", "band 3.2"),
        (2008, "female", "band 3.1"),
        (1961, "MALE", "band 3.3"),
        (None, None, "band 3"),
    ],
)
def test_evaluate_derives_age_from_birth_year_and_ignores_sex_case(
    birth_year: int | None, sex: str | None, chosen: str
) -> None:
    """2026 - 2009 = 17 (child band); sex codes are compared case-insensitively."""
    (decision,) = run(lab(K, 2.0, birth_year=birth_year, sex=sex), rules=BANDED)
    assert decision.alerts[0].message.startswith(chosen + ":")


# --- delta checks -------------------------------------------------------------------------------------

DELTAS = [
    # (LOINC, previous, value, hours between, expected kinds)
    (HB, 120.0, 100.0, 23.0, ["DELTA"]),  # fall of exactly 20 g/L: inclusive
    (HB, 120.0, 100.5, 23.0, []),  # 19.5
    (HB, 120.0, 100.0, 24.0, ["DELTA"]),  # window is inclusive: 24 h still counts
    (HB, 120.0, 100.0, 24.02, []),  # just outside 24 h
    (HB, 120.0, 140.0, 2.0, []),  # a rise: the haemoglobin check is fall-only
    (CREA, 80.0, 106.5, 47.0, ["DELTA"]),  # KDIGO +26.5 umol/L within 48 h
    (CREA, 80.0, 106.4, 47.0, []),
    (CREA, 80.0, 106.5, 49.0, []),  # outside 48 h, and +33 % is below 1.5 x
    (CREA, 80.0, 120.0, 100.0, ["DELTA"]),  # KDIGO 1.5 x baseline within 7 days
    (CREA, 80.0, 119.9, 100.0, []),
    (CREA, 80.0, 120.0, 168.0, ["DELTA"]),
    (CREA, 80.0, 120.0, 168.5, []),
    (CREA, 120.0, 60.0, 10.0, []),  # a fall: the creatinine checks are rise-only
]


@pytest.mark.parametrize(("loinc", "previous", "value", "gap", "expected"), DELTAS)
def test_delta_checks_window_threshold_and_direction(
    loinc: str, previous: float, value: float, gap: float, expected: list[str]
) -> None:
    """Consecutive results are compared in the canonical unit within each check's window."""
    first, second = run(lab(loinc, previous, 0), lab(loinc, value, gap))
    assert kinds(first) == []
    assert kinds(second) == expected
    for alert in second.alerts:
        assert (alert.previous_value, alert.previous_time) == (previous, T0)
        validate_record(alert_record(alert), ALERT_SCHEMA)


def test_first_firing_delta_check_wins_and_limit_is_the_value_to_reach() -> None:
    """80 -> 120 umol/L in 10 h meets both KDIGO checks; one DELTA alert, from the first (absolute) check."""
    _, second = run(lab(CREA, 80.0, 0), lab(CREA, 120.0, 10))
    (alert,) = second.alerts
    assert alert.limit_value == pytest.approx(106.5)  # 80 + 26.5
    assert alert.severity == "MODERATE"
    assert alert.deadline_time == alert.raised_time + dt.timedelta(hours=1)  # CLSI GP47: 1 hour
    assert "26.5" in alert.message and alert.rule_source.startswith("KDIGO")


def test_percent_delta_limit_value() -> None:
    """80 -> 125 after 60 h: only the percent check is in its window; the limit is 1.5 x 80 = 120."""
    _, second = run(lab(CREA, 80.0, 0), lab(CREA, 125.0, 60))
    (alert,) = second.alerts
    assert alert.limit_value == pytest.approx(120.0)
    assert "50%" in alert.message


def test_threshold_and_delta_raise_separate_alerts() -> None:
    """Hb 125 -> 55 g/L: below Mayo's 60 g/L and a fall of 70 g/L: two alerts, two ids, two deadlines."""
    _, second = run(lab(HB, 125.0, 0), lab(HB, 55.0, 3))
    low, delta = second.alerts
    assert (low.limit_kind, delta.limit_kind) == ("LOW", "DELTA")
    assert low.alert_id != delta.alert_id
    assert low.deadline_time - low.raised_time == dt.timedelta(minutes=15)  # CRITICAL
    assert delta.deadline_time - delta.raised_time == dt.timedelta(minutes=30)  # HIGH
    assert delta.limit_value == pytest.approx(105.0)  # 125 - 20


def _k_delta(**changes: Any) -> RuleBook:
    rule = DeltaRule(
        loinc=K,
        analyte="Potassium",
        kind="absolute",
        direction="fall",
        threshold=0.3,
        window=dt.timedelta(hours=12),
        inclusive=True,
        severity="HIGH",
        message="Potassium delta",
        source="TEST: synthetic",
    )
    return RuleBook.build(RULES.thresholds[K], [dataclasses.replace(rule, **changes)])


@pytest.mark.parametrize(
    ("changes", "previous", "value", "fires"),
    [
        ({}, 5.3, 5.0, True),  # 5.3 - 5.0 is 0.29999999999999982 in binary; still a 0.3 fall
        ({"inclusive": False}, 5.3, 5.0, False),
        ({"inclusive": False}, 5.3, 4.99, True),
        ({"direction": "rise"}, 5.3, 5.0, False),
        ({"direction": "rise"}, 4.1, 4.4, True),
        ({"direction": "any"}, 4.1, 4.4, True),
        ({"direction": "any"}, 4.4, 4.1, True),
        ({"direction": "any"}, 4.4, 4.2, False),
        ({"kind": "percent", "threshold": 10.0}, 5.0, 4.5, True),  # -10 %
        ({"kind": "percent", "threshold": 10.0}, 5.0, 4.55, False),
    ],
)
def test_delta_direction_kind_and_inclusive_flag(
    changes: dict[str, Any], previous: float, value: float, fires: bool
) -> None:
    """Synthetic checks: exact boundaries survive floating point; direction and kind are honoured."""
    _, second = run(lab(K, previous, 0), lab(K, value, 1), rules=_k_delta(**changes))
    assert kinds(second) == (["DELTA"] if fires else [])


def test_no_delta_against_a_zero_previous_value() -> None:
    """A percent change from zero is undefined and never fires."""
    book = _k_delta(kind="percent", threshold=10.0, direction="any")
    assert DeltaRule.fires(book.deltas_for(K)[0], 0.0, 4.0) is None


def test_first_result_has_no_delta() -> None:
    """Without a previous value there is nothing to compare."""
    (decision,) = run(lab(HB, 90.0))
    assert decision.alerts == () and decision.state.last_value == 90.0


# --- suppression ----------------------------------------------------------------------------------------


def test_repeats_are_suppressed_and_counted_until_a_worse_value() -> None:
    """K 6.5 alerts; 6.5 and 6.3 within 8 h are counted on it; 6.8 is worse and alerts anew."""
    d = run(lab(K, 6.5, 0), lab(K, 6.5, 1), lab(K, 6.3, 2), lab(K, 6.8, 3), lab(K, 6.6, 4))
    first = d[0].alerts[0]
    assert [len(x.alerts) for x in d] == [1, 0, 0, 1, 0]
    assert [x.suppressed for x in d] == [False, True, True, False, True]
    assert [u.suppressed_repeats for u in d[1].updated_alerts] == [1]
    assert [u.suppressed_repeats for u in d[2].updated_alerts] == [2]
    assert d[1].updated_alerts[0].alert_id == d[2].updated_alerts[0].alert_id == first.alert_id
    assert d[2].updated_alerts[0] == dataclasses.replace(first, suppressed_repeats=2)
    worse = d[3].alerts[0]
    assert worse.alert_id != first.alert_id and worse.suppressed_repeats == 0
    assert [(u.alert_id, u.suppressed_repeats) for u in d[4].updated_alerts] == [(worse.alert_id, 1)]
    for update in (*d[1].updated_alerts, *d[2].updated_alerts, *d[4].updated_alerts):
        validate_record(alert_record(update), ALERT_SCHEMA)


@pytest.mark.parametrize(
    ("gap", "suppressed"),
    [(1.0, True), (7.99, True), (8.0, False), (30.0, False)],
)
def test_suppression_window_is_eight_hours(gap: float, suppressed: bool) -> None:
    """clinical.md: most repeats come more than 8 h apart; a repeat 8 h or more later alerts again."""
    _, second = run(lab(K, 6.5, 0), lab(K, 6.5, gap))
    assert second.suppressed is suppressed
    assert len(second.alerts) == (0 if suppressed else 1)


@pytest.mark.parametrize(
    ("values", "alerting"),
    [
        ([2.8, 2.9, 2.7, 2.7, 2.75], [True, False, True, False, False]),  # LOW: lower is worse
        ([2.8, 6.5, 2.8, 6.5], [True, True, False, False]),  # LOW and HIGH are suppressed apart
        ([6.5, 4.0, 6.5], [True, False, False]),  # a normal value in between ends nothing
    ],
)
def test_worse_means_further_beyond_the_limit_per_direction(
    values: list[float], alerting: list[bool]
) -> None:
    """Each limit kind keeps its own open alert; only a value further out re-alerts."""
    decisions = run(*(lab(K, v, i * 0.5) for i, v in enumerate(values)))
    assert [bool(d.alerts) for d in decisions] == alerting


def test_delta_repeats_compare_the_size_of_the_change() -> None:
    """Hb 130 -> 110 (-20) alerts; 110 -> 90 (-20) is not a larger change; 90 -> 65 (-25) is."""
    d = run(lab(HB, 130.0, 0), lab(HB, 110.0, 2), lab(HB, 90.0, 4), lab(HB, 65.0, 6))
    assert [kinds(x) for x in d] == [[], ["DELTA"], [], ["DELTA"]]
    assert [(u.limit_kind, u.suppressed_repeats) for u in d[2].updated_alerts] == [("DELTA", 1)]


def test_zero_window_never_suppresses() -> None:
    """A hub may switch suppression off."""
    policy = dataclasses.replace(POLICY, suppression_window=dt.timedelta(0))
    decisions = run(lab(K, 6.5, 0), lab(K, 6.5, 1), policy=policy)
    assert [len(d.alerts) for d in decisions] == [1, 1]


# --- ordering, cancellations, corrections, redelivery ----------------------------------------------------


def test_out_of_order_result_alerts_on_thresholds_but_keeps_the_latest_value() -> None:
    """A late older result is still a critical value someone must hear, but it is not the latest value."""
    newer, older = run(lab(K, 4.0, 2), lab(K, 7.0, 1))
    assert older.out_of_order and kinds(older) == ["HIGH"]
    assert older.alerts[0].previous_value is None
    assert (older.state.last_value, older.state.last_time_ms) == (4.0, epoch_ms(hours(2)))
    assert older.state.last_event_id == newer.state.last_event_id


def test_out_of_order_result_runs_no_delta_and_later_deltas_use_the_latest() -> None:
    """Hb 120 at 10 h, a late 95 from 5 h (no delta), then 100 at 11 h: -20 from 120 fires."""
    d = run(lab(HB, 120.0, 10), lab(HB, 95.0, 5), lab(HB, 100.0, 11))
    assert [kinds(x) for x in d] == [[], [], ["DELTA"]]
    assert d[2].alerts[0].previous_value == 120.0


@pytest.mark.parametrize("value", [7.5, 1.5])
def test_cancelled_results_never_alert_nor_become_previous(value: float) -> None:
    """A withdrawn result sends nobody anywhere and is no baseline for later results."""
    (decision,) = run(lab(K, value, status="cancelled"))
    assert decision.alerts == () and decision.updated_alerts == ()
    assert decision.state.last_value is None


def test_cancelled_other_result_leaves_the_baseline() -> None:
    """Hb 120, a cancelled 90, then 98: the fall is 22 from 120."""
    d = run(lab(HB, 120.0, 0), lab(HB, 90.0, 1, status="cancelled"), lab(HB, 98.0, 2))
    assert [kinds(x) for x in d] == [[], [], ["DELTA"]]
    assert d[2].alerts[0].previous_value == 120.0


def test_cancelling_the_latest_result_restores_the_one_before() -> None:
    """Hb 120 (R1), 150 (R2), R2 cancelled, then 130: compared with 120 (a rise), not 150 (a fall of 20)."""
    d = run(
        lab(HB, 120.0, 0, result="R1"),
        lab(HB, 150.0, 1, result="R2"),
        lab(HB, 150.0, 1.5, result="R2", status="cancelled"),
        lab(HB, 130.0, 2, result="R3"),
    )
    assert d[2].state.last_value == 120.0
    assert kinds(d[3]) == []


def test_cancelling_the_latest_two_results_restores_the_one_before_both() -> None:
    """Hb 120 (R1), 150 (R2), 100 (R3); R3 then R2 cancelled: the latest is 120 of R1, never the
    cancelled 150 (before, the second cancellation left it: R2 had become the latest without its id)."""
    d = run(
        lab(HB, 120.0, 0, result="R1"),
        lab(HB, 150.0, 1, result="R2"),
        lab(HB, 100.0, 2, result="R3"),
        lab(HB, 100.0, 2.5, result="R3", status="cancelled"),
        lab(HB, 150.0, 2.6, result="R2", status="cancelled"),
        lab(HB, 125.0, 3, result="R4"),
    )
    assert (d[3].state.last_value, d[3].state.last_result_id) == (150.0, "R2")
    assert d[3].state.prior_value == 120.0
    assert (d[4].state.last_value, d[4].state.last_result_id) == (120.0, "R1")
    assert d[4].state.last_time_ms == epoch_ms(hours(0))
    assert kinds(d[5]) == []  # compared with 120 (R1), not the cancelled 150 (a fall of 25)
    assert d[5].state.prior_value == 120.0


def test_cancelling_the_result_before_the_latest_leaves_no_cancelled_previous_value() -> None:
    """Hb 120 (R1), 150 (R2), 130 (R3); R2 cancelled, then R3 cancelled: the latest is 120 of R1."""
    d = run(
        lab(HB, 120.0, 0, result="R1"),
        lab(HB, 150.0, 1, result="R2"),
        lab(HB, 130.0, 2, result="R3"),
        lab(HB, 150.0, 2.5, result="R2", status="cancelled"),
        lab(HB, 130.0, 2.6, result="R3", status="cancelled"),
    )
    assert (d[3].state.last_value, d[3].state.prior_value) == (130.0, 120.0)
    assert (d[4].state.last_value, d[4].state.last_result_id, d[4].state.prior_value) == (120.0, "R1", None)


def test_cancelled_alerted_result_does_not_suppress_the_next_one() -> None:
    """K 7.0 (R1) alerts and is cancelled; K 6.8 an hour later must alert, not count as a repeat."""
    d = run(
        lab(K, 7.0, 0, result="R1"),
        lab(K, 7.0, 0.5, result="R1", status="cancelled"),
        lab(K, 6.8, 1, result="R2"),
    )
    assert [kinds(x) for x in d] == [["HIGH"], [], ["HIGH"]]
    assert d[1].state.open_alerts == ()


def test_cancelling_an_older_alerted_result_also_frees_its_alert() -> None:
    """K 7.0 (R1) alerts, 6.9 (R2) is a repeat, R1 is cancelled: the next 6.8 (R3) alerts again."""
    d = run(
        lab(K, 7.0, 0, result="R1"),
        lab(K, 6.9, 0.5, result="R2"),
        lab(K, 7.0, 0.7, result="R1", status="cancelled"),
        lab(K, 6.8, 1, result="R3"),
    )
    assert [kinds(x) for x in d] == [["HIGH"], [], [], ["HIGH"]]
    assert d[2].state.last_value == 6.9  # R2 stays the latest value


def test_corrected_result_alerts_anew_even_when_not_worse() -> None:
    """K 6.5 (R1) corrected to 6.4: a new alert with a new id; the clinician must hear the correction."""
    first, corrected = run(lab(K, 6.5, 0, result="R1"), lab(K, 6.4, 0.5, result="R1", status="corrected"))
    assert kinds(corrected) == ["HIGH"]
    assert corrected.alerts[0].alert_id != first.alerts[0].alert_id
    assert corrected.alerts[0].value == 6.4
    assert corrected.state.last_value == 6.4


def test_corrected_result_compares_with_the_result_before_the_one_it_corrects() -> None:
    """Hb 120 (R1), 140 (R2, wrong), R2 corrected to 118: -2 from 120, not -22 from 140."""
    d = run(
        lab(HB, 120.0, 0, result="R1"),
        lab(HB, 140.0, 2, result="R2"),
        lab(HB, 118.0, 3, result="R2", status="corrected"),
    )
    assert kinds(d[2]) == []
    assert (d[2].state.last_value, d[2].state.prior_value) == (118.0, 120.0)


def test_final_version_of_an_alerted_preliminary_is_not_a_repeat() -> None:
    """K 6.5 preliminary alerts; the same result released final is neither a new alert nor a repeat."""
    _, final = run(lab(K, 6.5, 0, result="R1", status="preliminary"), lab(K, 6.5, 0.2, result="R1"))
    assert final.alerts == () and final.updated_alerts == () and final.suppressed


def test_redelivered_event_changes_nothing_and_reissues_its_alert() -> None:
    """At-least-once delivery: the same event again yields the same alert and the same state."""
    facts = lab(K, 7.5)
    first = evaluate(facts, None, RULES, T0, POLICY)
    again = evaluate(facts, first.state, RULES, T0 + dt.timedelta(minutes=5), POLICY)
    assert again.duplicate and again.state == first.state
    assert again.alerts == first.alerts and again.updated_alerts == ()


def test_redelivered_repeat_is_not_counted_twice() -> None:
    """A suppressed repeat delivered twice counts once."""
    d = run(lab(K, 6.5, 0), lab(K, 6.5, 1), lab(K, 6.5, 1))
    assert d[2].duplicate and d[2].updated_alerts == () and d[2].alerts == ()
    assert d[2].state.open_alert("HIGH") is not None
    assert d[2].state.open_alert("HIGH").alert.suppressed_repeats == 1  # type: ignore[union-attr]


def test_naive_result_time_is_refused() -> None:
    """The hub carries UTC instants only."""
    facts = dataclasses.replace(lab(K, 7.0), result_time=dt.datetime(2026, 11, 23, 8, 0))
    with pytest.raises(ValueError, match="naive"):
        evaluate(facts, None, RULES, T0, POLICY)


# --- state serialisation ----------------------------------------------------------------------------------


def test_epoch_ms_round_trip_and_truncation() -> None:
    """Times are kept as epoch milliseconds; sub-millisecond parts are dropped, as in Avro."""
    moment = dt.datetime(2026, 11, 23, 8, 0, 0, 123456, tzinfo=dt.UTC)
    assert epoch_ms(moment) == 1795420800123
    assert from_epoch_ms(epoch_ms(moment)) == moment.replace(microsecond=123000)


def test_full_state_round_trips_through_json() -> None:
    """A state with every field set survives JSON and decides the next result the same way."""
    d = run(
        lab(HB, 125.0, 0, result="R1"),
        lab(HB, 55.0, 3, result="R2"),
        lab(HB, 56.0, 4, result="R3"),
    )
    state = d[-1].state
    assert state.prior_value is not None and len(state.open_alerts) == 2 and state.recent_event_ids
    restored = AnalyteState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    assert restored == state
    follow = lab(HB, 40.0, 5)
    now = hours(5)
    assert evaluate(follow, restored, RULES, now, POLICY) == evaluate(follow, state, RULES, now, POLICY)


def test_a_stored_history_reads_back_typed_and_a_malformed_entry_is_refused() -> None:
    """History entries are JSON lists: read back with their numbers typed, and exactly 13 fields."""
    state = run(lab(K, 4.0), lab(K, 4.2, 1))[-1].state
    stored = json.loads(json.dumps(state.to_dict()))
    stored["history"][0][1] = float(stored["history"][0][1])  # a result time read back as a float
    restored = AnalyteState.from_dict(stored)
    assert restored == state
    assert type(restored.history[0].result_ms) is int and type(restored.history[0].value) is float
    stored["history"][0] = stored["history"][0][:-1]
    with pytest.raises(TypeError):
        AnalyteState.from_dict(stored)


def test_alert_draft_round_trips() -> None:
    """Alert drafts in the state are plain JSON too."""
    (alert,) = run(lab(K, 7.5))[0].alerts
    assert AlertDraft.from_dict(json.loads(json.dumps(alert.to_dict()))) == alert


def test_remembered_event_ids_are_bounded() -> None:
    """The state keeps the last RECENT_EVENTS event ids, so it stays small however long the history."""
    decisions = run(*(lab(K, 4.0 + i / 100, i) for i in range(RECENT_EVENTS + 8)))
    recent = decisions[-1].state.recent_event_ids
    assert len(recent) == RECENT_EVENTS
    assert recent == tuple(d.state.last_event_id for d in decisions[-RECENT_EVENTS:])


def _judged_at(facts: LabFacts, age: dt.timedelta, state: AnalyteState | None = None) -> Decision:
    return evaluate(facts, state, RULES, facts.result_time + age, POLICY)


@pytest.mark.parametrize(
    ("age", "alerted"),
    [
        (dt.timedelta(minutes=1), True),
        (dt.timedelta(days=6, hours=23), True),  # a late result, still one to act on
        (dt.timedelta(days=7), True),  # exactly at the window
        (dt.timedelta(days=7, minutes=1), False),
        (dt.timedelta(days=400), False),
    ],
)
def test_results_older_than_the_alert_window_raise_nothing(age: dt.timedelta, alerted: bool) -> None:
    assert POLICY.alert_within == dt.timedelta(days=7)
    decision = _judged_at(lab(K, 7.5), age)
    assert bool(decision.alerts) is alerted
    assert decision.late is not alerted
    assert decision.state.last_value == 7.5  # judged or not, it is the latest value now
    assert lab(K, 7.5).event_id in decision.state.recent_event_ids


def test_an_old_result_still_becomes_the_previous_value_of_the_next_delta_check() -> None:
    old = _judged_at(lab(HB, 130.0), dt.timedelta(days=8))
    assert old.late and not old.alerts
    fresh = _judged_at(lab(HB, 100.0, at=20.0), dt.timedelta(minutes=1), old.state)
    assert [(a.limit_kind, a.previous_value) for a in fresh.alerts] == [("DELTA", 130.0)]


def test_a_replay_after_the_alert_was_acknowledged_and_forgotten_raises_it_no_more() -> None:
    """Acknowledged alerts are remembered ACK_RETENTION (7 days); after that only the age rule stands
    between a consumer-group replay and a second escalation of a result long dealt with."""
    from streams.domain.escalation import ACK_RETENTION

    first = _judged_at(lab(K, 7.5), dt.timedelta(minutes=1))
    assert first.alerts
    replayed = _judged_at(lab(K, 7.5), ACK_RETENTION + dt.timedelta(hours=1), state=None)  # state long gone
    assert replayed.alerts == () and replayed.late

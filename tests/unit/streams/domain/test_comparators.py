"""Results that are bounds, not measurements: "> 600 mg/dL" is critical, "> 100 mg/dL" cannot be."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.domain.reference import ThresholdRule, load_reference
from streams.domain.rules import AnalyteState, LabFacts, alert_record, crossed_limit, evaluate

REFERENCE = load_reference()
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
GLUCOSE, POTASSIUM = "2345-7", "2823-3"


def rule(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> ThresholdRule:
    return ThresholdRule(
        loinc="0000-0",
        analyte="X",
        low=low,
        high=high,
        low_inclusive=low_inclusive,
        high_inclusive=high_inclusive,
        severity="CRITICAL",
        message="m",
        source="s",
    )


@pytest.mark.parametrize(
    ("value", "comparator", "inclusive", "expected"),
    [
        # high limit 20
        (25.0, ">", True, "HIGH"),  # more than 25: above 20 whatever it is
        (20.0, ">", False, "HIGH"),  # more than 20 is above an exclusive 20
        (20.0, ">=", True, "HIGH"),  # at least 20 reaches an inclusive 20
        (20.0, ">=", False, None),  # it may be exactly 20, which an exclusive limit does not count
        (15.0, ">", True, None),  # more than 15: may be 16, normal
        (25.0, "<", True, None),  # less than 25 says nothing about the high limit
        # low limit 10
        (5.0, "<", True, "LOW"),
        (10.0, "<", False, "LOW"),  # less than 10 is below an exclusive 10
        (10.0, "<=", True, "LOW"),
        (10.0, "<=", False, None),
        (12.0, "<", True, None),  # less than 12: may be 11, normal
        (5.0, ">", True, None),  # more than 5 says nothing about the low limit
        # plain values, as before
        (20.0, None, True, "HIGH"),
        (20.0, None, False, None),
        (10.0, None, True, "LOW"),
    ],
)
def test_a_bound_crosses_a_limit_only_when_every_value_it_allows_does(
    value: float, comparator: str | None, inclusive: bool, expected: str | None
) -> None:
    crossed = crossed_limit(value, rule(10.0, 20.0, inclusive, inclusive), comparator)
    assert (crossed[0] if crossed else None) == expected


def test_an_unknown_comparator_is_a_bug_not_a_guess() -> None:
    with pytest.raises(ValueError, match="comparator"):
        crossed_limit(5.0, rule(10.0, 20.0, True, True), "~")


def _allowed(value: float, comparator: str | None, probe: float) -> float:
    """A value the bound allows, `probe` (>= 0) away from it."""
    step = probe if comparator in (">=", "<=", None) else probe + 1e-6
    if comparator is None:
        return value
    return value + step if comparator in (">", ">=") else value - step


@given(
    value=st.floats(-50, 50, allow_nan=False),
    comparator=st.sampled_from([None, "<", "<=", ">=", ">"]),
    low=st.one_of(st.none(), st.floats(-40, -1, allow_nan=False)),
    high=st.one_of(st.none(), st.floats(1, 40, allow_nan=False)),  # rules have low < high
    low_inclusive=st.booleans(),
    high_inclusive=st.booleans(),
    probes=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=5),
)
def test_never_an_alert_a_possible_value_would_not_raise(
    value: float,
    comparator: str | None,
    low: float | None,
    high: float | None,
    low_inclusive: bool,
    high_inclusive: bool,
    probes: list[float],
) -> None:
    """Whatever the true value behind the bound, it crosses the limit the bound was alerted on."""
    limits = rule(low, high, low_inclusive, high_inclusive)
    crossed = crossed_limit(value, limits, comparator)
    if crossed is None:
        return
    for probe in [0.0, *probes]:
        if comparator in (">", "<") and probe == 0.0:
            continue  # a strict bound never allows the bound itself
        actual = _allowed(value, comparator, probe)
        again = crossed_limit(actual, limits)
        assert again is not None and again[0] == crossed[0], (actual, crossed)


def facts(value: float, comparator: str | None, loinc: str = GLUCOSE, **changes: object) -> LabFacts:
    fields: dict[str, object] = {
        "event_id": "e-1",
        "regional_patient_id": "rp-1",
        "institution_id": "H001",
        "loinc_code": loinc,
        "value": value,
        "unit": REFERENCE.analytes[loinc].canonical_unit,
        "status": "final",
        "result_time": NOW - dt.timedelta(minutes=5),
        "correlation_id": "c-1",
        "birth_year": 1960,
        "sex": "female",
        "result_id": "H001|R-1",
        "comparator": comparator,
    }
    fields.update(changes)
    return LabFacts(**fields)  # type: ignore[arg-type]


def test_glucose_above_the_measuring_range_alerts_with_the_bound_on_the_alert() -> None:
    """> 600 mg/dL (33.3 mmol/L): critical (limit 25 mmol/L at the sources in critical_rules.json)."""
    decision = evaluate(facts(600 * 0.0555, ">"), None, REFERENCE.rulebook, NOW, REFERENCE.policy)
    (alert,) = decision.alerts
    assert (alert.limit_kind, alert.value_comparator) == ("HIGH", ">")
    assert "> 33.3" in alert.message
    assert alert_record(alert)["value_comparator"] == ">"


def test_potassium_below_the_measuring_range_alerts_low() -> None:
    decision = evaluate(facts(1.0, "<", POTASSIUM), None, REFERENCE.rulebook, NOW, REFERENCE.policy)
    assert [a.limit_kind for a in decision.alerts] == ["LOW"]


def test_a_bound_that_cannot_be_critical_raises_nothing() -> None:
    """> 6 mmol/L glucose may be 6.1: no alert."""
    assert evaluate(facts(6.0, ">"), None, REFERENCE.rulebook, NOW, REFERENCE.policy).alerts == ()


def test_a_bound_runs_no_delta_check_and_leaves_the_last_measured_value() -> None:
    first = evaluate(facts(7.0, None, event_id="e-0", result_id="H001|R-0"), None, REFERENCE.rulebook, NOW)
    bounded = evaluate(facts(1.0, "<"), first.state, REFERENCE.rulebook, NOW)
    assert [a.limit_kind for a in bounded.alerts] == ["LOW"]
    assert bounded.state.last_value == first.state.last_value == 7.0
    assert isinstance(bounded.state, AnalyteState)

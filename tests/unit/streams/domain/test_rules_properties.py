"""Properties of the rule engine over generated result sequences (hypothesis)."""

from __future__ import annotations

import datetime as dt
import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import standard
from schemas.wire import validate_record
from streams.domain.reference import load_reference
from streams.domain.rules import RECENT_EVENTS, AnalyteState, Decision, LabFacts, alert_record, evaluate

REFERENCE = load_reference()
RULES = REFERENCE.rulebook
POLICY = REFERENCE.policy
ALERT_SCHEMA = standard.load(standard.CRITICAL_VALUE_ALERT)
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
NAMESPACE = uuid.UUID("0c8e2f4a-6b1d-4e3f-9a5c-7d2b4f6e8a10")
K_HIGH = 6.1  # ARUP >6.1 mmol/L
WINDOW_MINUTES = 8 * 60  # clinical.md: most repeats come more than 8 h apart

SETTINGS = settings(max_examples=150, deadline=None)


def potassium(
    index: int, value: float, minute: int, status: str = "final", result: str | None = None
) -> LabFacts:
    return LabFacts(
        event_id=str(uuid.uuid5(NAMESPACE, f"{index}")),
        regional_patient_id="RP-PROP",
        institution_id="H001",
        loinc_code="2823-3",
        value=value,
        unit="mmol/L",
        status=status,
        result_time=T0 + dt.timedelta(minutes=minute),
        correlation_id=f"corr-{index}",
        result_id=result or f"H001|R{index}",
    )


def run(results: list[LabFacts]) -> list[Decision]:
    state: AnalyteState | None = None
    decisions = []
    for facts in results:
        decision = evaluate(facts, state, RULES, facts.result_time + dt.timedelta(minutes=2), POLICY)
        decisions.append(decision)
        state = decision.state
    return decisions


high_values = st.floats(min_value=6.11, max_value=14.0, allow_nan=False).map(lambda v: round(v, 2))
minutes_in_window = st.lists(st.integers(min_value=0, max_value=WINDOW_MINUTES - 1), min_size=1, max_size=12)


@SETTINGS
@given(
    readings=st.lists(
        st.tuples(high_values, st.integers(min_value=0, max_value=WINDOW_MINUTES - 1)),
        min_size=1,
        max_size=12,
    )
)
def test_non_worsening_repeats_within_the_window_raise_one_alert(readings: list[tuple[float, int]]) -> None:
    """However a non-rising run of critical potassium values is timed within 8 h, one alert, n-1 repeats."""
    values = sorted((value for value, _ in readings), reverse=True)
    times = sorted(minute for _, minute in readings)
    decisions = run([potassium(i, v, t) for i, (v, t) in enumerate(zip(values, times, strict=True))])
    assert sum(len(d.alerts) for d in decisions) == 1
    final = decisions[-1].state.open_alert("HIGH")
    assert final is not None and final.alert.suppressed_repeats == len(values) - 1
    assert all(d.suppressed for d in decisions[1:])


@SETTINGS
@given(
    values=st.lists(
        st.one_of(high_values, st.floats(min_value=3.0, max_value=6.1).map(lambda v: round(v, 2))),
        min_size=1,
        max_size=15,
    ),
    minutes=st.lists(st.integers(min_value=0, max_value=WINDOW_MINUTES - 1), min_size=15, max_size=15),
)
def test_within_the_window_only_new_highs_alert(values: list[float], minutes: list[int]) -> None:
    """Alerts are raised exactly at critical values above every earlier alerted one (running maximum)."""
    times = sorted(minutes)[: len(values)]
    decisions = run([potassium(i, v, t) for i, (v, t) in enumerate(zip(values, times, strict=True))])
    expected, highest = [], None
    for value in values:
        alerting = value > K_HIGH and (highest is None or value > highest)
        expected.append(alerting)
        if alerting:
            highest = value
    assert [bool(d.alerts) for d in decisions] == expected
    repeats = sum(1 for value in values if value > K_HIGH) - sum(expected)
    assert sum(len(d.updated_alerts) for d in decisions) == repeats


@st.composite
def result_sequences(draw: st.DrawFn) -> list[LabFacts]:
    """Mixed potassium results: any value, times out of order, cancellations, corrections, redeliveries."""
    count = draw(st.integers(min_value=1, max_value=14))
    results: list[LabFacts] = []
    for index in range(count):
        if results and draw(st.integers(0, 9)) == 0:
            results.append(draw(st.sampled_from(results)))  # redelivery of an earlier event
            continue
        results.append(
            potassium(
                index,
                round(draw(st.floats(min_value=1.5, max_value=9.0)), 2),
                draw(st.integers(min_value=0, max_value=24 * 60)),
                draw(st.sampled_from(["final", "final", "preliminary", "corrected", "cancelled"])),
                f"H001|R{draw(st.integers(0, 4))}",
            )
        )
    return results


@SETTINGS
@given(results=result_sequences())
def test_every_state_round_trips_through_json_and_decides_alike(results: list[LabFacts]) -> None:
    """A Faust changelog stores the state as JSON: restoring it must change no later decision."""
    state: AnalyteState | None = None
    for facts in results:
        now = facts.result_time + dt.timedelta(minutes=2)
        decision = evaluate(facts, state, RULES, now, POLICY)
        if state is not None:
            restored = AnalyteState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
            assert restored == state
            assert evaluate(facts, restored, RULES, now, POLICY) == decision
        state = decision.state
    assert state is not None
    assert AnalyteState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@SETTINGS
@given(results=result_sequences())
def test_invariants_over_any_sequence(results: list[LabFacts]) -> None:
    """Cancelled results never alert; late ones become the latest value only as a new version of a kept
    result; alerts fit the schema."""
    state: AnalyteState | None = None
    raised: dict[str, str] = {}
    for facts in results:
        decision = evaluate(facts, state, RULES, facts.result_time + dt.timedelta(minutes=2), POLICY)
        if facts.status == "cancelled":
            assert decision.alerts == () or decision.duplicate
        if decision.out_of_order:
            # Rule 5: a late result takes its place by result time, so it becomes the latest value only
            # as a new version of a result kept in the history (a version replaces the one before it).
            assert state is not None
            kept = {entry.result_id for entry in state.history}
            assert decision.state.last_event_id != facts.event_id or facts.result_id in kept
        for alert in (*decision.alerts, *decision.updated_alerts):
            validate_record(alert_record(alert), ALERT_SCHEMA)
            assert raised.setdefault(alert.alert_id, alert.source_event_id) == alert.source_event_id
        kinds = [entry.alert.limit_kind for entry in decision.state.open_alerts]
        assert len(kinds) == len(set(kinds))
        assert len(decision.state.recent_event_ids) <= RECENT_EVENTS
        state = decision.state

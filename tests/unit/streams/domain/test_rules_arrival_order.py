"""Rule 5: judgement that does not depend on arrival order (issue 11, item 5).

A late result is judged in its place by result time: against its predecessor, and its successors again
against it. Every alert of the in-order run is raised whatever the arrival order, with the same id; an
alert raised only because a result came late is never withdrawn, and carries a note saying so.
Limits: Hb (718-7) LOW <= 60 g/L, HIGH >= 200 g/L (Mayo), DELTA a fall of >= 20 g/L within 24 h
(EP33-LOCAL); K (2823-3) HIGH > 6.1 mmol/L (ARUP); suppression window 8 h.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.reference import load_reference
from streams.domain.rules import (
    HISTORY_LIMIT,
    AlertDraft,
    AnalyteState,
    Decision,
    LabFacts,
    alert_id_for,
    epoch_ms,
    evaluate,
)

REFERENCE = load_reference()
RULES = REFERENCE.rulebook
POLICY = REFERENCE.policy
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
NAMESPACE = uuid.UUID("9b3e1f6a-2c4d-4e8f-a1b2-c3d4e5f60718")
HB, K = "718-7", "2823-3"
UNITS = {HB: "g/L", K: "mmol/L"}
INSTITUTIONS = ("H001", "H002", "H003")


def lab(
    index: int,
    value: float,
    minutes: int,
    *,
    loinc: str = HB,
    institution: str = "H001",
    status: str = "final",
    result: str | None = None,
    comparator: str | None = None,
) -> LabFacts:
    return LabFacts(
        event_id=str(uuid.uuid5(NAMESPACE, f"{loinc}|{index}|{status}")),
        regional_patient_id="RP-LATE",
        institution_id=institution,
        loinc_code=loinc,
        value=value,
        unit=UNITS[loinc],
        status=status,
        result_time=T0 + dt.timedelta(minutes=minutes),
        correlation_id=f"corr-{index}",
        result_id=result or f"{institution}|R{index}",
        comparator=comparator,
    )


def run(results: list[LabFacts], now: dt.datetime | None = None) -> list[Decision]:
    """Arrival order as given; judged at `now` (default: a minute after each result)."""
    state: AnalyteState | None = None
    decisions = []
    for facts in results:
        decision = evaluate(facts, state, RULES, now or facts.result_time + dt.timedelta(minutes=1), POLICY)
        decisions.append(decision)
        state = decision.state
    return decisions


def raised(decisions: list[Decision]) -> dict[str, AlertDraft]:
    return {alert.alert_id: alert for d in decisions for alert in d.alerts}


def noted(decisions: list[Decision]) -> dict[str, AlertDraft]:
    return {alert.alert_id: alert for d in decisions for alert in d.updated_alerts if alert.note}


# --- the property of the issue ---------------------------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> list[LabFacts]:
    """Up to 8 Hb results of one patient from 2-3 institutions within 20 h (inside the 24 h delta window,
    across the 8 h suppression window), values around the LOW limit and with falls of 20 g/L or more."""
    count = draw(st.integers(min_value=1, max_value=8))
    minutes = draw(st.lists(st.integers(0, 20 * 60), min_size=count, max_size=count, unique=True))
    institutions = INSTITUTIONS[: draw(st.integers(2, 3))]
    return [
        lab(
            i,
            float(draw(st.sampled_from([45, 55, 60, 70, 80, 95, 100, 120, 140, 205]))),
            minute,
            institution=draw(st.sampled_from(institutions)),
        )
        for i, minute in enumerate(minutes)
    ]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), results=histories())
def test_every_in_order_alert_is_raised_in_any_arrival_order(
    data: st.DataObject, results: list[LabFacts]
) -> None:
    """Every alert of the in-order run is raised (same id) in any interleaving; any other alert raised
    along the way has been given the late-result note by the end, and the final judgement is the same."""
    now = T0 + dt.timedelta(hours=21)
    in_order_run = run(sorted(results, key=lambda facts: facts.result_time), now)
    arrival = data.draw(st.permutations(results))
    permuted_run = run(arrival, now)
    in_order, permuted, notes = raised(in_order_run), raised(permuted_run), noted(permuted_run)
    assert set(in_order) <= set(permuted)
    assert set(permuted) - set(in_order) <= set(notes)
    assert set(notes) <= set(permuted)
    assert all(d.updated_alerts == () or not noted([d]) for d in in_order_run)  # in order: no notes
    for alert_id, alert in in_order.items():
        assert alert_id == alert_id_for(alert.source_event_id, HB, alert.limit_kind)
        first = permuted[alert_id]
        if (first.previous_value, first.previous_time) != (alert.previous_value, alert.previous_time):
            assert alert_id in notes  # raised with another comparison: the note says which it has now
    for alert in notes.values():
        assert "received late now precedes this one" in (alert.note or "")
    last, final = in_order_run[-1].state, permuted_run[-1].state
    assert (final.last_value, final.last_time_ms, final.prior_value) == (
        last.last_value,
        last.last_time_ms,
        last.prior_value,
    )
    assert [e.alert.alert_id for e in final.open_alerts] == [e.alert.alert_id for e in last.open_alerts]
    assert [facts.event_id for facts in final.history] == [facts.event_id for facts in last.history]


@settings(max_examples=200, deadline=None)
@given(data=st.data(), results=histories())
def test_a_late_note_is_given_once(data: st.DataObject, results: list[LabFacts]) -> None:
    """However many late results change an alert's comparison, it is noted once: a later update of it
    (a repeat counted) carries the same note."""
    decisions = run(data.draw(st.permutations(results)), T0 + dt.timedelta(hours=21))
    notes: dict[str, str] = {}
    for alert in (alert for d in decisions for alert in d.updated_alerts if alert.note):
        assert notes.setdefault(alert.alert_id, alert.note) == alert.note


# --- cases -----------------------------------------------------------------------------------------------


def test_a_late_result_is_compared_with_its_predecessor_and_its_successor_with_it() -> None:
    """Hb 120 at 0 h, 100 at 10 h (a fall of 20: DELTA), then 95 from 5 h arrives: 95 falls 25 from 120
    (DELTA, raised now); 100 is a rise from 95, so its DELTA would not have been raised: it gains a note."""
    _, second, late = run([lab(0, 120.0, 0), lab(1, 100.0, 600), lab(2, 95.0, 300)])
    (kept,) = second.alerts
    assert (kept.limit_kind, kept.previous_value) == ("DELTA", 120.0)
    assert late.out_of_order
    (new,) = late.alerts
    assert (new.limit_kind, new.value, new.previous_value, new.note) == ("DELTA", 95.0, 120.0, None)
    assert new.alert_id == alert_id_for(lab(2, 95.0, 300).event_id, HB, "DELTA")
    (update,) = late.updated_alerts
    assert update.alert_id == kept.alert_id and update.suppressed_repeats == kept.suppressed_repeats
    assert update.note is not None and update.note.startswith(
        "a result of 2026-11-23T13:00:00+00:00 received late now precedes this one"
    )
    assert (late.state.last_value, late.state.prior_value) == (100.0, 95.0)
    assert late.state.last_time_ms == epoch_ms(T0 + dt.timedelta(hours=10))


def test_an_older_result_arriving_late_is_not_suppressed_by_a_newer_alert() -> None:
    """K 6.4 at 2 h alerts; K 6.3 from 1 h arrives: in result-time order 6.3 alerts first and 6.4 is
    worse, so both are alerts of the in-order run (the old rule suppressed 6.3); 6.4's alert, raised
    with no previous value, is noted with the one it has now."""
    newer, older = run([lab(0, 6.4, 120, loinc=K), lab(1, 6.3, 60, loinc=K)])
    assert [a.limit_kind for a in newer.alerts] == ["HIGH"]
    assert [(a.limit_kind, a.value) for a in older.alerts] == [("HIGH", 6.3)]
    assert not older.suppressed
    (update,) = older.updated_alerts
    assert update.alert_id == newer.alerts[0].alert_id and update.note is not None
    assert update.note.endswith(
        "compared with it (6.3 mmol/L at 2026-11-23T09:00:00+00:00) this alert is still raised"
    )
    assert [e.alert.value for e in older.state.open_alerts] == [6.4]


def test_a_late_result_that_would_have_suppressed_a_raised_alert_notes_it() -> None:
    """K 6.4 at 2 h alerts; K 6.5 from 1 h arrives: in order 6.5 alerts and 6.4 is a repeat of it; the
    6.4 alert is kept open with the note, and 6.5's alert is raised."""
    newer, older = run([lab(0, 6.4, 120, loinc=K), lab(1, 6.5, 60, loinc=K)])
    (kept,) = newer.alerts
    assert [(a.limit_kind, a.value) for a in older.alerts] == [("HIGH", 6.5)]
    (update,) = older.updated_alerts
    assert update.alert_id == kept.alert_id and update.note is not None
    assert [(e.alert.value, e.alert.suppressed_repeats) for e in older.state.open_alerts] == [(6.5, 1)]


def test_a_late_repeat_is_counted_on_the_open_alert() -> None:
    """K 6.8 at 0 h alerts, 5.0 at 2 h; a late 6.5 from 1 h is a repeat within 8 h: counted, no alert."""
    d = run([lab(0, 6.8, 0, loinc=K), lab(1, 5.0, 120, loinc=K), lab(2, 6.5, 60, loinc=K)])
    assert d[2].alerts == () and d[2].suppressed
    (update,) = d[2].updated_alerts
    assert (update.alert_id, update.suppressed_repeats, update.note) == (d[0].alerts[0].alert_id, 1, None)


def test_a_late_result_older_than_the_alert_window_raises_nothing_but_takes_its_place() -> None:
    """Hb 80 judged now; a result of 8 days ago comes in: no alert (rule 6), but it is kept by time."""
    current = lab(0, 80.0, 8 * 24 * 60)
    old = lab(1, 50.0, 0)
    now = current.result_time + dt.timedelta(minutes=1)
    _, late = run([current, old], now)
    assert late.late and late.out_of_order and late.alerts == () and late.updated_alerts == ()
    assert [facts.event_id for facts in late.state.history][-1] == current.event_id
    assert late.state.last_value == 80.0


def test_a_replay_a_week_later_keeps_the_alerts_raised_then() -> None:
    """K 6.5 alerted at 0 h, 6.4 at 1 h was its repeat; a week later a late 5.0 from 0.5 h arrives: the
    replay keeps 6.5's alert (judged when it came), so 6.4 stays a repeat and nothing is raised anew."""
    first, repeat = run([lab(0, 6.5, 0, loinc=K), lab(1, 6.4, 60, loinc=K)])
    assert first.alerts and repeat.suppressed
    now = T0 + POLICY.alert_within + dt.timedelta(hours=1)  # 6.4 is still young enough to alert
    late = evaluate(lab(2, 5.0, 30, loinc=K), repeat.state, RULES, now, POLICY)
    assert late.late and late.alerts == () and late.updated_alerts == ()
    assert [e.alert.alert_id for e in late.state.open_alerts] == [first.alerts[0].alert_id]


def test_a_redelivered_late_result_returns_its_alerts_again() -> None:
    """At-least-once delivery: the late result's alert comes again with the same id, state unchanged."""
    results = [lab(0, 120.0, 0), lab(1, 100.0, 600), lab(2, 95.0, 300)]
    *_, late = run(results)
    again = evaluate(results[2], late.state, RULES, T0 + dt.timedelta(hours=11), POLICY)
    assert again.duplicate and again.state == late.state
    assert [a.alert_id for a in again.alerts] == [a.alert_id for a in late.alerts]


def test_a_cancelled_result_leaves_the_history() -> None:
    """Hb 120 (R1) at 0 h, 95 (R2) at 5 h cancelled, then 100 from 3 h arrives: compared with 120 only."""
    d = run(
        [
            lab(0, 120.0, 0, result="H001|R1"),
            lab(1, 95.0, 300, result="H001|R2"),
            lab(2, 95.0, 301, result="H001|R2", status="cancelled"),
            lab(3, 101.0, 180, result="H001|R3"),
        ]
    )
    assert [facts.result_id for facts in d[2].state.history] == ["H001|R1"]
    assert d[2].state.raised == () and d[2].state.open_alerts == ()
    assert d[3].alerts == () and d[3].updated_alerts == ()  # 120 -> 101 is a fall of 19


def test_a_late_bound_is_judged_in_its_place_and_never_becomes_the_previous_value() -> None:
    """Hb 120 at 0 h, 110 at 4 h; '< 50' from 2 h arrives: LOW alert, no delta; 110 still compares with
    120."""
    d = run([lab(0, 120.0, 0), lab(1, 110.0, 240), lab(2, 50.0, 120, comparator="<")])
    assert [(a.limit_kind, a.value_comparator) for a in d[2].alerts] == [("LOW", "<")]
    assert d[2].updated_alerts == ()
    assert (d[2].state.last_value, d[2].state.prior_value) == (110.0, 120.0)


def test_history_is_bounded_and_older_results_are_folded_into_the_base() -> None:
    """Hourly results: at most HISTORY_LIMIT kept; the base remembers what was folded out, so a suppression
    that began before the kept history still holds in a replay (no spurious alert for an old repeat)."""
    results = [lab(0, 6.5, 0, loinc=K)] + [lab(i, 6.4, i * 20, loinc=K) for i in range(1, 22)]
    decisions = run(results)
    state = decisions[-1].state
    assert len(state.history) == HISTORY_LIMIT and state.base is not None
    assert sum(len(d.alerts) for d in decisions) == 1
    late = evaluate(lab(99, 6.3, 6 * 60 + 30, loinc=K), state, RULES, T0 + dt.timedelta(hours=8), POLICY)
    assert late.out_of_order and late.alerts == () and late.suppressed
    assert [u.alert_id for u in late.updated_alerts] == [decisions[0].alerts[0].alert_id]
    assert all(u.note is None for u in late.updated_alerts)


def test_a_result_older_than_every_kept_one_is_judged_on_thresholds_alone() -> None:
    """Once results were folded out of the history, one older than them cannot be put in its place."""
    decisions = run([lab(i, 130.0, 24 * 60 + i * 60) for i in range(HISTORY_LIMIT + 2)])
    state = decisions[-1].state
    assert state.base_ms is not None
    late = evaluate(lab(99, 55.0, 0), state, RULES, T0 + dt.timedelta(days=2), POLICY)
    assert [a.limit_kind for a in late.alerts] == ["LOW"] and late.out_of_order
    assert late.state.history == state.history and late.state.last_value == 130.0


def test_state_with_history_round_trips_through_json() -> None:
    d = run([lab(0, 120.0, 0), lab(1, 100.0, 600), lab(2, 95.0, 300, institution="H002")])
    state = d[-1].state
    assert state.history and state.raised
    restored = AnalyteState.from_dict(json.loads(json.dumps(state.to_dict(), allow_nan=False)))
    assert restored == state
    assert state.to_dict()["format"] == 2


# --- upgrade from format 1 -------------------------------------------------------------------------------


def _format_1(state: AnalyteState) -> dict[str, object]:
    """The state dict as the engine before rule 5 wrote it (STATE_FORMAT 1)."""
    data = state.to_dict()
    for key in ("history", "raised", "base", "base_ms"):
        del data[key]
    data["format"] = 1
    return data


def test_a_format_1_state_is_read_and_judged_as_before() -> None:
    """Hb 120 at 0 h stored by the old engine; 100 at 10 h is a DELTA against it, as it was."""
    (first,) = run([lab(0, 120.0, 0)])
    old = AnalyteState.from_dict(json.loads(json.dumps(_format_1(first.state))))
    assert old.last_value == 120.0 and old.history == () and old.base is None
    decision = evaluate(lab(1, 100.0, 600), old, RULES, T0 + dt.timedelta(hours=10), POLICY)
    assert [(a.limit_kind, a.previous_value) for a in decision.alerts] == [("DELTA", 120.0)]
    assert decision.state.base is not None and decision.state.base.last_value == 120.0


def test_after_an_upgrade_a_late_result_is_replayed_from_the_old_state() -> None:
    """Old state: Hb 130 at 0 h; then 112 at 10 h (a fall of 18) and a late 108 from 6 h: 108 falls 22 from
    130 (the old state's value): DELTA; one older than 0 h is judged on thresholds alone."""
    (first,) = run([lab(0, 130.0, 0)])
    old = AnalyteState.from_dict(_format_1(first.state))
    second = evaluate(lab(1, 112.0, 600), old, RULES, T0 + dt.timedelta(hours=10), POLICY)
    assert second.alerts == ()
    late = evaluate(lab(2, 108.0, 360), second.state, RULES, T0 + dt.timedelta(hours=10), POLICY)
    assert [(a.limit_kind, a.previous_value) for a in late.alerts] == [("DELTA", 130.0)]
    older = evaluate(lab(3, 55.0, -60), old, RULES, T0 + dt.timedelta(hours=1), POLICY)
    assert [a.limit_kind for a in older.alerts] == ["LOW"]
    assert older.state.last_value == 130.0 and older.state.history == ()


@settings(max_examples=150, deadline=None)
@given(results=histories())
def test_in_order_judgement_does_not_depend_on_the_new_state_fields(results: list[LabFacts]) -> None:
    """In result-time order, a state read from format 1 (no history) decides every next result alike."""
    state: AnalyteState | None = None
    for facts in sorted(results, key=lambda facts: facts.result_time):
        now = facts.result_time + dt.timedelta(minutes=1)
        decision = evaluate(facts, state, RULES, now, POLICY)
        if state is not None:
            old = AnalyteState.from_dict(_format_1(state))
            again = evaluate(facts, old, RULES, now, POLICY)
            assert (again.alerts, again.updated_alerts, again.suppressed) == (
                decision.alerts,
                decision.updated_alerts,
                decision.suppressed,
            )
            assert dataclasses.replace(again.state, history=(), raised=(), base=None, base_ms=None) == (
                dataclasses.replace(decision.state, history=(), raised=(), base=None, base_ms=None)
            )
        state = decision.state

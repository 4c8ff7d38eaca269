"""Escalation of unacknowledged alerts: deadlines, levels, repeats at the last level, acknowledgements.

Deadlines are those of the shipped policy, taken from shared/reference/clinical.md: escalate a critical
value not acknowledged within 15 minutes; Mayo phones within 30 minutes; CLSI GP47 reports within 1 hour.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import standard
from schemas.wire import validate_record
from streams.domain.escalation import (
    AckOutcome,
    EscalationDraft,
    OpenAlerts,
    OpenAlertState,
    acknowledge,
    apply_escalation,
    due_escalations,
    escalation_id_for,
    escalation_record,
    next_deadline,
    open_alert,
    prune,
    update_alert,
)
from streams.domain.reference import EscalationPolicy, load_reference
from streams.domain.rules import AlertDraft, LabFacts, evaluate

REFERENCE = load_reference()
POLICY = REFERENCE.policy.escalation
ESCALATION_SCHEMA = standard.load(standard.ALERT_ESCALATION)
ACK_SCHEMA = standard.load(standard.ALERT_ACKNOWLEDGEMENT)
T0 = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)
CHAIN = ("responsible clinician", "attending physician", "department head", "medical director")


def minutes(m: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=m)


def alert(loinc: str = "2823-3", value: float = 7.5, patient: str = "RP-0009", event: int = 1) -> AlertDraft:
    """A real alert from the rule engine, raised at T0 (K 7.5: CRITICAL; Hb delta: HIGH)."""
    facts = LabFacts(
        event_id=str(uuid.uuid5(uuid.UUID(int=7), f"{patient}|{event}")),
        regional_patient_id=patient,
        institution_id="H002",
        loinc_code=loinc,
        value=value,
        unit=REFERENCE.analytes[loinc].canonical_unit,
        status="final",
        result_time=T0 - dt.timedelta(minutes=5),
        correlation_id="corr-esc",
    )
    (draft,) = evaluate(facts, None, REFERENCE.rulebook, T0, REFERENCE.policy).alerts
    return draft


def ack(draft: AlertDraft, at: dt.datetime, alert_id: str | None = None) -> dict[str, Any]:
    """An AlertAcknowledgement record as decoded from Kafka; checked against the schema here."""
    record = {
        "ack_id": str(uuid.uuid4()),
        "alert_id": alert_id or draft.alert_id,
        "acknowledged_by": "staff-0042",
        "role": "resident",
        "channel": "PHONE",
        "read_back": True,
        "acknowledged_time": at,
        "note": None,
        "regional_patient_id": draft.regional_patient_id,
    }
    validate_record(record, ACK_SCHEMA)
    return record


def step(state: OpenAlerts, now: dt.datetime) -> tuple[OpenAlerts, list[EscalationDraft]]:
    """What the timer does: publish the due escalations, then apply them."""
    drafts = due_escalations(state, now, POLICY)
    for draft in drafts:
        state = apply_escalation(state, draft)
    return state, drafts


def test_open_alert_starts_at_level_zero_with_the_alert_deadline() -> None:
    """A CRITICAL alert raised at T0 is due at T0 + 15 min."""
    draft = alert()
    state = open_alert(None, draft)
    entry = state.get(draft.alert_id)
    assert entry == OpenAlertState(
        alert_id=draft.alert_id,
        severity="CRITICAL",
        message=draft.message,
        institution_id="H002",
        regional_patient_id="RP-0009",
        level=0,
        deadline_ms=int((minutes(15) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1000),
    )
    assert not entry.acknowledged
    assert next_deadline(state) == minutes(15)


@pytest.mark.parametrize(
    ("at", "due"),
    [(0, False), (14.99, False), (15, True), (16, True), (600, True)],
)
def test_due_at_the_deadline_not_before(at: float, due: bool) -> None:
    """'Acknowledge before this time or the alert escalates': at the deadline itself it escalates."""
    state = open_alert(None, alert())
    assert bool(due_escalations(state, minutes(at), POLICY)) is due


def test_levels_follow_the_recipient_chain_then_repeat_at_the_last() -> None:
    """CRITICAL: every 15 min the next recipient; the medical director is then called again every 15 min."""
    draft = alert()
    state = open_alert(None, draft)
    seen = []
    for at in (15, 30, 45, 60, 75):
        state, (escalation,) = step(state, minutes(at))
        seen.append((escalation.level, escalation.recipient, escalation.next_deadline_time))
        validate_record(escalation_record(escalation), ESCALATION_SCHEMA)
        assert escalation.escalated_time == minutes(at)
        assert escalation.escalation_id == str(uuid.uuid5(uuid.UUID(draft.alert_id), str(escalation.level)))
    assert seen == [
        (1, CHAIN[1], minutes(30)),
        (2, CHAIN[2], minutes(45)),
        (3, CHAIN[3], minutes(60)),  # last recipient reached: the repeat interval from here on
        (4, CHAIN[3], minutes(75)),
        (5, CHAIN[3], minutes(90)),
    ]


def test_high_severity_waits_its_own_deadline_between_levels() -> None:
    """A HIGH alert (Hb delta) gets 30 min per level, then the 15 min repeat at the last recipient."""
    history = [(0.0, 125.0), (180.0, 100.0)]  # Hb falls 25 g/L in 3 h
    state_rules = None
    draft = None
    for offset, value in history:
        facts = LabFacts(
            event_id=str(uuid.uuid5(uuid.UUID(int=9), str(offset))),
            regional_patient_id="RP-0010",
            institution_id="H001",
            loinc_code="718-7",
            value=value,
            unit="g/L",
            status="final",
            result_time=T0 + dt.timedelta(minutes=offset - 180),
            correlation_id="corr-hb",
        )
        decision = evaluate(facts, state_rules, REFERENCE.rulebook, T0, REFERENCE.policy)
        state_rules = decision.state
        draft = next(iter(decision.alerts), draft)
    assert draft is not None and draft.severity == "HIGH" and draft.limit_kind == "DELTA"
    state = open_alert(None, draft)
    deadlines = []
    for at in (30, 60, 90, 105):
        state, (escalation,) = step(state, minutes(at))
        deadlines.append(escalation.next_deadline_time)
    assert deadlines == [minutes(60), minutes(90), minutes(105), minutes(120)]


def test_late_timer_escalates_one_level_and_restarts_the_clock() -> None:
    """A timer that wakes up an hour late escalates one level, with a full deadline from now."""
    state = open_alert(None, alert())
    state, (escalation,) = step(state, minutes(75))
    assert (escalation.level, escalation.next_deadline_time) == (1, minutes(90))
    assert due_escalations(state, minutes(89), POLICY) == []


def test_acknowledgement_stops_escalation_for_good() -> None:
    """Once acknowledged, nothing is ever due again, however late."""
    draft = alert()
    state, _ = step(open_alert(None, draft), minutes(15))
    result = acknowledge(state, ack(draft, minutes(20)))
    assert result.outcome is AckOutcome.ACKNOWLEDGED
    entry = result.state.get(draft.alert_id)
    assert entry is not None and entry.acknowledged and entry.level == 1
    for at in (30, 45, 24 * 60):
        assert due_escalations(result.state, minutes(at), POLICY) == []
    assert next_deadline(result.state) is None


def test_acknowledgement_between_publish_and_apply_wins() -> None:
    """An escalation computed before the acknowledgement was applied changes nothing afterwards."""
    draft = alert()
    state = open_alert(None, draft)
    (escalation,) = due_escalations(state, minutes(15), POLICY)
    acked = acknowledge(state, ack(draft, minutes(15))).state
    assert apply_escalation(acked, escalation) == acked


def test_applying_the_same_escalation_twice_changes_nothing() -> None:
    """Idempotent: a redelivered or re-fired escalation is a no-op."""
    state = open_alert(None, alert())
    (escalation,) = due_escalations(state, minutes(15), POLICY)
    once = apply_escalation(state, escalation)
    assert once != state
    assert apply_escalation(once, escalation) == once


def test_timer_firing_twice_before_apply_yields_the_same_escalation_id() -> None:
    """The id depends on alert and level only, so a restarted timer publishes the same escalation."""
    state = open_alert(None, alert())
    (first,) = due_escalations(state, minutes(15), POLICY)
    (second,) = due_escalations(state, minutes(16), POLICY)
    assert first.escalation_id == second.escalation_id
    assert first.level == second.level == 1
    after = apply_escalation(apply_escalation(state, first), second)
    assert after == apply_escalation(state, first)


@pytest.mark.parametrize("level", [0, 1, 2, 4, 7])
def test_escalation_of_the_wrong_level_is_ignored(level: int) -> None:
    """Only the next level applies; stale or skipped levels are no-ops (the state is at level 2 here)."""
    state, _ = step(open_alert(None, alert()), minutes(15))
    state, _ = step(state, minutes(30))
    (due,) = due_escalations(state, minutes(45), POLICY)
    stray = dataclasses.replace(due, level=level, escalation_id=escalation_id_for(due.alert_id, level))
    assert apply_escalation(state, stray) == state


def test_escalation_of_an_unknown_alert_is_ignored() -> None:
    state = open_alert(None, alert())
    (due,) = due_escalations(state, minutes(15), POLICY)
    assert apply_escalation(OpenAlerts(), due) == OpenAlerts()


def test_acknowledging_an_unknown_alert_is_a_reported_no_op() -> None:
    """The state is unchanged and the outcome says the alert is unknown."""
    draft = alert()
    state = open_alert(None, draft)
    result = acknowledge(state, ack(draft, minutes(3), alert_id=str(uuid.uuid4())))
    assert result.outcome is AckOutcome.UNKNOWN_ALERT
    assert result.state == state
    assert acknowledge(None, ack(draft, minutes(3))).outcome is AckOutcome.UNKNOWN_ALERT


def test_second_acknowledgement_keeps_the_first_time() -> None:
    draft = alert()
    first = acknowledge(open_alert(None, draft), ack(draft, minutes(5))).state
    second = acknowledge(first, ack(draft, minutes(9)))
    assert second.outcome is AckOutcome.ALREADY_ACKNOWLEDGED
    assert second.state == first


@pytest.mark.parametrize(
    "acknowledged_time",
    [minutes(5), int((minutes(5) - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)).total_seconds() * 1000)],
)
def test_acknowledged_time_as_datetime_or_epoch_ms(acknowledged_time: Any) -> None:
    """Decoders may hand timestamp-millis over either way."""
    draft = alert()
    record = {"alert_id": draft.alert_id, "acknowledged_time": acknowledged_time}
    result = acknowledge(open_alert(None, draft), record)
    entry = result.state.get(draft.alert_id)
    assert entry is not None and entry.acknowledged_ms == 1795420800000 + 5 * 60_000


def test_reopening_a_known_alert_changes_nothing() -> None:
    """A suppressed-repeat update or a reprocessed event (same alert id) never resets level or ack."""
    draft = alert()
    state, _ = step(open_alert(None, draft), minutes(15))
    bumped = dataclasses.replace(draft, suppressed_repeats=3, deadline_time=minutes(200))
    assert open_alert(state, bumped) == state
    acked = acknowledge(state, ack(draft, minutes(20))).state
    assert open_alert(acked, draft) == acked


def test_several_alerts_escalate_independently_earliest_first() -> None:
    """Two alerts of one patient: each has its own level and deadline; the earliest deadline comes first."""
    later, earlier = sorted([alert(event=1), alert(event=2)], key=lambda a: a.alert_id)
    earlier = dataclasses.replace(earlier, deadline_time=minutes(10))  # the larger id is due first
    state = open_alert(open_alert(None, later), earlier)
    assert next_deadline(state) == minutes(10)
    state, drafts = step(state, minutes(15))
    assert [d.alert_id for d in drafts] == [earlier.alert_id, later.alert_id]
    state = acknowledge(state, ack(earlier, minutes(16))).state
    _, drafts = step(state, minutes(30))
    assert [(d.alert_id, d.level) for d in drafts] == [(later.alert_id, 2)]


def test_prune_forgets_old_acknowledged_alerts_only() -> None:
    """Acknowledged alerts are kept (against reprocessing) for the retention, unacknowledged ones always."""
    old, recent, pending = alert(event=1), alert(event=2), alert(event=3)
    state = open_alert(open_alert(open_alert(None, old), recent), pending)
    state = acknowledge(state, ack(old, minutes(0))).state
    state = acknowledge(state, ack(recent, minutes(60 * 24 * 6))).state
    pruned = prune(state, minutes(60 * 24 * 7 + 1))
    assert set(pruned.alerts) == {recent.alert_id, pending.alert_id}
    assert prune(pruned, minutes(60 * 24 * 7 + 1)) == pruned


def test_escalation_record_has_exactly_the_schema_fields() -> None:
    state = open_alert(None, alert())
    (escalation,) = due_escalations(state, minutes(15), POLICY)
    record = escalation_record(escalation)
    assert set(record) == {f["name"] for f in json.loads(ESCALATION_SCHEMA.text)["fields"]}
    validate_record(record, ESCALATION_SCHEMA)


def test_single_recipient_policy_repeats_to_that_recipient() -> None:
    """With one recipient every escalation repeats to it at the repeat interval."""
    policy = EscalationPolicy(recipients=("duty doctor",), repeat_interval=dt.timedelta(minutes=10))
    state = open_alert(None, alert())
    recipients = []
    for at in (15, 25, 35):
        (escalation,) = due_escalations(state, minutes(at), policy)
        state = apply_escalation(state, escalation)
        recipients.append((escalation.recipient, escalation.next_deadline_time))
    assert recipients == [
        ("duty doctor", minutes(25)),
        ("duty doctor", minutes(35)),
        ("duty doctor", minutes(45)),
    ]


# --- properties -----------------------------------------------------------------------------------------

operations = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.integers(min_value=0, max_value=240)),
        st.tuples(st.just("ack"), st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("open"), st.integers(min_value=0, max_value=2)),
        st.tuples(st.just("replay"), st.integers(min_value=0, max_value=240)),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations)
def test_any_history_round_trips_and_acknowledged_alerts_stay_quiet(ops: list[tuple[str, int]]) -> None:
    """Random timer ticks, acks, reopenings and replayed escalations: JSON round trip holds at every step,
    acknowledged alerts never escalate, and levels only ever grow by one per applied escalation."""
    drafts = [alert(event=i) for i in range(3)]
    state = open_alert(None, drafts[0])
    clock = T0
    issued: list[EscalationDraft] = []
    for op, arg in ops:
        before = state
        if op == "tick":
            clock = clock + dt.timedelta(minutes=arg)
            due = due_escalations(state, clock, POLICY)
            for escalation in due:
                entry = state.get(escalation.alert_id)
                assert entry is not None and not entry.acknowledged
                assert escalation.level == entry.level + 1
                validate_record(escalation_record(escalation), ESCALATION_SCHEMA)
            issued.extend(due)
            state, _ = step(state, clock)
        elif op == "ack":
            state = acknowledge(state, ack(drafts[arg], clock)).state
        elif op == "open":
            state = open_alert(state, drafts[arg])
        elif issued:
            state = apply_escalation(state, issued[arg % len(issued)])  # a replayed escalation
        for alert_id, entry in state.alerts.items():
            old = before.get(alert_id)
            if old is not None:
                assert entry.level in (old.level, old.level + 1)
                if old.acknowledged:
                    assert entry == old
        assert OpenAlerts.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_the_state_knows_repeats_note_recipient_and_who_acknowledged() -> None:
    """What an AlertState record carries besides level and deadline (streams/domain/alert_state.py)."""
    draft = alert()
    state = open_alert(None, draft)
    state = update_alert(state, dataclasses.replace(draft, suppressed_repeats=2))
    state = update_alert(state, dataclasses.replace(draft, suppressed_repeats=2, note="late result"))
    state = update_alert(state, dataclasses.replace(draft, suppressed_repeats=1))  # never fewer
    state, (escalation,) = step(state, minutes(15))
    state = acknowledge(state, ack(draft, minutes(20))).state
    entry = state.get(draft.alert_id)
    assert entry is not None
    assert (entry.suppressed_repeats, entry.note) == (2, "late result")
    assert (entry.level, entry.recipient) == (1, escalation.recipient) == (1, CHAIN[1])
    assert entry.acknowledged_by == "staff-0042"
    assert OpenAlerts.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_an_update_neither_tracks_an_unknown_alert_nor_touches_level_or_deadline() -> None:
    draft = alert()
    assert update_alert(None, draft) == OpenAlerts()
    state, _ = step(open_alert(None, draft), minutes(15))
    updated = update_alert(state, dataclasses.replace(draft, suppressed_repeats=1, deadline_time=minutes(99)))
    before, after = state.get(draft.alert_id), updated.get(draft.alert_id)
    assert before is not None and after is not None
    assert dataclasses.replace(after, suppressed_repeats=0) == before
    same = dataclasses.replace(draft, suppressed_repeats=1)
    assert update_alert(updated, same) is updated, "nothing new: the same state, nothing to write"


def test_state_written_before_the_alert_state_fields_still_loads() -> None:
    old = {
        "format": 1,
        "alerts": {
            "a1": {
                "alert_id": "a1",
                "severity": "CRITICAL",
                "message": "m",
                "institution_id": "H001",
                "regional_patient_id": "rp",
                "level": 1,
                "deadline_ms": 5,
                "acknowledged_ms": None,
            }
        },
    }
    entry = OpenAlerts.from_dict(old).alerts["a1"]
    assert (entry.suppressed_repeats, entry.note, entry.recipient, entry.acknowledged_by) == (
        0,
        None,
        None,
        None,
    )

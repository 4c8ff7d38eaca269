"""When analyte state can no longer matter: horizon from the reference data, verdicts on stored records."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from streams.domain.expiry import (
    UPDATED_FIELD,
    Verdict,
    alert_ids,
    analyte_verdict,
    expired_keys,
    expiry_horizon,
    horizon_ms,
    legacy_verdict,
    newest_result_ms,
    stamped,
)
from streams.domain.reference import AlertPolicy, RuleBook, load_reference
from streams.domain.rules import AnalyteState, LabFacts, epoch_ms, evaluate

REFERENCE = load_reference()
HOUR = 3_600_000
NOW_MS = 1_800_000_000_000
HORIZON_MS = 100 * HOUR


def test_the_horizon_is_the_longest_delta_window_plus_suppression_plus_the_alert_memory() -> None:
    rulebook, policy = REFERENCE.rulebook, REFERENCE.policy
    longest = max(rule.window for rules in rulebook.deltas.values() for rule in rules)
    assert expiry_horizon(rulebook, policy) == longest + policy.suppression_window + policy.alert_within
    # the shipped reference data: creatinine's 7-day delta, 8 h suppression, 7 days of alert memory
    assert expiry_horizon(rulebook, policy) == dt.timedelta(days=14, hours=8)
    shorter = AlertPolicy(suppression_window=dt.timedelta(0), alert_within=dt.timedelta(hours=1))
    assert expiry_horizon(RuleBook(), shorter) == dt.timedelta(hours=1)  # no delta checks at all


def _record(newest_ms: int | None, updated_ms: int | None = None, **fields: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"format": 2, "last_time_ms": newest_ms, **fields}
    if updated_ms is not None:
        record[UPDATED_FIELD] = updated_ms
    return record


def _open(alert_id: str, result_ms: int) -> dict[str, Any]:
    return {"alert": {"alert_id": alert_id, "result_time": result_ms}, "result_id": None}


def test_the_newest_result_time_is_found_anywhere_in_the_state() -> None:
    assert newest_result_ms({"format": 2}) is None
    assert newest_result_ms(_record(5, prior_time_ms=3)) == 5
    assert newest_result_ms(_record(5, history=[["e", 9, 1.0]])) == 9
    assert newest_result_ms(_record(None, base={"last_time_ms": 4}, base_ms=7)) == 7
    assert newest_result_ms(_record(5, open_alerts=[_open("a", 11)])) == 11
    assert newest_result_ms(_record(5, raised=[{"alert_id": "a", "result_time": 12}])) == 12


def test_a_real_engine_state_reads_as_its_newest_result() -> None:
    at = dt.datetime(2026, 11, 20, 8, 0, tzinfo=dt.UTC)
    facts = LabFacts(
        event_id="e-1",
        regional_patient_id="rp-x",
        institution_id="H001",
        loinc_code="2823-3",
        value=6.9,
        unit="mmol/L",
        status="final",
        result_time=at,
        correlation_id="c-1",
    )
    first = evaluate(facts, None, REFERENCE.rulebook, at, REFERENCE.policy)
    later = dataclasses.replace(facts, event_id="e-2", value=6.7, result_time=at + dt.timedelta(hours=2))
    second = evaluate(later, first.state, REFERENCE.rulebook, at, REFERENCE.policy)
    record = second.state.to_dict()
    assert newest_result_ms(record) == epoch_ms(at + dt.timedelta(hours=2))
    assert alert_ids(record) == {first.alerts[0].alert_id}
    assert AnalyteState.from_dict(stamped(record, NOW_MS)) == second.state  # the stamp is ignored on read


def test_state_is_kept_until_both_its_newest_result_and_its_last_write_are_past_the_horizon() -> None:
    old = NOW_MS - HORIZON_MS - 1
    recent = NOW_MS - HORIZON_MS  # exactly the horizon: still kept
    cases = [
        (_record(recent, updated_ms=old), Verdict.KEEP),  # a result that a delta check may still compare with
        (
            _record(old, updated_ms=recent),
            Verdict.KEEP,
        ),  # a back-fill written a moment ago, old by event time
        (_record(old, updated_ms=old), Verdict.EXPIRE),
        (_record(None, updated_ms=old), Verdict.EXPIRE),  # no result left (its only one was cancelled)
        (_record(None, updated_ms=recent), Verdict.KEEP),
        (_record(old), Verdict.STAMP),  # written before writes were stamped: stamped now, expires later
        (_record(recent), Verdict.KEEP),
    ]
    assert [analyte_verdict(record, NOW_MS, HORIZON_MS) for record, _ in cases] == [v for _, v in cases]


def test_a_state_whose_alert_still_escalates_is_never_expired() -> None:
    old = NOW_MS - 10 * HORIZON_MS
    record = _record(old, updated_ms=old, open_alerts=[_open("alert-1", old)])
    assert analyte_verdict(record, NOW_MS, HORIZON_MS, escalating={"alert-1"}) is Verdict.KEEP
    assert analyte_verdict(record, NOW_MS, HORIZON_MS, escalating={"alert-2"}) is Verdict.EXPIRE
    assert analyte_verdict(record, NOW_MS, HORIZON_MS) is Verdict.EXPIRE  # acknowledged, or never tracked


def test_expired_keys_lists_in_lists_out() -> None:
    old, recent = NOW_MS - HORIZON_MS - 1, NOW_MS - HOUR
    entries = [
        ("rp-1|2823-3", _record(old, updated_ms=old)),
        ("rp-1|718-7", _record(recent, updated_ms=recent)),
        ("rp-2|2823-3", _record(old, updated_ms=old, open_alerts=[_open("a-2", old)])),
        ("rp-3|2823-3", _record(old)),  # unstamped: STAMP, not expired yet
        ("rp-4|2160-0", _record(old, updated_ms=old)),
    ]

    def escalating(key: str) -> set[str]:
        return {"a-2"} if key.startswith("rp-2|") else set()

    assert expired_keys(entries, NOW_MS, HORIZON_MS, escalating) == ["rp-1|2823-3", "rp-4|2160-0"]


def test_a_legacy_map_expires_on_event_time_when_every_state_in_it_is_old() -> None:
    old, recent = NOW_MS - HORIZON_MS - 1, NOW_MS - HOUR
    assert (
        legacy_verdict({"2823-3": _record(old), "718-7": _record(old)}, NOW_MS, HORIZON_MS) is Verdict.EXPIRE
    )
    assert (
        legacy_verdict({"2823-3": _record(old), "718-7": _record(recent)}, NOW_MS, HORIZON_MS) is Verdict.KEEP
    )
    escalating = {"a-1"}
    legacy = {"2823-3": _record(old, open_alerts=[_open("a-1", old)])}
    assert legacy_verdict(legacy, NOW_MS, HORIZON_MS, escalating) is Verdict.KEEP
    assert legacy_verdict({}, NOW_MS, HORIZON_MS) is Verdict.EXPIRE


def test_horizon_in_milliseconds() -> None:
    assert horizon_ms(dt.timedelta(hours=100)) == HORIZON_MS

"""Critical-value rules engine: banded thresholds, delta checks and repeat suppression, as pure functions.

Nothing here reads a clock, Kafka or Faust: `now` is a parameter, state goes in and comes out.

API::

    evaluate(facts: LabFacts, state: AnalyteState | None, rules: RuleBook, now: datetime,
             policy: AlertPolicy = AlertPolicy()) -> Decision
    alert_record(draft: AlertDraft) -> dict          # a CriticalValueAlert v2 record
    LabFacts.from_record(normalised LabResult record, ward=None) -> LabFacts | None
    AnalyteState.to_dict() -> dict / AnalyteState.from_dict(dict) -> AnalyteState   (JSON primitives)
    AlertDraft.to_dict() / AlertDraft.from_dict()                                   (JSON primitives)

`RuleBook`, `AlertPolicy` and the rule classes live in streams.domain.reference (`load_reference().rulebook`
and `.policy`) and are re-exported here.

One `AnalyteState` per (regional patient id, LOINC code). `evaluate` returns a `Decision`:

- `alerts`: new alerts to store, publish and open for escalation (escalation.open_alert);
- `updated_alerts`: open alerts whose `suppressed_repeats` went up (same alert_id), to publish again;
- `state`: the state to write back.

Rules, in order:

1. An event already seen (its id is among the last `RECENT_EVENTS` ids of the state) changes nothing;
   the alerts it raised are returned again in `alerts` (same ids), so a crash between writing the state
   and publishing cannot lose an alert. Downstream must treat alerts as upserts by alert_id.
2. A cancelled result never alerts and never becomes the previous value; if it cancels the latest
   result (same result_id), that result's value is forgotten and open alerts it raised are dropped, so
   its retraction cannot suppress the next genuine critical value.
3. Threshold: the most specific rule for the patient's age (result year - birth year) and sex. A
   bound ("> 600", an analyser above its measuring range) crosses a limit only when every value it
   allows does; it runs no delta check and does not replace the last measured value.
4. Delta (CLSI EP33): against the previous result of the same patient and analyte, if it is at most
   the check's window older. A new version (preliminary -> final, corrected) of the latest result is
   compared with the result before it, not with the version it replaces. The first firing check wins.
5. Out-of-order results (result_time before the latest one, a different result) may alert on
   thresholds but run no delta check and do not replace the latest value.
6. A result older than `policy.alert_within` (7 days, the time acknowledged alerts are remembered)
   raises nothing; it still becomes the latest value if it is the newest.
7. Suppression, per limit kind (LOW, HIGH, DELTA): while an alert of that kind is open and the new
   result lies within `policy.suppression_window` of the alerted result's time, a result that is not
   worse (LOW: not lower, HIGH: not higher, DELTA: not a larger absolute change) raises no alert;
   the open alert's `suppressed_repeats` goes up by one and it is returned in `updated_alerts`.
   A later version of the very result that raised the alert is suppressed without counting.
   Corrected results are never suppressed: the clinician must hear the corrected value.
7. Alert ids are uuid5(event id, LOINC, limit kind): reprocessing yields the same id, a correction
   (new event id) a new one. The acknowledgement deadline is `now` + the severity's deadline.

Times in state dicts are epoch milliseconds; all datetimes are UTC and truncated to milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.domain.reference import AlertPolicy, DeltaRule, EscalationPolicy, RuleBook, ThresholdRule

__all__ = [
    "ALERT_NAMESPACE",
    "LIMIT_KINDS",
    "RECENT_EVENTS",
    "AlertDraft",
    "AlertPolicy",
    "AnalyteState",
    "Decision",
    "DeltaRule",
    "EscalationPolicy",
    "LabFacts",
    "OpenAlert",
    "RuleBook",
    "ThresholdRule",
    "age_at",
    "alert_id_for",
    "alert_record",
    "crossed_limit",
    "epoch_ms",
    "evaluate",
    "from_epoch_ms",
]

ALERT_NAMESPACE = uuid.UUID("6f1c2d9e-58a3-4c1b-9a57-0c6f5e2b7d10")
LIMIT_KINDS = ("LOW", "HIGH", "DELTA")
COMPARATORS = (None, "<", "<=", ">=", ">")  # None: the value is the measurement itself
RECENT_EVENTS = 32  # event ids remembered per patient and analyte to recognise redelivery
STATE_FORMAT = 1

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


def epoch_ms(value: dt.datetime) -> int:
    """Milliseconds since the epoch (floor), exact for any aware datetime."""
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value.isoformat()}: the hub carries UTC instants only")
    return (value - _EPOCH) // _MS


def from_epoch_ms(value: int) -> dt.datetime:
    return _EPOCH + value * _MS


def _truncate(value: dt.datetime) -> dt.datetime:
    return from_epoch_ms(epoch_ms(value))


@dataclass(frozen=True)
class AlertDraft:
    """An alert before it is stored and published; its id is derived, so reprocessing yields the same id."""

    alert_id: str
    source_event_id: str
    regional_patient_id: str
    institution_id: str
    loinc_code: str
    analyte: str
    value: float
    unit: str
    limit_kind: str
    limit_value: float
    severity: str
    message: str
    rule_source: str
    result_time: dt.datetime
    raised_time: dt.datetime
    deadline_time: dt.datetime
    correlation_id: str
    ward: str | None = None
    previous_value: float | None = None
    previous_time: dt.datetime | None = None
    suppressed_repeats: int = 0
    value_comparator: str | None = None  # "<", "<=", ">=", ">": `value` is a bound, not the measurement
    note: str | None = None  # why an open alert changed besides its repeats (e.g. a late result came in)

    def to_dict(self) -> dict[str, Any]:
        data = dict(vars(self))  # flat fields: dataclasses.asdict would deep-copy each one, per event
        for key in ("result_time", "raised_time", "deadline_time", "previous_time"):
            if data[key] is not None:
                data[key] = epoch_ms(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AlertDraft:
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data}
        for key in ("result_time", "raised_time", "deadline_time", "previous_time"):
            if values.get(key) is not None:
                values[key] = from_epoch_ms(int(values[key]))
        for key in ("value", "limit_value", "previous_value"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        return cls(**values)


@dataclass(frozen=True)
class OpenAlert:
    """The latest published version of an alert, and the result it came from (to honour a cancellation)."""

    alert: AlertDraft
    result_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"alert": self.alert.to_dict(), "result_id": self.result_id}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpenAlert:
        return cls(alert=AlertDraft.from_dict(data["alert"]), result_id=data.get("result_id"))


@dataclass(frozen=True)
class AnalyteState:
    """What the engine remembers per (patient, LOINC code): latest value, the one before, open alerts."""

    last_value: float | None = None
    last_time_ms: int | None = None
    last_event_id: str | None = None
    last_result_id: str | None = None
    prior_value: float | None = None
    prior_time_ms: int | None = None
    open_alerts: tuple[OpenAlert, ...] = ()  # at most one per limit kind, in LIMIT_KINDS order
    recent_event_ids: tuple[str, ...] = ()  # oldest first, at most RECENT_EVENTS

    def open_alert(self, kind: str) -> OpenAlert | None:
        return next((entry for entry in self.open_alerts if entry.alert.limit_kind == kind), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "last_value": self.last_value,
            "last_time_ms": self.last_time_ms,
            "last_event_id": self.last_event_id,
            "last_result_id": self.last_result_id,
            "prior_value": self.prior_value,
            "prior_time_ms": self.prior_time_ms,
            "open_alerts": [entry.to_dict() for entry in self.open_alerts],
            "recent_event_ids": list(self.recent_event_ids),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalyteState:
        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        def integer(key: str) -> int | None:
            return None if data.get(key) is None else int(data[key])

        return cls(
            last_value=number("last_value"),
            last_time_ms=integer("last_time_ms"),
            last_event_id=data.get("last_event_id"),
            last_result_id=data.get("last_result_id"),
            prior_value=number("prior_value"),
            prior_time_ms=integer("prior_time_ms"),
            open_alerts=_ordered(OpenAlert.from_dict(entry) for entry in data.get("open_alerts", ())),
            recent_event_ids=tuple(data.get("recent_event_ids", ())),
        )


def _ordered(entries: Any) -> tuple[OpenAlert, ...]:
    by_kind = {entry.alert.limit_kind: entry for entry in entries}
    return tuple(by_kind[kind] for kind in LIMIT_KINDS if kind in by_kind)


@dataclass(frozen=True, kw_only=True)
class LabFacts:
    """What the engine needs of one normalised result; `value` is in the canonical `unit`."""

    event_id: str
    regional_patient_id: str
    institution_id: str
    loinc_code: str
    value: float
    unit: str
    status: str
    result_time: dt.datetime
    correlation_id: str
    birth_year: int | None = None
    sex: str | None = None  # FHIR administrative sex: male, female, other, unknown
    ward: str | None = None
    result_id: str | None = None  # the institution's result id: links versions and cancellations
    comparator: str | None = None  # "<", "<=", ">=", ">": `value` is a bound (outside the measuring range)

    @classmethod
    def from_record(cls, record: Mapping[str, Any], ward: str | None = None) -> LabFacts | None:
        """Facts of a normalised LabResult (as published on norm.lab), or None when it has nothing to
        judge (no LOINC code, value or unit)."""
        if (
            record.get("loinc_code") is None
            or record.get("canonical_value") is None
            or not record.get("canonical_unit")
        ):
            return None
        envelope = record["envelope"]
        return cls(
            event_id=str(envelope["event_id"]),
            regional_patient_id=record["regional_patient_id"],
            institution_id=envelope["institution_id"],
            loinc_code=record["loinc_code"],
            value=record["canonical_value"],
            unit=record["canonical_unit"],
            status=str(record["status"]),
            result_time=record["result_time"],
            correlation_id=str(envelope["correlation_id"]),
            birth_year=record.get("patient_birth_year"),
            sex=record.get("patient_sex"),
            ward=ward,
            result_id=f"{envelope['institution_id']}|{record['result_id']}",
            comparator=record.get("value_comparator"),
        )


@dataclass(frozen=True)
class Decision:
    """The outcome of one result: state to store, alerts to raise, open alerts to republish."""

    state: AnalyteState
    alerts: tuple[AlertDraft, ...] = ()
    updated_alerts: tuple[AlertDraft, ...] = ()
    suppressed: bool = False  # at least one crossed limit raised no new alert
    duplicate: bool = False  # the event had been evaluated before
    out_of_order: bool = False  # older than the latest result: did not replace it
    late: bool = False  # resulted longer than `policy.alert_within` ago: judged by no rule


def crossed_limit(
    value: float, rule: ThresholdRule, comparator: str | None = None
) -> tuple[str, float] | None:
    """Which limit the value crosses, honouring whether the limit itself counts as critical.

    With a comparator the value is a bound: "> 600" is any value above 600. A limit is crossed only
    when every value the bound allows crosses it, never when some could not.
    """
    if comparator not in COMPARATORS:
        raise ValueError(f"comparator {comparator!r} is not one of {', '.join(c for c in COMPARATORS if c)}")
    if rule.low is not None and comparator not in (">", ">="):
        # every allowed value is at most `value` ("<", "<=") or is `value` (no comparator)
        strictly_below = comparator == "<"
        if value < rule.low or (value == rule.low and (rule.low_inclusive or strictly_below)):
            return "LOW", rule.low
    if rule.high is not None and comparator not in ("<", "<="):
        strictly_above = comparator == ">"
        if value > rule.high or (value == rule.high and (rule.high_inclusive or strictly_above)):
            return "HIGH", rule.high
    return None


def alert_id_for(event_id: str, loinc: str, kind: str) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"{event_id}|{loinc}|{kind}"))


def age_at(birth_year: int | None, when: dt.datetime) -> int | None:
    """Age in whole years from the birth year (the year difference); None if unknown or impossible."""
    if birth_year is None or birth_year > when.year:
        return None
    return when.year - birth_year


def _sign(kind: str, rule: ThresholdRule) -> str:
    if kind == "LOW":
        return "<=" if rule.low_inclusive else "<"
    return ">=" if rule.high_inclusive else ">"


@dataclass(frozen=True)
class _Finding:
    kind: str
    limit: float
    severity: str
    message: str
    source: str


def _threshold_finding(facts: LabFacts, rules: RuleBook) -> _Finding | None:
    rule = rules.threshold_for(
        facts.loinc_code, age_at(facts.birth_year, facts.result_time), (facts.sex or "").lower() or None
    )
    if rule is None:
        return None
    crossed = crossed_limit(facts.value, rule, facts.comparator)
    if crossed is None:
        return None
    kind, limit = crossed
    bound = f"{facts.comparator} " if facts.comparator else ""
    return _Finding(
        kind=kind,
        limit=limit,
        severity=rule.severity,
        message=(
            f"{rule.message}: {bound}{facts.value:.4g} {facts.unit} "
            f"({_sign(kind, rule)} {limit:g} {facts.unit})"
        ),
        source=rule.source,
    )


def _delta_finding(
    facts: LabFacts, rules: RuleBook, previous: float, previous_ms: int, now_ms: int
) -> _Finding | None:
    elapsed = dt.timedelta(milliseconds=now_ms - previous_ms)
    if elapsed < dt.timedelta(0):
        return None
    for rule in rules.deltas_for(facts.loinc_code):
        if elapsed > rule.window:
            continue
        boundary = rule.fires(previous, facts.value)
        if boundary is None:
            continue
        change = facts.value - previous
        limit_text = f"{rule.threshold:g}%" if rule.kind == "percent" else f"{rule.threshold:g} {facts.unit}"
        return _Finding(
            kind="DELTA",
            limit=boundary,
            severity=rule.severity,
            message=(
                f"{rule.message}: {previous:.4g} -> {facts.value:.4g} {facts.unit} "
                f"({change:+.4g} {facts.unit} "
                f"in {elapsed.total_seconds() / 3600:.1f} h; {rule.direction} limit {limit_text} "
                f"within {rule.window.total_seconds() / 3600:g} h)"
            ),
            source=rule.source,
        )
    return None


def _worse(kind: str, value: float, previous: float | None, alerted: AlertDraft) -> bool:
    """Further beyond the limit than the alerted value (for DELTA: a larger absolute change)."""
    if kind == "LOW":
        return value < alerted.value
    if kind == "HIGH":
        return value > alerted.value
    if previous is None or alerted.previous_value is None:
        return True
    return abs(value - previous) > abs(alerted.value - alerted.previous_value)


def _remember(recent: tuple[str, ...], event_id: str) -> tuple[str, ...]:
    return (*recent, event_id)[-RECENT_EVENTS:]


def evaluate(
    facts: LabFacts,
    state: AnalyteState | None,
    rules: RuleBook,
    now: dt.datetime,
    policy: AlertPolicy | None = None,
) -> Decision:
    """Judge one result against thresholds and delta checks, applying suppression; see the module doc."""
    policy = policy or AlertPolicy()
    state = state or AnalyteState()
    now = _truncate(now)
    result_time = _truncate(facts.result_time)
    result_ms = epoch_ms(result_time)

    if facts.event_id in state.recent_event_ids:
        raised = tuple(
            entry.alert for entry in state.open_alerts if entry.alert.source_event_id == facts.event_id
        )
        return Decision(state=state, alerts=raised, duplicate=True)
    recent = _remember(state.recent_event_ids, facts.event_id)

    same_result = facts.result_id is not None and facts.result_id == state.last_result_id
    if facts.status == "cancelled":
        kept = tuple(
            entry
            for entry in state.open_alerts
            if facts.result_id is None or entry.result_id != facts.result_id
        )
        if not same_result:
            return Decision(state=dataclasses.replace(state, open_alerts=kept, recent_event_ids=recent))
        return Decision(
            state=dataclasses.replace(
                state,
                last_value=state.prior_value,
                last_time_ms=state.prior_time_ms,
                last_event_id=None,
                last_result_id=None,
                prior_value=None,
                prior_time_ms=None,
                open_alerts=kept,
                recent_event_ids=recent,
            )
        )

    out_of_order = not same_result and state.last_time_ms is not None and result_ms < state.last_time_ms
    previous: tuple[float, int] | None
    if facts.comparator is not None:
        # A bound is no number to take a difference from or to: no delta check, and the last measured
        # value stays the one the next result is compared with.
        previous = None
        new_state = state
    elif same_result:
        previous = (
            None
            if state.prior_value is None or state.prior_time_ms is None
            else (state.prior_value, state.prior_time_ms)
        )
        new_state = dataclasses.replace(
            state, last_value=facts.value, last_time_ms=result_ms, last_event_id=facts.event_id
        )
    elif out_of_order:
        previous = None
        new_state = state
    else:
        previous = (
            None
            if state.last_value is None or state.last_time_ms is None
            else (state.last_value, state.last_time_ms)
        )
        new_state = dataclasses.replace(
            state,
            last_value=facts.value,
            last_time_ms=result_ms,
            last_event_id=facts.event_id,
            last_result_id=facts.result_id,
            prior_value=state.last_value,
            prior_time_ms=state.last_time_ms,
        )

    if now - result_time > policy.alert_within:
        # Stored and remembered, never alerted: a result this old is history, not a call to act, and a
        # replay of it must not open (and escalate) again an alert that was acknowledged and forgotten.
        return Decision(
            state=dataclasses.replace(new_state, recent_event_ids=recent),
            out_of_order=out_of_order,
            late=True,
        )

    findings = [_threshold_finding(facts, rules)]
    if previous is not None:
        findings.append(_delta_finding(facts, rules, previous[0], previous[1], result_ms))

    open_by_kind = {entry.alert.limit_kind: entry for entry in state.open_alerts}
    alerts: list[AlertDraft] = []
    updated: list[AlertDraft] = []
    suppressed = False
    window_ms = policy.suppression_window // _MS
    for finding in findings:
        if finding is None:
            continue
        anchor = open_by_kind.get(finding.kind)
        if (
            anchor is not None
            and facts.status != "corrected"
            and abs(result_ms - epoch_ms(anchor.alert.result_time)) < window_ms
            and not _worse(finding.kind, facts.value, previous[0] if previous else None, anchor.alert)
        ):
            suppressed = True
            if anchor.result_id is not None and anchor.result_id == facts.result_id:
                continue  # a later version of the alerted result is not a repeat
            bumped = dataclasses.replace(anchor.alert, suppressed_repeats=anchor.alert.suppressed_repeats + 1)
            open_by_kind[finding.kind] = dataclasses.replace(anchor, alert=bumped)
            updated.append(bumped)
            continue
        draft = AlertDraft(
            alert_id=alert_id_for(facts.event_id, facts.loinc_code, finding.kind),
            source_event_id=facts.event_id,
            regional_patient_id=facts.regional_patient_id,
            institution_id=facts.institution_id,
            loinc_code=facts.loinc_code,
            analyte=_analyte_name(rules, facts.loinc_code),
            value=facts.value,
            unit=facts.unit,
            limit_kind=finding.kind,
            limit_value=finding.limit,
            severity=finding.severity,
            message=finding.message,
            rule_source=finding.source,
            result_time=result_time,
            raised_time=now,
            deadline_time=now + policy.escalation.deadline_for(finding.severity),
            correlation_id=facts.correlation_id,
            ward=facts.ward,
            previous_value=previous[0] if previous else None,
            previous_time=from_epoch_ms(previous[1]) if previous else None,
            value_comparator=facts.comparator,
        )
        open_by_kind[finding.kind] = OpenAlert(alert=draft, result_id=facts.result_id)
        alerts.append(draft)

    return Decision(
        state=dataclasses.replace(
            new_state, open_alerts=_ordered(open_by_kind.values()), recent_event_ids=recent
        ),
        alerts=tuple(alerts),
        updated_alerts=tuple(updated),
        suppressed=suppressed,
        out_of_order=out_of_order,
    )


def _analyte_name(rules: RuleBook, loinc: str) -> str:
    for rule in rules.thresholds.get(loinc, ()):
        return rule.analyte
    for delta in rules.deltas_for(loinc):
        return delta.analyte
    return loinc


_ALERT_FIELDS = (
    "alert_id",
    "source_event_id",
    "regional_patient_id",
    "institution_id",
    "ward",
    "loinc_code",
    "analyte",
    "value",
    "unit",
    "limit_kind",
    "limit_value",
    "severity",
    "message",
    "rule_source",
    "previous_value",
    "previous_time",
    "result_time",
    "raised_time",
    "deadline_time",
    "correlation_id",
    "suppressed_repeats",
    "value_comparator",
)


def alert_record(draft: AlertDraft) -> dict[str, Any]:
    """The CriticalValueAlert (v3) Avro record of a draft: exactly the schema's fields, UTC datetimes."""
    return {name: getattr(draft, name) for name in _ALERT_FIELDS}

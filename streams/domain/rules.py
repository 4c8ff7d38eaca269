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
- `updated_alerts`: raised alerts whose `suppressed_repeats` went up or that gained a `note` (same
  alert_id), to publish again;
- `state`: the state to write back. Besides the latest values and open alerts it keeps the recent
  results by result time (`history`, at most HISTORY_LIMIT, none older than a late result could need),
  the alerts raised for them (`raised`), and `base`, the in-order state before the oldest kept result
  (results folded out of the history are judged into it). A state of format 1 (no history) is read as
  its own base.

Rules, in order:

1. An event already seen (its id is among the last `RECENT_EVENTS` ids of the state) changes nothing;
   the alerts it raised are returned again in `alerts` (same ids), so a crash between writing the state
   and publishing cannot lose an alert. Downstream must treat alerts as upserts by alert_id.
2. A cancelled result never alerts and never becomes the latest or the previous value: its versions
   leave the history, the latest and previous values become those of the results still kept (judged
   again in result-time order from `base`, values only), and open alerts it raised are dropped, so its
   retraction cannot suppress the next genuine critical value.
3. Threshold: the most specific rule for the patient's age (result year - birth year) and sex. A
   bound ("> 600", an analyser above its measuring range) crosses a limit only when every value it
   allows does; it runs no delta check and does not replace the last measured value (it is kept in the
   history, so that a replay judges and suppresses alike).
4. Delta (CLSI EP33): against the previous result of the same patient and analyte, if it is at most
   the check's window older. A new version (preliminary -> final, corrected) of the latest result is
   compared with the result before it, not with the version it replaces. The first firing check wins.
5. Arrival order does not matter: results are judged by result time. A result that is the newest (or a
   new version of the latest) is judged incrementally, as above. A late one (result_time before the
   latest, a different result) is put in its place in the history and the history is judged again in
   result-time order from `base`, by the same rules from rule 3 on: the late result is compared with its
   predecessor in time and its successors with it. Alerts of that in-order run not raised yet are
   returned in `alerts` (ids are deterministic, so those already raised keep theirs); an alert raised
   before is never withdrawn (it stays open in escalation): if the in-order run does not raise it, or
   raises it against another previous result, it is returned once in `updated_alerts` with a `note`
   ("a result of <time> received late now precedes this one; ..."). The state becomes the in-order
   run's. A late result older than every kept one (folded into `base`, or from before a format-1 state)
   cannot be put in its place: it may alert on thresholds but runs no delta check and does not replace
   the latest value. For results that arrive in order the outcome is what it was without the history.
6. A result older than `policy.alert_within` (7 days, the time acknowledged alerts are remembered)
   raises nothing; it still becomes the latest value if it is the newest, and a late one still takes its
   place in the history (its successors are compared with it).
7. Suppression, per limit kind (LOW, HIGH, DELTA): while an alert of that kind is open and the new
   result lies within `policy.suppression_window` of the alerted result's time, a result that is not
   worse (LOW: not lower, HIGH: not higher, DELTA: not a larger absolute change) raises no alert;
   the open alert's `suppressed_repeats` goes up by one and it is returned in `updated_alerts`.
   A later version of the very result that raised the alert is suppressed without counting.
   Corrected results are never suppressed: the clinician must hear the corrected value. Suppression
   follows result time too (rule 5): an older result arriving after a newer one's alert is judged before
   it, so it is not suppressed by it; a late repeat of an open alert counts on it.
8. Alert ids are uuid5(event id, LOINC, limit kind): reprocessing yields the same id, a correction
   (new event id) a new one. The acknowledgement deadline is `now` + the severity's deadline.

Times in state dicts are epoch milliseconds; all datetimes are UTC and truncated to milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

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
STATE_FORMAT = 2  # 2: recent results (history), raised alerts, base
HISTORY_LIMIT = 16  # recent results kept per patient and analyte to judge a late one in its place

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)
_T = TypeVar("_T")


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
        values = {name: data[name] for name in _draft_fields() if name in data}
        for key in ("result_time", "raised_time", "deadline_time", "previous_time"):
            if values.get(key) is not None:
                values[key] = from_epoch_ms(int(values[key]))
        for key in ("value", "limit_value", "previous_value"):
            if values.get(key) is not None:
                values[key] = float(values[key])
        return cls(**values)


@functools.cache
def _draft_fields() -> tuple[str, ...]:
    """AlertDraft's field names, looked up once (dataclasses.fields builds them on every call)."""
    return tuple(f.name for f in dataclasses.fields(AlertDraft))


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
    """What the engine remembers per (patient, LOINC code): latest value, the one before, open alerts,
    and the recent results by result time, so that a late result can be judged in its place (rule 5)."""

    last_value: float | None = None
    last_time_ms: int | None = None
    last_event_id: str | None = None
    last_result_id: str | None = None
    prior_value: float | None = None
    prior_time_ms: int | None = None
    open_alerts: tuple[OpenAlert, ...] = ()  # at most one per limit kind, in LIMIT_KINDS order
    recent_event_ids: tuple[str, ...] = ()  # oldest first, at most RECENT_EVENTS
    history: tuple[Entry, ...] = ()  # recent results, every version, by result time (oldest first)
    raised: tuple[AlertDraft, ...] = ()  # alerts raised for results of `history`; note set once noted
    base: AnalyteState | None = None  # the in-order state before history[0] (results folded out of it)
    base_ms: int | None = None  # newest result time folded into `base`: an older result cannot be replayed

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
            "history": [list(entry) for entry in self.history],
            "raised": [draft.to_dict() for draft in self.raised],
            "base": None if self.base is None else self.base.to_dict(),
            "base_ms": self.base_ms,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnalyteState:
        """Reads this format and format 1 (no history: the whole state is then the base a replay starts
        from, and results older than its latest one are judged on thresholds alone)."""

        def number(key: str) -> float | None:
            return None if data.get(key) is None else float(data[key])

        def integer(key: str) -> int | None:
            return None if data.get(key) is None else int(data[key])

        base = data.get("base")
        open_alerts = data.get("open_alerts")
        raised = data.get("raised")
        # Built as `_with` copies (no frozen __init__): this runs for every result judged.
        return _built(
            cls,
            last_value=number("last_value"),
            last_time_ms=integer("last_time_ms"),
            last_event_id=data.get("last_event_id"),
            last_result_id=data.get("last_result_id"),
            prior_value=number("prior_value"),
            prior_time_ms=integer("prior_time_ms"),
            open_alerts=_ordered(OpenAlert.from_dict(entry) for entry in open_alerts) if open_alerts else (),
            recent_event_ids=tuple(data.get("recent_event_ids", ())),
            history=tuple(map(Entry.from_list, data.get("history", ()))),
            raised=tuple(AlertDraft.from_dict(entry) for entry in raised) if raised else (),
            base=None if base is None else AnalyteState.from_dict(base),
            base_ms=integer("base_ms"),
        )


def _built(cls: type[_T], **fields: Any) -> _T:
    """An instance of a frozen dataclass without validation in `__init__`, given every field."""
    made = object.__new__(cls)
    made.__dict__.update(fields)
    return made


def _with(value: _T, **changes: Any) -> _T:
    """`dataclasses.replace` without re-running `__init__`, for the states and decisions of the hot path
    (a field-for-field copy; the classes are frozen dataclasses without validation in `__init__`)."""
    copy = object.__new__(type(value))
    copy.__dict__.update(value.__dict__, **changes)
    return copy


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


class Entry(NamedTuple):
    """A result kept in the history: what judging it again needs (the patient and LOINC are the state's).
    Stored as a JSON list, in this order."""

    event_id: str
    result_ms: int
    value: float
    unit: str
    status: str
    institution_id: str
    correlation_id: str
    result_id: str | None
    birth_year: int | None
    sex: str | None
    ward: str | None
    comparator: str | None
    judged: bool  # judged when it arrived (not older than `policy.alert_within`, rule 6)

    @classmethod
    def of(cls, facts: LabFacts, result_ms: int, judged: bool) -> Entry:
        return cls(
            facts.event_id,
            result_ms,
            facts.value,
            facts.unit,
            facts.status,
            facts.institution_id,
            facts.correlation_id,
            facts.result_id,
            facts.birth_year,
            facts.sex,
            facts.ward,
            facts.comparator,
            judged,
        )

    @classmethod
    def from_list(cls, data: list[Any]) -> Entry:
        event_id, result_ms, value, *middle, judged = data  # _make and _replace cost 8x this
        if len(middle) != 9:
            raise TypeError(f"a history entry has 13 fields, not {len(data)}")
        return tuple.__new__(cls, (event_id, int(result_ms), float(value), *middle, bool(judged)))

    def facts(self, patient: str, loinc: str) -> LabFacts:
        return LabFacts(
            event_id=self.event_id,
            regional_patient_id=patient,
            institution_id=self.institution_id,
            loinc_code=loinc,
            value=self.value,
            unit=self.unit,
            status=self.status,
            result_time=from_epoch_ms(self.result_ms),
            correlation_id=self.correlation_id,
            birth_year=self.birth_year,
            sex=self.sex,
            ward=self.ward,
            result_id=self.result_id,
            comparator=self.comparator,
        )


@dataclass(frozen=True)
class Decision:
    """The outcome of one result: state to store, alerts to raise, open alerts to republish."""

    state: AnalyteState
    alerts: tuple[AlertDraft, ...] = ()
    updated_alerts: tuple[AlertDraft, ...] = ()
    suppressed: bool = False  # at least one crossed limit raised no new alert
    duplicate: bool = False  # the event had been evaluated before
    out_of_order: bool = False  # older than the latest result: judged in its place by result time (rule 5)
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
    state = _anchored(state)
    if facts.result_time != result_time:
        facts = dataclasses.replace(facts, result_time=result_time)

    if facts.status == "cancelled":
        return _cancel(facts, state, recent, rules, now, policy)

    same_result = facts.result_id is not None and facts.result_id == state.last_result_id
    arrived_late = not same_result and state.last_time_ms is not None and result_ms < state.last_time_ms
    if arrived_late and (state.base_ms is None or result_ms >= state.base_ms):
        return _replay(facts, state, rules, now, policy, recent)

    decision = _step(facts, state, rules, now, policy)
    if arrived_late:
        # Older than every result still kept: judged on thresholds alone, as it cannot be put in its place.
        return _with(decision, state=_with(decision.state, recent_event_ids=recent))
    new_state = _with(
        decision.state,
        history=_insert(state.history, Entry.of(facts, result_ms, not decision.late)),
        raised=(*state.raised, *decision.alerts) if decision.alerts else state.raised,
        recent_event_ids=recent,
    )
    return _with(decision, state=_trim(new_state, facts, rules, now, policy))


def _cancel(
    facts: LabFacts,
    state: AnalyteState,
    recent: tuple[str, ...],
    rules: RuleBook,
    now: dt.datetime,
    policy: AlertPolicy,
) -> Decision:
    """Rule 2; the cancelled result's versions also leave the history, and the latest and previous
    values become those of the results still kept, in result-time order from the base (as rule 5
    judges them): a value of a cancelled result is never the latest or the previous one."""
    kept = tuple(
        entry for entry in state.open_alerts if facts.result_id is None or entry.result_id != facts.result_id
    )
    history = tuple(
        entry for entry in state.history if facts.result_id is None or entry.result_id != facts.result_id
    )
    gone = {entry.event_id for entry in state.history} - {entry.event_id for entry in history}
    raised = tuple(draft for draft in state.raised if draft.source_event_id not in gone)
    cancels_latest = facts.result_id is not None and facts.result_id == state.last_result_id
    if not gone and not cancels_latest:
        return Decision(
            state=_with(state, open_alerts=kept, recent_event_ids=recent, history=history, raised=raised)
        )
    # `_anchored` gave any state with results a history or a base, so this is never an empty run by mistake
    values = _values_in_order(state.base, history, facts, rules, now, policy)
    return Decision(
        state=_with(
            state,
            last_value=values.last_value,
            last_time_ms=values.last_time_ms,
            last_event_id=values.last_event_id,
            last_result_id=values.last_result_id,
            prior_value=values.prior_value,
            prior_time_ms=values.prior_time_ms,
            open_alerts=kept,
            recent_event_ids=recent,
            history=history,
            raised=raised,
        )
    )


def _values_in_order(
    base: AnalyteState | None,
    history: tuple[Entry, ...],
    facts: LabFacts,
    rules: RuleBook,
    now: dt.datetime,
    policy: AlertPolicy,
) -> AnalyteState:
    """The in-order run of the kept results from the base; only its values are used (no alert)."""
    replayed = base or AnalyteState()
    for entry in history:
        step = _step(
            entry.facts(facts.regional_patient_id, facts.loinc_code), replayed, rules, now, policy, False
        )
        replayed = step.state
    return replayed


def _newest_ms(state: AnalyteState) -> int | None:
    times = [epoch_ms(entry.alert.result_time) for entry in state.open_alerts]
    times += [t for t in (state.last_time_ms, state.prior_time_ms) if t is not None]
    return max(times) if times else None


def _anchored(state: AnalyteState) -> AnalyteState:
    """A state with results but no history (format 1, or built by hand) is its own base: a replay starts
    from it, and results older than its latest one cannot be replayed."""
    if state.history or state.base is not None or state.base_ms is not None:
        return state
    newest = _newest_ms(state)
    if newest is None:
        return state
    return _with(state, base=_core(state), base_ms=newest)


def _core(state: AnalyteState) -> AnalyteState:
    """The in-order part of a state: values and open alerts, without history or remembered events."""
    return _with(state, recent_event_ids=(), history=(), raised=(), base=None, base_ms=None)


def _insert(history: tuple[Entry, ...], facts: Entry) -> tuple[Entry, ...]:
    """`facts` placed after every entry of the same or an earlier result time, and after every earlier
    version of its result (a version replaces the one before it, whatever its result time)."""
    first = 0
    if facts.result_id is not None:
        first = next(
            (i + 1 for i in range(len(history) - 1, -1, -1) if history[i].result_id == facts.result_id), 0
        )
    index = len(history)
    while index > first and history[index - 1].result_ms > facts.result_ms:
        index -= 1
    return (*history[:index], facts, *history[index:])


def _known(state: AnalyteState) -> dict[str, AlertDraft]:
    known = {draft.alert_id: draft for draft in state.raised}
    known.update((entry.alert.alert_id, entry.alert) for entry in state.open_alerts)
    return known


def _canonical(open_alerts: tuple[OpenAlert, ...], known: Mapping[str, AlertDraft]) -> tuple[OpenAlert, ...]:
    """Open alerts of a replay judged as the replay did (its previous value decides later suppression),
    with the raised time, deadline and note they were raised with, and never fewer repeats."""
    entries = []
    for entry in open_alerts:
        before = known.get(entry.alert.alert_id)
        if before is not None:
            alert = dataclasses.replace(
                entry.alert,
                raised_time=before.raised_time,
                deadline_time=before.deadline_time,
                note=before.note,
                suppressed_repeats=max(before.suppressed_repeats, entry.alert.suppressed_repeats),
            )
            entry = _with(entry, alert=alert)
        entries.append(entry)
    return tuple(entries)


def _trim(
    state: AnalyteState, facts: LabFacts, rules: RuleBook, now: dt.datetime, policy: AlertPolicy
) -> AnalyteState:
    """Fold the oldest results into the base, in order, beyond HISTORY_LIMIT or older than a late result
    could need: one judged `policy.alert_within` late still compares with a predecessor up to the longest
    delta window, and with an alert up to the suppression window, before it."""
    history = state.history
    horizon = max((rule.window for rule in rules.deltas_for(facts.loinc_code)), default=dt.timedelta(0))
    horizon += policy.suppression_window + policy.alert_within
    oldest_kept = history[-1].result_ms - horizon // _MS
    if len(history) <= HISTORY_LIMIT and history[0].result_ms >= oldest_kept:
        return state
    base, base_ms, raised = state.base, state.base_ms, state.raised
    known = _known(state)
    while len(history) > HISTORY_LIMIT or history[0].result_ms < oldest_kept:
        oldest, history = history[0], history[1:]
        before = base or AnalyteState()
        folded = oldest.facts(facts.regional_patient_id, facts.loinc_code)
        stepped = _step(folded, before, rules, now, policy, oldest.judged)
        base = _with(stepped.state, open_alerts=_canonical(stepped.state.open_alerts, known))
        base_ms = oldest.result_ms if base_ms is None else max(base_ms, oldest.result_ms)
        raised = tuple(draft for draft in raised if draft.source_event_id != oldest.event_id)
    return _with(state, history=history, raised=raised, base=base, base_ms=base_ms)


def _late_note(late_time: dt.datetime, raised: AlertDraft, in_order: AlertDraft | None) -> str | None:
    """Why a raised alert's comparison changed when a late result took its place, or None if it did not."""
    head = f"a result of {late_time.isoformat()} received late now precedes this one; "
    if in_order is None:
        return head + "judged in result-time order this alert would not have been raised; it stays open"
    if (in_order.previous_value, in_order.previous_time) == (raised.previous_value, raised.previous_time):
        return None
    if in_order.previous_value is None or in_order.previous_time is None:  # its previous result was cancelled
        return (
            f"judged again in result-time order after a result of {late_time.isoformat()} received late, "
            "this alert has no previous result to compare with; it stays open"
        )
    return head + (
        f"compared with it ({in_order.previous_value:.4g} {in_order.unit} at "
        f"{in_order.previous_time.isoformat()}) this alert is still raised"
    )


def _replay(
    facts: LabFacts,
    state: AnalyteState,
    rules: RuleBook,
    now: dt.datetime,
    policy: AlertPolicy,
    recent: tuple[str, ...],
) -> Decision:
    """Rule 5: the kept results and the late one, judged again in result-time order from the base."""
    too_old = now - facts.result_time > policy.alert_within
    late = Entry.of(facts, epoch_ms(facts.result_time), not too_old)
    history = _insert(state.history, late)
    replayed = state.base or AnalyteState()
    in_order: list[AlertDraft] = []
    suppressed = False
    for entry in history:
        step = _step(
            facts if entry is late else entry.facts(facts.regional_patient_id, facts.loinc_code),
            replayed,
            rules,
            now,
            policy,
            entry.judged,
        )
        replayed = step.state
        in_order.extend(step.alerts)
        if entry is late:
            suppressed = step.suppressed
    known = _known(state)
    in_order_by_id = {draft.alert_id: draft for draft in in_order}
    alerts = tuple(draft for draft in in_order if draft.alert_id not in known)
    # Rule 6 holds in a replay too: a result now older than `policy.alert_within` raises nothing new
    # (nor keeps an alert open that was never raised).
    stale = {draft.alert_id for draft in alerts if now - draft.result_time > policy.alert_within}
    alerts = tuple(draft for draft in alerts if draft.alert_id not in stale)
    current = {entry.alert.alert_id: entry.alert for entry in state.open_alerts}
    updated: list[AlertDraft] = []
    raised: list[AlertDraft] = []
    for draft in state.raised:
        note = _late_note(facts.result_time, draft, in_order_by_id.get(draft.alert_id))
        if note is not None and draft.note is None:
            # Never withdrawn: the alert stays open (escalation), and says why its comparison changed.
            draft = dataclasses.replace(draft, note=note)
            updated.append(dataclasses.replace(current.get(draft.alert_id, draft), note=note))
        raised.append(draft)
    raised.extend(alerts)
    known = {**known, **{draft.alert_id: draft for draft in raised}}
    open_alerts = _canonical(
        tuple(entry for entry in replayed.open_alerts if entry.alert.alert_id not in stale), known
    )
    for opened in open_alerts:
        before = current.get(opened.alert.alert_id)
        if before is not None and opened.alert.suppressed_repeats > before.suppressed_repeats:
            updated = [draft for draft in updated if draft.alert_id != opened.alert.alert_id]
            updated.append(opened.alert)
    new_state = _with(
        replayed,
        open_alerts=open_alerts,
        recent_event_ids=recent,
        history=history,
        raised=tuple(raised),
        base=state.base,
        base_ms=state.base_ms,
    )
    return Decision(
        state=_trim(new_state, facts, rules, now, policy),
        alerts=alerts,
        updated_alerts=tuple(updated),
        suppressed=suppressed,
        out_of_order=True,
        late=too_old,
    )


def _step(
    facts: LabFacts,
    state: AnalyteState,
    rules: RuleBook,
    now: dt.datetime,
    policy: AlertPolicy,
    judged: bool | None = None,
) -> Decision:
    """Rules 3, 4, 6 and 7 for one result (truncated times, not cancelled) after `state`; the caller keeps
    the remembered events and the history. `judged` (replays): whether the result was judged (rule 6)
    when it arrived, so that a replay keeps the alerts it raised then."""
    result_time = facts.result_time
    result_ms = epoch_ms(result_time)
    same_result = facts.result_id is not None and facts.result_id == state.last_result_id
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
        new_state = _with(state, last_value=facts.value, last_time_ms=result_ms, last_event_id=facts.event_id)
    elif out_of_order:
        previous = None
        new_state = state
    else:
        previous = (
            None
            if state.last_value is None or state.last_time_ms is None
            else (state.last_value, state.last_time_ms)
        )
        new_state = _with(
            state,
            last_value=facts.value,
            last_time_ms=result_ms,
            last_event_id=facts.event_id,
            last_result_id=facts.result_id,
            prior_value=state.last_value,
            prior_time_ms=state.last_time_ms,
        )

    too_old = now - result_time > policy.alert_within if judged is None else not judged
    if too_old:
        # Stored and remembered, never alerted: a result this old is history, not a call to act, and a
        # replay of it must not open (and escalate) again an alert that was acknowledged and forgotten.
        return Decision(state=new_state, out_of_order=out_of_order, late=True)

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
        state=_with(new_state, open_alerts=_ordered(open_by_kind.values())),
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

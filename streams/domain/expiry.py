"""When analyte state can no longer matter, as pure functions over the stored records: no clock, no Faust.

The clinical stage keeps one AnalyteState per (patient, LOINC code) (streams.domain.rules). Without
expiry its tables hold every patient ever seen; with it they hold the patients seen within the horizon.

API::

    expiry_horizon(rules: RuleBook, policy: AlertPolicy) -> timedelta
    horizon_ms(horizon: timedelta) -> int
    newest_result_ms(record: Mapping) -> int | None        # newest result time an AnalyteState record holds
    alert_ids(record: Mapping) -> set[str]                 # ids of the open alerts it holds
    analyte_verdict(record, now_ms, horizon_ms, escalating) -> Verdict
    legacy_verdict(records: Mapping[LOINC, record], now_ms, horizon_ms, escalating) -> Verdict
    stamped(record, now_ms) -> dict                        # the record with its update time
    expired_keys(entries: Iterable[(key, record)], now_ms, horizon_ms, escalating_of) -> list[key]

The horizon is the longest delta-check window + the suppression window + `policy.alert_within`, from
the reference data (critical_rules.json), the same horizon `rules._trim` keeps history for. A state
whose newest result is older than `now - horizon` cannot change a decision any more:

- a result that can alert is at most `alert_within` old (rule 6), so the state's newest result is more
  than the longest delta window and the suppression window before it: no delta check compares with it
  (rule 4), no open alert of it suppresses (rule 7), and a late result of that age is judged in its place
  against nothing older than that (rule 5);
- a result that cannot alert (older than `alert_within`) raises nothing with or without the state; a
  redelivered event of the state is one of those.

Two clocks, both must agree (`analyte_verdict`), so that a replay of old data (a hospital back-filling a
month of labs, every result older than the horizon by event time) is not expired while it is being
written:

1. event time: `now - newest result time > horizon`;
2. processing time: `now - the record's last write (`UPDATED_FIELD`, stamped by the clinical stage at
   every write) > horizon`. A record written before the stamp existed is stamped once by the expiry
   timer (`Verdict.STAMP`) and expires a horizon later.

`now` is the wall clock. A state whose alert is still escalating (unacknowledged in the open-alerts
table) is never expired, whatever its age. Legacy per-patient maps (`patient-analytes`, never written
since the per-analyte table) go on event time alone: nothing can be writing them.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

from streams.domain.reference import AlertPolicy, RuleBook

__all__ = [
    "UPDATED_FIELD",
    "Verdict",
    "alert_ids",
    "analyte_verdict",
    "expired_keys",
    "expiry_horizon",
    "horizon_ms",
    "legacy_verdict",
    "newest_result_ms",
    "stamped",
]

UPDATED_FIELD = "updated_ms"  # wall clock (epoch ms) of the record's last write; AnalyteState ignores it
_MS = dt.timedelta(milliseconds=1)


class Verdict(enum.Enum):
    KEEP = "keep"
    EXPIRE = "expire"  # delete the key (a tombstone on the changelog)
    STAMP = "stamp"  # expired by event time but its last write is unknown: write it back with the time


def expiry_horizon(rules: RuleBook, policy: AlertPolicy) -> dt.timedelta:
    """How long after its newest result (and its last write) a state can still change a decision."""
    longest = max(
        (rule.window for deltas in rules.deltas.values() for rule in deltas), default=dt.timedelta(0)
    )
    return longest + policy.suppression_window + policy.alert_within


def _times(record: Mapping[str, Any]) -> Iterable[int]:
    for key in ("last_time_ms", "prior_time_ms", "base_ms"):
        if record.get(key) is not None:
            yield int(record[key])
    for entry in record.get("history") or ():
        yield int(entry[1])  # rules.Entry: (event_id, result_ms, ...)
    for entry in record.get("open_alerts") or ():
        yield int(entry["alert"]["result_time"])
    for draft in record.get("raised") or ():
        yield int(draft["result_time"])
    base = record.get("base")
    if base:
        yield from _times(base)


def newest_result_ms(record: Mapping[str, Any]) -> int | None:
    """The newest result time (epoch ms) an AnalyteState record (`AnalyteState.to_dict`, format 1 or 2)
    holds anywhere: latest and prior values, history, base, open and raised alerts. None: no result."""
    return max(_times(record), default=None)


def alert_ids(record: Mapping[str, Any]) -> set[str]:
    """Ids of the open alerts an AnalyteState record holds (suppression state)."""
    return {str(entry["alert"]["alert_id"]) for entry in record.get("open_alerts") or ()}


def _old(newest_ms: int | None, now_ms: int, horizon_ms: int) -> bool:
    return newest_ms is None or now_ms - newest_ms > horizon_ms


def analyte_verdict(
    record: Mapping[str, Any], now_ms: int, horizon_ms: int, escalating: Collection[str] = ()
) -> Verdict:
    """Whether one analyte state is still needed at `now_ms` (wall clock): KEEP unless its newest result
    and its last write are both more than `horizon_ms` old and none of its open alerts is among
    `escalating` (the patient's unacknowledged alert ids); STAMP when only the last write is unknown."""
    if not _old(newest_result_ms(record), now_ms, horizon_ms):
        return Verdict.KEEP
    if not alert_ids(record).isdisjoint(escalating):
        return Verdict.KEEP
    updated = record.get(UPDATED_FIELD)
    if updated is None:
        return Verdict.STAMP
    return Verdict.EXPIRE if now_ms - int(updated) > horizon_ms else Verdict.KEEP


def legacy_verdict(
    records: Mapping[str, Any], now_ms: int, horizon_ms: int, escalating: Collection[str] = ()
) -> Verdict:
    """A legacy per-patient map (LOINC -> AnalyteState record, never written any more): EXPIRE when every
    state in it is older than the horizon by event time and none holds an escalating alert."""
    for record in records.values():
        if not isinstance(record, Mapping):
            continue
        if not _old(newest_result_ms(record), now_ms, horizon_ms):
            return Verdict.KEEP
        if not alert_ids(record).isdisjoint(escalating):
            return Verdict.KEEP
    return Verdict.EXPIRE


def stamped(record: Mapping[str, Any], now_ms: int) -> dict[str, Any]:
    return {**record, UPDATED_FIELD: now_ms}


def expired_keys(
    entries: Iterable[tuple[str, Mapping[str, Any]]],
    now_ms: int,
    horizon_ms: int,
    escalating_of: Callable[[str], Collection[str]] = lambda _key: (),
) -> list[str]:
    """The keys among (key, AnalyteState record) pairs that `analyte_verdict` expires, in order."""
    return [
        key
        for key, record in entries
        if analyte_verdict(record, now_ms, horizon_ms, escalating_of(key)) is Verdict.EXPIRE
    ]


def horizon_ms(horizon: dt.timedelta) -> int:
    return horizon // _MS

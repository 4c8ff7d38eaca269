"""Escalation of unacknowledged critical-value alerts, as pure functions over per-patient state.

Nothing here reads a clock or touches Kafka: `now` is a parameter, state goes in and comes out.

API::

    open_alert(state: OpenAlerts | None, draft: AlertDraft) -> OpenAlerts
    update_alert(state: OpenAlerts | None, draft: AlertDraft) -> OpenAlerts   # an update's repeats, note
    due_escalations(state: OpenAlerts | None, now: datetime, policy: EscalationPolicy)
        -> list[EscalationDraft]
    apply_escalation(state: OpenAlerts | None, escalation: EscalationDraft) -> OpenAlerts
    acknowledge(state: OpenAlerts | None, ack: Mapping) -> AckResult         # .state, .outcome
    escalation_record(draft: EscalationDraft) -> dict                          # an AlertEscalation record
    next_deadline(state: OpenAlerts | None) -> datetime | None                 # earliest pending deadline
    prune(state: OpenAlerts | None, now: datetime, keep: timedelta = ACK_RETENTION) -> OpenAlerts
    OpenAlerts.to_dict() / OpenAlerts.from_dict()                              # JSON primitives only

`EscalationPolicy` (from `load_reference().policy.escalation`) gives the acknowledgement deadline per
severity, the recipients by level and the repeat interval.

One `OpenAlerts` per regional patient id, mapping alert_id to `OpenAlertState`:

- `open_alert` adds an alert at level 0 with the draft's deadline. An alert already known (a
  suppressed-repeat update with the same id, a reprocessed event) is left exactly as it is: its level,
  deadline and acknowledgement are never reset.
- `update_alert` takes the suppressed repeats and note of an open alert's update (`Decision.updated_alerts`);
  level, deadline and acknowledgement stay, and an alert not tracked stays untracked.
- `due_escalations` returns, for each unacknowledged alert whose deadline is at or before `now`, the
  next level: level n notifies `policy.recipients[n]` (past the end of the list, the last recipient
  again, every `repeat_interval`). Before the last recipient the next deadline is `now` + the
  severity's deadline. Its escalation_id is uuid5(alert_id, str(level)), so a timer that fires twice
  before the state is written yields the same id.
- `apply_escalation` moves the alert to the escalation's level, recipient and deadline only if the
  escalation is the next level of an unacknowledged alert: applying it twice, late or after an
  acknowledgement changes nothing.
- `acknowledge` closes the alert for good, with who acknowledged it; the entry stays (acknowledged) so
  a reprocessed alert cannot reopen it until `prune` drops it. An acknowledgement of an unknown alert
  changes nothing and says so in `AckResult.outcome`.

Times in state dicts are epoch milliseconds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streams.domain.reference import EscalationPolicy
from streams.domain.rules import AlertDraft, epoch_ms, from_epoch_ms

__all__ = [
    "ACK_RETENTION",
    "AckOutcome",
    "AckResult",
    "EscalationDraft",
    "EscalationPolicy",
    "OpenAlertState",
    "OpenAlerts",
    "acknowledge",
    "apply_escalation",
    "due_escalations",
    "escalation_id_for",
    "escalation_record",
    "next_deadline",
    "open_alert",
    "prune",
    "update_alert",
]

ACK_RETENTION = dt.timedelta(days=7)  # acknowledged alerts are remembered this long against reprocessing
STATE_FORMAT = 1


@dataclass(frozen=True)
class OpenAlertState:
    """Where one alert stands: the escalation level reached and who it went to, the next deadline, whether
    and by whom acknowledged, its suppressed repeats and note (an AlertState record, alert_state.py)."""

    alert_id: str
    severity: str
    message: str
    institution_id: str
    regional_patient_id: str
    level: int
    deadline_ms: int
    acknowledged_ms: int | None = None
    suppressed_repeats: int = 0
    note: str | None = None
    recipient: str | None = None  # of the latest escalation; None before the first
    acknowledged_by: str | None = None

    @property
    def acknowledged(self) -> bool:
        return self.acknowledged_ms is not None

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))  # flat fields; dataclasses.asdict deep-copies each one

    @classmethod
    def from_draft(cls, draft: AlertDraft) -> OpenAlertState:
        """A just-raised alert: at level 0 and open, its deadline, repeats and note as the draft has them."""
        return cls(
            alert_id=draft.alert_id,
            severity=draft.severity,
            message=draft.message,
            institution_id=draft.institution_id,
            regional_patient_id=draft.regional_patient_id,
            level=0,
            deadline_ms=epoch_ms(draft.deadline_time),
            suppressed_repeats=draft.suppressed_repeats,
            note=draft.note,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpenAlertState:
        acknowledged = data.get("acknowledged_ms")
        # the last four were added later: state written before has none of them
        note, recipient, by = data.get("note"), data.get("recipient"), data.get("acknowledged_by")
        return cls(
            alert_id=str(data["alert_id"]),
            severity=str(data["severity"]),
            message=str(data["message"]),
            institution_id=str(data["institution_id"]),
            regional_patient_id=str(data["regional_patient_id"]),
            level=int(data["level"]),
            deadline_ms=int(data["deadline_ms"]),
            acknowledged_ms=None if acknowledged is None else int(acknowledged),
            suppressed_repeats=int(data.get("suppressed_repeats") or 0),
            note=None if note is None else str(note),
            recipient=None if recipient is None else str(recipient),
            acknowledged_by=None if by is None else str(by),
        )


@dataclass(frozen=True)
class OpenAlerts:
    """The alerts of one patient by alert_id, acknowledged ones included until pruned."""

    alerts: Mapping[str, OpenAlertState] = field(default_factory=dict)

    def get(self, alert_id: str) -> OpenAlertState | None:
        return self.alerts.get(alert_id)

    def _with(self, entry: OpenAlertState) -> OpenAlerts:
        return OpenAlerts({**self.alerts, entry.alert_id: entry})

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "alerts": {alert_id: entry.to_dict() for alert_id, entry in sorted(self.alerts.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpenAlerts:
        return cls(
            {str(alert_id): OpenAlertState.from_dict(entry) for alert_id, entry in data["alerts"].items()}
        )


@dataclass(frozen=True)
class EscalationDraft:
    """An escalation to publish (AlertEscalation) and then apply to the state."""

    escalation_id: str
    alert_id: str
    regional_patient_id: str
    institution_id: str
    level: int
    recipient: str
    severity: str
    message: str
    escalated_time: dt.datetime
    next_deadline_time: dt.datetime


class AckOutcome(enum.StrEnum):
    ACKNOWLEDGED = "acknowledged"
    ALREADY_ACKNOWLEDGED = "already_acknowledged"
    UNKNOWN_ALERT = "unknown_alert"


@dataclass(frozen=True)
class AckResult:
    state: OpenAlerts
    outcome: AckOutcome


def escalation_id_for(alert_id: str, level: int) -> str:
    return str(uuid.uuid5(uuid.UUID(alert_id), str(level)))


def _truncate(value: dt.datetime) -> dt.datetime:
    return from_epoch_ms(epoch_ms(value))


def open_alert(state: OpenAlerts | None, draft: AlertDraft) -> OpenAlerts:
    """Track a new alert at level 0; an alert already tracked is left untouched."""
    state = state or OpenAlerts()
    if draft.alert_id in state.alerts:
        return state
    return state._with(OpenAlertState.from_draft(draft))


def update_alert(state: OpenAlerts | None, draft: AlertDraft) -> OpenAlerts:
    """An open alert's update (same alert id): its suppressed repeats (never fewer) and note, nothing else.
    An alert not tracked (long acknowledged and pruned) is not tracked again: it must not escalate anew."""
    state = state or OpenAlerts()
    entry = state.get(draft.alert_id)
    if entry is None:
        return state
    repeats = max(entry.suppressed_repeats, draft.suppressed_repeats)
    note = draft.note if draft.note is not None else entry.note
    if (repeats, note) == (entry.suppressed_repeats, entry.note):
        return state
    return state._with(dataclasses.replace(entry, suppressed_repeats=repeats, note=note))


def due_escalations(
    state: OpenAlerts | None, now: dt.datetime, policy: EscalationPolicy
) -> list[EscalationDraft]:
    """The next escalation of every unacknowledged alert whose deadline has come, earliest deadline first."""
    if state is None:
        return []
    now = _truncate(now)
    now_ms = epoch_ms(now)
    due = sorted(
        (entry for entry in state.alerts.values() if not entry.acknowledged and entry.deadline_ms <= now_ms),
        key=lambda entry: (entry.deadline_ms, entry.alert_id),
    )
    drafts = []
    for entry in due:
        level = entry.level + 1
        drafts.append(
            EscalationDraft(
                escalation_id=escalation_id_for(entry.alert_id, level),
                alert_id=entry.alert_id,
                regional_patient_id=entry.regional_patient_id,
                institution_id=entry.institution_id,
                level=level,
                recipient=policy.recipient_for(level),
                severity=entry.severity,
                message=entry.message,
                escalated_time=now,
                next_deadline_time=now + policy.step_after(level, entry.severity),
            )
        )
    return drafts


def apply_escalation(state: OpenAlerts | None, escalation: EscalationDraft) -> OpenAlerts:
    """Record an escalation; anything but the next level of an unacknowledged alert is a no-op."""
    state = state or OpenAlerts()
    entry = state.get(escalation.alert_id)
    if entry is None or entry.acknowledged or escalation.level != entry.level + 1:
        return state
    return state._with(
        dataclasses.replace(
            entry,
            level=escalation.level,
            deadline_ms=epoch_ms(escalation.next_deadline_time),
            recipient=escalation.recipient,
        )
    )


def _ack_time_ms(value: Any) -> int:
    if isinstance(value, dt.datetime):
        return epoch_ms(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"acknowledged_time must be a UTC datetime or epoch milliseconds, not {value!r}")


def acknowledge(state: OpenAlerts | None, ack: Mapping[str, Any]) -> AckResult:
    """Close an alert for an AlertAcknowledgement record (decoded: times as datetimes or epoch ms)."""
    state = state or OpenAlerts()
    alert_id = str(ack["alert_id"])
    entry = state.get(alert_id)
    if entry is None:
        return AckResult(state, AckOutcome.UNKNOWN_ALERT)
    if entry.acknowledged:
        return AckResult(state, AckOutcome.ALREADY_ACKNOWLEDGED)
    closed = dataclasses.replace(
        entry,
        acknowledged_ms=_ack_time_ms(ack["acknowledged_time"]),
        acknowledged_by=None if ack.get("acknowledged_by") is None else str(ack["acknowledged_by"]),
    )
    return AckResult(state._with(closed), AckOutcome.ACKNOWLEDGED)


def next_deadline(state: OpenAlerts | None) -> dt.datetime | None:
    """The earliest deadline of an unacknowledged alert: when the timer next has work."""
    if state is None:
        return None
    pending = [entry.deadline_ms for entry in state.alerts.values() if not entry.acknowledged]
    return from_epoch_ms(min(pending)) if pending else None


def prune(state: OpenAlerts | None, now: dt.datetime, keep: dt.timedelta = ACK_RETENTION) -> OpenAlerts:
    """Forget alerts acknowledged more than `keep` before `now`; unacknowledged alerts always stay."""
    state = state or OpenAlerts()
    cutoff = epoch_ms(now - keep)
    kept = {
        alert_id: entry
        for alert_id, entry in state.alerts.items()
        if entry.acknowledged_ms is None or entry.acknowledged_ms >= cutoff
    }
    return state if len(kept) == len(state.alerts) else OpenAlerts(kept)


def escalation_record(draft: EscalationDraft) -> dict[str, Any]:
    """The AlertEscalation Avro record of a draft: exactly the schema's fields, UTC datetimes."""
    return {
        "escalation_id": draft.escalation_id,
        "alert_id": draft.alert_id,
        "regional_patient_id": draft.regional_patient_id,
        "institution_id": draft.institution_id,
        "level": draft.level,
        "recipient": draft.recipient,
        "severity": draft.severity,
        "message": draft.message,
        "escalated_time": draft.escalated_time,
        "next_deadline_time": draft.next_deadline_time,
    }

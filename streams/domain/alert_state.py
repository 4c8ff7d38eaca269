"""AlertState records: the latest state of one alert after a change, as plain functions, no Kafka.

An alert travels once, on alerts.critical. What happens to it afterwards (a suppressed repeat, a note,
an escalation, the acknowledgement) is a state change published on alerts.state, keyed by alert id and
compacted: each record carries the whole current state (`OpenAlertState`, escalation.py), so the latest
record of a key is all a reader needs. The first state (OPENED) goes out with the alert.

API::

    alert_state_record(entry: OpenAlertState, change: AlertChange, cause: str, changed_time: datetime,
                       correlation_id: str | None = None) -> dict     # an AlertState record
    repeat_change(draft: AlertDraft, repeats_before: int | None) -> AlertChange
    state_id_for(alert_id: str, change: AlertChange, cause: str) -> str
    untracked(draft: AlertDraft) -> OpenAlertState                     # an update's state, not tracked

`cause` names what made the change, so the state id is the same when a change is replayed: the alert's
source event (OPENED), the later result's event id (REPEAT, NOTE), the escalation id, the ack id.
"""

from __future__ import annotations

import datetime as dt
import enum
import uuid
from typing import Any

from streams.domain.escalation import OpenAlertState
from streams.domain.rules import AlertDraft, epoch_ms, from_epoch_ms

__all__ = ["AlertChange", "AlertStatus", "alert_state_record", "repeat_change", "state_id_for", "untracked"]


class AlertStatus(enum.StrEnum):
    OPEN = "OPEN"
    ACKNOWLEDGED = "ACKNOWLEDGED"


class AlertChange(enum.StrEnum):
    """What an AlertState record changed (the schema's AlertChange, but OTHER, which is never written)."""

    OPENED = "OPENED"
    REPEAT = "REPEAT"
    NOTE = "NOTE"
    ESCALATED = "ESCALATED"
    ACKNOWLEDGED = "ACKNOWLEDGED"


def state_id_for(alert_id: str, change: AlertChange, cause: str) -> str:
    return str(uuid.uuid5(uuid.UUID(str(alert_id)), f"{change}|{cause}"))


def repeat_change(draft: AlertDraft, repeats_before: int | None) -> AlertChange:
    """What an update of an open alert (`Decision.updated_alerts`) changed: NOTE when it carries a note
    and its repeat count is the one the alert had before (`repeats_before`, None: not known), else REPEAT."""
    if draft.note is not None and repeats_before is not None and draft.suppressed_repeats == repeats_before:
        return AlertChange.NOTE
    return AlertChange.REPEAT


def untracked(draft: AlertDraft) -> OpenAlertState:
    """The state of an updated alert the escalation state no longer tracks (acknowledged long ago and
    pruned): as the draft has it, at level 0 and open, since nothing more is known."""
    return OpenAlertState.from_draft(draft)


def alert_state_record(
    entry: OpenAlertState,
    change: AlertChange,
    cause: str,
    changed_time: dt.datetime,
    correlation_id: str | None = None,
) -> dict[str, Any]:
    """The AlertState Avro record of an alert's state after `change`: exactly the schema's fields."""
    acknowledged = entry.acknowledged_ms is not None
    return {
        "state_id": state_id_for(entry.alert_id, change, cause),
        "alert_id": entry.alert_id,
        "regional_patient_id": entry.regional_patient_id,
        "institution_id": entry.institution_id,
        "status": str(AlertStatus.ACKNOWLEDGED if acknowledged else AlertStatus.OPEN),
        "change": str(change),
        "suppressed_repeats": entry.suppressed_repeats,
        "escalation_level": entry.level,
        "recipient": entry.recipient,
        "next_deadline_time": None if acknowledged else from_epoch_ms(entry.deadline_ms),
        "acknowledged_by": entry.acknowledged_by if acknowledged else None,
        "acknowledged_time": None if entry.acknowledged_ms is None else from_epoch_ms(entry.acknowledged_ms),
        "note": entry.note,
        "changed_time": from_epoch_ms(epoch_ms(changed_time)),
        "correlation_id": correlation_id,
    }

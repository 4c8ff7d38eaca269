"""The live queue's order, timers and escalation chain, from alert rows: pure, `now` passed in."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from streams.domain.reference import EscalationPolicy

SEVERITY_RANK = {"CRITICAL": 0, "HIGH": 1, "MODERATE": 2}
SEVERITIES = tuple(SEVERITY_RANK)


@dataclass(frozen=True)
class ChainStep:
    """One level of an alert's escalation chain: who, from when (reached) or by when (pending)."""

    level: int
    recipient: str
    reached: bool
    current: bool
    due_time: dt.datetime | None  # when this level is (or was) due; None past the deadline we know


def escalation_chain(
    policy: EscalationPolicy,
    severity: str,
    level: int,
    raised_time: dt.datetime,
    next_deadline: dt.datetime | None,
) -> list[ChainStep]:
    """Every recipient of the chain for this severity: reached levels, the current one, and when the
    later ones become due if nobody acknowledges (each step after the policy's deadline)."""
    steps = []
    due: dt.datetime | None = raised_time
    for index, recipient in enumerate(policy.recipients):
        if index == level + 1:
            due = next_deadline
        elif index > level + 1 and due is not None:
            due = due + policy.step_after(index - 1, severity)
        steps.append(
            ChainStep(
                level=index,
                recipient=recipient,
                reached=index <= level,
                current=index == min(level, len(policy.recipients) - 1),
                due_time=due if index > level else None,
            )
        )
    return steps


def sort_key(severity: str, result_time: dt.datetime, alert_id: str) -> tuple[int, dt.datetime, str]:
    """Most severe first, then the oldest result."""
    return (SEVERITY_RANK.get(severity, len(SEVERITY_RANK)), result_time, alert_id)


def minutes_between(start: dt.datetime, end: dt.datetime) -> float:
    return (end - start).total_seconds() / 60.0


def seconds_left(deadline: dt.datetime | None, now: dt.datetime) -> float | None:
    """Until the next escalation; negative when it is overdue (the timer will fire shortly)."""
    return None if deadline is None else (deadline - now).total_seconds()


def no_action_recorded(
    acknowledged_time: dt.datetime | None, action_noted: bool, now: dt.datetime, after: dt.timedelta
) -> bool:
    """Acknowledgement is ownership: an acknowledged alert with no action note, long enough after."""
    return acknowledged_time is not None and not action_noted and now - acknowledged_time >= after


def age_bucket(minutes: float) -> str:
    """The open-alert age buckets of the console's metrics and operator view."""
    if minutes < 15:
        return "lt_15m"
    if minutes < 60:
        return "15m_1h"
    if minutes < 240:
        return "1h_4h"
    return "ge_4h"


AGE_BUCKETS = ("lt_15m", "15m_1h", "1h_4h", "ge_4h")


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 1]) of the values; None for none."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    if low == high:
        return ordered[low]
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True)
class AckStats:
    """Time to acknowledge over a period, for one institution."""

    institution_id: str
    acknowledged: int
    open: int
    median_minutes: float | None
    p90_minutes: float | None
    within_target: int

    @property
    def within_target_share(self) -> float | None:
        return None if not self.acknowledged else self.within_target / self.acknowledged


def ack_stats(
    institution_id: str, minutes_to_ack: Iterable[tuple[float, float]], open_count: int
) -> AckStats:
    """From (minutes to acknowledge, target minutes) pairs of one institution's acknowledged alerts."""
    pairs = list(minutes_to_ack)
    minutes = [m for m, _ in pairs]
    return AckStats(
        institution_id=institution_id,
        acknowledged=len(pairs),
        open=open_count,
        median_minutes=percentile(minutes, 0.5),
        p90_minutes=percentile(minutes, 0.9),
        within_target=sum(1 for m, target in pairs if m <= target),
    )

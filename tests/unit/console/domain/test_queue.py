"""Queue order, the escalation chain with its due times, the no-action flag, percentiles, a trend plot."""

from __future__ import annotations

import datetime as dt

from console.domain import queue as q
from console.domain.trend import plot
from streams.domain.reference import EscalationPolicy

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)
POLICY = EscalationPolicy(
    ack_deadlines={"CRITICAL": dt.timedelta(minutes=15), "HIGH": dt.timedelta(minutes=30)},
    recipients=("clinician", "attending", "head", "director"),
    repeat_interval=dt.timedelta(minutes=10),
)


def test_most_severe_then_oldest_first() -> None:
    keys = [
        q.sort_key("HIGH", T0, "a"),
        q.sort_key("CRITICAL", T0 + dt.timedelta(minutes=5), "b"),
        q.sort_key("CRITICAL", T0, "c"),
        q.sort_key("MODERATE", T0 - dt.timedelta(hours=1), "d"),
    ]
    assert [k[2] for k in sorted(keys)] == ["c", "b", "a", "d"]


def test_the_chain_shows_who_was_reached_and_when_the_rest_are_due() -> None:
    deadline = T0 + dt.timedelta(minutes=15)
    chain = q.escalation_chain(POLICY, "CRITICAL", 0, T0, deadline)
    assert [(s.recipient, s.reached, s.current) for s in chain] == [
        ("clinician", True, True),
        ("attending", False, False),
        ("head", False, False),
        ("director", False, False),
    ]
    assert [s.due_time for s in chain[1:]] == [
        deadline,
        deadline + dt.timedelta(minutes=15),
        deadline + dt.timedelta(minutes=30),
    ]
    escalated = q.escalation_chain(POLICY, "CRITICAL", 2, T0, deadline)
    assert [s.reached for s in escalated] == [True, True, True, False]
    assert escalated[2].current


def test_an_acknowledgement_without_action_is_flagged_after_the_configured_time() -> None:
    after = dt.timedelta(minutes=30)
    assert not q.no_action_recorded(T0, False, T0 + dt.timedelta(minutes=29), after)
    assert q.no_action_recorded(T0, False, T0 + dt.timedelta(minutes=30), after)
    assert not q.no_action_recorded(T0, True, T0 + dt.timedelta(hours=5), after)
    assert not q.no_action_recorded(None, False, T0 + dt.timedelta(hours=5), after)


def test_ack_figures() -> None:
    stats = q.ack_stats("H001", [(5.0, 15.0), (10.0, 15.0), (40.0, 15.0)], open_count=2)
    assert stats.median_minutes == 10.0
    assert stats.p90_minutes is not None and 10.0 < stats.p90_minutes < 40.0
    assert stats.within_target_share == 2 / 3
    assert q.percentile([], 0.5) is None
    assert [q.age_bucket(m) for m in (1, 20, 90, 300)] == list(q.AGE_BUCKETS)


def test_a_trend_plot_scales_time_and_value_into_its_box() -> None:
    p = plot(
        [(T0, 4.0), (T0 + dt.timedelta(hours=1), 6.0), (T0 + dt.timedelta(hours=3), 5.0)], 100, 40, pad=0
    )
    assert p.points[0] == (0.0, 40.0) and p.points[1][1] == 0.0 and p.points[-1][0] == 100.0
    assert (p.low, p.high) == (4.0, 6.0)
    assert plot([]).points == []

"""The pacer: event i is due at start + i/rate; waits come from the schedule, so no drift accumulates."""

from __future__ import annotations

import datetime as dt

import pytest

from producers.pacing import Schedule, achieved_rate, paced, publish_paced


class FakeClock:
    """A clock that advances only when slept on, or when the test says the sender was slow."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_schedule_due_times_are_start_plus_index_over_rate() -> None:
    schedule = Schedule(start=10.0, rate=4.0)
    assert [schedule.due(i) for i in range(4)] == [10.0, 10.25, 10.5, 10.75]


def test_schedule_wait_is_zero_when_late() -> None:
    schedule = Schedule(start=0.0, rate=10.0)
    assert schedule.wait(5, now=0.3) == pytest.approx(0.2)
    assert schedule.wait(5, now=0.9) == 0.0


def test_rate_zero_never_waits() -> None:
    clock = FakeClock()
    sent = [index for index, _ in paced(range(5), 0, clock, clock.sleep)]
    assert sent == [0, 1, 2, 3, 4]
    assert clock.sleeps == []


def test_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        Schedule(start=0.0, rate=-1.0)


def test_each_item_is_yielded_at_its_due_time() -> None:
    clock = FakeClock()
    times = [clock() for _ in paced(range(5), 100.0, clock, clock.sleep)]
    assert times == pytest.approx([100.0, 100.01, 100.02, 100.03, 100.04])


def test_oversleeping_and_slow_sends_do_not_accumulate_drift() -> None:
    """A sender that oversleeps or is slow once catches up: event i is still sent at start + i/rate."""
    clock = FakeClock()
    oversleep = 0.003

    def sleepy(seconds: float) -> None:
        clock.sleep(seconds + oversleep)

    times = []
    for index, _ in paced(range(1000), 100.0, clock, sleepy):
        times.append(clock())
        if index == 10:
            clock.now += 0.5  # one slow send: the next 50 are due already and go at once
    # Never earlier than due, and never later than one oversleep (or the slow send's backlog).
    for index, sent in enumerate(times):
        due = 100.0 + index / 100.0
        assert sent >= due - 1e-9
        if index > 61:
            assert sent - due <= oversleep + 1e-9
    assert achieved_rate(len(times), times[0], times[-1]) == pytest.approx(100.0, rel=0.001)


def test_sending_late_does_not_sleep() -> None:
    clock = FakeClock()
    slept_before = []
    for _ in paced(range(3), 10.0, clock, clock.sleep):
        slept_before.append(len(clock.sleeps))
        clock.now += 1.0  # each send takes longer than the interval
    assert slept_before == [0, 0, 0]


def test_achieved_rate_counts_intervals() -> None:
    assert achieved_rate(101, 5.0, 6.0) == pytest.approx(100.0)
    assert achieved_rate(1, 5.0, 5.0) == 0.0
    assert achieved_rate(0, 0.0, 0.0) == 0.0


def test_publish_paced_stamps_produced_time_as_each_event_is_sent() -> None:
    clock = FakeClock()
    t0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    long_ago = t0 - dt.timedelta(hours=3)
    events = [("lab", {"envelope": {"event_time": long_ago, "produced_time": long_ago}}) for _ in range(4)]
    sent: list[tuple[str, dt.datetime]] = []

    def wall() -> dt.datetime:
        return t0 + dt.timedelta(seconds=clock() - 100.0)

    run = publish_paced(
        events,
        lambda kind, record: sent.append((kind, record["envelope"]["produced_time"])),
        rate=2.0,
        clock=clock,
        sleep=clock.sleep,
        wall=wall,
    )
    assert [when for _kind, when in sent] == [t0 + dt.timedelta(seconds=s) for s in (0, 0.5, 1.0, 1.5)]
    assert all(record["envelope"]["event_time"] == long_ago for _kind, record in events), "event time kept"
    assert (run.sent, run.rate) == (4, pytest.approx(2.0))


def test_publish_paced_of_nothing_sends_nothing() -> None:
    run = publish_paced([], lambda _kind, _record: None, rate=10.0)
    assert (run.sent, run.rate) == (0, 0.0)

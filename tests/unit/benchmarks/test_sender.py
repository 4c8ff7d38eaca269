"""The suite's offered load: sent on the pacing schedule, each event stamped when it is sent."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

import pytest

from benchmarks import sender as sender_module
from benchmarks.sender import CHUNK, lab_stream, publish_paced


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Recorder:
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, Mapping[str, Any]]] = []

    def send(self, record: Mapping[str, Any]) -> None:
        self.sent.append((self.clock.now, record))
        self.clock.now += 0.0001  # sending takes a little time, which the schedule absorbs


def wall(clock: FakeClock) -> dt.datetime:
    return dt.datetime.fromtimestamp(clock.now, dt.UTC)


def test_events_go_out_on_the_schedule_not_after_each_other() -> None:
    clock = FakeClock()
    sender = Recorder(clock)
    records = list(lab_stream(seed=1, count=50, critical_share=0.02, patients=20))
    run = publish_paced(sender, records, rate=100, clock=clock, sleep=clock.sleep, now=lambda: wall(clock))
    times = [when for when, _ in sender.sent]
    assert [round(t - times[0], 6) for t in times] == [round(i / 100, 6) for i in range(50)]
    assert run.event_ids == [str(r["envelope"]["event_id"]) for r in records]
    assert abs(run.seconds - 49 / 100) < 0.001
    for when, record in sender.sent:  # stamped at its send time
        assert record["envelope"]["event_time"] == dt.datetime.fromtimestamp(when, dt.UTC)
        assert record["envelope"]["produced_time"] == record["envelope"]["event_time"]


def test_a_late_sender_catches_up_at_once_and_rate_zero_never_waits() -> None:
    clock = FakeClock()
    sender = Recorder(clock)
    records = list(lab_stream(seed=2, count=10, critical_share=0.0, patients=5))
    original = sender.send

    def slow(record: Mapping[str, Any]) -> None:
        original(record)
        if len(sender.sent) == 3:
            clock.now += 0.05  # a 50 ms stall: the next five are already due

    sender.send = slow  # type: ignore[method-assign]
    publish_paced(sender, records, rate=100, clock=clock, sleep=clock.sleep, now=lambda: wall(clock))
    start = sender.sent[0][0]
    assert all(when >= start + i / 100 - 1e-9 for i, (when, _) in enumerate(sender.sent))
    assert sender.sent[-1][0] - start < 0.1  # no drift: the last is due at 90 ms

    clock.slept.clear()
    publish_paced(Recorder(clock), records, rate=0, clock=clock, sleep=clock.sleep, now=lambda: wall(clock))
    assert clock.slept == []


def test_long_streams_are_made_chunk_by_chunk_with_distinct_events() -> None:
    records = list(lab_stream(seed=3, count=CHUNK + 7, critical_share=0.02, patients=50))
    assert len(records) == CHUNK + 7
    assert len({r["envelope"]["event_id"] for r in records}) == CHUNK + 7


def test_a_run_longer_than_the_pool_sends_new_events_of_new_patients(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sender_module, "POOL", 10)
    records = list(lab_stream(seed=4, count=25, critical_share=0.5, patients=5))
    assert len({r["envelope"]["event_id"] for r in records}) == 25
    assert len({(r["envelope"]["institution_id"], r["result_id"]) for r in records}) == 25
    first, again = records[3], records[13]  # the same simulated result, one cycle later
    assert again["local_code"] == first["local_code"] and again["value_numeric"] == first["value_numeric"]
    assert again["patient_mrn"] == f"{first['patient_mrn']}-1"
    assert again["patient_national_id"] is None
    assert records[23]["patient_mrn"] == f"{first['patient_mrn']}-2"

"""The worker's timers as plain units: fake positions in, lag gauges and re-reads out."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

from streams.metrics import StreamMetrics, make_stream_metrics
from streams.runtime import timers
from streams.runtime.lag import LagReport
from streams.runtime.stalls import TopicPartition
from streams.runtime.timers import StallWatch, StoreLagWatch, stage_topic_sets


class FakePositions:
    """GroupPositions answering from fixed numbers (or failing as a broker that is away). The first
    record a read-committed reader gets is at the asked offset, unless `no_events_after` says only
    transaction markers and aborted records follow that offset."""

    def __init__(self, committed: dict[TopicPartition, int], ends: dict[TopicPartition, int]) -> None:
        self.committed, self.ends = committed, ends
        self.unavailable = False
        self.asked: list[list[TopicPartition]] = []
        self.no_events_after: set[tuple[TopicPartition, int]] = set()
        self.looked_past: list[tuple[str, int, int]] = []

    def first_record_offset(self, topic: str, partition: int, start: int) -> int | None:
        self.looked_past.append((topic, partition, start))
        return None if ((topic, partition), start) in self.no_events_after else start

    def read(
        self, partitions: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        self.asked.append(partitions)
        if self.unavailable:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT))
        return (
            {tp: self.committed[tp] for tp in partitions},
            {tp: self.ends[tp] for tp in partitions},
        )


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


@dataclass
class FakeConsumer:
    owned: list[TP]
    reread: list[tuple[str, int, int]] = field(default_factory=list)

    def assignment(self) -> list[TP]:
        return self.owned


@dataclass
class FakeApp:
    consumer: FakeConsumer
    rebalancing: bool = False
    in_recovery: bool = False


def lag(metrics: StreamMetrics, stage: str, topic: str) -> float:
    return metrics.consumer_lag.labels(stage=stage, topic=topic)._value.get()


def test_store_lag_watch_reports_what_its_group_has_not_committed() -> None:
    metrics = make_stream_metrics(CollectorRegistry())
    positions = FakePositions(
        {("norm.lab", 0): 5, ("norm.lab", 1): 9}, {("norm.lab", 0): 12, ("norm.lab", 1): 9}
    )

    async def owned() -> list[TopicPartition]:
        return [("norm.lab", 0), ("norm.lab", 1)]

    watch = StoreLagWatch(owned, positions, LagReport(metrics.consumer_lag, "store"))  # type: ignore[arg-type]
    asyncio.run(watch.tick())
    assert lag(metrics, "store", "norm.lab") == 7

    positions.unavailable = True  # the broker away: the last reading stays, the next tick tries again
    asyncio.run(watch.tick())
    assert lag(metrics, "store", "norm.lab") == 7


def test_stall_watch_reports_each_stage_and_rereads_a_partition_stuck_with_events_waiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = make_stream_metrics(CollectorRegistry())
    app = FakeApp(FakeConsumer([TP("raw.H001.lab", 0), TP("norm.lab", 0), TP("elsewhere", 0)]))
    positions = FakePositions(
        {("raw.H001.lab", 0): 3, ("norm.lab", 0): 8}, {("raw.H001.lab", 0): 10, ("norm.lab", 0): 8}
    )

    async def reread(consumer: FakeConsumer, topic: str, partition: int, offset: int) -> None:
        consumer.reread.append((topic, partition, offset))

    monkeypatch.setattr(timers, "reread_from_committed", reread)
    clock = iter([0.0, 100.0, 200.0])
    topics = stage_topic_sets({"normaliser", "clinical"}, ["raw.H001.lab"], ["norm.lab"])
    in_flight: Mapping[str, float] = {}
    watch = StallWatch(app, positions, topics, in_flight, metrics, 60.0, clock=lambda: next(clock))  # type: ignore[arg-type]

    asyncio.run(watch.tick())
    assert positions.asked[-1] == [("norm.lab", 0), ("raw.H001.lab", 0)], "only the stages' own topics"
    assert (lag(metrics, "normaliser", "raw.H001.lab"), lag(metrics, "clinical", "norm.lab")) == (7, 0)
    assert app.consumer.reread == []

    asyncio.run(watch.tick())  # 100 s later, the commit has not moved with 7 events waiting
    assert app.consumer.reread == [("raw.H001.lab", 0, 3)]
    assert metrics.stalls_reread.labels(topic="raw.H001.lab")._value.get() == 1


def test_stall_watch_waits_out_a_rebalance_and_leaves_a_long_batch_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    metrics = make_stream_metrics(CollectorRegistry())
    app = FakeApp(FakeConsumer([TP("norm.lab", 0)]), rebalancing=True)
    positions = FakePositions({("norm.lab", 0): 0}, {("norm.lab", 0): 10})
    reread: list[Any] = []

    async def record(*args: Any) -> None:
        reread.append(args)

    monkeypatch.setattr(timers, "reread_from_committed", record)
    clock = iter([0.0, 100.0, 200.0])
    in_flight = {"clinical": -1000.0}  # a batch in flight for long (a stopped stage holds its batch)
    watch = StallWatch(
        app,  # type: ignore[arg-type]
        positions,  # type: ignore[arg-type]
        stage_topic_sets({"clinical"}, [], ["norm.lab"]),
        in_flight,
        metrics,
        60.0,
        clock=lambda: next(clock),
    )
    asyncio.run(watch.tick())
    assert positions.asked == [], "nothing is read while partitions move"
    app.rebalancing = False
    asyncio.run(watch.tick())
    asyncio.run(watch.tick())
    assert reread == []


def test_a_partition_that_ends_in_transaction_markers_is_neither_lagging_nor_read_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A FHIR transaction's commit marker follows its last event: the group commits the event, never the
    marker, so committed stays one short of the end with nothing waiting."""
    metrics = make_stream_metrics(CollectorRegistry())
    app = FakeApp(FakeConsumer([TP("raw.C003.lab", 0), TP("raw.C003.lab", 1)]))
    positions = FakePositions(
        {("raw.C003.lab", 0): 6, ("raw.C003.lab", 1): 2}, {("raw.C003.lab", 0): 7, ("raw.C003.lab", 1): 9}
    )
    positions.no_events_after = {(("raw.C003.lab", 0), 6)}
    reread: list[Any] = []

    async def record(_consumer: Any, *args: Any) -> None:
        reread.append(args)

    monkeypatch.setattr(timers, "reread_from_committed", record)
    clock = iter([0.0, 100.0, 200.0, 300.0])
    topics = stage_topic_sets({"normaliser"}, ["raw.C003.lab"], [])
    watch = StallWatch(app, positions, topics, {}, metrics, 60.0, clock=lambda: next(clock))  # type: ignore[arg-type]
    asyncio.run(watch.tick())
    assert positions.looked_past == [], "a commit that may still move is not looked past"
    for _ in range(3):
        asyncio.run(watch.tick())
    assert lag(metrics, "normaliser", "raw.C003.lab") == 7, "partition 1's seven events still wait"
    assert reread == [("raw.C003.lab", 1, 2)] * 3, "partition 0 is never read again"
    assert positions.looked_past.count(("raw.C003.lab", 0, 6)) == 1, "each position is read once"

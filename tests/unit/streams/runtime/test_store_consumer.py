"""The store consumer's loop over a stand-in consumer: offsets are marked only after their batch is stored."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from core.exceptions import KafkaAccessError, KafkaAuthenticationError, KafkaAuthorizationError
from core.kafka_errors import ClientErrors
from streams.runtime.normaliser import RawMessage
from streams.runtime.startup import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES
from streams.runtime.store_consumer import (
    StoreConsumer,
    consumer_config,
    next_offsets,
    store_group,
    take_arrived,
)


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int, error: Any = None) -> None:
        self._where = (topic, partition, offset)
        self._error = error

    def topic(self) -> str:
        return self._where[0]

    def partition(self) -> int:
        return self._where[1]

    def offset(self) -> int:
        return self._where[2]

    def key(self) -> bytes:
        return b"rp-1"

    def value(self) -> bytes:
        return b"v%d" % self._where[2]

    def headers(self) -> list[tuple[str, bytes]]:
        return [("correlation_id", b"c-1")]

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_764_000_000_000 + self._where[2])  # TIMESTAMP_CREATE_TIME, epoch ms

    def error(self) -> Any:
        return self._error


class FakeConsumer:
    """Hands out the given batches, then nothing; records what the loop asked of it, in order."""

    def __init__(self, batches: list[list[FakeMessage]], refuse_store: bool = False) -> None:
        self.batches = list(batches)
        self.refuse_store = refuse_store
        self.calls: list[tuple[str, Any]] = []
        self.subscribed = False

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any) -> None:
        self.calls.append(("subscribe", topics))
        self.subscribed = True

    def unsubscribe(self) -> None:
        self.calls.append(("unsubscribe", None))
        self.subscribed = False  # the revocation, served by the next poll in librdkafka

    def poll(self, timeout: float) -> None:
        return None

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        if self.batches:
            return self.batches.pop(0)[:count]
        import time

        time.sleep(min(timeout, 0.01))
        return []

    def store_offsets(self, offsets: list[Any]) -> None:
        self.calls.append(("store_offsets", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)))
        if self.refuse_store:
            raise KafkaException(KafkaError(KafkaError._STATE, "partition not assigned"))

    def assignment(self) -> list[Any]:
        from confluent_kafka import TopicPartition

        if not self.subscribed:
            return []
        return [TopicPartition("norm.lab", 1), TopicPartition("alerts.critical", 0)]

    def close(self) -> None:
        self.calls.append(("close", None))


def run_until(consumer: FakeConsumer, handled: list[list[RawMessage]], expected_batches: int) -> None:
    async def handle(messages: list[RawMessage]) -> None:
        handled.append(messages)
        consumer.calls.append(("handled", [m.offset for m in messages]))

    store = StoreConsumer({}, ["norm.lab"], handle, 500, 0.05, consumer_factory=lambda _config: consumer)

    async def scenario() -> None:
        task = asyncio.create_task(store.run())
        for _ in range(500):
            # every handled batch is followed by marking its offsets (in the consumer's thread): wait
            # for those, or the cancellation can land between the two
            if [name for name, _ in consumer.calls].count("store_offsets") >= expected_batches:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def run_store_until(store: StoreConsumer, done: Callable[[], bool]) -> None:
    """Run the store loop until `done()` (polled every 10 ms, at most 5 s), then stop it as a worker does."""

    async def scenario() -> None:
        task = asyncio.create_task(store.run())
        for _ in range(500):
            if done():
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())


def test_offsets_are_marked_after_their_batch_is_handled_and_the_consumer_closed_on_stop() -> None:
    consumer = FakeConsumer(
        [
            [
                FakeMessage("norm.lab", 0, 5),
                FakeMessage("norm.lab", 0, 6),
                FakeMessage("alerts.critical", 2, 9),
            ],
            [FakeMessage("norm.lab", 0, 7)],
        ]
    )
    handled: list[list[RawMessage]] = []
    run_until(consumer, handled, expected_batches=2)
    assert consumer.calls == [
        ("subscribe", ["norm.lab"]),
        ("handled", [5, 6, 9]),
        ("store_offsets", [("alerts.critical", 2, 10), ("norm.lab", 0, 7)]),
        ("handled", [7]),
        ("store_offsets", [("norm.lab", 0, 8)]),
        ("unsubscribe", None),  # leaves the group at once, a static member too
        ("close", None),
    ]
    assert handled[0][0] == RawMessage(
        "norm.lab", 0, 5, b"rp-1", b"v5", {"correlation_id": b"c-1"}, 1_764_000_000_005
    )


def test_error_events_from_the_consumer_are_not_handed_to_the_store() -> None:
    failed = FakeMessage("norm.lab", 0, -1, error=KafkaError(KafkaError._TRANSPORT, "broker down"))
    consumer = FakeConsumer([[failed], [failed, FakeMessage("norm.lab", 1, 3)]])
    handled: list[list[RawMessage]] = []
    run_until(consumer, handled, expected_batches=1)
    assert [[m.offset for m in batch] for batch in handled] == [[3]]


def test_offsets_refused_after_a_rebalance_do_not_stop_the_stage() -> None:
    consumer = FakeConsumer(
        [[FakeMessage("norm.lab", 0, 1)], [FakeMessage("norm.lab", 0, 2)]], refuse_store=True
    )
    handled: list[list[RawMessage]] = []
    run_until(consumer, handled, expected_batches=2)
    assert [name for name, _ in consumer.calls].count("store_offsets") == 2
    assert consumer.calls[-1] == ("close", None)


@pytest.mark.parametrize(
    ("offsets", "expected"),
    [
        ([], {}),
        ([("a", 0, 4)], {("a", 0): 5}),
        ([("a", 0, 9), ("a", 0, 4), ("a", 1, 0), ("b", 0, 2)], {("a", 0): 10, ("a", 1): 1, ("b", 0): 3}),
    ],
)
def test_next_offsets_resume_after_the_highest_offset_per_partition(
    offsets: list[tuple[str, int, int]], expected: dict[tuple[str, int], int]
) -> None:
    messages = [RawMessage(topic, partition, offset, None, b"") for topic, partition, offset in offsets]
    assert next_offsets(messages) == expected


def test_the_consumer_commits_only_what_was_marked_stored() -> None:
    config = consumer_config({"bootstrap.servers": "k:9092"}, store_group("clinhub-streams"), 1.5, 30)
    assert config["group.id"] == "clinhub-streams-sink"  # never the Faust group of a --role store worker
    assert (config["enable.auto.commit"], config["enable.auto.offset.store"]) == (True, False)
    assert config["auto.commit.interval.ms"] == 1500
    assert config["auto.offset.reset"] == "earliest"


def test_the_store_consumer_fetches_as_the_faust_consumer_does() -> None:
    # a fetch is answered after the wait unless a batch is there: not one fetch per arriving event
    config = consumer_config({"bootstrap.servers": "k:9092"}, store_group("clinhub-streams"), 1.5, 30)
    assert (config["fetch.wait.max.ms"], config["fetch.min.bytes"]) == (FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES)
    assert FETCH_MIN_BYTES > 1


def test_assignment_is_read_on_the_consumers_thread_and_empty_before_start() -> None:
    consumer = FakeConsumer([])

    async def handle(_messages: list[RawMessage]) -> None:
        return None

    store = StoreConsumer({}, ["norm.lab"], handle, 500, 0.01, consumer_factory=lambda _config: consumer)

    async def scenario() -> list[list[tuple[str, int]]]:
        before = await store.assignment()
        task = asyncio.create_task(store.run())
        while store._consumer is None:
            await asyncio.sleep(0.01)
        during = await store.assignment()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [before, during, await store.assignment()]

    assert asyncio.run(scenario()) == [[], [("alerts.critical", 0), ("norm.lab", 1)], []]


STORE_CONFIG = {"sasl.username": "store", "group.id": "hub-sink"}


def refused_run(consumer: FakeConsumer, errors: ClientErrors | None = None) -> KafkaAccessError:
    """Run the store consumer until it stops on a refusal; nothing may be handed to the store."""

    async def handle(_messages: list[RawMessage]) -> None:
        raise AssertionError("a batch that came with a refusal is not stored")

    store = StoreConsumer(
        STORE_CONFIG,
        ["norm.lab"],
        handle,
        500,
        0.01,
        consumer_factory=lambda _config: consumer,
        errors=errors,
    )
    with pytest.raises(KafkaAccessError) as refused:
        asyncio.run(asyncio.wait_for(store.run(), 5))
    return refused.value


def test_a_topic_refused_while_running_stops_the_store_typed_and_marks_nothing_stored() -> None:
    denied = KafkaError(
        KafkaError.TOPIC_AUTHORIZATION_FAILED, "Fetch from broker 1 failed: Topic authorization"
    )
    consumer = FakeConsumer([[FakeMessage("norm.lab", 1, 7), FakeMessage("norm.lab", 0, -1, error=denied)]])
    refused = refused_run(consumer)
    assert isinstance(refused, KafkaAuthorizationError)
    assert (refused.principal, refused.topic) == ("store", "norm.lab")
    assert [name for name, _ in consumer.calls] == ["subscribe", "unsubscribe", "close"], (
        "no offset marked stored"
    )


def test_a_group_refused_while_running_names_the_group() -> None:
    denied = KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED, "Group authorization failed")
    refused = refused_run(FakeConsumer([[FakeMessage("norm.lab", 0, -1, error=denied)]]))
    assert isinstance(refused, KafkaAuthorizationError)
    assert (refused.principal, refused.group) == ("store", "hub-sink")


def test_a_password_refused_for_long_enough_stops_the_store_typed() -> None:
    """librdkafka tells a refused password only to the error callback, which the worker's clients share."""
    errors = ClientErrors("store")
    errors(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials"))
    refused = refused_run(FakeConsumer([[FakeMessage("norm.lab", 1, 7)]]), errors)
    assert isinstance(refused, KafkaAuthenticationError) and refused.principal == "store"


def test_the_store_consumer_reports_to_the_workers_error_callback() -> None:
    errors = ClientErrors("store")

    async def handle(_messages: list[RawMessage]) -> None:
        return None

    store = StoreConsumer(STORE_CONFIG, ["norm.lab"], handle, 500, 0.01, errors=errors)
    assert store.config["error_cb"] is errors


class Arrivals:
    """librdkafka's consume(n, timeout) over a scripted local queue: `queued` is there already; each
    wait (timeout > 0) lets the next list of `arriving` come, and returns up to n of what is there."""

    def __init__(self, queued: list[int], arriving: list[list[int]]) -> None:
        self.queue = list(queued)
        self.arriving = list(arriving)
        self.calls: list[tuple[int, float]] = []

    def __call__(self, count: int, timeout: float) -> list[int]:
        self.calls.append((count, timeout))
        if timeout > 0 and self.arriving:
            self.queue += self.arriving.pop(0)
        taken, self.queue = self.queue[:count], self.queue[count:]
        return taken


def test_what_came_while_the_store_was_busy_is_taken_at_once() -> None:
    consume = Arrivals(queued=[1, 2, 3], arriving=[[4]])
    assert take_arrived(consume, 500, 0.005) == [1, 2, 3]
    assert consume.calls == [(500, 0)], "no waiting: the batch is what has arrived"


def test_an_idle_store_waits_for_a_first_message_then_lingers_for_others_up_to_the_batch_size() -> None:
    consume = Arrivals(queued=[], arriving=[[1], [2, 3, 4]])
    assert take_arrived(consume, 3, 0.005, idle_wait_seconds=0.5) == [1, 2, 3]
    assert consume.calls == [(3, 0), (1, 0.5), (2, 0.005)]
    assert consume.queue == [4], "the rest waits for the next batch"


def test_an_idle_wait_with_nothing_arriving_gives_an_empty_batch() -> None:
    consume = Arrivals(queued=[], arriving=[])
    assert take_arrived(consume, 500, 0.005, idle_wait_seconds=0.5) == []
    assert consume.calls == [(500, 0), (1, 0.5)], "no linger without a first message"


def test_a_batch_of_one_never_lingers() -> None:
    consume = Arrivals(queued=[], arriving=[[1, 2]])
    assert take_arrived(consume, 1, 0.005) == [1]
    assert [timeout for _, timeout in consume.calls] == [0, 0.5]


def fatal_message() -> FakeMessage:
    fenced = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Static consumer fenced by other consumer")
    return FakeMessage("norm.lab", -1, -1001, error=fenced)


def test_a_consumer_that_turned_fatal_is_replaced_and_the_next_one_carries_on() -> None:
    # After a coordinator outage librdkafka may fence a static member by its own rejoin: the consumer
    # is dead for good, and a new one under the same instance id takes the partitions back.
    first = FakeConsumer([[FakeMessage("norm.lab", 0, 1)], [fatal_message()]])
    second = FakeConsumer([[FakeMessage("norm.lab", 0, 1), FakeMessage("norm.lab", 0, 2)]])
    made = iter([first, second])
    handled: list[list[int]] = []

    async def handle(messages: list[RawMessage]) -> None:
        handled.append([m.offset for m in messages])

    store = StoreConsumer({}, ["norm.lab"], handle, 500, 0.01, consumer_factory=lambda _config: next(made))

    run_store_until(store, lambda: ("store_offsets", [("norm.lab", 0, 3)]) in second.calls)
    assert handled == [[1], [1, 2]]  # what was not committed is read again (stored once, idempotently)
    assert first.calls[-1] == ("close", None)
    assert ("unsubscribe", None) not in first.calls  # a dead consumer can neither leave nor commit
    assert second.calls[0] == ("subscribe", ["norm.lab"])
    assert second.calls[-2:] == [("unsubscribe", None), ("close", None)]

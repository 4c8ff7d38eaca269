"""The stage runtime: what becomes a dead letter, what is retried, and when a stage stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from types import SimpleNamespace
from typing import Any

import pytest

from core.contract import TopicNames
from core.exceptions import KafkaAuthorizationError
from schemas.exceptions import MagicByteError, RegistryUnavailableError
from schemas.wire import ConfluentRegistry
from sinks.exceptions import StoreAccessError, StoreUnavailableError
from streams.exceptions import (
    ChangelogDeliveryError,
    ImplausibleValueError,
    OutputDeliveryError,
    StageFailedError,
)
from streams.runtime.messages import RawMessage
from streams.runtime.outputs import Output
from streams.runtime.stage import (
    Components,
    LingerBatches,
    RetryPolicy,
    Stage,
    StageHealth,
    judge_each,
    linger_take,
    run_batches,
)
from tests.unit.streams.runtime.test_app import make_components, stage_of, wait_until

BATCH = [RawMessage("norm.lab", 2, offset, b"rp-1", b"v") for offset in (40, 41, 42)]


def components(bug_attempts: int = 3) -> Components:
    made = make_components(ConfluentRegistry({"url": "mock://stage"}))
    made.retry = RetryPolicy(first_delay=0.0, max_delay=0.0, bug_attempts=bug_attempts)
    return made


async def nowhere(_outputs: Sequence[Output]) -> None:
    raise AssertionError("nothing is published")


def decoded(message: RawMessage) -> dict[str, Any]:
    return {"envelope": {"institution_id": "H001", "correlation_id": f"c-{message.offset}"}}


def test_only_typed_input_errors_reject_a_message_and_they_name_the_field() -> None:
    def process(message: RawMessage, _record: dict[str, Any]) -> int:
        if message.offset == 41:
            raise ImplausibleValueError("value_numeric", "potassium 40 mmol/L is impossible")
        return message.offset

    judged = judge_each(BATCH, decoded, process)
    assert [result for _message, result in judged.results] == [40, 42]
    (rejection,) = judged.rejections
    assert (rejection.message.offset, rejection.error_class, rejection.field) == (
        41,
        "ImplausibleValueError",
        "value_numeric",
    )
    assert (rejection.institution_id, rejection.correlation_id) == ("H001", "c-41")


def test_an_undecodable_message_is_rejected_with_the_topics_institution() -> None:
    def decode(message: RawMessage) -> dict[str, Any]:
        raise MagicByteError("first byte is 1, not 0", field="header")

    judged = judge_each(BATCH[:1], decode, lambda _m, _r: None, institution_of=lambda _m: "H002")
    (rejection,) = judged.rejections
    assert (rejection.field, rejection.institution_id, rejection.correlation_id) == ("header", "H002", None)


@pytest.mark.parametrize(
    "bug",
    [
        AttributeError("'LabFacts' object has no attribute 'valeu'"),
        TypeError("'<' not supported between instances of 'str' and 'float'"),
        KeyError("canonical_value"),
        ValueError("could not convert string to float: '6.8'"),
    ],
)
def test_a_bug_is_never_a_dead_letter(bug: Exception) -> None:
    def process(_message: RawMessage, _record: dict[str, Any]) -> None:
        raise bug

    with pytest.raises(type(bug)):
        judge_each(BATCH, decoded, process)


@pytest.mark.parametrize(
    "outage",
    [
        RegistryUnavailableError("connection refused"),
        StoreUnavailableError("database is starting up"),
        OutputDeliveryError("norm.lab", "Local: Message timed out", 3),
    ],
)
def test_an_unavailable_service_is_retried_without_limit(outage: Exception) -> None:
    made = components(bug_attempts=1)
    stage = stage_of("store", made, nowhere)
    calls = 0

    async def action() -> str:
        nonlocal calls
        calls += 1
        if calls <= 10:  # more than any bug bound
            raise outage
        return "done"

    assert asyncio.run(stage.attempt("store batch", action, BATCH)) == "done"
    assert calls == 11
    assert stage.health.is_up("store")
    assert made.metrics.sink_retries.labels(reason=type(outage).__name__)._value.get() == 10


def test_a_bug_is_retried_a_bounded_number_of_times_then_the_stage_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = components(bug_attempts=3)
    stage = stage_of("clinical", made, nowhere)
    calls = 0

    async def action() -> None:
        nonlocal calls
        calls += 1
        raise AttributeError("'LabFacts' object has no attribute 'valeu'")

    with pytest.raises(StageFailedError) as failed:
        asyncio.run(stage.attempt("clinical batch", action, BATCH))
    assert calls == 3
    assert (failed.value.stage, failed.value.attempts) == ("clinical", 3)
    assert isinstance(failed.value.cause, AttributeError)
    assert not stage.health.is_up("clinical")
    assert made.metrics.stage_up.labels(stage="clinical")._value.get() == 0
    assert made.metrics.stage_errors.labels(stage="clinical", error="AttributeError")._value.get() == 3
    assert "norm.lab[2]@40-42" in caplog.text, "the batch's position is logged"
    assert "rp-1" not in caplog.text, "never a patient key in a log line"


def test_a_bug_that_goes_away_within_the_bound_does_not_stop_the_stage() -> None:
    stage = stage_of("normaliser", components(bug_attempts=3), nowhere)
    outcomes: list[Exception | None] = [KeyError("flaky"), None]

    async def action() -> str:
        error = outcomes.pop(0)
        if error is not None:
            raise error
        return "done"

    assert asyncio.run(stage.attempt("normalise batch", action, BATCH)) == "done"
    assert stage.health.is_up("normaliser")


class FakeEvent:
    """A Faust event as run_batches reads it: its message with a Kafka timestamp in seconds."""

    def __init__(self, message: RawMessage) -> None:
        seconds = message.timestamp_ms / 1000 if message.timestamp_ms else None
        self.message = SimpleNamespace(**vars(message), timestamp=seconds)


class FakeStream:
    """What run_batches uses of a Faust stream: batches (`fake_take`), and ack."""

    def __init__(self, batches: list[list[RawMessage]]) -> None:
        self.batches = batches
        self.acked: list[int] = []

    async def ack(self, event: FakeEvent) -> None:
        self.acked.append(event.message.offset)


async def fake_take(stream: FakeStream, _size: int, _linger: float) -> AsyncIterator[list[Any]]:
    for batch in stream.batches:
        yield [FakeEvent(message) for message in batch]


def test_a_stopped_faust_stage_never_acks_its_batch_nor_takes_another() -> None:
    made = components(bug_attempts=2)
    stage = stage_of("clinical", made, nowhere)
    stream = FakeStream([BATCH[:1], BATCH[1:]])
    handled: list[list[int]] = []

    async def handle(messages: list[RawMessage]) -> None:
        handled.append([m.offset for m in messages])
        if messages[0].offset == 41:

            async def bug() -> None:
                raise TypeError("bug")

            await stage.attempt("clinical batch", bug, messages)

    in_flight: dict[str, float] = {}

    async def scenario() -> None:
        loop = asyncio.create_task(run_batches(stream, handle, stage, 10, 0.1, in_flight, take=fake_take))
        for _ in range(100):
            if not stage.health.is_up("clinical"):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not loop.done(), "the stopped stage waits, holding its batch"
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(scenario())
    assert handled == [[40], [41, 42]]
    assert stream.acked == [40], "the failed batch is never acked"
    assert "clinical" in in_flight, "the watchdog sees the batch in flight and leaves its partitions alone"


def test_an_exception_escaping_a_handler_stops_the_stage_instead_of_acking() -> None:
    stage = stage_of("normaliser", components(), nowhere)
    stream = FakeStream([BATCH])

    async def handle(_messages: list[RawMessage]) -> None:
        raise RuntimeError("a table write failed after the outputs were confirmed")

    async def scenario() -> None:
        loop = asyncio.create_task(run_batches(stream, handle, stage, 10, 0.1, {}, take=fake_take))
        await asyncio.sleep(0.05)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(scenario())
    assert stream.acked == []
    assert not stage.health.is_up("normaliser")


def test_a_batch_is_acked_only_once_the_changelog_of_its_state_is_confirmed() -> None:
    """Ack after confirm holds for table state too; a changelog the broker did not take is retried."""
    made = components()
    stream = FakeStream([BATCH])
    confirmations: list[str] = []
    release = asyncio.Event()

    async def confirm_state() -> None:
        confirmations.append("asked")
        if len(confirmations) == 1:
            raise ChangelogDeliveryError("app-wards-changelog", "Local: Message timed out", 1)
        await release.wait()

    stage = Stage("clinical", made, TopicNames(), nowhere, StageHealth(made.metrics), confirm_state)

    async def handle(_messages: list[RawMessage]) -> None:
        pass

    async def scenario() -> None:
        loop = asyncio.create_task(run_batches(stream, handle, stage, 10, 0.1, {}, take=fake_take))
        await wait_until(lambda: len(confirmations) == 2)
        assert stream.acked == [], "not acked while its changelog is unconfirmed"
        release.set()
        await asyncio.wait_for(loop, 1)

    asyncio.run(scenario())
    assert stream.acked == [40, 41, 42]
    assert stage.health.is_up("clinical"), "an unconfirmed changelog is an outage, not a bug"


REFUSED = KafkaAuthorizationError("worker", "TOPIC_AUTHORIZATION_FAILED", "norm.lab")
ROLE_REFUSED = StoreAccessError("clinhub_store", "InsufficientPrivilege: permission denied for table alerts")


@pytest.mark.parametrize("refused", [REFUSED, ROLE_REFUSED], ids=["kafka", "database"])
def test_a_refusal_of_the_principal_is_neither_retried_nor_counted_as_a_bug(refused: Exception) -> None:
    made = components(bug_attempts=3)
    stage = stage_of("normaliser", made, nowhere)
    calls = 0

    async def action() -> None:
        nonlocal calls
        calls += 1
        raise refused

    with pytest.raises(type(refused)):
        asyncio.run(stage.attempt("normalise batch", action, BATCH))
    assert calls == 1
    error = type(refused).__name__
    assert made.metrics.stage_errors.labels(stage="normaliser", error=error)._value.get() == 0


def test_a_database_refusing_the_store_role_stops_the_worker_like_kafka_refusing_it() -> None:
    made = components()
    stopped: list[BaseException] = []

    async def stop_worker(error: BaseException) -> None:
        stopped.append(error)

    health = StageHealth(made.metrics, stop_worker)
    store = Stage("store", made, TopicNames(), nowhere, health)
    health.running("store")

    async def scenario() -> None:
        task = asyncio.create_task(store.stop(ROLE_REFUSED))
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(scenario())
    assert stopped == [ROLE_REFUSED]
    assert made.metrics.stage_up.labels(stage="store")._value.get() == 0
    assert "the database refused role clinhub_store" in str(health.failures["store"])


def test_a_refused_faust_stage_stops_the_worker_with_every_stage_down_and_acks_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    made = components()
    stopped: list[BaseException] = []

    async def stop_worker(error: BaseException) -> None:
        stopped.append(error)

    health = StageHealth(made.metrics, stop_worker)
    normaliser = Stage("normaliser", made, TopicNames(), nowhere, health)
    Stage("store", made, TopicNames(), nowhere, health)
    stream = FakeStream([BATCH])

    async def handle(_messages: list[RawMessage]) -> None:
        raise REFUSED  # e.g. its outputs' topic refused (outputs.py)

    async def scenario() -> None:
        loop = asyncio.create_task(run_batches(stream, handle, normaliser, 10, 0.1, {}, take=fake_take))
        for _ in range(100):
            if stopped:
                break
            await asyncio.sleep(0.01)
        assert not loop.done(), "it holds its batch until the worker's stop cancels it"
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
        health.access_lost(REFUSED)  # any other client of the worker meeting it too says nothing more
    assert stopped == [REFUSED]
    assert stream.acked == []
    assert [made.metrics.stage_up.labels(stage=s)._value.get() for s in ("normaliser", "store")] == [0, 0]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert "stages normaliser, store down: Kafka refused principal worker on norm.lab" in errors[0]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_batch_is_what_has_arrived_once_its_first_item_has_lingered() -> None:
    clock = Clock()
    batches: LingerBatches[int] = LingerBatches(10, 0.005, clock)

    async def scenario() -> list[list[int]]:
        for item in (1, 2, 3):
            await batches.put(item)
        clock.now += 0.005  # the first has lingered: taken at once, not waiting for the batch to fill
        first = await batches.take()
        await batches.put(4)
        clock.now += 1.0
        return [first, await batches.take()]

    assert asyncio.run(scenario()) == [[1, 2, 3], [4]]
    assert len(batches) == 0


def test_a_lone_item_is_taken_after_the_linger_without_waiting_for_company() -> None:
    batches: LingerBatches[str] = LingerBatches(500, 0.001)  # a real clock and a tiny linger

    async def scenario() -> list[str]:
        await batches.put("only")
        return await batches.take()

    assert asyncio.run(scenario()) == ["only"]


def test_the_taker_waits_for_a_first_item_and_then_for_what_comes_within_the_linger() -> None:
    batches: LingerBatches[int] = LingerBatches(500, 0.05)

    async def scenario() -> list[int]:
        taking = asyncio.create_task(batches.take())
        await asyncio.sleep(0.01)
        assert not taking.done(), "nothing has arrived: the stage waits, without limit"
        await batches.put(1)
        await batches.put(2)  # within the first one's linger
        return await taking

    assert asyncio.run(scenario()) == [1, 2]


def test_a_full_batch_is_taken_at_once_and_further_items_wait_for_room() -> None:
    clock = Clock()
    batches: LingerBatches[int] = LingerBatches(2, 3600.0, clock)  # a linger that would never end

    async def scenario() -> tuple[list[int], bool, list[int]]:
        await batches.put(1)
        await batches.put(2)
        third = asyncio.create_task(batches.put(3))
        await asyncio.sleep(0)
        held = not third.done()  # the stream is held back while the batch is full
        first = await batches.take()  # full: no linger
        await third
        batches.linger_seconds = 0.0
        return first, held, await batches.take()

    first, held, second = asyncio.run(scenario())
    assert (first, held, second) == ([1, 2], True, [3])


def test_batches_grow_with_what_arrives_while_the_stage_is_busy() -> None:
    """Under load a batch is whatever came during the previous one's handling, taken without a linger."""
    clock = Clock()
    batches: LingerBatches[int] = LingerBatches(500, 0.005, clock)
    sizes: list[int] = []

    async def scenario() -> None:
        await batches.put(0)
        clock.now += 0.005
        for arriving in (3, 40):
            batch = await batches.take()
            sizes.append(len(batch))
            for item in range(arriving):  # arrive while the stage handles `batch`
                await batches.put(item)
            clock.now += 0.02  # the handling took longer than the linger
        sizes.append(len(await batches.take()))

    asyncio.run(scenario())
    assert sizes == [1, 3, 40]


def test_a_ready_batch_is_taken_without_waiting_and_none_is_ready_before_its_linger() -> None:
    clock = Clock()
    batches: LingerBatches[int] = LingerBatches(3, 0.005, clock)
    assert batches.take_ready() is None  # nothing arrived

    async def put(*items: int) -> None:
        for item in items:
            await batches.put(item)

    asyncio.run(put(1, 2))
    assert batches.take_ready() is None  # the first has not lingered yet
    clock.now += 0.005
    assert batches.take_ready() == [1, 2]
    asyncio.run(put(3, 4, 5))
    assert batches.take_ready() == [3, 4, 5]  # full: no linger
    assert len(batches) == 0


class StoppableStream:
    """What `linger_take` uses of a Faust stream: processors fed by hand, and a stop."""

    def __init__(self) -> None:
        self.enable_acks = True
        self.channel = self
        self._processors: list[Any] = []
        self.current_event: Any = None
        self._stopped = asyncio.Event()

    @property
    def should_stop(self) -> bool:
        return self._stopped.is_set()

    def add_processor(self, processor: Any) -> None:
        self._processors.append(processor)

    def _enable_passive(self, _channel: Any) -> None:
        return None

    def __aiter__(self) -> StoppableStream:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration  # the passive drain is not used: events arrive by hand

    async def wait(self) -> None:
        await self._stopped.wait()

    async def arrive(self, event: Any) -> None:
        self.current_event = event
        for processor in self._processors:
            await processor(event)

    def stop(self) -> None:
        self._stopped.set()


def test_a_stream_stopping_ends_a_waiting_take_and_nothing_taken_then_is_handed_on() -> None:
    stream = StoppableStream()

    async def scenario() -> tuple[list[list[Any]], bool]:
        taken: list[list[Any]] = []

        async def consume() -> None:
            async for batch in linger_take(stream, 10, 0.005):
                taken.append(batch)

        consuming = asyncio.create_task(consume())
        await wait_until(lambda: bool(stream._processors))  # linger_take has started
        await stream.arrive("first")
        await wait_until(lambda: len(taken) == 1)
        await asyncio.sleep(0.02)  # waiting for the next batch, with nothing arriving
        assert not consuming.done()
        await stream.arrive("as it stops")
        stream.stop()  # before that event's linger ended: not handed on (never acked, read again)
        await asyncio.wait_for(consuming, 1.0)
        return taken, stream.enable_acks

    taken, acks = asyncio.run(scenario())
    assert taken == [["first"]]
    assert acks, "the stream's own acking is restored"
    assert stream._processors == []


def test_linger_batches_hold_at_least_one_item() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LingerBatches(0, 0.005)


def test_a_faust_agent_batches_what_arrived_while_it_was_busy(tmp_path: Any) -> None:
    """`linger_take` on a real Faust stream (the agent's test context): one event alone, then the three
    that came while it was handled, as one batch."""
    import faust

    app = faust.App(  # nothing connects in an agent's test context
        "linger-test", broker="kafka://127.0.0.1:1", store="memory://", web_enabled=False, datadir=tmp_path
    )
    stage = stage_of("normaliser", components(), nowhere)
    handled: list[list[bytes | None]] = []
    release = asyncio.Event()

    async def handle(messages: list[RawMessage]) -> None:
        handled.append([message.value for message in messages])
        if len(handled) == 1:
            await release.wait()  # busy with the first batch while others arrive

    @app.agent(app.topic("linger", value_serializer="raw"), concurrency=1)
    async def agent(stream: Any) -> None:
        await run_batches(stream, handle, stage, 10, 0.005, {})

    async def scenario() -> None:
        async with agent.test_context() as context:
            await context.put(value=b"a", wait=False)
            await wait_until(lambda: len(handled) == 1)
            for value in (b"b", b"c", b"d"):
                await context.put(value=value, wait=False)
            await asyncio.sleep(0.05)  # they arrive, and wait, while the first batch is handled
            release.set()
            await wait_until(lambda: len(handled) == 2)

    asyncio.run(scenario())
    assert handled == [[b"a"], [b"b", b"c", b"d"]]

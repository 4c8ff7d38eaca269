"""The stage runtime: what becomes a dead letter, what is retried, and when a stage stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest

from core.contract import TopicNames
from core.exceptions import KafkaAuthorizationError
from schemas.exceptions import MagicByteError, RegistryUnavailableError
from schemas.wire import ConfluentRegistry
from sinks.exceptions import StoreAccessError, StoreUnavailableError
from streams.exceptions import ImplausibleValueError, OutputDeliveryError, StageFailedError
from streams.runtime.messages import RawMessage
from streams.runtime.outputs import Output
from streams.runtime.stage import Components, RetryPolicy, Stage, StageHealth, judge_each, run_batches
from tests.unit.streams.runtime.test_app import make_components, stage_of

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
    def __init__(self, message: RawMessage) -> None:
        self.message = message


class FakeStream:
    """What run_batches uses of a Faust stream: batches from noack_take, and ack."""

    def __init__(self, batches: list[list[RawMessage]]) -> None:
        self.batches = batches
        self.acked: list[int] = []

    async def noack_take(self, _size: int, _within: float) -> Any:
        for batch in self.batches:
            yield [FakeEvent(message) for message in batch]

    async def ack(self, event: FakeEvent) -> None:
        self.acked.append(event.message.offset)


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
        loop = asyncio.create_task(run_batches(stream, handle, stage, 10, 0.1, in_flight))
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
        loop = asyncio.create_task(run_batches(stream, handle, stage, 10, 0.1, {}))
        await asyncio.sleep(0.05)
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop

    asyncio.run(scenario())
    assert stream.acked == []
    assert not stage.health.is_up("normaliser")


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
        loop = asyncio.create_task(run_batches(stream, handle, normaliser, 10, 0.1, {}))
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

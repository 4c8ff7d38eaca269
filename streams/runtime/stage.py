"""The stage runtime: what every stage (normaliser, clinical, store) does the same way.

- decode and catch: each message is decoded and processed on its own; only the hub's typed input
  errors (`SchemaError`, `RejectedEvent`) turn it into a rejection, i.e. a dead letter naming the
  field and the reason. Its neighbours carry on.
- retry: an unavailable service (`ServiceUnavailableError`: broker, registry, database) is retried
  without limit, with back-off; the batch stays unacknowledged, so waiting loses nothing.
- bugs fail loudly: any other exception is the hub's own error. It is logged with the batch's
  topics, partitions and offsets, counted, and retried a bounded number of times; then the stage stops
  (`StageFailedError`) and reports itself down (`clinhub_stage_up` 0). Its events wait in Kafka until
  the fix, never in the dead-letter topic: a bug in the rules must not quietly bin every potassium.
- ack after confirm: a Faust stage acks a batch only after its handler returned, i.e. after every
  output was confirmed by the broker, and after the broker confirmed the table changelog records the
  batch wrote (`Stage.confirm_state`, streams/runtime/changelog.py) (`run_batches`); a stopped stage
  never acks again.
- batches by linger: a batch is what has arrived, taken as soon as the stage is idle (its first message
  lingers a few milliseconds for company), never a window waiting to fill; it grows only under load
  (`LingerBatches`).
- access lost: Kafka refusing the worker's principal while it runs (its ACLs or credentials revoked,
  `KafkaAccessError`), or the database its role (`StoreAccessError`), is neither retried nor a bug:
  every stage of the worker reports itself down, one ERROR line says who was refused what, and the
  worker stops, non-zero (`StageHealth.stop_worker`).
  What it had not confirmed stays unacknowledged in Kafka until access is restored.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from core.contract import RECORD_SCHEMAS, TopicNames
from core.exceptions import AccessDeniedError, ServiceUnavailableError
from schemas import standard
from schemas.exceptions import SchemaError
from schemas.wire import AvroDecoder, AvroEncoder, SchemaRegistry, make_encoder
from sinks.base import Sink
from streams.domain.codes import CodeMaps
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import ReferenceData
from streams.exceptions import RejectedEvent, StageFailedError
from streams.metrics import StreamMetrics
from streams.runtime.messages import RawMessage, Rejection, dead_letter_record, kafka_timestamp_ms, positions
from streams.runtime.outputs import Output, Publish

log = logging.getLogger("clinhub.streams")

T = TypeVar("T")

# The errors that mean "this input is bad", never "our code is".
INPUT_ERRORS = (SchemaError, RejectedEvent)


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class RetryPolicy:
    """Back-off for a failing batch, and how often a bug is tried before its stage stops."""

    first_delay: float = 0.2
    max_delay: float = 30.0
    bug_attempts: int = 3


class Codecs:
    """Avro decoders of every record on the hub's topics, and encoders made on first use (an encoder
    registers its schema, so a worker starts while the registry is still coming up)."""

    def __init__(self, registry: SchemaRegistry) -> None:
        self.registry = registry
        self.decoders: dict[str, AvroDecoder] = {
            name: AvroDecoder(registry, standard.load(schema)) for name, schema in RECORD_SCHEMAS.items()
        }
        self._encoders: dict[str, AvroEncoder] = {}

    def decode(self, record: str, value: bytes | None) -> dict[str, Any]:
        return self.decoders[record](value)

    def encode(self, record: str, value: Mapping[str, Any]) -> bytes:
        if record not in self._encoders:
            schema = standard.load(RECORD_SCHEMAS[record])
            self._encoders[record] = make_encoder(self.registry, schema, check=False)
        return self._encoders[record](value)


@dataclass
class Components:
    """What the stages are built from. The command builds it (clinhub/worker.py), and only it holds the
    secrets: the pseudonymisation key (as `identity`) for the normaliser, the database (as `sink`) for
    the store; a stage's process gets neither when it does not run that stage."""

    registry: SchemaRegistry
    reference: ReferenceData
    codes: CodeMaps
    metrics: StreamMetrics
    identity: RegionalIdentity | None = None
    sink: Sink | None = None
    clock: Callable[[], dt.datetime] = utc_now
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    codecs: Codecs = field(init=False)

    def __post_init__(self) -> None:
        self.codecs = Codecs(self.registry)


class StageHealth:
    """Which stages of this worker run. A stopped stage stays down until the worker restarts.

    `stop_worker` stops the whole worker with an error (the Faust app's `crash`: the process exits
    non-zero); it is called when Kafka refuses the worker's principal.
    """

    def __init__(
        self,
        metrics: StreamMetrics,
        stop_worker: Callable[[BaseException], Awaitable[None]] | None = None,
    ) -> None:
        self._metrics = metrics
        self._stop_worker = stop_worker
        self.stages: list[str] = []
        self.failures: dict[str, StageFailedError] = {}
        self.refused: AccessDeniedError | None = None

    def running(self, stage: str) -> None:
        if stage not in self.stages:
            self.stages.append(stage)
        self.failures.pop(stage, None)
        self._metrics.stage_up.labels(stage=stage).set(1)

    def failed(self, error: StageFailedError) -> None:
        self.failures[error.stage] = error
        self._metrics.stage_up.labels(stage=error.stage).set(0)

    def is_up(self, stage: str) -> bool:
        return stage not in self.failures

    def access_lost(self, refused: AccessDeniedError) -> AccessDeniedError:
        """Kafka refused this worker's principal, or the database its role: every stage of it down,
        said once at ERROR; returns the refusal, for the caller to raise."""
        if self.refused is not None:
            return self.refused
        self.refused = refused
        for stage in self.stages:
            if self.is_up(stage):
                self.failed(StageFailedError(stage, "keep its access", 1, refused))
        log.error(
            "worker stopping, stages %s down: %s. Whatever they had not confirmed waits in Kafka, "
            "unacknowledged, until its access is restored and the worker restarted",
            ", ".join(self.stages) or "(none)",
            refused,
        )
        return refused

    async def stop_worker(self, refused: AccessDeniedError) -> None:
        """`access_lost`, then stop the worker (it exits non-zero with the refusal)."""
        error = self.access_lost(refused)
        if self._stop_worker is not None:
            await self._stop_worker(error)


@dataclass
class Judged(Generic[T]):
    """A batch after decode-and-catch: each message's result, and the rejected ones."""

    results: list[tuple[RawMessage, T]] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)


def judge_each(
    messages: Sequence[RawMessage],
    decode: Callable[[RawMessage], dict[str, Any]],
    process: Callable[[RawMessage, dict[str, Any]], T],
    institution_of: Callable[[RawMessage], str | None] = lambda _message: None,
) -> Judged[T]:
    """Decode and process each message; a typed input error rejects that message alone.

    An unavailable service and any other exception propagate: the batch is retried, or the stage
    stops, and no message of it is dead-lettered for a fault that is not its own.
    """
    judged: Judged[T] = Judged()
    for message in messages:
        record: dict[str, Any] | None = None
        try:
            record = decode(message)
            judged.results.append((message, process(message, record)))
        except ServiceUnavailableError:
            raise
        except INPUT_ERRORS as exc:
            judged.rejections.append(_rejection(message, exc, record, institution_of(message)))
    return judged


def _rejection(
    message: RawMessage,
    exc: SchemaError | RejectedEvent,
    record: dict[str, Any] | None,
    institution: str | None,
) -> Rejection:
    # The topic names the sender that Kafka authenticated; the payload only claims one.
    envelope = (record or {}).get("envelope") or record or {}
    return Rejection(
        message=message,
        error_class=type(exc).__name__,
        field=exc.field,
        reason=exc.reason,
        institution_id=institution or envelope.get("institution_id"),
        correlation_id=_text(envelope.get("correlation_id")),
    )


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


class Stage:
    """One stage's share of the runtime: retrying, dead-lettering and reporting its health."""

    def __init__(
        self,
        name: str,
        components: Components,
        topics: TopicNames,
        publish: Publish,
        health: StageHealth,
        confirm_state: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`confirm_state` returns once the broker has the changelog records of the state the stage
        wrote (a batch is acked only after it); None: nothing to wait for (Faust's own changelog path)."""
        self.name = name
        self.components = components
        self.codecs = components.codecs
        self.metrics = components.metrics
        self.clock = components.clock
        self.topics = topics
        self.publish = publish
        self.health = health
        self.confirm_state = confirm_state
        health.running(name)

    async def attempt(
        self, doing: str, action: Callable[[], Awaitable[T]], messages: Sequence[RawMessage]
    ) -> T:
        """Run `action` until it succeeds: unavailable services without limit, bugs a bounded number
        of times, after which the stage stops (StageFailedError), its batch unacknowledged."""
        retry = self.components.retry
        delay = retry.first_delay
        bugs = 0
        while True:
            try:
                return await action()
            except ServiceUnavailableError as exc:
                log.warning("%s failed (%s), retrying in %.1fs", doing, exc, delay)
                self.metrics.sink_retries.labels(reason=type(exc).__name__).inc()
            except AccessDeniedError:
                raise  # refused, not unavailable and not a bug: retrying changes nothing (`stop`)
            except Exception as exc:  # a bug of the hub: counted, logged, retried a few times
                bugs += 1
                self.metrics.stage_errors.labels(stage=self.name, error=type(exc).__name__).inc()
                log.error(
                    "%s failed with an error of the hub's own code (attempt %d of %d) on %s",
                    doing,
                    bugs,
                    retry.bug_attempts,
                    positions(messages),
                    exc_info=exc,
                )
                if bugs >= retry.bug_attempts:
                    raise self.failed(doing, bugs, exc) from exc
            await asyncio.sleep(delay)
            delay = min(delay * 2, retry.max_delay)

    def failed(self, doing: str, attempts: int, cause: BaseException) -> StageFailedError:
        """Report this stage down, for good; returns the error to raise."""
        failure = (
            cause
            if isinstance(cause, StageFailedError)
            else StageFailedError(self.name, doing, attempts, cause)
        )
        if self.health.is_up(self.name):
            self.health.failed(failure)
            log.critical(
                "stage %s stopped: its events wait in Kafka, unacknowledged, for the fix and a restart (%s)",
                self.name,
                failure,
            )
        return failure

    async def stop(self, cause: BaseException) -> None:
        """Stop for good on `cause`: report down and wait, holding the batch, until the worker stops.
        Kafka refusing the principal, or the database the role, stops the worker too
        (`StageHealth.stop_worker`)."""
        if isinstance(cause, AccessDeniedError):
            await self.health.stop_worker(cause)
        else:
            self.failed("handle a batch", 1, cause)
        await asyncio.Event().wait()

    async def dead_letter(self, rejections: Sequence[Rejection], kind: str) -> None:
        """Publish a dead letter for each rejection; returns once the broker has every one."""
        if not rejections:
            return

        async def send() -> None:
            outputs = []
            for rejection in rejections:
                value = self.codecs.encode(
                    "deadletter", dead_letter_record(rejection, f"streams.{self.name}", self.clock())
                )
                headers = {"correlation_id": (rejection.correlation_id or "").encode()}
                outputs.append(Output(self.topics.deadletter_topic, rejection.message.key, value, headers))
            await self.publish(outputs)

        await self.attempt(f"dead-letter {self.name} rejects", send, [r.message for r in rejections])
        for rejection in rejections:
            self.metrics.rejects.labels(kind=kind, reason=rejection.error_class).inc()
            self.metrics.events.labels(
                institution=rejection.institution_id or "?", kind=kind, outcome="rejected"
            ).inc()
            log.warning(
                "rejected %s[%d]@%d: %s (%s) correlation_id=%s",
                rejection.message.topic,
                rejection.message.partition,
                rejection.message.offset,
                rejection.reason,
                rejection.field,
                rejection.correlation_id,
            )


BatchHandler = Callable[[list[RawMessage]], Awaitable[None]]


def to_raw_message(event: Any) -> RawMessage:
    message = event.message
    return RawMessage(
        message.topic,
        message.partition,
        message.offset,
        message.key,
        message.value,
        dict(message.headers or {}),
        kafka_timestamp_ms(message.timestamp),
    )


class LingerBatches(Generic[T]):
    """What has arrived, in batches: a batch is taken once the stage is idle and its first item has
    waited `linger_seconds` for company (or the batch is full), never a window waiting to fill.

    Items put while the stage handles the previous batch wait here (up to `max_size`; then `put`
    waits, which holds the stream back), so under load the next batch is taken at once and is as big
    as the load made it; at low load a batch is the one message and whatever came within the linger.
    """

    def __init__(
        self, max_size: int, linger_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_size < 1:
            raise ValueError("a batch holds at least one item")
        self.max_size = max_size
        self.linger_seconds = linger_seconds
        self.clock = clock
        self._items: list[T] = []
        self._first_at = 0.0
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self.closed = False

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        """Add an item; waits while the batch is full until it is taken."""
        while len(self._items) >= self.max_size:
            self._room.clear()
            await self._room.wait()
        if not self._items:
            self._first_at = self.clock()
        self._items.append(item)
        self._arrived.set()
        if len(self._items) >= self.max_size:
            self._full.set()

    def close(self) -> None:
        """No batch is taken any more: a waiting `take` returns what it has, or [] (its stream stopped)."""
        self.closed = True
        self._arrived.set()
        self._full.set()

    def take_ready(self) -> list[T] | None:
        """The next batch if it can be taken now (its first item has lingered, or it is full), else
        None: under load the batch is ready whenever the stage comes back for it, and takes no waiting."""
        if not self._items:
            return None
        if not self._full.is_set() and self.clock() < self._first_at + self.linger_seconds:
            return None
        return self._taken()

    async def take(self) -> list[T]:
        """The next batch: waits, without limit, for its first item, then at most until that item has
        lingered `linger_seconds` (counted from its arrival) or the batch is full; [] once closed."""
        while not self._items:
            if self.closed:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        remaining = self._first_at + self.linger_seconds - self.clock()
        if remaining > 0 and not self._full.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._full.wait()
        return self._taken()

    def _taken(self) -> list[T]:
        batch, self._items = self._items, []
        self._full.clear()
        self._arrived.clear()
        self._room.set()
        return batch


async def linger_take(stream: Any, batch_size: int, linger_seconds: float) -> AsyncIterator[list[Any]]:
    """A Faust stream's events in `LingerBatches`, none acked: the caller acks them (`run_batches`).

    Faust's own `noack_take(n, within)` waits `within` for every batch that is not full, so at low load
    each event waited the whole window. This is its mechanism (a processor fills the buffer while the
    stream is consumed in the background, acks disabled) with the linger instead of the window.
    """
    batches: LingerBatches[Any] = LingerBatches(batch_size, linger_seconds)

    async def add(value: Any) -> Any:
        event = stream.current_event
        if event is None:
            raise RuntimeError("the stream's current event is None")
        await batches.put(event)
        return value

    enabled_acks = stream.enable_acks
    stream.enable_acks = False  # acked by hand, once their outputs are confirmed
    stream.add_processor(add)
    stream._enable_passive(aiter(stream.channel))  # as Faust's noack_take does
    # The stream stopping (its worker stopping) ends a waiting take: one watcher for the stream's life,
    # not Faust's `stream.wait(take)` per batch, which made and cancelled three futures each time.
    stopping = asyncio.ensure_future(stream.wait())

    def stopped(done: asyncio.Future[Any]) -> None:
        batches.close()
        if not done.cancelled():
            done.exception()  # retrieved: a failure of the watch itself is the stream's to report

    stopping.add_done_callback(stopped)
    try:
        while not stream.should_stop:
            batch = batches.take_ready() or await batches.take()
            if batches.closed or stream.should_stop:
                break  # a batch taken as the stream stopped is not handled: never acked, read again
            yield batch
    finally:
        stopping.cancel()
        stream.enable_acks = enabled_acks
        stream._processors.remove(add)


Take = Callable[[Any, int, float], AsyncIterator[list[Any]]]


async def run_batches(
    stream: Any,
    handle: BatchHandler,
    stage: Stage,
    batch_size: int,
    linger_seconds: float,
    in_flight: dict[str, float],
    take: Take = linger_take,
) -> None:
    """A Faust agent's loop: batches (`linger_take`) to `handle`, acked only once it returned (its
    outputs confirmed) and the changelog of the state it wrote is confirmed (`Stage.confirm_state`).

    A stage that stopped on a bug keeps its batch in flight and unacknowledged for good: nothing
    escapes to Faust (which would ack it), the stall watchdog leaves a partition with a batch in flight
    alone, and a restart reads the batch again.
    """
    agent_stream = cast(Any, stream)  # the concrete faust.Stream
    confirm_state = stage.confirm_state
    async for events in take(agent_stream, batch_size, linger_seconds):
        in_flight[stage.name] = time.monotonic()
        try:
            messages = [to_raw_message(event) for event in events]
            await handle(messages)
            if confirm_state is not None:  # the state it wrote is in the changelog before the ack
                await stage.attempt(f"confirm {stage.name} state changelog", confirm_state, messages)
        except Exception as exc:  # noqa: BLE001 - escaping would ack the batch; the stage stops instead
            await stage.stop(exc)
        del in_flight[stage.name]
        for event in events:
            await agent_stream.ack(event)

"""The store stage on a plain librdkafka consumer: read the standard topics, store, then mark done.

The store needs no tables, so it needs nothing Faust gives, and Faust's ack and gap bookkeeping
is where faust-streaming 0.15.3 lost or stuck offsets after rebalances (streams/stalls.py). Here an
offset is handed to librdkafka (`store_offsets`) only after its batch's store transaction and dead
letters are done; librdkafka's auto-commit sends only those, every commit interval and on every
revocation. So the committed position never passes what the store holds, and a crash re-reads at
most the batches since the last commit, which the idempotent writer stores once.

It runs inside the stream worker's event loop (a Faust task), with the consumer's blocking calls on
one thread of its own, so that close() never races a consume() in flight.

A refusal of the principal (a topic or the group it may no longer read, or its credentials refused for
long enough, `ClientErrors`) ends `run` with the typed `KafkaAccessError` before the batch it came with
is handled, so nothing of that batch is marked stored: it is read again once access is restored.

A librdkafka consumer that hit a fatal error is unusable for good. With static membership that
happens after an outage of the group coordinator (a broker restart): the session expires, the
consumer rejoins under its instance id, and a commit still in flight under its old member id is
answered FENCED_INSTANCE_ID, which librdkafka makes fatal (librdkafka#3437). Left alone, the store
stage would sit on that consumer for ever, silently. So the stage closes it and builds a new one
under the same instance id, which takes the partitions back; batches stored but not yet committed
are read again and stored once. Fatal errors that keep coming (another live worker elsewhere under
this instance id) end `run` with the error instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from core.kafka_errors import ClientErrors, refusal
from streams.runtime.membership import claim_instance_id, leave_and_close
from streams.runtime.normaliser import RawMessage
from streams.runtime.startup import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES, heartbeat_seconds

log = logging.getLogger("clinhub.streams.store")


def store_group(app_id: str) -> str:
    """The store consumer's group: one per deployment, whichever worker layout runs it.

    Not `<app id>-store`: that is the Faust group of a worker run with `--role store`.
    """
    return f"{app_id}-sink"


def next_offsets(messages: Sequence[RawMessage]) -> dict[tuple[str, int], int]:
    """Per partition, the offset to resume from once these messages are stored (highest + 1)."""
    resume: dict[tuple[str, int], int] = {}
    for message in messages:
        where = (message.topic, message.partition)
        resume[where] = max(resume.get(where, 0), message.offset + 1)
    return resume


# How long one wait for a first message may block the consumer's thread: close() and a refusal are seen
# within this (the thread serves them between waits), as the old batch window was.
IDLE_WAIT_SECONDS = 0.5


def take_arrived(
    consume: Callable[[int, float], Sequence[Any]],
    batch_size: int,
    linger_seconds: float,
    idle_wait_seconds: float = IDLE_WAIT_SECONDS,
) -> list[Any]:
    """One batch of a librdkafka consumer, as `stage.LingerBatches` takes one from a Faust stream.

    librdkafka's `consume(n, timeout)` waits for all n or the timeout, so a batch size with a window
    made every event at low load wait the window. Here: what is queued already (it came while the
    stage was busy) is taken at once; otherwise wait (up to `idle_wait_seconds`, an empty batch after)
    for a first message, then at most `linger_seconds` more for others, up to `batch_size`.
    """
    batch = list(consume(batch_size, 0))
    if batch:
        return batch
    batch = list(consume(1, idle_wait_seconds))
    if batch and batch_size > 1:
        batch += consume(batch_size - 1, linger_seconds)
    return batch


def raw_message(message: Any) -> RawMessage:
    """A confluent-kafka Message as the handlers' RawMessage."""
    return RawMessage(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        dict(message.headers() or ()),
        _timestamp_ms(message),
    )


def _timestamp_ms(message: Any) -> int | None:
    """librdkafka's (type, ms) timestamp; None when the message has none (TIMESTAMP_NOT_AVAILABLE)."""
    kind, ms = message.timestamp()
    return int(ms) if kind != 0 and ms > 0 else None


def consumer_config(
    client_config: Mapping[str, Any],
    group: str,
    commit_interval_seconds: float,
    session_timeout: float,
    instance_id: str | None = None,
) -> dict[str, Any]:
    """`instance_id`: the worker's static member id (streams/runtime/membership.py), None: dynamic."""
    static = {"group.instance.id": instance_id} if instance_id is not None else {}
    return {
        **client_config,
        **static,
        "group.id": group,
        "auto.offset.reset": "earliest",
        "enable.auto.commit": True,  # commits only what store_offsets marked: stored batches
        "enable.auto.offset.store": False,
        "auto.commit.interval.ms": int(commit_interval_seconds * 1000),
        "session.timeout.ms": int(session_timeout * 1000),
        "heartbeat.interval.ms": int(heartbeat_seconds(session_timeout) * 1000),
        # A long store outage stops consume() calls; the group waits this long before it moves the
        # partitions (what was stored but not committed is then read again, and stored once).
        "max.poll.interval.ms": 600_000,
        "fetch.wait.max.ms": FETCH_MAX_WAIT_MS,  # as the worker's Faust consumer (startup.py)
        "fetch.min.bytes": FETCH_MIN_BYTES,
        "queued.max.messages.kbytes": 16 * 1024,  # what waits in memory while the store is down
        "logger": logging.getLogger("clinhub.kafka.store-consumer"),
    }


# More fatal consumer errors than this within the window: not a one-off fencing after an outage, but a
# consumer that cannot work (another live worker under the instance id, fencing this one each time).
MOST_REBUILDS = 3
REBUILD_WINDOW_SECONDS = 300.0


class ConsumerUnusable(Exception):  # a signal between two methods of the loop, never leaves run()
    """The consumer reported a fatal error: close it and build another."""

    def __init__(self, error: Any) -> None:
        super().__init__(str(error))
        self.error = error


def is_fatal(error: Any) -> bool:
    """librdkafka's fatal error as the consumer hands it out: code _FATAL (its `fatal()` flag is unset
    on that event; the flag is set on the underlying error, as the error callback receives it)."""
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


class StoreConsumer:
    """Batches from the standard topics to `handle`, then their offsets to librdkafka's commit."""

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: Sequence[str],
        handle: Callable[[list[RawMessage]], Awaitable[None]],
        batch_size: int,
        linger_seconds: float,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
        errors: ClientErrors | None = None,
    ) -> None:
        self.config = dict(config)
        self.errors = errors
        if errors is not None:
            self.config["error_cb"] = errors  # where librdkafka reports a refused password
        self.principal = self.config.get("sasl.username")
        self.group = self.config.get("group.id")
        self.topics = list(topics)
        self.handle = handle
        self.batch_size = batch_size
        self.linger_seconds = linger_seconds
        self.consumer_factory = consumer_factory or _confluent_consumer
        self._consumer: Any = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-consumer")

    async def _blocking(self, call: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, call, *args)

    def _subscribed(self) -> Any:
        consumer = self.consumer_factory(self.config)
        consumer.subscribe(self.topics, on_assign=_log_assigned, on_revoke=_log_revoked)
        return consumer

    async def run(self) -> None:
        """Consume until cancelled; the handler retries a failing batch itself, so nothing is skipped."""
        rebuilds: deque[float] = deque()
        while True:
            try:
                await self._run_one_consumer()
                return
            except ConsumerUnusable as unusable:
                now = time.monotonic()
                while rebuilds and now - rebuilds[0] > REBUILD_WINDOW_SECONDS:
                    rebuilds.popleft()
                if len(rebuilds) >= MOST_REBUILDS:
                    raise KafkaException(unusable.error) from None
                rebuilds.append(now)
                log.warning(
                    "store consumer unusable (%s): building a new one under the same group member id; "
                    "batches stored but not yet committed are read again and stored once",
                    unusable.error,
                )

    async def _run_one_consumer(self) -> None:
        consumer = await self._blocking(self._subscribed)
        self._consumer = consumer
        try:
            while True:
                polled = await self._blocking(
                    take_arrived, consumer.consume, self.batch_size, self.linger_seconds
                )
                messages = self._messages(polled)
                if not messages:
                    continue
                await self.handle(messages)
                await self._mark_stored(consumer, messages)
        except ConsumerUnusable:
            self._consumer = None
            await asyncio.shield(self._blocking(_close_unusable, consumer))
            raise
        except BaseException:
            # Commits what was marked stored and leaves the group at once (a static member too), so the
            # partitions move without waiting for the session timeout.
            self._consumer = None
            await asyncio.shield(self._blocking(_close, consumer))
            self._thread.shutdown(wait=False)
            raise

    def _messages(self, polled: Sequence[Any]) -> list[RawMessage]:
        """The messages of a poll; raises the refusal when the broker refused the principal."""
        messages = []
        for message in polled:
            error = message.error()
            if error is None:
                messages.append(raw_message(message))
                continue
            refused = refusal(error, self.principal, message.topic(), self.group)
            if refused is not None:
                raise refused
            if is_fatal(error):
                raise ConsumerUnusable(error)
            log.warning("store consumer: %s", error)
        if self.errors is not None:
            self.errors.raise_if_refused()
        return messages

    async def assignment(self) -> list[tuple[str, int]]:
        """The partitions this worker's store consumer owns now (none before it has started)."""
        consumer = self._consumer
        if consumer is None:
            return []
        try:
            owned = await self._blocking(consumer.assignment)
        except RuntimeError:  # closed meanwhile (the worker is stopping)
            return []
        return sorted((tp.topic, tp.partition) for tp in owned)

    async def _mark_stored(self, consumer: Any, messages: Sequence[RawMessage]) -> None:
        from confluent_kafka import TopicPartition

        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets(messages).items()]
        try:
            await self._blocking(lambda: consumer.store_offsets(offsets=offsets))
        except KafkaException as exc:
            # The partitions moved while the batch was stored (a rebalance, or the poll interval
            # passed during a long outage): their new owner reads the batch again; stored once.
            log.warning("store consumer: could not mark stored offsets (%s); they will be re-read", exc)


def _partitions(partitions: Sequence[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _log_assigned(_consumer: Any, partitions: Sequence[Any]) -> None:
    log.info("store consumer assigned %s", _partitions(partitions))


def _log_revoked(_consumer: Any, partitions: Sequence[Any]) -> None:
    # librdkafka commits the offsets marked stored before it lets these go
    log.info("store consumer revoked %s", _partitions(partitions))


def _confluent_consumer(config: dict[str, Any]) -> Any:
    from confluent_kafka import Consumer

    if "group.instance.id" in config:
        claim_instance_id(config["group.instance.id"])  # refused when another live worker holds it
    return Consumer(config)


def _close(consumer: Any) -> None:
    try:
        leave_and_close(consumer)
    except Exception as exc:  # noqa: BLE001 - closing on shutdown; uncommitted batches are re-read
        log.warning("store consumer: close failed: %r", exc)


def _close_unusable(consumer: Any) -> None:
    """Close a consumer after its fatal error: it can neither leave nor commit any more."""
    try:
        consumer.close()
    except Exception as exc:  # noqa: BLE001 - the consumer is already dead; its successor takes over
        log.info("store consumer: closing the unusable consumer: %r", exc)

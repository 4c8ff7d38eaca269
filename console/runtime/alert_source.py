"""Where notifications come from: the alerts and escalations topics, read by a librdkafka consumer of its
own (group `<stream app id>-console-notify`) on a thread of its own, so the console's event loop never
waits for Kafka or for the outbox transaction.

At-least-once, and exactly one delivery per channel, alert and level: a batch's offsets are handed to
librdkafka (`store_offsets`, committed by its auto-commit and on close or revocation) only after the outbox
transaction of that batch has committed; a crash in between reads the batch again, and its delivery ids
(uuid5 of channel, alert, event, level) find the rows already queued.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.contract import TopicNames
from core.exceptions import ServiceUnavailableError
from schemas import standard
from schemas.exceptions import SchemaError
from schemas.wire import AvroDecoder, SchemaRegistry
from streams.runtime.messages import RawMessage
from streams.runtime.store_consumer import consumer_config, next_offsets, raw_message

log = logging.getLogger("clinhub.console.notify.source")

ALERT, ESCALATION = "alert", "escalation"


def notify_group(app_id: str) -> str:
    """The notifier's consumer group: one per deployment, beside the store's `<app id>-sink`."""
    return f"{app_id}-console-notify"


@dataclass(frozen=True)
class SourceRecord:
    """A decoded record of the alerts (`alert`) or escalations (`escalation`) topic, and where it was."""

    event: str
    record: Mapping[str, Any]
    topic: str
    partition: int
    offset: int


def source_config(
    client_config: Mapping[str, Any], group: str, session_timeout: float = 30.0
) -> dict[str, Any]:
    """The store consumer's settings (offsets stored by hand, auto-committed), under the notifier's group."""
    return {
        **consumer_config(client_config, group, commit_interval_seconds=1.0, session_timeout=session_timeout),
        "logger": logging.getLogger("clinhub.kafka.console-notify"),
    }


class AlertSource:
    """Consumes both topics on its thread; hands each batch to `accept` (which commits the outbox
    transaction before it returns) and only then marks the batch's offsets for commit.

    A batch that `accept` refuses (database down, registry unreachable, or a bug) is tried again with
    back-off, its offsets unmarked, until it is accepted or the source is stopped; a record that cannot be
    decoded at all (not Confluent-framed Avro of the alert schemas) is logged and passed over.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topics: TopicNames,
        registry: SchemaRegistry,
        accept: Callable[[Sequence[SourceRecord], dt.datetime], object],
        clock: Callable[[], dt.datetime],
        *,
        on_accepted: Callable[[], None] = lambda: None,
        on_error: Callable[[BaseException], None] = lambda _exc: None,
        batch_size: int = 100,
        poll_seconds: float = 0.5,
        retry_max_seconds: float = 30.0,
        consumer_factory: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.config = dict(config)
        self.topics = {topics.alerts_topic: ALERT, topics.escalations_topic: ESCALATION}
        self._decoders = {
            ALERT: AvroDecoder(registry, standard.load(standard.CRITICAL_VALUE_ALERT)),
            ESCALATION: AvroDecoder(registry, standard.load(standard.ALERT_ESCALATION)),
        }
        self.accept = accept
        self.clock = clock
        self.on_accepted = on_accepted
        self.on_error = on_error
        self.batch_size = batch_size
        self.poll_seconds = poll_seconds
        self.retry_max_seconds = retry_max_seconds
        self.consumer_factory = consumer_factory or _confluent_consumer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None  # why the thread ended early, if it did

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the alert source is already started")
        self._thread = threading.Thread(target=self._run, name="console-notify-source", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the thread to finish (it leaves the group, committing what was accepted) and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("notification source: still stopping after %.0f s", timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        try:
            consumer = self.consumer_factory(self.config)
        except Exception as exc:
            log.exception("notification source: cannot create the Kafka consumer")
            self.failure = exc
            return
        try:
            consumer.subscribe(list(self.topics), on_assign=_log_assigned, on_revoke=_log_revoked)
            while not self._stop.is_set():
                polled = consumer.consume(self.batch_size, self.poll_seconds)
                messages = []
                for message in polled:
                    if message.error() is not None:
                        log.warning("notification source: %s", message.error())
                        continue
                    messages.append(raw_message(message))
                if messages and self._accept_until_done(messages):
                    self._mark_accepted(consumer, messages)
        except Exception as exc:
            log.exception("notification source stopped by an error; unaccepted batches will be read again")
            self.failure = exc
        finally:
            _close(consumer)

    def _accept_until_done(self, messages: Sequence[RawMessage]) -> bool:
        """True once the batch is in the outbox; False when stopped first (its offsets stay unmarked)."""
        failures = 0
        while not self._stop.is_set():
            try:
                self.accept(self._decoded(messages), self.clock())
            except Exception as exc:  # noqa: BLE001 - nothing is skipped: the batch is tried again
                failures += 1
                delay = min(self.retry_max_seconds, 0.5 * 2 ** min(failures - 1, 10))
                transient = isinstance(exc, ServiceUnavailableError) or _is_database_outage(exc)
                (log.warning if transient else log.error)(
                    "notification source: batch of %d not queued (%s: %s), try %d again in %.1f s",
                    len(messages),
                    type(exc).__name__,
                    exc if transient else "see traceback",
                    failures,
                    delay,
                    exc_info=not transient,
                )
                self.on_error(exc)
                self._stop.wait(delay)
                continue
            self.on_accepted()
            return True
        return False

    def _decoded(self, messages: Sequence[RawMessage]) -> list[SourceRecord]:
        records = []
        for message in messages:
            event = self.topics[message.topic]
            try:
                record = self._decoders[event](message.value)
            except ServiceUnavailableError:
                raise  # the registry: wait for it, with the batch
            except SchemaError as exc:
                log.error(
                    "notification source: %s[%d]@%d is no %s record, passed over (%s: %s)",
                    message.topic,
                    message.partition,
                    message.offset,
                    event,
                    type(exc).__name__,
                    exc.reason,
                )
                continue
            records.append(SourceRecord(event, record, message.topic, message.partition, message.offset))
        return records

    def _mark_accepted(self, consumer: Any, messages: Sequence[RawMessage]) -> None:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = [TopicPartition(t, p, o) for (t, p), o in next_offsets(messages).items()]
        try:
            consumer.store_offsets(offsets=offsets)
        except KafkaException as exc:
            # The partitions moved meanwhile: their new owner reads the batch again and queues nothing new.
            log.warning("notification source: could not mark offsets (%s); they will be read again", exc)


def _is_database_outage(exc: BaseException) -> bool:
    from sqlalchemy.exc import DBAPIError, OperationalError

    return isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated)


def _partitions(partitions: Sequence[Any]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]" for tp in partitions) or "nothing"


def _log_assigned(_consumer: Any, partitions: Sequence[Any]) -> None:
    log.info("notification source assigned %s", _partitions(partitions))


def _log_revoked(_consumer: Any, partitions: Sequence[Any]) -> None:
    log.info("notification source revoked %s", _partitions(partitions))


def _confluent_consumer(config: dict[str, Any]) -> Any:
    from confluent_kafka import Consumer

    return Consumer(config)


def _close(consumer: Any) -> None:
    try:
        consumer.close()
    except Exception as exc:  # noqa: BLE001 - closing on shutdown; what was not committed is read again
        log.warning("notification source: close failed: %r", exc)

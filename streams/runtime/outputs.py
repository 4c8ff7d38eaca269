"""What the agents publish, and the librdkafka producer that publishes it.

Handlers collect their outputs per batch and hand them over in one call, which returns only once
the broker has acknowledged every message (acks=all): the batch's input is acked after that. A call
whose message the broker refused the principal (no ACL for the topic), or made while the principal's
credentials are refused, raises the typed refusal (`KafkaAccessError`), never retried. The
producer is confluent-kafka's, not Faust's: Faust's aiokafka producer costs a task, a timer and a
future in Python per message, and was a sixth of the normaliser's time. Table changelogs go through
it too (`produce_nowait`, streams/runtime/changelog.py), confirmed before their batch is acked.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple

from core.exceptions import KafkaAccessError
from core.kafka_errors import ClientErrors, refusal
from core.settings import KafkaSettings
from streams.exceptions import OutputDeliveryError

log = logging.getLogger("clinhub.streams.runtime.outputs")


class Output(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: Mapping[str, bytes]


# Publish every output; return once the broker has all of them, raise if any was refused.
Publish = Callable[[Sequence[Output]], Awaitable[None]]


class _Pending:
    """One call's messages in flight: the future resolves when the last delivery report is in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int, principal: str | None = None) -> None:
        self.loop = loop
        self.remaining = count
        self.principal = principal
        self._lock = threading.Lock()
        self.errors: list[tuple[str, str]] = []  # (topic, reason)
        self.refused: KafkaAccessError | None = None
        self.done: asyncio.Future[None] = loop.create_future()

    def report(self, error: Any, message: Any) -> None:
        """librdkafka's delivery callback, called on the poll thread."""
        with self._lock:
            if error is not None:
                self.errors.append((message.topic(), str(error)))
                self.refused = self.refused or refusal(error, self.principal, message.topic())
            self.remaining -= 1
            finished = self.remaining == 0
        if finished:
            self.loop.call_soon_threadsafe(self._finish)

    def abandon(self, unsent: int, topic: str, reason: str) -> None:
        """produce() refused a message outright: the rest of the call is not sent, and it fails."""
        with self._lock:
            self.errors.append((topic, reason))
            self.remaining -= unsent
            finished = self.remaining == 0
        if finished:
            self.loop.call_soon_threadsafe(self._finish)

    def _finish(self) -> None:
        if self.done.done():
            return
        if self.refused is not None:
            self.done.set_exception(self.refused)
        elif self.errors:
            topic, reason = self.errors[0]
            self.done.set_exception(OutputDeliveryError(topic, reason, len(self.errors)))
        else:
            self.done.set_result(None)


class KafkaOutputs:
    """A librdkafka producer with a thread that serves its delivery reports.

    `errors` is the producer's `error_cb`, where a refused password shows: a call waiting while the
    refusal counts fails with it instead of waiting for the delivery timeout.
    """

    def __init__(
        self,
        producer: Any,
        poll_seconds: float = 0.05,
        principal: str | None = None,
        errors: ClientErrors | None = None,
    ) -> None:
        self._producer = producer
        self._poll_seconds = poll_seconds
        self._principal = principal
        self._errors = errors
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def _poll_forever(self) -> None:
        while not self._stopping.is_set():
            self._producer.poll(self._poll_seconds)

    def _ensure_polling(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._poll_forever, name="clinhub-outputs-poll", daemon=True
                )
                self._thread.start()

    def produce_nowait(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | None,
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        """Hand one message to librdkafka without waiting for the broker: its report goes to
        `on_delivery` on the poll thread. A full local queue is drained here first (this is called from
        synchronous code: a table write); any other refusal of produce() raises."""
        if self._thread is None:
            self._ensure_polling()
        while True:
            try:
                self._producer.produce(topic, value, key, partition=partition, on_delivery=on_delivery)
                return
            except BufferError:  # local queue full: wait for deliveries to make room
                self._producer.poll(self._poll_seconds)

    async def publish(self, outputs: Sequence[Output]) -> None:
        if not outputs:
            return
        self._ensure_polling()
        pending = _Pending(asyncio.get_running_loop(), len(outputs), self._principal)
        for index, output in enumerate(outputs):
            while True:
                try:
                    self._producer.produce(
                        output.topic,
                        output.value,
                        output.key,
                        headers=list(output.headers.items()),
                        on_delivery=pending.report,
                    )
                    break
                except BufferError:  # local queue full: let the poll thread drain deliveries
                    await asyncio.sleep(self._poll_seconds)
                except Exception as exc:  # noqa: BLE001 - e.g. a message over the size limit
                    pending.abandon(len(outputs) - index, output.topic, f"{type(exc).__name__}: {exc}")
                    await pending.done  # the ones already queued are reported first, then this raises
        await self._confirmed(pending)

    async def _confirmed(self, pending: _Pending) -> None:
        """Every delivery report, or the refusal of the principal once it counts."""
        if self._errors is None:
            await pending.done
            return
        while not pending.done.done():
            await asyncio.wait([pending.done], timeout=max(self._poll_seconds, 0.5))
            if not pending.done.done() and self._errors.refused is not None:
                pending.done.add_done_callback(_retrieved)  # the reports still due come to no one
                raise self._errors.refused
        await pending.done

    def close(self, timeout: float = 10.0) -> int:
        """Stop polling and flush; returns how many messages were still undelivered."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        remaining = int(self._producer.flush(timeout))
        if remaining:
            log.warning("%d output messages undelivered at shutdown; their input is not acked", remaining)
        return remaining


def _retrieved(done: asyncio.Future[None]) -> None:
    if not done.cancelled():
        done.exception()


def make_outputs(
    kafka: KafkaSettings, delivery_timeout: float = 30.0, errors: ClientErrors | None = None
) -> KafkaOutputs:
    """The worker's producer; `errors`, the worker's record of refusals, also hears its error callback."""
    from confluent_kafka import Producer

    config = kafka.producer_config(delivery_timeout, linger_ms=kafka.stage_producer_linger_ms)
    if errors is not None:
        config["error_cb"] = errors
    return KafkaOutputs(Producer(config), principal=kafka.sasl_username, errors=errors)

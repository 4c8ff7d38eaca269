"""The publisher SDK: validate locally, encode Avro, publish idempotently with acks=all, confirm.

publisher = make_publisher(load_settings(), institution_id="H001")
receipt = publisher.publish("lab", record)          # raises if the broker did not accept it
receipts = publisher.publish_many("vitals", batch)  # one result per record, in order
publisher.close()                                   # raises listing anything undelivered

At a sustained rate, publish without waiting for each confirmation (a bounded number in flight, every
delivery report collected):

stream = publisher.stream(max_in_flight=10_000)
for record in records:
    stream.send("lab", record)                      # validated, queued; raises only for bad records
outcome = stream.close()                            # waits for every report: outcome.confirmed, .failures

Built with a transactional id, `publish_atomically(events)` sends events of any kinds in one Kafka
transaction: a reader that reads committed (the hub's normaliser) gets all of them or none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from core import contract
from core.contract import TopicNames
from core.exceptions import KafkaAccessError
from core.kafka_errors import ClientErrors, refusal
from core.settings import HubSettings
from producers.exceptions import (
    AccessRefusedError,
    ClusterUnreachableError,
    DeliveryFailedError,
    TransactionFailedError,
    UndeliveredOnCloseError,
)
from producers.validation import check_event
from schemas import standard
from schemas.exceptions import RecordValidationError
from schemas.wire import AvroEncoder, ConfluentRegistry, make_encoder


@dataclass(frozen=True)
class Receipt:
    """Where the broker durably stored the event."""

    event_id: str
    topic: str
    partition: int
    offset: int


def message_key(record: Mapping[str, Any]) -> bytes:
    """All events of one patient at one institution share a key, hence a partition, hence an order."""
    return contract.patient_key(record["envelope"]["institution_id"], record["patient_mrn"]).encode()


class TransactionalProducer:
    """A transactional librdkafka producer, made (its transactions initialised) on first use, and made
    again after a failure that leaves it unusable. A new one with the same transactional id fences the
    old one at the broker, which aborts whatever transaction the old one left open."""

    def __init__(self, make: Callable[[], Any], timeout: float) -> None:
        self._make = make
        self._timeout = timeout
        self._producer: Any = None

    def get(self) -> Any:
        if self._producer is None:
            producer = self._make()
            producer.init_transactions(self._timeout)  # raises KafkaException when the broker is away
            self._producer = producer
        return self._producer

    def abort(self) -> None:
        """Abort the open transaction; a producer that cannot abort it is dropped (the next is new)."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            producer.abort_transaction(self._timeout)
            self._producer = producer
        except KafkaException:
            producer.purge()  # queued messages of the aborted transaction must never be sent

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self._timeout)
            self._producer = None


class Publisher:
    """Publishes one institution's events. Thread-safe; one per institution and process is enough."""

    def __init__(
        self,
        producer: Any,
        encoders: Mapping[str, AvroEncoder],
        topics: TopicNames,
        institution_id: str,
        delivery_timeout: float,
        transactional: TransactionalProducer | None = None,
        errors: ClientErrors | None = None,
    ) -> None:
        self._producer = producer
        self._errors = errors  # the producers' error_cb: a refused password shows only there
        self._encoders = dict(encoders)
        self._topics = topics
        self.institution_id = institution_id
        self._delivery_timeout = delivery_timeout
        self._lock = threading.Lock()
        self._in_flight: dict[str, None] = {}
        self._transactional = transactional
        self._transaction_lock = threading.Lock()  # one transaction at a time per transactional id

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the cluster now, not with the first event. Its first connection (TLS, SASL and the
        idempotent producer's id, a few hundred ms) otherwise delays the first events sent, which a sender
        on a schedule then sends in a burst; and a cluster that is unreachable, or refuses the
        credentials, is known at start-up: KafkaAccessError (naming the principal) when it refused them,
        ClusterUnreachableError when no broker answered."""
        try:
            self._producer.list_topics(timeout=timeout)
        except KafkaException as exc:
            if self._errors is not None:
                self._producer.poll(0.5)  # error_cb runs only in poll(): a refused password shows there
                self._errors.raise_if_refused()
            raise ClusterUnreachableError(str(exc.args[0] if exc.args else exc), timeout) from exc

    def _encoder(self, kind: str) -> AvroEncoder:
        try:
            return self._encoders[kind]
        except KeyError:
            raise RecordValidationError(
                f"unknown event kind {kind!r}; one of {', '.join(sorted(self._encoders))}", field="kind"
            ) from None

    def validate(self, kind: str, record: Mapping[str, Any]) -> None:
        """Raise RecordValidationError (field, value, rule) if the event must not be sent."""
        check_event(kind, record, self._encoder(kind).schema, self.institution_id)

    def _produce(
        self,
        kind: str,
        record: Mapping[str, Any],
        report: Callable[[Receipt | DeliveryFailedError], None],
        producer: Any = None,
    ) -> None:
        """Queue one event; `report` gets its delivery report (served by the producer's poll/flush)."""
        producer = self._producer if producer is None else producer
        topic = self._topics.raw(self.institution_id, kind)
        value = self._encoder(kind)(record)
        event_id = str(record["envelope"]["event_id"])
        headers = [
            ("correlation_id", str(record["envelope"]["correlation_id"]).encode()),
            ("event_id", event_id.encode()),
        ]

        def on_delivery(err: Any, msg: Any) -> None:
            with self._lock:
                self._in_flight.pop(event_id, None)
            if err is not None:
                refused = refusal(err, self._principal, topic)
                if refused is not None:
                    report(AccessRefusedError(event_id, refused))
                    return
                # A timed-out message may or may not have landed; resending is safe (the hub de-duplicates
                # on event id), so it counts as retriable for the caller.
                retriable = bool(err.retriable()) or err.code() == KafkaError._MSG_TIMED_OUT
                report(DeliveryFailedError(event_id, err.str(), retriable))
            else:
                report(Receipt(event_id, msg.topic(), msg.partition(), msg.offset()))

        with self._lock:
            self._in_flight[event_id] = None
        while True:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=message_key(record),
                    headers=headers,
                    on_delivery=on_delivery,
                )
                return
            except BufferError:
                # Local queue full: back-pressure. Serve delivery reports until there is room.
                producer.poll(0.1)

    def publish_many(
        self, kind: str, records: Sequence[Mapping[str, Any]]
    ) -> list[Receipt | DeliveryFailedError]:
        """Publish all, wait for every delivery report; the result list lines up with the input.

        Every record is validated before any is sent, so a batch with one bad record sends nothing.
        """
        return self.publish_events([(kind, record) for record in records])

    def publish_events(
        self, events: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Receipt | DeliveryFailedError]:
        """`publish_many` over events of several kinds (one HL7 message makes labs, vitals, a diagnosis):
        all validated first, all sent, then one wait for their delivery reports, not one per kind."""
        for kind, record in events:
            self.validate(kind, record)
        results: dict[int, Any] = {}
        for index, (kind, record) in enumerate(events):
            self._produce(kind, record, partial(results.__setitem__, index))
            self._producer.poll(0)
        deadline = time.monotonic() + self._delivery_timeout + 5
        while len(results) < len(events) and time.monotonic() < deadline:
            self._producer.poll(0.1)
            if self._errors is not None and (refused := self._errors.refused) is not None:
                self._refuse_waiting(events, results, refused)
        for i in range(len(events)):
            if i not in results:
                event_id = str(events[i][1]["envelope"]["event_id"])
                results[i] = DeliveryFailedError(
                    event_id, "no delivery report within the timeout", retriable=True
                )
        return [results[i] for i in range(len(events))]

    @property
    def _principal(self) -> str | None:
        return self._errors.principal if self._errors is not None else None

    def _refuse_waiting(
        self,
        events: Sequence[tuple[str, Mapping[str, Any]]],
        results: dict[int, Any],
        refused: KafkaAccessError,
    ) -> None:
        """The broker refused our credentials: what waits would only time out. It is dropped from the
        queue (never sent later) and reported now."""
        self._producer.purge(in_queue=True, in_flight=False)
        self._producer.poll(0)  # purged messages report their delivery as failed ("Purged in queue")
        for i, (_kind, record) in enumerate(events):
            if not isinstance(results.get(i), Receipt):
                event_id = str(record["envelope"]["event_id"])
                results[i] = AccessRefusedError(event_id, refused)

    def publish_atomically(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[Receipt]:
        """Every event in one Kafka transaction, or none: raises TransactionFailedError (the transaction
        was aborted, or its outcome is unknown and the client should send the same events again)."""
        if self._transactional is None:
            raise RuntimeError("this publisher was built without a transactional id")
        for kind, record in events:
            self.validate(kind, record)
        event_ids = [str(record["envelope"]["event_id"]) for _kind, record in events]
        results: dict[int, Any] = {}
        with self._transaction_lock:
            try:
                producer = self._transactional.get()
                producer.begin_transaction()
                for index, (kind, record) in enumerate(events):
                    self._produce(kind, record, partial(results.__setitem__, index), producer)
                producer.commit_transaction(self._delivery_timeout)  # flushes, serving delivery reports
            except KafkaException as exc:
                error = exc.args[0] if exc.args else None
                reason = error.str() if isinstance(error, KafkaError) else str(exc)
                self._transactional.abort()
                raise TransactionFailedError(event_ids, reason) from None
            producer.poll(0)
        failed = [r for r in results.values() if not isinstance(r, Receipt)]
        if failed or len(results) < len(events):  # committed, so each was delivered: a bug if not
            raise RuntimeError(f"transaction committed without every delivery report: {failed[:1]}")
        return [results[i] for i in range(len(events))]

    def stream(
        self,
        max_in_flight: int = 10_000,
        on_result: Callable[[Receipt | DeliveryFailedError], None] | None = None,
    ) -> PublishStream:
        """Publish event after event without waiting for each confirmation; see `PublishStream`."""
        return PublishStream(self, max_in_flight, on_result)

    def publish(self, kind: str, record: Mapping[str, Any]) -> Receipt:
        """Publish one event and return once the broker has it, or raise DeliveryFailedError."""
        (result,) = self.publish_many(kind, [record])
        if isinstance(result, DeliveryFailedError):
            raise result
        return result

    def publish_lab(self, record: Mapping[str, Any]) -> Receipt:
        return self.publish("lab", record)

    def publish_many_labs(self, records: Sequence[Mapping[str, Any]]) -> list[Receipt | DeliveryFailedError]:
        return self.publish_many("lab", records)

    def close(self, timeout: float | None = None) -> None:
        """Flush everything queued; raise (listing the events) if anything is still undelivered."""
        remaining = self._producer.flush(self._delivery_timeout if timeout is None else timeout)
        if self._transactional is not None:
            with self._transaction_lock:
                self._transactional.close()
        if remaining:
            with self._lock:
                raise UndeliveredOnCloseError(list(self._in_flight))


@dataclass
class StreamOutcome:
    """What became of a stream's events: every one sent is either confirmed or among `failures`."""

    sent: int = 0
    confirmed: int = 0
    failures: list[DeliveryFailedError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures and self.confirmed == self.sent


class PublishStream:
    """Events published one after another without waiting for each confirmation, for sustained rates.

    `send` validates the event (RecordValidationError: nothing sent) and queues it; at most
    `max_in_flight` wait for their delivery report at any time (a send beyond that serves reports until
    one is in). Every report is collected: a receipt is counted as confirmed, a failure kept in the
    outcome (and passed, like each receipt, to `on_result`). `close` waits for the remaining reports,
    up to the publisher's delivery timeout; one still missing then is a retriable failure, never
    silently lost. If the broker refuses the principal, whatever waits is dropped from the queue (never
    sent later) and fails with AccessRefusedError, as does every later send.

    One thread sends on a stream; the publisher under it may serve other threads and streams."""

    def __init__(
        self,
        publisher: Publisher,
        max_in_flight: int,
        on_result: Callable[[Receipt | DeliveryFailedError], None] | None = None,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, not {max_in_flight}")
        self._publisher = publisher
        self._producer = publisher._producer
        self._max_in_flight = max_in_flight
        self._on_result = on_result
        self._waiting: dict[int, str] = {}  # send number -> event id, until its report
        self.outcome = StreamOutcome()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._waiting)

    def send(self, kind: str, record: Mapping[str, Any]) -> None:
        if self._closed:
            raise RuntimeError("this stream is closed")
        self._publisher.validate(kind, record)
        number = self.outcome.sent
        self.outcome.sent += 1
        event_id = str(record["envelope"]["event_id"])
        refused = self._refused()
        if refused is not None:
            self._report(None, AccessRefusedError(event_id, refused))
            return
        while len(self._waiting) >= self._max_in_flight:
            self._serve(0.05)
        self._waiting[number] = event_id
        self._publisher._produce(kind, record, partial(self._report, number))
        self._producer.poll(0)

    def close(self, timeout: float | None = None) -> StreamOutcome:
        """Wait for every outstanding delivery report (up to `timeout`, default the publisher's delivery
        timeout and a margin) and return the outcome; the publisher stays open."""
        self._closed = True
        wait = self._publisher._delivery_timeout + 5 if timeout is None else timeout
        deadline = time.monotonic() + wait
        while self._waiting and time.monotonic() < deadline:
            self._serve(0.1)
        for number, event_id in list(self._waiting.items()):
            self._report(number, DeliveryFailedError(event_id, "no delivery report within the timeout", True))
        return self.outcome

    def _refused(self) -> KafkaAccessError | None:
        errors = self._publisher._errors
        return errors.refused if errors is not None else None

    def _serve(self, timeout: float) -> None:
        self._producer.poll(timeout)
        refused = self._refused()
        if refused is not None and self._waiting:
            self._producer.purge(in_queue=True, in_flight=False)
            self._producer.poll(0)  # purged messages report their delivery as failed ("Purged in queue")
            for number, event_id in list(self._waiting.items()):
                self._report(number, AccessRefusedError(event_id, refused))

    def _report(self, number: int | None, result: Receipt | DeliveryFailedError) -> None:
        if number is not None and self._waiting.pop(number, None) is None:
            return  # already reported (a purged message's late report after its refusal)
        refused = self._refused()
        if refused is not None and not isinstance(result, Receipt | AccessRefusedError):
            result = AccessRefusedError(result.event_id, refused)  # "Purged in queue" and the like
        if isinstance(result, Receipt):
            self.outcome.confirmed += 1
        else:
            self.outcome.failures.append(result)
        if self._on_result is not None:
            self._on_result(result)


def make_publisher(
    settings: HubSettings,
    institution_id: str,
    delivery_timeout: float = 30.0,
    registry: Any = None,
    kinds: Sequence[str] = tuple(standard.KIND_SCHEMAS),
    transactional_id: str | None = None,
) -> Publisher:
    """Build a publisher for one institution; registers (or finds) each kind's schema once.

    It connects as that institution's principal unless the settings name one (a gateway publishes for
    several institutions as itself). With `transactional_id` (unique to one running process: a second
    process with the same id fences the first) it can also `publish_atomically`."""
    from confluent_kafka import Producer

    kafka = settings.kafka.for_principal(institution_id)
    errors = ClientErrors(kafka.sasl_username)
    schema_registry = registry or ConfluentRegistry(
        settings.registry.for_principal(institution_id).client_config()
    )
    encoders = {
        kind: make_encoder(schema_registry, standard.load(standard.KIND_SCHEMAS[kind]), check=False)
        for kind in kinds
    }
    transactional = None
    if transactional_id is not None:
        config = kafka.transactional_producer_config(delivery_timeout, transactional_id)
        config["error_cb"] = errors
        transactional = TransactionalProducer(lambda: Producer(config), delivery_timeout)
    return Publisher(
        Producer({**kafka.producer_config(delivery_timeout), "error_cb": errors}),
        encoders,
        TopicNames(prefix=settings.stream.topic_prefix),
        institution_id,
        delivery_timeout,
        transactional,
        errors,
    )


def receipts_ok(results: Iterable[Receipt | DeliveryFailedError]) -> bool:
    return all(isinstance(r, Receipt) for r in results)

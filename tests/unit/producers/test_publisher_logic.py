"""Publisher behaviour that needs no broker: back-pressure, delivery failures, close, validation first."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from core.contract import TopicNames
from core.exceptions import KafkaAuthorizationError
from core.kafka_errors import ClientErrors
from producers.exceptions import (
    AccessRefusedError,
    DeliveryFailedError,
    TransactionFailedError,
    UndeliveredOnCloseError,
)
from producers.publisher import Publisher, Receipt, TransactionalProducer
from producers.simulator import simulate_labs
from schemas import standard
from schemas.exceptions import RecordValidationError
from schemas.wire import ConfluentRegistry, make_encoder


class FakeError:
    def __init__(self, text: str, retriable: bool, code: int = -1) -> None:
        self._text, self._retriable, self._code = text, retriable, code

    def str(self) -> str:
        return self._text

    def retriable(self) -> bool:
        return self._retriable

    def code(self) -> int:
        return self._code


class FakeMessage:
    def __init__(self, topic: str, partition: int, offset: int) -> None:
        self._t, self._p, self._o = topic, partition, offset

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


class FakeProducer:
    """Stands in for confluent_kafka.Producer: a bounded local queue, callbacks served on poll()."""

    def __init__(self, capacity: int = 1000, fail: Callable[[int], FakeError | None] | None = None) -> None:
        self.capacity = capacity
        self.fail = fail or (lambda _n: None)
        self.queue: list[tuple[str, bytes, Any]] = []
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.buffer_errors = 0
        self.attempts = 0
        self.deliver = True

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any, on_delivery: Any) -> None:
        if len(self.queue) >= self.capacity:
            self.buffer_errors += 1
            raise BufferError("Local: Queue full")
        self.queue.append((topic, key, (value, on_delivery)))

    def poll(self, timeout: float = 0) -> int:
        # Acknowledgements take time: a zero-timeout poll finds none yet, as with a real broker.
        if not self.deliver or timeout <= 0:
            return 0
        served = 0
        while self.queue:
            topic, key, (value, callback) = self.queue.pop(0)
            number = self.attempts
            self.attempts += 1
            error = self.fail(number)
            if error is None:
                self.sent.append((topic, key, value))
                callback(None, FakeMessage(topic, 0, number))
            else:
                callback(error, None)
            served += 1
        return served

    def flush(self, timeout: float = 0) -> int:
        self.poll(max(timeout, 0.001))
        return len(self.queue)


def publisher(producer: FakeProducer, timeout: float = 2.0) -> Publisher:
    registry = ConfluentRegistry({"url": "mock://publisher-logic"})
    encoders = {"lab": make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)}
    return Publisher(producer, encoders, TopicNames(), "H001", timeout)


def h001_labs(count: int) -> list[dict[str, Any]]:
    labs = [r for r in simulate_labs(seed=5, count=count * 4) if r["envelope"]["institution_id"] == "H001"]
    assert len(labs) >= count
    return labs[:count]


def test_a_full_local_queue_applies_back_pressure_and_loses_nothing() -> None:
    producer = FakeProducer(capacity=3)
    results = publisher(producer).publish_many_labs(h001_labs(10))
    assert producer.buffer_errors > 0, "the queue really filled up"
    assert all(isinstance(r, Receipt) for r in results)
    assert len(producer.sent) == 10


def test_results_line_up_with_input_and_failures_are_reported_per_event() -> None:
    producer = FakeProducer(
        fail=lambda n: FakeError("Broker: Not enough in-sync replicas", True) if n == 2 else None
    )
    records = h001_labs(5)
    results = publisher(producer).publish_many_labs(records)
    assert [type(r).__name__ for r in results] == [
        "Receipt",
        "Receipt",
        "DeliveryFailedError",
        "Receipt",
        "Receipt",
    ]
    failure = results[2]
    assert isinstance(failure, DeliveryFailedError)
    assert failure.event_id == records[2]["envelope"]["event_id"]
    assert failure.retriable and "in-sync" in failure.reason


def test_publish_raises_when_the_broker_does_not_accept() -> None:
    producer = FakeProducer(fail=lambda _n: FakeError("Broker: Topic authorization failed", False))
    with pytest.raises(DeliveryFailedError) as caught:
        publisher(producer).publish_lab(h001_labs(1)[0])
    assert not caught.value.retriable


def test_no_delivery_report_within_the_timeout_is_an_error_not_a_hang() -> None:
    producer = FakeProducer()
    producer.deliver = False
    results = publisher(producer, timeout=0.2).publish_many_labs(h001_labs(2))
    assert all(isinstance(r, DeliveryFailedError) and r.retriable for r in results)


def test_close_lists_events_still_undelivered() -> None:
    producer = FakeProducer()
    pub = publisher(producer, timeout=0.2)
    producer.deliver = False
    records = h001_labs(3)
    pub.publish_many_labs(records)
    with pytest.raises(UndeliveredOnCloseError) as caught:
        pub.close(timeout=0.1)
    assert set(caught.value.event_ids) == {r["envelope"]["event_id"] for r in records}


def test_one_invalid_record_means_nothing_of_the_batch_is_sent() -> None:
    producer = FakeProducer()
    records = h001_labs(4)
    broken = copy.deepcopy(records[3])
    broken["result_time"] = "yesterday"
    with pytest.raises(RecordValidationError) as caught:
        publisher(producer).publish_many_labs([*records[:3], broken])
    assert caught.value.field == "result_time"
    assert producer.sent == [] and producer.queue == []


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("envelope", "event_id"), "not-a-uuid", "envelope.event_id"),
        (("envelope", "correlation_id"), "  ", "envelope.correlation_id"),
        (("patient_mrn",), "", "patient_mrn"),
        (("result_id",), " ", "result_id"),
        (("envelope", "institution_id"), "H002", "envelope.institution_id"),
    ],
)
def test_rules_beyond_the_schema_name_the_field(path: tuple[str, ...], value: Any, field: str) -> None:
    record = copy.deepcopy(h001_labs(1)[0])
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(RecordValidationError) as caught:
        publisher(FakeProducer()).validate("lab", record)
    assert caught.value.field == field
    assert repr(value) in str(caught.value)


def test_naive_datetimes_are_refused_as_ambiguous() -> None:
    record = copy.deepcopy(h001_labs(1)[0])
    record["specimen_collected_time"] = record["result_time"].replace(tzinfo=None)
    with pytest.raises(RecordValidationError) as caught:
        publisher(FakeProducer()).validate("lab", record)
    assert caught.value.field == "specimen_collected_time"


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(RecordValidationError) as caught:
        publisher(FakeProducer()).publish("x-ray", h001_labs(1)[0])
    assert caught.value.field == "kind"


@pytest.mark.parametrize(
    ("comparator", "value", "field"),
    [("~", 600.0, "value_comparator"), ("=>", 600.0, "value_comparator"), (">", None, "value_numeric")],
)
def test_a_bound_needs_a_known_comparator_and_its_number(
    comparator: str, value: float | None, field: str
) -> None:
    record = copy.deepcopy(h001_labs(1)[0])
    record.update(value_comparator=comparator, value_numeric=value)
    with pytest.raises(RecordValidationError) as caught:
        publisher(FakeProducer()).validate("lab", record)
    assert caught.value.field == field


@pytest.mark.parametrize("comparator", ["<", "<=", ">=", ">"])
def test_a_bound_above_or_below_the_measuring_range_is_publishable(comparator: str) -> None:
    record = copy.deepcopy(h001_labs(1)[0])
    record.update(value_comparator=comparator, value_numeric=600.0)
    publisher(FakeProducer()).validate("lab", record)


class FakeTransactionalProducer(FakeProducer):
    """FakeProducer with librdkafka's transaction calls; `commit_error` makes the commit fail."""

    def __init__(self, commit_error: Exception | None = None, abort_error: Exception | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.commit_error, self.abort_error = commit_error, abort_error

    def init_transactions(self, _timeout: float) -> None:
        self.calls.append("init")

    def begin_transaction(self) -> None:
        self.calls.append("begin")

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append("commit")
        if self.commit_error is not None:
            raise self.commit_error
        self.poll(1)

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append("abort")
        self.queue.clear()
        if self.abort_error is not None:
            raise self.abort_error

    def purge(self) -> None:
        self.calls.append("purge")
        self.queue.clear()


def transactional_publisher(made: list[FakeTransactionalProducer], **errors: Any) -> Publisher:
    def make() -> FakeTransactionalProducer:
        made.append(FakeTransactionalProducer(**errors))
        return made[-1]

    registry = ConfluentRegistry({"url": "mock://publisher-logic"})
    encoders = {"lab": make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)}
    return Publisher(FakeProducer(), encoders, TopicNames(), "H001", 1.0, TransactionalProducer(make, 1.0))


def test_publish_atomically_sends_every_event_in_one_committed_transaction() -> None:
    made: list[FakeTransactionalProducer] = []
    publisher = transactional_publisher(made)
    events = [("lab", record) for record in h001_labs(3)]
    receipts = publisher.publish_atomically(events)
    assert [r.event_id for r in receipts] == [str(r["envelope"]["event_id"]) for _k, r in events]
    assert len(made) == 1 and made[0].calls == ["init", "begin", "commit"] and len(made[0].sent) == 3
    publisher.publish_atomically(events[:1])
    assert made[0].calls[3:] == ["begin", "commit"], "transactions are initialised once"


def test_a_transaction_not_committed_is_aborted_and_reported_as_retriable() -> None:
    made: list[FakeTransactionalProducer] = []
    timeout = KafkaException(KafkaError(KafkaError._TIMED_OUT, "commit timed out"))
    publisher = transactional_publisher(made, commit_error=timeout)
    events = [("lab", record) for record in h001_labs(2)]
    with pytest.raises(TransactionFailedError) as failed:
        publisher.publish_atomically(events)
    assert failed.value.retriable and failed.value.event_ids == [
        str(r["envelope"]["event_id"]) for _k, r in events
    ]
    assert made[0].calls == ["init", "begin", "commit", "abort"] and made[0].sent == []


def test_a_producer_that_cannot_abort_is_purged_and_replaced() -> None:
    made: list[FakeTransactionalProducer] = []
    away = KafkaException(KafkaError(KafkaError._TRANSPORT, "broker away"))
    publisher = transactional_publisher(made, commit_error=away, abort_error=away)
    events = [("lab", record) for record in h001_labs(1)]
    with pytest.raises(TransactionFailedError):
        publisher.publish_atomically(events)
    assert made[0].calls[-2:] == ["abort", "purge"]
    with pytest.raises(TransactionFailedError):
        publisher.publish_atomically(events)
    assert len(made) == 2 and made[1].calls[0] == "init", "a new producer fences the old one"


def test_one_invalid_record_means_no_transaction_is_begun() -> None:
    made: list[FakeTransactionalProducer] = []
    publisher = transactional_publisher(made)
    good, bad = h001_labs(2)
    bad = copy.deepcopy(bad)
    bad["envelope"]["institution_id"] = "H002"
    with pytest.raises(RecordValidationError):
        publisher.publish_atomically([("lab", good), ("lab", bad)])
    assert made == [], "validated before any producer is made"


class NamedError(FakeError):
    """A librdkafka error with its name, as error_cb and delivery reports give it."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text, retriable=False)
        self._name = name

    def name(self) -> str:
        return self._name


class PurgingProducer(FakeProducer):
    def purge(self, in_queue: bool = True, in_flight: bool = True) -> None:
        self.queue.clear()


def test_a_refused_password_fails_every_waiting_event_at_once_and_sends_none_later() -> None:
    """librdkafka reports a wrong password only to error_cb; without it the events would time out."""
    producer = PurgingProducer()
    producer.deliver = False  # nothing is delivered: the broker refused the connection
    errors = ClientErrors("H001")
    registry = ConfluentRegistry({"url": "mock://publisher-logic"})
    encoders = {"lab": make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)}
    refusing = Publisher(producer, encoders, TopicNames(), "H001", 60.0, errors=errors)
    errors(NamedError("_AUTHENTICATION", "SASL authentication error: invalid credentials"))
    started = time.monotonic()
    results = refusing.publish_many_labs(h001_labs(3))
    assert time.monotonic() - started < 5, "not the 60 s delivery timeout"
    assert all(isinstance(r, AccessRefusedError) and not r.retriable for r in results)
    assert isinstance(results[0], AccessRefusedError) and results[0].principal == "H001"
    assert "invalid credentials" in str(results[0]) and producer.queue == [], "purged, never sent later"


def test_a_topic_the_principal_may_not_write_is_a_typed_refusal_naming_principal_and_topic() -> None:
    denied = NamedError("TOPIC_AUTHORIZATION_FAILED", "Broker: Topic authorization failed")
    producer = FakeProducer(fail=lambda _n: denied)
    errors = ClientErrors("H001")
    registry = ConfluentRegistry({"url": "mock://publisher-logic"})
    encoders = {"lab": make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)}
    with pytest.raises(AccessRefusedError) as refused:
        Publisher(producer, encoders, TopicNames(), "H001", 2.0, errors=errors).publish_lab(h001_labs(1)[0])
    assert (refused.value.principal, refused.value.topic) == ("H001", "raw.H001.lab")
    assert isinstance(refused.value.refused, KafkaAuthorizationError)


# The stream: publish without waiting for each confirmation, a bounded number in flight.


class CountingProducer(FakeProducer):
    """Records how many events waited for their report at the most."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.peak_queue = 0

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any, on_delivery: Any) -> None:
        super().produce(topic, value, key, headers, on_delivery)
        self.peak_queue = max(self.peak_queue, len(self.queue))


def test_a_stream_sends_without_waiting_and_confirms_every_event() -> None:
    producer = CountingProducer()
    stream = publisher(producer).stream(max_in_flight=100)
    for record in h001_labs(20):
        stream.send("lab", record)
    assert stream.in_flight == 20 and producer.sent == [], "nothing waited for a confirmation"
    outcome = stream.close()
    assert (outcome.sent, outcome.confirmed, outcome.failures, outcome.ok) == (20, 20, [], True)
    assert len(producer.sent) == 20


def test_a_stream_keeps_at_most_max_in_flight_waiting() -> None:
    producer = CountingProducer()
    stream = publisher(producer).stream(max_in_flight=4)
    for record in h001_labs(15):
        stream.send("lab", record)
        assert stream.in_flight <= 4
    assert producer.peak_queue <= 4
    assert stream.close().confirmed == 15


def test_a_stream_counts_and_reports_each_failure_and_every_result() -> None:
    producer = FakeProducer(
        fail=lambda n: FakeError("Broker: Not enough in-sync replicas", True) if n in (1, 3) else None
    )
    records = h001_labs(6)
    seen: list[Receipt | DeliveryFailedError] = []
    stream = publisher(producer).stream(max_in_flight=2, on_result=seen.append)
    for record in records:
        stream.send("lab", record)
    outcome = stream.close()
    assert (outcome.sent, outcome.confirmed, outcome.ok) == (6, 4, False)
    assert [f.event_id for f in outcome.failures] == [
        records[1]["envelope"]["event_id"],
        records[3]["envelope"]["event_id"],
    ]
    assert all(f.retriable for f in outcome.failures)
    assert len(seen) == 6


def test_a_full_local_queue_under_a_stream_loses_nothing() -> None:
    producer = FakeProducer(capacity=3)
    stream = publisher(producer).stream(max_in_flight=50)
    for record in h001_labs(12):
        stream.send("lab", record)
    assert producer.buffer_errors > 0, "the queue really filled up"
    assert stream.close().confirmed == 12 and len(producer.sent) == 12


def test_a_stream_whose_reports_never_come_fails_them_at_close_not_silently() -> None:
    producer = FakeProducer()
    producer.deliver = False
    records = h001_labs(3)
    stream = publisher(producer).stream()
    for record in records:
        stream.send("lab", record)
    outcome = stream.close(timeout=0.2)
    assert (outcome.confirmed, len(outcome.failures)) == (0, 3)
    assert {f.event_id for f in outcome.failures} == {r["envelope"]["event_id"] for r in records}
    assert all(f.retriable and "timeout" in f.reason for f in outcome.failures)
    with pytest.raises(RuntimeError, match="closed"):
        stream.send("lab", records[0])


def test_an_invalid_record_is_refused_by_send_and_never_counted_as_sent() -> None:
    producer = FakeProducer()
    stream = publisher(producer).stream()
    bad = copy.deepcopy(h001_labs(1)[0])
    bad["envelope"]["institution_id"] = "H002"
    with pytest.raises(RecordValidationError):
        stream.send("lab", bad)
    assert stream.close().sent == 0 and producer.sent == []


def test_a_refused_password_fails_a_streams_waiting_and_later_events_and_sends_none() -> None:
    producer = PurgingProducer()
    producer.deliver = False
    errors = ClientErrors("H001")
    registry = ConfluentRegistry({"url": "mock://publisher-logic"})
    encoders = {"lab": make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)}
    stream = Publisher(producer, encoders, TopicNames(), "H001", 60.0, errors=errors).stream()
    records = h001_labs(4)
    for record in records[:2]:
        stream.send("lab", record)
    errors(NamedError("_AUTHENTICATION", "SASL authentication error: invalid credentials"))
    for record in records[2:]:
        stream.send("lab", record)
    started = time.monotonic()
    outcome = stream.close()
    assert time.monotonic() - started < 5, "not the 60 s delivery timeout"
    assert (outcome.sent, outcome.confirmed, len(outcome.failures)) == (4, 0, 4)
    assert all(isinstance(f, AccessRefusedError) and f.principal == "H001" for f in outcome.failures)
    assert producer.queue == [], "purged, never sent later"

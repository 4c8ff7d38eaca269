"""KafkaOutputs over a stand-in producer: a call returns only when every delivery report is in."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Collection
from typing import Any

import pytest
from confluent_kafka import KafkaError

from core.exceptions import KafkaAuthenticationError, KafkaAuthorizationError
from core.kafka_errors import ClientErrors
from streams.exceptions import OutputDeliveryError
from streams.runtime.outputs import KafkaOutputs, Output


class _Message:
    def __init__(self, topic: str) -> None:
        self._topic = topic

    def topic(self) -> str:
        return self._topic


class FakeProducer:
    """Queues messages; poll() reports them, failing those whose topic is in `failing`."""

    def __init__(self, failing: Collection[str] = (), queue_limit: int = 1000) -> None:
        self.failing = failing
        self.queue_limit = queue_limit
        self.refuse_topic: str | None = None
        self.queued: list[tuple[str, bytes | None, bytes, Callable[[Any, Any], None]]] = []
        self.delivered: list[tuple[str, bytes | None, bytes, list[tuple[str, bytes]]]] = []
        self.buffer_errors = 0
        self._lock = threading.Lock()

    def produce(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        on_delivery: Callable[[Any, Any], None],
    ) -> None:
        if topic == self.refuse_topic:
            raise ValueError("message too large")
        with self._lock:
            if len(self.queued) >= self.queue_limit:
                self.buffer_errors += 1
                raise BufferError("queue full")
            self.queued.append((topic, key, value, on_delivery))
            self.delivered.append((topic, key, value, headers))

    def poll(self, timeout: float) -> int:
        with self._lock:
            batch, self.queued = self.queued, []
        for topic, _key, _value, report in batch:
            report("broker said no" if topic in self.failing else None, _Message(topic))
        if not batch:
            threading.Event().wait(min(timeout, 0.01))
        return len(batch)

    def flush(self, timeout: float) -> int:
        self.poll(0)
        return 0


def outputs(n: int, topic: str = "norm.lab") -> list[Output]:
    return [Output(topic, f"k{i}".encode(), f"v{i}".encode(), {"correlation_id": b"c"}) for i in range(n)]


def test_a_call_returns_once_every_message_is_delivered() -> None:
    producer = FakeProducer()
    sink = KafkaOutputs(producer, poll_seconds=0.01)
    asyncio.run(sink.publish(outputs(50)))
    assert [(t, k, v) for t, k, v, _ in producer.delivered] == [
        (o.topic, o.key, o.value) for o in outputs(50)
    ]
    assert producer.delivered[0][3] == [("correlation_id", b"c")]
    assert sink.close() == 0


def test_a_refused_delivery_fails_the_whole_call_naming_the_topic() -> None:
    sink = KafkaOutputs(FakeProducer(failing={"alerts.critical"}), poll_seconds=0.01)
    with pytest.raises(OutputDeliveryError) as caught:
        asyncio.run(sink.publish([*outputs(3), *outputs(2, "alerts.critical")]))
    assert caught.value.topic == "alerts.critical"
    assert caught.value.failed == 2
    assert "broker said no" in caught.value.reason


def test_a_full_local_queue_waits_for_deliveries_instead_of_failing() -> None:
    producer = FakeProducer(queue_limit=10)
    sink = KafkaOutputs(producer, poll_seconds=0.01)
    asyncio.run(sink.publish(outputs(100)))
    assert len(producer.delivered) == 100
    assert producer.buffer_errors > 0


def test_a_message_produce_refuses_fails_the_call_after_the_queued_ones_are_reported() -> None:
    producer = FakeProducer()
    producer.refuse_topic = "deadletter"
    sink = KafkaOutputs(producer, poll_seconds=0.01)
    with pytest.raises(OutputDeliveryError) as caught:
        asyncio.run(sink.publish([*outputs(5), *outputs(3, "deadletter")]))
    assert caught.value.topic == "deadletter"
    assert "message too large" in caught.value.reason
    assert len(producer.delivered) == 5


def test_nothing_to_publish_returns_at_once_without_starting_the_poll_thread() -> None:
    sink = KafkaOutputs(FakeProducer())
    asyncio.run(sink.publish([]))
    assert sink._thread is None


class RefusingProducer(FakeProducer):
    """Reports a delivery to a topic the principal may not write as the broker does."""

    def poll(self, timeout: float) -> int:
        with self._lock:
            batch, self.queued = self.queued, []
        for topic, _key, _value, report in batch:
            denied = topic in self.failing
            report(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED) if denied else None, _Message(topic))
        if not batch:
            threading.Event().wait(min(timeout, 0.01))
        return len(batch)


class SilentProducer(FakeProducer):
    """A producer whose password is refused: librdkafka reports nothing until the delivery timeout."""

    def poll(self, timeout: float) -> int:
        threading.Event().wait(min(timeout, 0.01))
        return 0


def test_a_delivery_the_broker_refuses_the_principal_is_the_typed_refusal_not_an_outage() -> None:
    sink = KafkaOutputs(RefusingProducer(failing={"norm.lab"}), poll_seconds=0.01, principal="normaliser")
    with pytest.raises(KafkaAuthorizationError) as refused:
        asyncio.run(sink.publish([*outputs(2, "deadletter"), *outputs(2)]))
    assert (refused.value.principal, refused.value.topic) == ("normaliser", "norm.lab")
    assert not isinstance(refused.value, OutputDeliveryError), "an outage is retried; a refusal is not"


def test_a_refused_password_fails_a_waiting_call_instead_of_waiting_for_the_delivery_timeout() -> None:
    errors = ClientErrors("normaliser")
    sink = KafkaOutputs(SilentProducer(), poll_seconds=0.01, principal="normaliser", errors=errors)

    async def scenario() -> None:
        call = asyncio.create_task(sink.publish(outputs(3)))
        await asyncio.sleep(0.1)
        assert not call.done(), "nothing counts yet"
        errors(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials"))
        await asyncio.wait_for(call, 5)

    with pytest.raises(KafkaAuthenticationError) as refused:
        asyncio.run(scenario())
    assert refused.value.principal == "normaliser"


def test_the_workers_producer_lingers_the_stage_setting_not_the_sdks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stage's burst batches itself; a linger would only delay its confirmation (twice a batch)."""
    import confluent_kafka

    from core.settings import KafkaSettings
    from streams.runtime.outputs import make_outputs

    made: list[dict[str, Any]] = []

    class RecordingProducer:
        def __init__(self, config: dict[str, Any]) -> None:
            made.append(config)

    monkeypatch.setattr(confluent_kafka, "Producer", RecordingProducer)
    kafka = KafkaSettings(security_protocol="PLAINTEXT", producer_linger_ms=7, stage_producer_linger_ms=0.5)
    make_outputs(kafka)
    assert [config["linger.ms"] for config in made] == [0.5]
    assert KafkaSettings(security_protocol="PLAINTEXT").stage_producer_linger_ms == 1.0

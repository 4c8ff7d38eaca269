"""A running worker that Kafka refuses stops typed, whichever of its clients meets the refusal: Faust's
consumer, the group probes of its timers, and the access watch's new connections."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import errors as aio
from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

from core.exceptions import KafkaAuthenticationError, KafkaAuthorizationError
from core.kafka_errors import ClientErrors
from streams.metrics import StreamMetrics, make_stream_metrics
from streams.runtime import topics
from streams.runtime.access import _refusals_reported_consumer, reporting
from streams.runtime.stage import StageHealth
from streams.runtime.stalls import GroupPositions
from streams.runtime.timers import AccessWatch


def health_of(*stages: str) -> tuple[StageHealth, StreamMetrics]:
    metrics = make_stream_metrics(CollectorRegistry())
    health = StageHealth(metrics)
    for stage in stages:
        health.running(stage)
    return health, metrics


class FetchingConsumer:
    """What Faust's consumer does in `_getmany`: ask aiokafka, which raises what it met."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error

    async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
        if self.error is not None:
            raise self.error
        return {"tp": ["record"]}


def test_faust_fetching_a_refused_topic_raises_the_typed_refusal_and_reports_the_stages_down() -> None:
    health, metrics = health_of("normaliser", "clinical")
    consumer = _refusals_reported_consumer(FetchingConsumer, "worker", health)(
        aio.TopicAuthorizationFailedError("t.raw.H001.lab")
    )
    with pytest.raises(KafkaAuthorizationError) as refused:
        asyncio.run(consumer._getmany(None, 1.0))
    assert (refused.value.principal, refused.value.topic) == ("worker", "t.raw.H001.lab")
    assert isinstance(refused.value.__cause__, aio.TopicAuthorizationFailedError)
    assert health.refused is refused.value
    assert metrics.stage_up.labels(stage="clinical")._value.get() == 0


def test_faust_fetching_through_an_outage_raises_what_it_raised_and_reports_nothing() -> None:
    health, _metrics = health_of("normaliser")
    consumer = _refusals_reported_consumer(FetchingConsumer, "worker", health)(aio.KafkaConnectionError("x"))
    with pytest.raises(aio.KafkaConnectionError):
        asyncio.run(consumer._getmany(None, 1.0))
    assert health.refused is None and health.is_up("normaliser")
    assert asyncio.run(
        _refusals_reported_consumer(FetchingConsumer, "w", health)(None)._getmany(None, 1)
    ) == {"tp": ["record"]}


def test_a_timer_meeting_a_refusal_reports_it_and_raises_it_for_faust_to_stop_the_worker() -> None:
    health, metrics = health_of("store")

    async def tick() -> None:
        raise KafkaAuthorizationError("store", "GROUP_AUTHORIZATION_FAILED", group="hub-sink")

    with pytest.raises(KafkaAuthorizationError):
        asyncio.run(reporting(health, tick)())
    assert health.refused is not None and health.refused.group == "hub-sink"
    assert metrics.stage_up.labels(stage="store")._value.get() == 0


class FakeProbe:
    """GroupPositions' probe consumer, answering as a broker that refuses the group."""

    def __init__(self, code: int) -> None:
        self.code = code

    def committed(self, _partitions: list[Any], timeout: float) -> list[Any]:
        raise KafkaException(KafkaError(self.code, "Failed to get committed offsets"))

    def close(self) -> None:
        return None


def test_the_group_probe_tells_a_refused_group_from_an_outage() -> None:
    positions = GroupPositions({"sasl.username": "store"}, "hub-sink")
    positions._probe = FakeProbe(KafkaError.GROUP_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaAuthorizationError) as refused:
        positions.read([("t.norm.lab", 0)])
    assert (refused.value.principal, refused.value.group) == ("store", "hub-sink")
    positions._probe = FakeProbe(KafkaError._TIMED_OUT)
    with pytest.raises(KafkaException):  # the timers wait for the next tick
        positions.read([("t.norm.lab", 0)])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refused_password(_config: Any, errors: ClientErrors) -> bool:
    """A new connection whose password the broker refuses: the error callback hears it, no answer."""
    errors(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials"))
    return False


def test_the_access_watch_stops_the_worker_once_a_refused_password_has_lasted() -> None:
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    watch = AccessWatch({}, errors, probe=refused_password)
    asyncio.run(watch.tick())  # a broker that has just started may not know the password yet
    clock.now += 10.0
    with pytest.raises(KafkaAuthenticationError) as refused:
        asyncio.run(watch.tick())
    assert refused.value.principal == "worker"


def test_the_access_watch_rides_out_an_outage_and_a_moment_of_refusal() -> None:
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    outcomes = [refused_password, lambda _c, _e: False, lambda _c, e: e.succeeded() or True, refused_password]
    watch = AccessWatch({}, errors, probe=lambda config, e: outcomes.pop(0)(config, e))
    for _ in range(4):
        asyncio.run(watch.tick())
        clock.now += 10.0
    assert errors.refused is None


def test_the_access_watch_stops_the_worker_on_a_refusal_another_client_met() -> None:
    errors = ClientErrors("worker", patience=10.0, clock=Clock())
    errors(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))  # e.g. the outputs' producer
    with pytest.raises(KafkaAuthorizationError):
        asyncio.run(AccessWatch({}, errors, probe=lambda _c, _e: True).tick())


class FakeAdmin:
    """An AdminClient whose connection is refused (`refuse`) or answers."""

    refuse = True

    def __init__(self, config: dict[str, Any]) -> None:
        self.error_cb = config["error_cb"]

    def list_topics(self, timeout: float) -> Any:
        if FakeAdmin.refuse:
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Failed to get metadata"))

        class Listed:
            topics: dict[str, Any] = {}

        return Listed()

    def poll(self, _timeout: float) -> int:
        self.error_cb(KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error"))
        return 0


def test_a_new_connection_tells_whether_the_principal_still_authenticates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import confluent_kafka.admin

    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", FakeAdmin)
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    FakeAdmin.refuse = True
    assert topics.authenticates({}, errors, timeout=0.0) is False  # refused, not for long enough yet
    FakeAdmin.refuse = False
    clock.now += 9.0
    assert topics.authenticates({}, errors, timeout=0.0) is True
    FakeAdmin.refuse = True
    clock.now += 9.0
    assert topics.authenticates({}, errors, timeout=0.0) is False  # a new run began after the success
    clock.now += 10.0
    with pytest.raises(KafkaAuthenticationError):
        topics.authenticates({}, errors, timeout=0.0)

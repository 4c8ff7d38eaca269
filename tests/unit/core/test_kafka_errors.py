"""Refusals told from outages in both clients' errors, and when a refused password counts."""

from __future__ import annotations

import pytest
from aiokafka import errors as aio
from confluent_kafka import KafkaError, KafkaException

from core.exceptions import KafkaAccessError, KafkaAuthenticationError, KafkaAuthorizationError
from core.kafka_errors import ClientErrors, refusal, refusal_in


def librdkafka(code: int, text: str = "broker said so") -> KafkaException:
    return KafkaException(KafkaError(code, text))


def test_a_refused_topic_names_the_principal_and_the_topic() -> None:
    refused = refusal(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), "store", "t.norm.lab", "g")
    assert isinstance(refused, KafkaAuthorizationError)
    assert (refused.principal, refused.topic, refused.group) == ("store", "t.norm.lab", None)
    assert str(refused).startswith("Kafka refused principal store on t.norm.lab: ")


def test_a_refused_group_names_the_group_when_it_is_known() -> None:
    refused = refusal(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED), "store", "t.norm.lab", "hub-sink")
    assert isinstance(refused, KafkaAuthorizationError)
    assert (refused.topic, refused.group) == (None, "hub-sink")
    assert "on group hub-sink" in str(refused)


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TIMED_OUT,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    ],
)
def test_an_outage_is_no_refusal(code: int) -> None:
    assert refusal(KafkaError(code), "store") is None
    assert refusal_in(librdkafka(code), "store") is None


@pytest.mark.parametrize(
    ("error", "kind", "topic", "group"),
    [
        (librdkafka(KafkaError._AUTHENTICATION), KafkaAuthenticationError, "asked", None),
        (librdkafka(KafkaError.TOPIC_AUTHORIZATION_FAILED), KafkaAuthorizationError, "asked", None),
        (librdkafka(KafkaError.GROUP_AUTHORIZATION_FAILED), KafkaAuthorizationError, None, "asked-group"),
        (aio.TopicAuthorizationFailedError("t.raw.H1.lab"), KafkaAuthorizationError, "t.raw.H1.lab", None),
        (aio.TopicAuthorizationFailedError({"t.b", "t.a"}), KafkaAuthorizationError, "t.a, t.b", None),
        (aio.GroupAuthorizationFailedError("hub"), KafkaAuthorizationError, None, "hub"),
        (aio.ClusterAuthorizationFailedError(), KafkaAuthorizationError, "asked", None),
        (aio.TransactionalIdAuthorizationFailed("fhir-1"), KafkaAuthorizationError, "asked", None),
        (aio.SaslAuthenticationFailed("invalid credentials"), KafkaAuthenticationError, "asked", None),
        (aio.AuthenticationFailedError("server signature"), KafkaAuthenticationError, "asked", None),
    ],
)
def test_either_clients_refusal_becomes_the_typed_error_naming_the_principal(
    error: Exception, kind: type[KafkaAccessError], topic: str | None, group: str | None
) -> None:
    refused = refusal_in(error, "worker", topic="asked", group="asked-group")
    assert type(refused) is kind
    assert refused is not None
    assert (refused.principal, refused.topic, refused.group) == ("worker", topic, group)
    assert str(refused).startswith("Kafka refused principal worker")


@pytest.mark.parametrize(
    "error",
    [
        aio.KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 9092)]"),
        aio.NodeNotReadyError("node 1"),
        aio.RequestTimedOutError(),
        aio.NotCoordinatorForGroupError(),
        aio.CommitFailedError("already rebalanced"),
        aio.UnknownTopicOrPartitionError(),
        RuntimeError("a bug"),
        ValueError(),
    ],
)
def test_an_outage_or_a_bug_in_either_client_is_no_refusal(error: Exception) -> None:
    assert refusal_in(error, "worker") is None


def test_a_refusal_that_caused_another_error_is_found_and_a_typed_one_is_itself() -> None:
    typed = KafkaAuthorizationError("store", "TOPIC_AUTHORIZATION_FAILED", "t.norm.lab")
    assert refusal_in(typed, "someone else") is typed
    try:
        try:
            raise aio.GroupAuthorizationFailedError("hub")
        except aio.GroupAuthorizationFailedError as exc:
            raise RuntimeError("the fetcher crashed") from exc
    except RuntimeError as outer:
        found = refusal_in(outer, "worker")
    assert isinstance(found, KafkaAuthorizationError) and found.group == "hub"
    assert refusal_in(None, "worker") is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def authentication() -> KafkaError:
    return KafkaError(KafkaError._AUTHENTICATION, "SASL authentication error: invalid credentials")


def test_without_patience_a_refusal_counts_at_once() -> None:
    errors = ClientErrors("H001")
    errors(authentication())
    assert isinstance(errors.refused, KafkaAuthenticationError)
    with pytest.raises(KafkaAuthenticationError):
        errors.raise_if_refused()


def test_a_running_workers_refused_password_counts_once_it_has_lasted() -> None:
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    for _ in range(5):  # librdkafka's reconnects, a second or two apart
        errors(authentication())
        assert errors.refused is None
        clock.now += 2.0
    errors(authentication())
    assert isinstance(errors.refused, KafkaAuthenticationError)
    assert errors.refused.principal == "worker"
    errors.succeeded()
    assert errors.refused is not None, "a refusal that counted stays"


def test_a_new_connection_authenticating_ends_a_run_of_refused_passwords() -> None:
    """A broker just restarted may refuse a password until it has loaded its SCRAM credentials."""
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    errors(authentication())
    clock.now += 8.0
    errors.succeeded()  # the access watch's connection got in
    clock.now += 1.0
    errors(authentication())
    clock.now += 9.0
    errors(authentication())
    assert errors.refused is None


def test_refused_passwords_far_apart_are_separate_moments_not_one_lasting_refusal() -> None:
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    errors(authentication())  # a broker restart
    clock.now += 3600.0
    errors(authentication())  # the next one, an hour later
    assert errors.refused is None


def test_an_authorisation_refusal_counts_at_once_even_with_patience() -> None:
    errors = ClientErrors("worker", patience=10.0, clock=Clock())
    errors(KafkaError(KafkaError.GROUP_AUTHORIZATION_FAILED))
    assert isinstance(errors.refused, KafkaAuthorizationError)


def test_outages_reported_to_the_callback_are_ignored() -> None:
    clock = Clock()
    errors = ClientErrors("worker", patience=10.0, clock=clock)
    for _ in range(20):
        errors(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
        errors(KafkaError(KafkaError._ALL_BROKERS_DOWN))
        clock.now += 5.0
    assert errors.refused is None

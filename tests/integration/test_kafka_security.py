"""The secured broker, as every other test uses it: SASL_SSL with SCRAM only, one principal per
institution and per stage, ACLs for exactly their work, refusals typed and fast."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import TopicPartition as AIOTopicPartition
from aiokafka.errors import TopicAuthorizationFailedError
from aiokafka.helpers import create_ssl_context
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import SecretStr

from clinhub.provision import revoke_institution
from core import principals
from core.exceptions import KafkaAuthenticationError, KafkaAuthorizationError
from core.settings import HubSettings
from producers.exceptions import AccessRefusedError
from producers.publisher import make_publisher
from tests.factories import lab_record
from tests.integration.conftest import HubEnv

pytestmark = pytest.mark.integration


def as_only(hub: HubEnv, principal: str, password: SecretStr | None = None) -> HubSettings:
    """The hub's settings with one identity for every client (no per-component principals)."""
    kafka = hub.settings.kafka.for_principal(principal)
    if password is not None:
        kafka = kafka.model_copy(update={"sasl_password": password, "sasl_password_file": None})
    kafka = kafka.model_copy(update={"principal_secrets_dir": None})
    return hub.settings.model_copy(update={"kafka": kafka})


def end_offsets(hub: HubEnv, topic: str) -> int:
    """Messages on the topic (retried while a just-created topic's leaders settle)."""
    consumer = Consumer({**hub.settings.kafka.client_config(), "group.id": "offsets"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for attempt in range(20):
            try:
                ends = [
                    consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in partitions
                ]
                return sum(ends)
            except KafkaException:
                if attempt == 19:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def refused_delivery(config: dict[str, Any], topic: str) -> KafkaError:
    """What the broker answers to one message sent with `config`."""
    results: list[Any] = []
    producer = Producer({**config, "message.timeout.ms": 5000})
    producer.produce(topic, b"x", on_delivery=lambda err, _msg: results.append(err))
    producer.flush(15)
    assert results and results[0] is not None, "the broker accepted it"
    return results[0]


def test_a_plaintext_client_is_refused(hub: HubEnv) -> None:
    topic = hub.topics.raw("H001", "lab")
    before = end_offsets(hub, topic)
    plaintext = {"bootstrap.servers": hub.settings.kafka.bootstrap_servers, "security.protocol": "PLAINTEXT"}
    error = refused_delivery(plaintext, topic)
    assert error.code() in (KafkaError._MSG_TIMED_OUT, KafkaError._TRANSPORT), error
    assert end_offsets(hub, topic) == before


def test_a_wrong_password_is_a_typed_error_within_10_seconds(hub: HubEnv) -> None:
    wrong = as_only(hub, "H001", SecretStr("not-the-password"))
    publisher = make_publisher(wrong, "H001", delivery_timeout=60.0)
    started = time.monotonic()
    with pytest.raises(AccessRefusedError) as refused:
        publisher.publish("lab", lab_record("H001", "K", 4.0, "mmol/L"))
    assert time.monotonic() - started < 10
    assert isinstance(refused.value.refused, KafkaAuthenticationError)
    assert refused.value.principal == "H001" and "not-the-password" not in str(refused.value)


def test_connect_with_a_wrong_password_raises_the_typed_refusal(hub: HubEnv) -> None:
    wrong = as_only(hub, "H001", SecretStr("not-the-password"))
    with pytest.raises(KafkaAuthenticationError) as refused:
        make_publisher(wrong, "H001", delivery_timeout=60.0).connect(timeout=10)
    assert refused.value.principal == "H001" and "not-the-password" not in str(refused.value)


def test_a_worker_with_a_wrong_password_exits_non_zero_naming_its_principal(hub: HubEnv) -> None:
    env = {k: v for k, v in hub.env().items() if k != "CLINHUB_KAFKA_PRINCIPAL_SECRETS_DIR"}
    env.update({"CLINHUB_KAFKA_SASL_USERNAME": "worker", "CLINHUB_KAFKA_SASL_PASSWORD": "wrong-password"})
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "clinhub.cli", "stream", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=hub.workdir,
        check=False,
    )
    assert done.returncode != 0
    assert time.monotonic() - started < 30
    assert "Kafka refused principal worker" in done.stderr, done.stderr[-2000:]
    assert "wrong-password" not in done.stdout + done.stderr


def test_an_institution_may_not_publish_as_another_and_nothing_is_written(hub: HubEnv) -> None:
    h001_only = as_only(hub, "H001")
    topic = hub.topics.raw("H002", "lab")
    before = end_offsets(hub, topic)
    publisher = make_publisher(h001_only, "H002")  # H001's credentials, H002's topic
    with pytest.raises(AccessRefusedError) as refused:
        publisher.publish("lab", lab_record("H002", "K", 4.0, "mmol/L"))
    assert isinstance(refused.value.refused, KafkaAuthorizationError)
    assert (refused.value.principal, refused.value.topic) == ("H001", topic)
    assert "TOPIC_AUTHORIZATION_FAILED" in str(refused.value) or "authorization" in str(refused.value).lower()
    assert end_offsets(hub, topic) == before


@pytest.mark.parametrize("topic", ["norm.lab", "alerts.critical", "deadletter"])
def test_an_institution_may_not_even_see_the_hubs_topics(hub: HubEnv, topic: str) -> None:
    config = hub.settings.kafka.for_principal("H001").client_config()
    consumer = Consumer({**config, "group.id": "h001-metadata"})
    try:
        name = f"{hub.topics.prefix}{topic}"
        found = consumer.list_topics(name, timeout=10).topics[name]
    finally:
        consumer.close()
    assert found.error is not None and found.error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


def test_an_institution_may_not_read_back_even_its_own_raw_topic(hub: HubEnv) -> None:
    """It may write there (so it sees the topic); a fetch, without a group (as aiokafka allows, so that
    the topic's own ACL answers), is refused."""
    name = hub.topics.raw("H001", "lab")
    producer = hub.producer()
    producer.produce(name, b"x", partition=0)
    producer.flush(10)
    kafka = hub.settings.kafka.for_principal("H001")
    password = kafka.password()
    assert password is not None

    async def fetch() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers,
            security_protocol="SASL_SSL",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username="H001",
            sasl_plain_password=password.get_secret_value(),
            ssl_context=create_ssl_context(cafile=str(kafka.ssl_ca_location)),
            group_id=None,
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            consumer.assign([AIOTopicPartition(name, 0)])
            consumer.seek(AIOTopicPartition(name, 0), 0)
            got = await consumer.getmany(timeout_ms=10_000)
            assert not got, "H001 read its raw topic back"
        finally:
            await consumer.stop()

    with pytest.raises(TopicAuthorizationFailedError):
        asyncio.run(fetch())


@pytest.mark.parametrize("stage", [principals.NORMALISER, principals.CLINICAL, principals.STORE])
def test_a_stage_may_not_write_raw_topics(hub: HubEnv, stage: str) -> None:
    config = hub.settings.kafka.for_principal(stage).client_config()
    error = refused_delivery(config, hub.topics.raw("H001", "lab"))
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error


def test_a_revoked_institution_publishes_nothing_more(hub: HubEnv) -> None:
    institution = f"R{uuid.uuid4().hex[:5].upper()}"
    added = hub.add_institution(institution)
    own = as_only(hub, institution, SecretStr(added.password))
    publisher = make_publisher(own, institution)
    publisher.publish("lab", lab_record(institution, "K", 4.0, "mmol/L"))  # allowed before the revocation

    assert revoke_institution(hub.settings, institution) >= 1
    with pytest.raises(AccessRefusedError):  # the same, already authenticated connection
        publisher.publish("lab", lab_record(institution, "K", 4.1, "mmol/L"))
    with pytest.raises(AccessRefusedError) as refused:  # a new one
        make_publisher(own, institution, delivery_timeout=30.0).publish(
            "lab", lab_record(institution, "K", 4.2, "mmol/L")
        )
    assert isinstance(refused.value.refused, KafkaAuthenticationError)
    assert end_offsets(hub, hub.topics.raw(institution, "lab")) == 1

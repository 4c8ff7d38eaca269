"""Notifications on the real stack: an alert published on the alerts topic reaches a webhook receiver that
checks its signature, an escalation follows it, and republishing (or a restarted notifier reading again)
sends nothing new. Kafka, the registry and PostgreSQL are the session's (tests/integration/conftest.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import select

from console.domain.notify import DELIVERY_HEADER, SignatureRejectedError, delivery_id, verify_signature
from console.runtime.alert_source import notify_group
from console.runtime.notify import DELIVERED, Notifier, build_notifier
from core.contract import regional_key
from core.settings import ConsoleSettings
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.models import NotificationAttempt, NotificationDelivery
from tests import factories
from tests.integration.conftest import HubEnv

KEY = "the H001 receiver's signing key"
CHANNEL = "h001-icu-webhook"


class Receiver:
    """A hospital's webhook endpoint on a free loopback port: verifies each request, answers 204 or 401."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    verify_signature(body, self.headers, KEY, dt.datetime.now(dt.UTC))
                    verified = True
                except SignatureRejectedError:
                    verified = False
                with receiver.lock:
                    receiver.requests.append((self.headers[DELIVERY_HEADER], json.loads(body), verified))
                self.send_response(204 if verified else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/clinhub"

    def received(self) -> list[tuple[str, dict[str, Any], bool]]:
        with self.lock:
            return list(self.requests)


@pytest.fixture()
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.server.shutdown()
    server.server.server_close()


def alert_record() -> dict[str, Any]:
    """An alert as the clinical stage publishes it (uuid fields as text, as the encoder takes them)."""
    record = factories.alert_record(regional_patient_id="rp-9d41e0", correlation_id="corr-notify")
    return {**record, "alert_id": str(record["alert_id"]), "source_event_id": str(record["source_event_id"])}


def escalation_record(alert: dict[str, Any]) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    return {
        "escalation_id": str(uuid.uuid4()),
        "alert_id": alert["alert_id"],
        "regional_patient_id": alert["regional_patient_id"],
        "institution_id": alert["institution_id"],
        "level": 1,
        "recipient": "attending physician",
        "severity": alert["severity"],
        "message": alert["message"],
        "escalated_time": now,
        "next_deadline_time": now + dt.timedelta(minutes=15),
    }


def publish(hub: HubEnv, topic: str, schema: str, record: dict[str, Any]) -> None:
    encode = make_encoder(ConfluentRegistry(hub.settings.registry.client_config()), standard.load(schema))
    producer = hub.producer()
    producer.produce(topic, key=regional_key(record["regional_patient_id"]), value=encode(record))
    assert producer.flush(30) == 0


def notifier_for(hub: HubEnv, tmp_path: Path, registry: CollectorRegistry, url: str) -> Notifier:
    channels = tmp_path / "notifications.json"
    channels.write_text(
        json.dumps(
            {
                "channels": [
                    {
                        "name": CHANNEL,
                        "kind": "webhook",
                        "url": url,
                        "institutions": ["H001"],
                        "wards": ["ICU"],
                        "severities": ["CRITICAL"],
                        "events": ["alert", "escalation"],
                    }
                ]
            }
        )
    )
    console = ConsoleSettings(
        notifications_file=channels,
        webhook_secret=SecretStr(KEY),
        notify_timeout_seconds=2,
        notify_retry_max_seconds=1,
    )
    notifier = build_notifier(
        console,
        hub.settings.kafka,
        hub.settings.registry.client_config(),
        hub.topics,
        notify_group(hub.settings.stream.app_id),
        hub.engine,
        registry,
    )
    assert notifier is not None
    return notifier


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.2)


def stored(hub: HubEnv) -> dict[str, tuple[str, int]]:
    table = NotificationDelivery.__table__
    with hub.engine.connect() as connection:
        rows = connection.execute(select(table.c.delivery_id, table.c.status, table.c.attempts)).all()
    return {row.delivery_id: (row.status, row.attempts) for row in rows}


def attempt_count(hub: HubEnv) -> int:
    with hub.engine.connect() as connection:
        return len(connection.execute(select(NotificationAttempt.__table__)).all())


def test_an_alert_on_kafka_reaches_the_webhook_once_and_republishing_it_sends_nothing_new(
    hub: HubEnv, receiver: Receiver, tmp_path: Path
) -> None:
    group = notify_group(hub.settings.stream.app_id)
    alert = alert_record()
    alert_delivery = delivery_id(CHANNEL, alert["alert_id"], "alert", 0)
    escalation_delivery = delivery_id(CHANNEL, alert["alert_id"], "escalation", 1)
    publish(hub, hub.topics.alerts_topic, standard.CRITICAL_VALUE_ALERT, alert)  # before the notifier starts
    registry = CollectorRegistry()

    def caught_up() -> bool:
        return hub.caught_up(group, hub.topics.alerts_topic) and hub.caught_up(
            group, hub.topics.escalations_topic
        )

    async def first_run() -> None:
        notifier = notifier_for(hub, tmp_path, registry, receiver.url)
        await notifier.start()
        try:
            await eventually(lambda: len(receiver.received()) >= 1, 90, "the alert at the receiver")
            publish(hub, hub.topics.alerts_topic, standard.CRITICAL_VALUE_ALERT, alert)  # a replay
            publish(hub, hub.topics.escalations_topic, standard.ALERT_ESCALATION, escalation_record(alert))
            await eventually(lambda: len(receiver.received()) >= 2, 60, "the escalation at the receiver")
            await eventually(caught_up, 60, "the notifier's offsets committed at the end of both topics")
            await eventually(
                lambda: all(status == DELIVERED for status, _ in stored(hub).values()),
                30,
                "attempts recorded",
            )
            assert notifier.healthy
        finally:
            await notifier.stop()

    asyncio.run(first_run())
    received = receiver.received()
    assert [(d, verified) for d, _, verified in received] == [
        (alert_delivery, True),
        (escalation_delivery, True),
    ]
    first, escalated = received[0][1], received[1][1]
    assert (first["event"], first["alert_id"], first["ward"], first["value"]) == (
        "alert",
        alert["alert_id"],
        "ICU",
        6.9,
    )
    assert (escalated["event"], escalated["escalation_level"], escalated["escalation_recipient"]) == (
        "escalation",
        1,
        "attending physician",
    )
    assert escalated["analyte"] == "Potassium", (
        "the escalation carries its alert's facts (the store had none)"
    )
    assert stored(hub) == {alert_delivery: (DELIVERED, 1), escalation_delivery: (DELIVERED, 1)}
    assert (
        registry.get_sample_value(
            "clinhub_notification_attempts_total", {"channel": CHANNEL, "outcome": "delivered"}
        )
        == 2
    )

    # A restarted notifier resumes from its committed offsets, and a third copy of the alert is a replay too.
    publish(hub, hub.topics.alerts_topic, standard.CRITICAL_VALUE_ALERT, alert)

    async def second_run() -> None:
        notifier = notifier_for(hub, tmp_path, CollectorRegistry(), receiver.url)
        await notifier.start()
        try:
            await eventually(caught_up, 60, "the restarted notifier's offsets at the end")
        finally:
            await notifier.stop()

    asyncio.run(second_run())
    assert len(receiver.received()) == 2, "nothing new was sent"
    assert stored(hub) == {alert_delivery: (DELIVERED, 1), escalation_delivery: (DELIVERED, 1)}
    assert attempt_count(hub) == 2

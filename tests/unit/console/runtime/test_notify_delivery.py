"""Notifications, runtime, against real local servers: a webhook receiver that checks signatures as a
hospital's would, an SMTP server (aiosmtpd), a receiver that refuses connections and one that hangs.

The outbox is the migrated store (SQLite); the alert source is driven by a stand-in consumer here (the
real broker is in tests/integration/console/test_notify_kafka.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email
import email.policy
import itertools
import json
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from sqlalchemy import Engine, func, insert, select

from console.domain.notify import (
    DELIVERY_HEADER,
    Notice,
    RetryPolicy,
    SignatureRejectedError,
    delivery_id,
    notice_from_alert,
    parse_notification_config,
    verify_signature,
)
from console.runtime.alert_source import AlertSource, SourceRecord, notify_group
from console.runtime.notify import (
    DELIVERED,
    FAILED,
    PENDING,
    AttemptResult,
    Notifier,
    build_notifier,
    delivery_overview,
    make_notifier,
    make_notify_metrics,
)
from core.contract import TopicNames
from core.exceptions import ConfigurationError
from core.settings import ConsoleSettings, KafkaSettings
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.exceptions import StoreUnavailableError
from sinks.models import Alert, NotificationAttempt, NotificationDelivery
from sinks.store import make_engine, upgrade
from tests import factories

SECRET = "receiver key: 32 random bytes in real life"  # noqa: S105 - a test key
FAST = RetryPolicy(max_attempts=3, max_delay_seconds=0.4, first_delay_seconds=0.2)
NOW = dt.datetime.now(dt.UTC)


# --- real local servers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    delivery_id: str
    body: bytes
    verified: bool
    time: float


class WebhookReceiver:
    """An HTTP receiver on a free loopback port that verifies each request with verify_signature; it can
    answer 503 to the first requests, or hang (accept and never answer)."""

    def __init__(self, secret: str = SECRET, fail_first: int = 0, hang: bool = False) -> None:
        self.secret, self.fail_first, self.hang = secret, fail_first, hang
        self.requests: list[Received] = []
        self.lock = threading.Lock()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.hang:
                    receiver.release.wait(30)
                    return
                try:
                    verify_signature(body, self.headers, receiver.secret, dt.datetime.now(dt.UTC))
                    verified = True
                except SignatureRejectedError:
                    verified = False
                with receiver.lock:
                    receiver.requests.append(
                        Received(self.headers[DELIVERY_HEADER], body, verified, time.monotonic())
                    )
                    answered = len(receiver.requests)
                status = 401 if not verified else 503 if answered <= receiver.fail_first else 204
                self.send_response(status)
                if status == 503:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks/clinhub"

    def delivery_ids(self) -> list[str]:
        with self.lock:
            return [r.delivery_id for r in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """aiosmtpd's handler: keeps every message it is given."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], email.message.EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        parsed = email.message_from_bytes(envelope.content, policy=email.policy.default)
        self.messages.append((list(envelope.rcpt_tos), parsed))
        return "250 OK"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture()
def receiver() -> Iterator[WebhookReceiver]:
    server = WebhookReceiver()
    yield server
    server.close()


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")
    upgrade(engine)
    yield engine
    engine.dispose()


# --- helpers -----------------------------------------------------------------------------------------------


def alert_record(**changes: Any) -> dict[str, Any]:
    """A CriticalValueAlert as fastavro decodes it, raised just now."""
    return factories.alert_record(**changes)


def escalation_record(alert: dict[str, Any], level: int = 1) -> dict[str, Any]:
    return {
        "escalation_id": uuid.uuid4(),
        "alert_id": alert["alert_id"],
        "regional_patient_id": alert["regional_patient_id"],
        "institution_id": alert["institution_id"],
        "level": level,
        "recipient": "attending physician",
        "severity": alert["severity"],
        "message": alert["message"],
        "escalated_time": dt.datetime.now(dt.UTC).replace(microsecond=0),
        "next_deadline_time": dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=15),
    }


def webhook(name: str, url: str, **changes: Any) -> dict[str, Any]:
    return {"name": name, "kind": "webhook", "url": url, "institutions": ["H001"], **changes}


def console_settings(**changes: Any) -> ConsoleSettings:
    values: dict[str, Any] = {"webhook_secret": SecretStr(SECRET), "notify_timeout_seconds": 2.0}
    values.update(changes)
    return ConsoleSettings(**values)


def notifier_for(
    engine: Engine,
    channels: list[dict[str, Any]],
    registry: CollectorRegistry | None = None,
    per_channel: int = 4,
    **settings: Any,
) -> Notifier:
    config = parse_notification_config(json.dumps({"channels": channels}))
    return make_notifier(
        config,
        console_settings(**settings),
        engine,
        make_notify_metrics(registry or CollectorRegistry()),
        retry=FAST,
        per_channel=per_channel,
        poll_seconds=0.05,
    )


async def eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll `check` (off the loop: it may read the database) until it returns something true."""
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(check)
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {value!r})")
        await asyncio.sleep(0.05)


def deliveries(engine: Engine) -> dict[str, dict[str, Any]]:
    with engine.connect() as connection:
        rows = connection.execute(select(NotificationDelivery.__table__)).mappings().all()
    return {row["delivery_id"]: dict(row) for row in rows}


def attempts(engine: Engine, delivery: str) -> list[dict[str, Any]]:
    table = NotificationAttempt.__table__
    with engine.connect() as connection:
        rows = connection.execute(
            select(table).where(table.c.delivery_id == delivery).order_by(table.c.attempt)
        ).mappings()
        return [dict(row) for row in rows]


def statuses(engine: Engine, channel: str) -> list[str]:
    return [d["status"] for d in deliveries(engine).values() if d["channel"] == channel]


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


# --- webhook and e-mail ------------------------------------------------------------------------------------


def test_a_webhook_delivery_is_signed_and_the_receiver_verifies_it(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    registry = CollectorRegistry()
    notifier = notifier_for(engine, [webhook("h001-icu", receiver.url, wards=["ICU"])], registry)
    notice = notice_from_alert(alert_record())
    expected = delivery_id("h001-icu", notice.alert_id, "alert", 0)

    async def scenario() -> None:
        await notifier.start()
        try:
            assert await notifier.enqueue(notice) == [expected]
            await eventually(lambda: deliveries(engine)[expected]["status"] == DELIVERED, 10, "delivered")
        finally:
            await notifier.stop()

    asyncio.run(scenario())
    [request] = receiver.requests
    assert request.verified and request.delivery_id == expected
    stored = deliveries(engine)[expected]
    assert request.body == stored["payload"].encode(), "the body is the stored payload, byte for byte"
    document = json.loads(request.body)
    assert (document["alert_id"], document["ward"], document["value"]) == (notice.alert_id, "ICU", 6.9)
    assert (stored["attempts"], stored["delivered_time"] is not None, stored["last_error"]) == (1, True, None)
    [attempt] = attempts(engine, expected)
    assert (attempt["outcome"], attempt["status_code"], attempt["attempt"]) == ("delivered", 204, 1)
    assert attempt["duration_ms"] > 0
    assert (
        sample(registry, "clinhub_notification_attempts_total", channel="h001-icu", outcome="delivered") == 1
    )
    assert sample(registry, "clinhub_notification_pending", channel="h001-icu") == 0


def test_a_webhook_signed_with_another_key_is_refused_by_the_receiver_and_retried(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    notifier = notifier_for(
        engine, [webhook("h001-icu", receiver.url)], webhook_secret=SecretStr("wrong key")
    )

    async def scenario() -> str:
        await notifier.start()
        try:
            [queued] = await notifier.enqueue(notice_from_alert(alert_record()))
            await eventually(lambda: deliveries(engine)[queued]["status"] == FAILED, 10, "given up")
            return queued
        finally:
            await notifier.stop()

    queued = asyncio.run(scenario())
    assert [r.verified for r in receiver.requests] == [False, False, False]
    assert [(a["outcome"], a["status_code"]) for a in attempts(engine, queued)] == [("http_error", 401)] * 3
    assert deliveries(engine)[queued]["last_error"] == "HTTP 401 Unauthorized"


def test_an_email_is_delivered_through_a_local_smtp_server(engine: Engine) -> None:
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        channel = {
            "name": "h001-duty-mail",
            "kind": "email",
            "to": ["duty@h001.example", "lab@h001.example"],
            "institutions": ["H001"],
        }
        notifier = notifier_for(engine, [channel], smtp_port=smtp.port, smtp_sender="clinhub@region.example")
        notice = notice_from_alert(alert_record())

        async def scenario() -> str:
            await notifier.start()
            try:
                [queued] = await notifier.enqueue(notice)
                await eventually(lambda: deliveries(engine)[queued]["status"] == DELIVERED, 10, "mailed")
                return queued
            finally:
                await notifier.stop()

        queued = asyncio.run(scenario())
    finally:
        smtp.stop()
    [(recipients, message)] = mailbox.messages
    assert recipients == ["duty@h001.example", "lab@h001.example"]
    assert message["From"] == "clinhub@region.example"
    assert message["Subject"] == "[clinhub] CRITICAL ALERT: Potassium (H001/ICU)"
    assert message["Message-ID"] == f"<{queued}@clinhub>"
    body = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert notice.alert_id in body and "value: 6.9" in body
    assert [(a["outcome"], a["status_code"]) for a in attempts(engine, queued)] == [("delivered", 250)]


def test_an_smtp_server_that_is_down_is_retried_and_the_attempts_say_why(engine: Engine) -> None:
    channel = {"name": "mail", "kind": "email", "to": ["duty@h001.example"], "institutions": ["H001"]}
    notifier = notifier_for(
        engine, [channel], smtp_port=free_port(), smtp_password=SecretStr("smtp-password-never-logged")
    )

    async def scenario() -> str:
        await notifier.start()
        try:
            [queued] = await notifier.enqueue(notice_from_alert(alert_record()))
            await eventually(lambda: deliveries(engine)[queued]["status"] == FAILED, 10, "given up")
            return queued
        finally:
            await notifier.stop()

    queued = asyncio.run(scenario())
    tried = attempts(engine, queued)
    assert [a["outcome"] for a in tried] == ["connection_error"] * 3
    assert all("refused" in (a["error"] or "").lower() for a in tried)
    assert not any("smtp-password" in (a["error"] or "") for a in tried)


# --- a channel that is down never delays another -----------------------------------------------------------


def test_a_channel_that_is_down_is_retried_with_back_off_while_a_healthy_one_is_delivered_at_once(
    engine: Engine, receiver: WebhookReceiver
) -> None:
    hanging = WebhookReceiver(hang=True)
    refused_url = f"http://127.0.0.1:{free_port()}/hook?token=url-secret"
    registry = CollectorRegistry()
    notifier = notifier_for(
        engine,
        [webhook("refusing", refused_url), webhook("hanging", hanging.url), webhook("healthy", receiver.url)],
        registry,
        per_channel=2,
        notify_timeout_seconds=0.5,
    )
    notices = [notice_from_alert(alert_record()) for _ in range(4)]
    lags: list[float] = []

    async def ticker() -> None:
        """How late the event loop runs a 20 ms timer while channels are down: it must stay free."""
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.02)
            lags.append(time.monotonic() - started - 0.02)

    async def scenario() -> float:
        await notifier.start()
        tick = asyncio.create_task(ticker())
        try:
            for notice in notices:
                await notifier.enqueue(notice)
            started = time.monotonic()
            await eventually(lambda: statuses(engine, "healthy") == [DELIVERED] * 4, 5, "healthy delivered")
            healthy_seconds = time.monotonic() - started
            assert PENDING in statuses(engine, "hanging"), "the hanging channel was still at it meanwhile"
            await eventually(
                lambda: statuses(engine, "refusing") + statuses(engine, "hanging") == [FAILED] * 8,
                30,
                "both broken channels given up",
            )
            return healthy_seconds
        finally:
            tick.cancel()
            await notifier.stop()
            hanging.close()

    healthy_seconds = asyncio.run(scenario())
    assert healthy_seconds < 1.5, f"the healthy channel waited {healthy_seconds:.2f} s for the broken ones"
    assert max(lags) < 0.5, f"the event loop was blocked for {max(lags):.2f} s"
    assert sorted(receiver.delivery_ids()) == sorted(
        delivery_id("healthy", n.alert_id, "alert", 0) for n in notices
    )

    for channel, outcome in (("refusing", "connection_error"), ("hanging", "timeout")):
        for notice in notices:
            tried = attempts(engine, delivery_id(channel, notice.alert_id, "alert", 0))
            assert [(a["attempt"], a["outcome"]) for a in tried] == [(1, outcome), (2, outcome), (3, outcome)]
            gaps = [(b["time"] - a["time"]).total_seconds() for a, b in itertools.pairwise(tried)]
            assert gaps[0] >= 0.2 - 0.02 and gaps[1] >= 0.4 - 0.02, f"back-off 0.2 s then 0.4 s, got {gaps}"
            assert all(
                "url-secret" not in (a["error"] or "") and SECRET not in (a["error"] or "") for a in tried
            )
        assert sample(registry, "clinhub_notification_failures_total", channel=channel) == 4
        assert sample(registry, "clinhub_notification_attempts_total", channel=channel, outcome=outcome) == 12
    if_hanging = attempts(engine, delivery_id("hanging", notices[0].alert_id, "alert", 0))
    assert all(a["duration_ms"] >= 450 for a in if_hanging), "each hanging attempt waited for the timeout"
    assert sample(registry, "clinhub_notification_failures_total", channel="healthy") == 0

    overview = {c.channel: c for c in delivery_overview(engine, "H001", 50).channels}
    assert (overview["healthy"].delivered, overview["healthy"].failed, overview["healthy"].last_error) == (
        4,
        0,
        None,
    )
    assert (overview["refusing"].failed, overview["refusing"].failed_attempts) == (4, 12)
    assert overview["hanging"].last_outcome == "timeout" and overview["hanging"].last_error


def test_a_receiver_that_fails_then_recovers_is_delivered_on_a_later_attempt(engine: Engine) -> None:
    flaky = WebhookReceiver(fail_first=2)
    notifier = notifier_for(engine, [webhook("flaky", flaky.url)])

    async def scenario() -> str:
        await notifier.start()
        try:
            [queued] = await notifier.enqueue(notice_from_alert(alert_record()))
            await eventually(lambda: deliveries(engine)[queued]["status"] == DELIVERED, 10, "delivered")
            return queued
        finally:
            await notifier.stop()
            flaky.close()

    queued = asyncio.run(scenario())
    assert [(a["outcome"], a["status_code"]) for a in attempts(engine, queued)] == [
        ("http_error", 503),
        ("http_error", 503),
        ("delivered", 204),
    ]
    assert flaky.delivery_ids() == [queued] * 3, (
        "the same delivery id on every retry, for the receiver to dedupe"
    )
    assert len({r.body for r in flaky.requests}) == 1, "the same body on every retry"


# --- exactly once ------------------------------------------------------------------------------------------


def test_each_delivery_is_sent_once_when_queued_again_and_dispatched_by_two_processes(
    tmp_path: Path, engine: Engine, receiver: WebhookReceiver
) -> None:
    other_engine = make_engine(f"sqlite:///{tmp_path / 'store.sqlite3'}")  # a second console process
    channels = [webhook("h001-icu", receiver.url), webhook("region", receiver.url, institutions=["*"])]
    first, second = notifier_for(engine, channels), notifier_for(other_engine, channels)
    notices = [notice_from_alert(alert_record()) for _ in range(10)]

    async def scenario() -> list[list[str]]:
        await first.start()
        await second.start()
        try:
            queued = [await notifier.enqueue(n) for n in notices for notifier in (first, second, first)]
            await eventually(lambda: len(receiver.requests) >= 20, 10, "20 deliveries")
            await eventually(
                lambda: all(d["status"] == DELIVERED for d in deliveries(engine).values()), 10, "all recorded"
            )
            return queued
        finally:
            await first.stop()
            await second.stop()
            other_engine.dispose()

    queued = asyncio.run(scenario())
    assert [len(q) for q in queued] == [2, 0, 0] * 10, "queued once, by whichever process came first"
    sent = receiver.delivery_ids()
    assert len(sent) == 20 and len(set(sent)) == 20, "one request per delivery id"
    assert {d["attempts"] for d in deliveries(engine).values()} == {1}


# --- the alert source, on a stand-in consumer --------------------------------------------------------------


class FakeMessage:
    def __init__(self, topic: str, offset: int, value: bytes, partition: int = 0) -> None:
        self._topic, self._offset, self._value, self._partition = topic, offset, value, partition

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def timestamp(self) -> tuple[int, int]:
        return (1, 1_700_000_000_000)  # librdkafka's (TIMESTAMP_CREATE_TIME, epoch ms)

    def key(self) -> bytes:
        return b"rp-7c21"

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return []

    def error(self) -> None:
        return None


class FakeConsumer:
    """Gives one batch, then nothing; notes what was subscribed, marked and closed, in order."""

    def __init__(self, batch: list[FakeMessage], events: list[str]) -> None:
        self.batch, self.events = batch, events
        self.stored: list[tuple[str, int, int]] = []

    def subscribe(self, topics: list[str], **_callbacks: Any) -> None:
        self.events.append(f"subscribe {sorted(topics)}")

    def consume(self, count: int, timeout: float) -> list[FakeMessage]:
        batch, self.batch = self.batch, []
        if not batch:
            time.sleep(min(timeout, 0.05))
        return batch

    def store_offsets(self, offsets: list[Any]) -> None:
        self.stored.extend((tp.topic, tp.partition, tp.offset) for tp in offsets)
        self.events.append("store_offsets")

    def close(self) -> None:
        self.events.append("close")


def test_the_source_marks_offsets_only_after_the_outbox_transaction_and_replays_queue_nothing(
    engine: Engine,
) -> None:
    topics = TopicNames("t1.")
    registry = ConfluentRegistry({"url": f"mock://notify-{uuid.uuid4().hex[:8]}"})
    encode_alert = make_encoder(registry, standard.load(standard.CRITICAL_VALUE_ALERT))
    encode_escalation = make_encoder(registry, standard.load(standard.ALERT_ESCALATION))
    in_batch = alert_record()
    stored_alert = alert_record(ward="ICU", analyte="Sodium", loinc_code="2951-2")
    with engine.begin() as connection:  # the store already holds this alert: its escalation is routed by ward
        row = {k: v for k, v in stored_alert.items() if k in Alert.__table__.c}
        row.update(
            alert_id=str(stored_alert["alert_id"]), source_event_id=str(stored_alert["source_event_id"])
        )
        connection.execute(insert(Alert).values(row))
    batch = [
        FakeMessage(topics.alerts_topic, 7, encode_alert(in_batch)),
        FakeMessage(topics.alerts_topic, 8, b"\x00\x00\x00\x00"),  # not a record: passed over
        FakeMessage(topics.escalations_topic, 3, encode_escalation(escalation_record(in_batch)), partition=1),
        FakeMessage(
            topics.escalations_topic, 4, encode_escalation(escalation_record(stored_alert)), partition=1
        ),
    ]
    config = parse_notification_config(
        json.dumps({"channels": [webhook("icu", "http://127.0.0.1:9/h", wards=["ICU"])]})
    )
    notifier = make_notifier(config, console_settings(), engine, make_notify_metrics(CollectorRegistry()))
    events: list[str] = []
    failures = iter([StoreUnavailableError("database restarting")])

    def accept(records: Any, now: dt.datetime) -> list[str]:
        failure = next(failures, None)
        if failure is not None:
            events.append("accept failed")
            raise failure
        queued = notifier.outbox.accept(records, now)
        events.append(f"accepted {len(queued)}")
        return queued

    consumers: list[FakeConsumer] = []

    def factory(_config: dict[str, Any]) -> FakeConsumer:
        consumers.append(FakeConsumer(batch, events))
        return consumers[-1]

    source = AlertSource(
        {}, topics, registry, accept, lambda: dt.datetime.now(dt.UTC), consumer_factory=factory
    )
    source.retry_max_seconds = 0.1
    source.start()
    deadline = time.monotonic() + 10
    while "store_offsets" not in events and time.monotonic() < deadline:
        time.sleep(0.02)
    source.stop()
    assert source.failure is None
    assert events == [
        f"subscribe {sorted([topics.alerts_topic, topics.escalations_topic])}",
        "accept failed",
        "accepted 3",
        "store_offsets",
        "close",
    ]
    assert sorted(consumers[0].stored) == [(topics.alerts_topic, 0, 9), (topics.escalations_topic, 1, 5)]
    queued = deliveries(engine)
    assert {(d["alert_id"], d["event"]) for d in queued.values()} == {
        (str(in_batch["alert_id"]), "alert"),
        (str(in_batch["alert_id"]), "escalation"),
        (str(stored_alert["alert_id"]), "escalation"),
    }
    from_store = queued[delivery_id("icu", str(stored_alert["alert_id"]), "escalation", 1)]
    assert json.loads(from_store["payload"])["analyte"] == "Sodium", "the facts of the stored alert"

    again = [SourceRecord("alert", in_batch, topics.alerts_topic, 0, 7)]
    assert notifier.outbox.accept(again, dt.datetime.now(dt.UTC)) == [], "a replay queues nothing"


def test_an_escalation_takes_the_facts_of_an_alert_notified_before_when_the_store_has_none(
    engine: Engine,
) -> None:
    config = parse_notification_config(
        json.dumps({"channels": [webhook("icu", "http://127.0.0.1:9/h", wards=["ICU"])]})
    )
    notifier = make_notifier(config, console_settings(), engine, make_notify_metrics(CollectorRegistry()))
    alert = alert_record()
    now = dt.datetime.now(dt.UTC)
    notifier.outbox.accept([SourceRecord("alert", alert, "a", 0, 1)], now)
    [queued] = notifier.outbox.accept(
        [SourceRecord("escalation", escalation_record(alert, 2), "e", 0, 1)], now
    )
    document = json.loads(deliveries(engine)[queued]["payload"])
    assert (document["ward"], document["analyte"], document["escalation_level"]) == ("ICU", "Potassium", 2)


def test_an_alert_older_than_the_window_is_not_notified(engine: Engine) -> None:
    config = parse_notification_config(json.dumps({"channels": [webhook("icu", "http://127.0.0.1:9/h")]}))
    notifier = make_notifier(config, console_settings(), engine, make_notify_metrics(CollectorRegistry()))
    old = alert_record(raised_time=dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    assert notifier.outbox.accept([SourceRecord("alert", old, "a", 0, 1)], dt.datetime.now(dt.UTC)) == []
    assert deliveries(engine) == {}


# --- building it -------------------------------------------------------------------------------------------


def build(console: ConsoleSettings, engine: Engine) -> Notifier | None:
    return build_notifier(
        console,
        KafkaSettings(bootstrap_servers="127.0.0.1:1", security_protocol="PLAINTEXT"),
        {"url": "mock://build"},
        TopicNames("t."),
        notify_group("clinhub-streams"),
        engine,
        CollectorRegistry(),
    )


def test_no_notifications_file_means_no_notifier(engine: Engine) -> None:
    assert build(ConsoleSettings(), engine) is None
    assert notify_group("clinhub-streams") == "clinhub-streams-console-notify"


def test_a_webhook_needs_a_signing_key_and_a_channel_may_have_its_own(engine: Engine, tmp_path: Path) -> None:
    channels = tmp_path / "notifications.json"
    own_key = tmp_path / "region.key"
    own_key.write_text("the region's own key\n")
    channels.write_text(
        json.dumps(
            {
                "channels": [
                    webhook("h001", "https://h001.example/hook"),
                    webhook("region", "https://region.example/hook", secret_file=str(own_key)),
                ]
            }
        )
    )
    with pytest.raises(ConfigurationError) as caught:
        build(ConsoleSettings(notifications_file=channels), engine)
    assert caught.value.setting == "channels[0].secret_file" and "CLINHUB_CONSOLE_WEBHOOK_SECRET" in str(
        caught.value
    )

    notifier = build(
        ConsoleSettings(notifications_file=channels, webhook_secret=SecretStr("console key")), engine
    )
    assert notifier is not None and notifier.channels == ["h001", "region"] and notifier.source is not None
    secrets = {name: sender._secret for name, sender in notifier.senders.items()}  # type: ignore[attr-defined]
    assert secrets == {"h001": b"console key", "region": b"the region's own key"}
    asyncio.run(notifier.stop())  # never started: closes its clients


def test_a_bad_channels_file_is_refused_naming_the_field_and_the_file(engine: Engine, tmp_path: Path) -> None:
    channels = tmp_path / "notifications.json"
    channels.write_text(json.dumps({"channels": [webhook("h001", "http://h001.example/hook")]}))
    with pytest.raises(ConfigurationError) as caught:
        build(console_settings(notifications_file=channels), engine)
    assert caught.value.setting == "channels[0].url" and str(channels) in caught.value.reason
    with pytest.raises(ConfigurationError, match="notifications_file"):
        build(console_settings(notifications_file=tmp_path / "missing.json"), engine)


# --- the console's view ------------------------------------------------------------------------------------


def test_the_overview_lists_recent_deliveries_with_their_attempts_for_one_institution(engine: Engine) -> None:
    config = parse_notification_config(
        json.dumps({"channels": [webhook("region", "http://127.0.0.1:9/h", institutions=["*"])]})
    )
    notifier = make_notifier(config, console_settings(), engine, make_notify_metrics(CollectorRegistry()))
    now = dt.datetime.now(dt.UTC)
    h001, h002 = notice_from_alert(alert_record()), notice_from_alert(alert_record(institution_id="H002"))
    outbox = notifier.outbox
    for notice in (h001, h002):
        outbox.enqueue(_plan(notifier, notice), now)
    claim = outbox.claim({"region": 10}, now, 60)
    assert len(claim.deliveries) == 2 and claim.pending == {"region": 2}
    for claimed in claim.deliveries:
        outbox.record(claimed, AttemptResult("timeout", error="ReadTimeout"), 500.0, now, FAST)
    h001_delivery = next(d for d in claim.deliveries if d.alert_id == h001.alert_id)
    outbox.record(h001_delivery, AttemptResult("delivered", status_code=200), 12.0, now, FAST)

    overview = delivery_overview(engine, "H001", 10)
    [view] = overview.deliveries
    assert (view.alert_id, view.status, view.attempts, view.escalation_level) == (
        h001.alert_id,
        DELIVERED,
        2,
        0,
    )
    assert [(a.attempt, a.outcome) for a in view.attempt_log] == [(1, "timeout"), (2, "delivered")]
    assert view.created_time.tzinfo is not None
    [health] = overview.channels
    assert (health.channel, health.delivered, health.pending, health.failed, health.failed_attempts) == (
        "region",
        1,
        0,
        0,
        1,
    )
    region = delivery_overview(engine, None, 10)
    assert len(region.deliveries) == 2 and region.channels[0].pending == 1
    with engine.connect() as connection:
        assert (
            connection.execute(select(func.count()).select_from(NotificationAttempt.__table__)).scalar() == 3
        )


def _plan(notifier: Notifier, notice: Notice) -> list[Any]:
    from console.domain.notify import plan_deliveries

    return plan_deliveries(notifier.config, notice)

"""The Faust app: thin wiring around `pipeline.process_lab_batch`, the sink and the alert outbox.

Reliability rules that shape this file (see ../shared/reference/faust-reliability.md):
- an exception escaping an agent acks its message, so nothing escapes the batch handler;
- events are acked by hand, only after the store commit and the dead-letter sends are confirmed
  (`noack_take`: Faust's `take_events` acks in a `finally`, i.e. also when a shutdown interrupts a
  batch whose store write never committed);
- `concurrency=1` (faust-streaming #606 can commit past an unfinished message).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import faust
from prometheus_client import CollectorRegistry

from clinhub.settings import HubSettings
from schemas import standard
from schemas.exceptions import RegistryUnavailableError
from schemas.wire import AvroDecoder, AvroEncoder, ConfluentRegistry, make_encoder
from sinks.base import write_isolating
from sinks.exceptions import StoreUnavailableError
from sinks.sql import SqlStoreSink
from sinks.store import ensure_current, make_engine
from streams.identity import RegionalIdentity
from streams.metrics import StreamMetrics, make_stream_metrics
from streams.normalise import FLAG_UNMAPPED_CODE
from streams.pipeline import RawMessage, alert_record, dead_letter_record, process_lab_batch
from streams.reference import ReferenceData, load_reference
from streams.topics import TopicNames

log = logging.getLogger("clinhub.streams")
PROCESSOR_NAME = "streams.lab"


@dataclass
class LabComponents:
    """Everything the lab agent calls, built once at start-up by `build_components`."""

    decode: AvroDecoder
    encode_alert: AvroEncoder
    encode_deadletter: AvroEncoder
    reference: ReferenceData
    identity: RegionalIdentity
    sink: SqlStoreSink
    metrics: StreamMetrics
    clock: Callable[[], dt.datetime]
    retry_max_seconds: float = 30.0


def _long_enough(key: bytes, setting: str) -> bytes:
    from clinhub.exceptions import ConfigurationError

    if len(key) < 32:
        raise ConfigurationError(
            setting, f"pseudonymisation key has {len(key)} bytes; use at least 32 random bytes"
        )
    return key


def load_pseudonym_key(settings: HubSettings) -> bytes:
    from clinhub.exceptions import ConfigurationError

    security = settings.security
    if security.pseudonym_key is not None:
        return _long_enough(
            security.pseudonym_key.get_secret_value().encode(), "CLINHUB_SECURITY_PSEUDONYM_KEY"
        )
    if security.pseudonym_key_file is not None:
        try:
            key = security.pseudonym_key_file.read_bytes().strip()
        except OSError as exc:
            raise ConfigurationError("CLINHUB_SECURITY_PSEUDONYM_KEY_FILE", str(exc)) from exc
        return _long_enough(key, "CLINHUB_SECURITY_PSEUDONYM_KEY_FILE")
    raise ConfigurationError(
        "CLINHUB_SECURITY_PSEUDONYM_KEY",
        "no pseudonymisation key; set it or CLINHUB_SECURITY_PSEUDONYM_KEY_FILE",
    )


def build_components(settings: HubSettings, registry: CollectorRegistry) -> LabComponents:
    engine = make_engine(settings.database.url.get_secret_value(), settings.database.echo)
    ensure_current(engine)
    schema_registry = ConfluentRegistry(settings.registry.client_config())
    return LabComponents(
        decode=AvroDecoder(schema_registry, standard.load(standard.LAB_RESULT)),
        encode_alert=make_encoder(schema_registry, standard.load(standard.CRITICAL_VALUE_ALERT), check=False),
        encode_deadletter=make_encoder(schema_registry, standard.load(standard.DEAD_LETTER), check=False),
        reference=load_reference(),
        identity=RegionalIdentity(load_pseudonym_key(settings)),
        sink=SqlStoreSink(engine),
        metrics=make_stream_metrics(registry),
        clock=lambda: dt.datetime.now(dt.UTC),
        retry_max_seconds=settings.stream.sink_retry_max_seconds,
    )


Send = Callable[[str, bytes | None, bytes, dict[str, bytes]], Awaitable[None]]


class LabHandler:
    """Handles one batch end to end; returns only when the batch is safely stored (or cancelled)."""

    def __init__(self, components: LabComponents, topics: TopicNames, send: Send) -> None:
        self.c = components
        self.topics = topics
        self.send = send
        self._outbox_lock = asyncio.Lock()

    async def _retrying(self, what: str, action: Callable[[], Awaitable[Any]]) -> Any:
        """Retry until done: a transient failure must never skip the batch (it would be acked)."""
        delay = 0.2
        while True:
            try:
                return await action()
            except asyncio.CancelledError:
                raise
            except (StoreUnavailableError, RegistryUnavailableError) as exc:
                reason = type(exc).__name__
                log.warning("%s failed (%s), retrying in %.1fs", what, exc, delay)
            except Exception as exc:
                reason = "unexpected"
                log.exception("%s failed unexpectedly (%r), retrying in %.1fs", what, exc, delay)
            self.c.metrics.sink_retries.labels(reason=reason).inc()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.c.retry_max_seconds)

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        started = self.c.clock()

        async def process_and_store() -> Any:
            now = self.c.clock()
            outcome = await asyncio.to_thread(
                process_lab_batch, messages, self.c.decode, self.c.reference, self.c.identity, now
            )
            result, refused = await asyncio.to_thread(write_isolating, self.c.sink, outcome.items)
            for index, error in sorted(refused, key=lambda pair: pair[0], reverse=True):
                outcome.reject_item(index, type(error).__name__, error.reason)
            return outcome, result

        outcome, result = await self._retrying("store batch", process_and_store)
        for rejection in outcome.rejections:
            record = dead_letter_record(rejection, PROCESSOR_NAME, self.c.clock())
            value = self.c.encode_deadletter(record)
            await self._retrying(
                "dead-letter send",
                lambda v=value, r=rejection: self.send(  # type: ignore[misc]
                    self.topics.deadletter_topic,
                    r.message.key,
                    v,
                    {"correlation_id": (r.correlation_id or "").encode()},
                ),
            )
            self.c.metrics.rejects.labels(kind="lab", reason=rejection.error_class).inc()
            self.c.metrics.events.labels(
                institution=rejection.institution_id or "?", kind="lab", outcome="rejected"
            ).inc()
            log.warning(
                "rejected %s[%d]@%d: %s (%s) correlation_id=%s",
                rejection.message.topic,
                rejection.message.partition,
                rejection.message.offset,
                rejection.reason,
                rejection.field,
                rejection.correlation_id,
            )
        committed = self.c.clock()
        for item in outcome.items:
            lab = item.lab
            new = lab.event_id in result.new_event_ids
            self.c.metrics.events.labels(
                institution=lab.institution_id, kind="lab", outcome="stored" if new else "duplicate"
            ).inc()
            if new:
                self.c.metrics.end_to_end_seconds.observe(
                    max(0.0, (committed - lab.event_time).total_seconds())
                )
                if FLAG_UNMAPPED_CODE in lab.flags:
                    self.c.metrics.unmapped_codes.labels(
                        institution=lab.institution_id, code=lab.local_code
                    ).inc()
        for alert in outcome.alerts:
            if alert.alert_id in result.new_alert_ids:
                self.c.metrics.alerts.labels(analyte=alert.analyte, severity=alert.severity).inc()
        if result.new_alert_ids:
            await self.publish_outbox()
        self.c.metrics.batch_seconds.observe((self.c.clock() - started).total_seconds())

    async def publish_outbox(self) -> int:
        """Send stored alerts not yet confirmed on Kafka; the alert id makes any resend recognisable."""
        async with self._outbox_lock:
            try:
                pending = await asyncio.to_thread(self.c.sink.unpublished_alerts)
            except StoreUnavailableError as exc:
                log.warning("alert outbox unavailable: %s", exc)
                return 0
            sent = []
            for row in pending:
                record = alert_record(row)
                try:
                    await self.send(
                        self.topics.alerts_topic,
                        record["regional_patient_id"].encode(),
                        self.c.encode_alert(record),
                        {"correlation_id": record["correlation_id"].encode()},
                    )
                except Exception as exc:  # noqa: BLE001 - left in the outbox, retried by the timer
                    log.warning("alert %s not published yet: %r", record["alert_id"], exc)
                    break
                sent.append(record["alert_id"])
                log.info(
                    "ALERT %s %s %s %s (%s) correlation_id=%s",
                    record["severity"],
                    record["analyte"],
                    record["value"],
                    record["unit"],
                    record["message"],
                    record["correlation_id"],
                )
            if sent:
                try:
                    await asyncio.to_thread(self.c.sink.mark_published, sent)
                except StoreUnavailableError as exc:
                    log.warning("alerts sent but not yet marked published (will resend): %s", exc)
            return len(sent)


def to_raw_message(event: Any) -> RawMessage:
    message = event.message
    headers = (
        dict(message.headers or []) if isinstance(message.headers, list) else dict(message.headers or {})
    )
    return RawMessage(message.topic, message.partition, message.offset, message.key, message.value, headers)


def create_app(
    settings: HubSettings,
    components: LabComponents | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> faust.App:
    """Build the Faust app. Nothing connects until the worker starts."""
    stream_settings = settings.stream
    topics = TopicNames(prefix=stream_settings.topic_prefix)
    app = faust.App(
        stream_settings.app_id,
        broker=[f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
        store="memory://",
        autodiscover=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        topic_partitions=settings.kafka.topic_partitions,
        topic_replication_factor=settings.kafka.topic_replication,
        web_enabled=False,
        datadir=str(stream_settings.data_dir),
        broker_commit_every=1000,
        broker_commit_interval=1.0,
    )
    source = app.topic(
        *[topics.raw(inst, "lab") for inst in stream_settings.institutions],
        key_serializer="raw",
        value_serializer="raw",
    )

    async def send(topic: str, key: bytes | None, value: bytes, headers: dict[str, bytes]) -> None:
        pending = await app.send(
            topic, key=key, value=value, headers=headers, key_serializer="raw", value_serializer="raw"
        )
        await pending  # wait for the broker's acknowledgement (acks=all)

    built = components or build_components(settings, metrics_registry or CollectorRegistry())
    handler = LabHandler(built, topics, send)

    @app.agent(source, concurrency=1, name="lab-results")
    async def lab_results(stream_t: faust.StreamT[Any]) -> None:
        stream = cast("faust.Stream[Any]", stream_t)  # the concrete class has noack_take
        # noack_take yields the buffered *events* (not values) and leaves acking to us.
        async for events in stream.noack_take(
            stream_settings.batch_size, stream_settings.batch_within_seconds
        ):
            await handler.handle([to_raw_message(event) for event in events])
            for event in events:
                await stream.ack(event)

    @app.timer(interval=5.0)
    async def sweep_alert_outbox() -> None:
        await handler.publish_outbox()

    return app

"""The stream worker: two thin Faust agents and the store stage, over plain functions.

    raw.<institution>.<kind> ──normaliser──► norm.<kind>, norm.identity, deadletter
    norm.lab, norm.encounter, alerts.ack, alerts.escalation ──clinical──► alerts.critical, alerts.escalation
    norm.*, norm.identity, alerts.* ──store──► regional store (one transaction per batch)

The store stage needs no tables and runs on a plain librdkafka consumer (streams/store_consumer.py).

Reliability rules that shape this file (see ../shared/reference/faust-reliability.md):
- an exception escaping an agent acks its message, so nothing escapes a batch handler;
- events are acked by hand, only after their outputs are confirmed by the broker or committed in
  the store (`noack_take`; Faust's `take_events` acks in a `finally`, i.e. also when a shutdown
  interrupts a batch whose outputs were never confirmed);
- `concurrency=1` (faust-streaming #606 can commit past an unfinished message);
- state lives in changelogged tables, so suppression and escalation timers survive restarts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from prometheus_client import CollectorRegistry

from core.settings import HubSettings
from schemas import standard
from schemas.wire import AvroDecoder, AvroEncoder, ConfluentRegistry, make_encoder
from streams.clinical import ClinicalHandler, ClinicalTables
from streams.codes import CodeMaps, load_codes
from streams.identity import RegionalIdentity
from streams.lag import LagReport, lag_by_topic
from streams.metrics import StreamMetrics, make_stream_metrics
from streams.outputs import Output, Publish, make_outputs
from streams.pipeline import RawMessage, Rejection, dead_letter_record, normalise_batch
from streams.reference import DATA_DIR, ReferenceData, load_reference
from streams.stalls import GroupPositions, StallDetector, contiguous_offsets_app, reread_from_committed
from streams.store_consumer import StoreConsumer, consumer_config, store_group
from streams.store_handler import StoreHandler, store_topics
from streams.tables import RawKeyTable, store_url
from streams.topics import KINDS, TopicNames, discover_raw_topics, subscribe_more

log = logging.getLogger("clinhub.streams")

ROLES = ("normaliser", "clinical", "store")

# Every record the agents read or write, by the short name the store and the handlers use.
RECORD_SCHEMAS = {
    **standard.KIND_SCHEMAS,
    "identity": standard.IDENTITY_LINK,
    "alert": standard.CRITICAL_VALUE_ALERT,
    "escalation": standard.ALERT_ESCALATION,
    "ack": standard.ALERT_ACKNOWLEDGEMENT,
    "deadletter": standard.DEAD_LETTER,
}


@dataclass
class Components:
    """Everything the agents call, built once at start-up by `build_components`."""

    registry: Any
    reference: ReferenceData
    codes: CodeMaps
    identity: RegionalIdentity | None  # only the normaliser holds the pseudonymisation key
    sink: Any  # only the store stage connects to the database (None elsewhere)
    metrics: StreamMetrics
    clock: Callable[[], dt.datetime]
    retry_max_seconds: float = 30.0
    decoders: dict[str, AvroDecoder] = field(default_factory=dict)
    encoders: dict[str, AvroEncoder] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, name in RECORD_SCHEMAS.items():
            self.decoders.setdefault(kind, AvroDecoder(self.registry, standard.load(name)))

    def encoder(self, kind: str) -> AvroEncoder:
        """Encoders register their schema on first use, so a worker starts without the registry."""
        if kind not in self.encoders:
            schema = standard.load(RECORD_SCHEMAS[kind])
            self.encoders[kind] = make_encoder(self.registry, schema, check=False)
        return self.encoders[kind]


def _long_enough(key: bytes, setting: str) -> bytes:
    from core.exceptions import ConfigurationError

    if len(key) < 32:
        raise ConfigurationError(
            setting, f"pseudonymisation key has {len(key)} bytes; use at least 32 random bytes"
        )
    return key


def load_pseudonym_key(settings: HubSettings) -> bytes:
    from core.exceptions import ConfigurationError

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


def build_components(
    settings: HubSettings, registry: CollectorRegistry, roles: Collection[str] = ROLES
) -> Components:
    """What the given stages need, and no more: the key only where pseudonyms are computed, the
    database only where the store is written, so a stage's process holds no secret it does not use."""
    from sinks.metrics import make_sink_metrics
    from sinks.sql import SqlStoreSink
    from sinks.store import ensure_current, make_engine

    sink = None
    if "store" in roles:
        engine = make_engine(settings.database.url.get_secret_value(), settings.database.echo)
        ensure_current(engine)
        sink = SqlStoreSink(engine, metrics=make_sink_metrics(registry))
    return Components(
        registry=ConfluentRegistry(settings.registry.client_config()),
        reference=load_reference(settings.stream.reference_dir or DATA_DIR),
        codes=load_codes(settings.stream.reference_dir or DATA_DIR),
        identity=RegionalIdentity(load_pseudonym_key(settings)) if "normaliser" in roles else None,
        sink=sink,
        metrics=make_stream_metrics(registry),
        clock=lambda: dt.datetime.now(dt.UTC),
        retry_max_seconds=settings.stream.sink_retry_max_seconds,
    )


async def retrying(
    what: str, action: Callable[[], Awaitable[Any]], metrics: StreamMetrics, max_delay: float
) -> Any:
    """Retry until done: a failure must never skip a batch (it would be acked and lost)."""
    delay = 0.2
    while True:
        try:
            return await action()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - transient or not, retried loudly rather than skipped
            log.warning("%s failed (%r), retrying in %.1fs", what, exc, delay)
            metrics.sink_retries.labels(reason=type(exc).__name__).inc()
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay)


async def send_dead_letters(
    rejections: Sequence[Rejection],
    c: Components,
    topics: TopicNames,
    publish: Publish,
    stage: str,
    kind: str,
) -> None:
    """Dead-letter each rejection; returns once the broker has every one."""
    if not rejections:
        return
    outputs = []
    for rejection in rejections:
        value = c.encoder("deadletter")(dead_letter_record(rejection, f"streams.{stage}", c.clock()))
        headers = {"correlation_id": (rejection.correlation_id or "").encode()}
        outputs.append(Output(topics.deadletter_topic, rejection.message.key, value, headers))
    await publish(outputs)
    for rejection in rejections:
        c.metrics.rejects.labels(kind=kind, reason=rejection.error_class).inc()
        c.metrics.events.labels(
            institution=rejection.institution_id or "?", kind=kind, outcome="rejected"
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


class NormaliserHandler:
    """raw -> norm.<kind> (keyed by regional patient id), identity links, dead letters."""

    def __init__(self, components: Components, topics: TopicNames, publish: Publish, links: Any) -> None:
        if components.identity is None:
            raise ValueError("the normaliser needs the regional identity (the pseudonymisation key)")
        self.identity = components.identity
        self.c = components
        self.topics = topics
        self.publish = publish
        self.links = links

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        c = self.c

        async def normalise() -> Any:
            return await asyncio.to_thread(
                normalise_batch,
                messages,
                c.decoders,
                c.reference,
                c.codes,
                self.identity,
                self.links.get,
                c.clock(),
            )

        outcome = await retrying("normalise batch", normalise, c.metrics, c.retry_max_seconds)

        async def publish() -> None:
            outputs = []  # encoded in here: an encoder's first call registers its schema, and may fail
            for _message, event in outcome.events:
                key = event.regional_patient_id.encode()
                headers = {"correlation_id": str(event.record["envelope"]["correlation_id"]).encode()}
                value = c.encoder(event.kind)(event.record)
                outputs.append(Output(self.topics.norm(event.kind), key, value, headers))
                if event.identity.link is not None:
                    link_value = c.encoder("identity")(event.identity.link)
                    outputs.append(Output(self.topics.identity_topic, key, link_value, {}))
            await self.publish(outputs)
            await send_dead_letters(outcome.rejections, c, self.topics, self.publish, "normaliser", "raw")

        await retrying("publish normalised batch", publish, c.metrics, c.retry_max_seconds)
        for key, regional_id in outcome.links.items():
            self.links[key] = regional_id
        for _message, event in outcome.events:
            institution = event.record["envelope"]["institution_id"]
            c.metrics.events.labels(institution=institution, kind=event.kind, outcome="normalised").inc()
            for flag in event.flags:
                if flag.startswith("unmapped"):
                    code = event.record.get("local_code") or event.record.get("drug_code") or "?"
                    c.metrics.unmapped_codes.labels(institution=institution, code=str(code)).inc()


def to_raw_message(event: Any) -> RawMessage:
    message = event.message
    headers = message.headers or {}
    return RawMessage(
        message.topic, message.partition, message.offset, message.key, message.value, dict(headers)
    )


def create_app(
    settings: HubSettings,
    components: Components | None = None,
    metrics_registry: CollectorRegistry | None = None,
    publish_override: Publish | None = None,
    raw_topics: Sequence[str] = (),
    roles: Collection[str] = ROLES,
) -> faust.App:
    """Build the Faust app and its agents. Connections are made when the worker starts.

    `raw_topics` adds raw topics found on the cluster (`topics.discover_raw_topics`) to those of the
    configured institutions. `roles` picks the agents this worker runs: all three by default, or a
    subset so that the stages run in separate processes (each subset is its own Faust app and consumer
    group, e.g. `clinhub-streams-normaliser`). `publish_override` replaces publishing to Kafka, for
    `agent.test_context()` tests.
    """
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise ValueError(f"roles must be a non-empty subset of {', '.join(ROLES)}, not {sorted(roles)}")
    stream = settings.stream
    topics = TopicNames(prefix=stream.topic_prefix)
    app_id = stream.app_id if set(roles) == set(ROLES) else "-".join([stream.app_id, *sorted(roles)])
    stream.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level, the app's own
    app = contiguous_offsets_app(faust.App)(
        app_id,
        broker=[f"kafka://{server}" for server in settings.kafka.bootstrap_servers.split(",")],
        store=store_url(stream.table_store),
        Table=RawKeyTable,
        autodiscover=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        topic_partitions=settings.kafka.topic_partitions,
        topic_replication_factor=settings.kafka.topic_replication,
        table_standby_replicas=0,
        web_enabled=False,
        datadir=str(stream.data_dir / app_id),  # table state belongs to one app id (consumer group)
        broker_commit_every=1000,
        broker_commit_interval=stream.commit_interval_seconds,
        broker_session_timeout=stream.session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, stream.session_timeout_seconds / 3),
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
    )
    c = components or build_components(settings, metrics_registry or CollectorRegistry(), roles)

    def raw_topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    if publish_override is not None:
        publish = publish_override
    else:
        outputs = make_outputs(settings)
        publish = outputs.publish

        async def close_outputs(_app: Any, **_kwargs: Any) -> None:
            await asyncio.to_thread(outputs.close)

        app.on_before_shutdown.connect(cast(Any, close_outputs))  # mode's handler type is narrower

    def table(name: str, **kwargs: Any) -> Any:
        # use_partitioner: the changelog partition follows the key's hash (murmur2 of the raw key, as on
        # the topics the agent reads), so tables can be written from batch handlers and timers, not only
        # inside stream iteration. Every table is keyed by a key of its agent's source topics, or by one
        # followed by "|..." when it is partitioned by that prefix (streams/tables.py).
        return app.Table(
            name, default=None, partitions=settings.kafka.topic_partitions, use_partitioner=True, **kwargs
        )

    in_flight: dict[str, float] = {}  # agent -> when its current batch started (for the stall watchdog)

    async def run_batches(
        stream_t: faust.StreamT[Any], handle: Callable[[list[RawMessage]], Awaitable[None]], agent: str
    ) -> None:
        agent_stream = cast("faust.Stream[Any]", stream_t)  # the concrete class has noack_take
        async for events in agent_stream.noack_take(stream.batch_size, stream.batch_within_seconds):
            in_flight[agent] = time.monotonic()
            try:
                await handle([to_raw_message(event) for event in events])
            finally:
                del in_flight[agent]
            for event in events:
                await agent_stream.ack(event)

    configured = [topics.raw(inst, kind) for inst in stream.institutions for kind in KINDS]
    raw_names = sorted(set(configured) | set(raw_topics or ()))
    raw_source = raw_topic(*raw_names)
    clinical_source = raw_topic(
        topics.norm("lab"), topics.norm("encounter"), topics.acks_topic, topics.escalations_topic
    )

    if "normaliser" in roles:
        normaliser = NormaliserHandler(c, topics, publish, table("identity-links"))

        @app.agent(raw_source, concurrency=1, name="normaliser")
        async def normaliser_agent(events: faust.StreamT[Any]) -> None:
            await run_batches(events, normaliser.handle, "normaliser")

        @app.timer(interval=stream.raw_topic_scan_seconds)
        async def watch_raw_topics() -> None:
            """Raw topics created after start-up (a new institution, a new kind) join the subscription."""
            try:
                found = await asyncio.to_thread(discover_raw_topics, settings.kafka.client_config(), topics)
            except Exception as exc:  # noqa: BLE001 - a failed look-up is retried at the next tick
                log.warning("could not list raw topics: %r", exc)
                return
            new = sorted(set(found) - set(raw_names))
            if new and subscribe_more(
                app, raw_names[0], new, settle_seconds=min(45.0, stream.raw_topic_scan_seconds)
            ):
                log.warning("raw topics %s appeared after start-up; subscribing to them", ", ".join(new))
                raw_names.extend(new)

    if "clinical" in roles:
        clinical = ClinicalHandler(
            c,
            topics,
            publish,
            ClinicalTables(
                analytes=table("analyte-states", partition_by_prefix="|"),
                open_alerts=table("open-alerts"),
                wards=table("wards"),
                legacy_analytes=table("patient-analytes"),
            ),
            c.reference.policy,
        )

        @app.agent(clinical_source, concurrency=1, name="clinical")
        async def clinical_agent(events: faust.StreamT[Any]) -> None:
            await run_batches(events, clinical.handle, "clinical")

        @app.timer(interval=stream.escalation_check_seconds)
        async def escalation_timer() -> None:
            await clinical.escalate_due()

    if "store" in roles:
        # Not a Faust agent: a librdkafka consumer in its own group that marks offsets done only after
        # the store transaction (streams/store_consumer.py).
        store = StoreConsumer(
            consumer_config(
                settings.kafka.client_config(),
                store_group(stream.app_id),
                stream.commit_interval_seconds,
                stream.session_timeout_seconds,
            ),
            store_topics(topics),
            StoreHandler(c, topics, publish).handle,
            stream.batch_size,
            stream.batch_within_seconds,
        )

        store_positions = GroupPositions(settings.kafka.client_config(), store_group(stream.app_id))
        store_lag = LagReport(c.metrics.consumer_lag, "store")

        @app.timer(interval=stream.stall_check_seconds)
        async def watch_store_lag() -> None:
            try:
                owned = await store.assignment()
                committed, ends = await asyncio.to_thread(store_positions.read, owned) if owned else ({}, {})
            except Exception as exc:  # noqa: BLE001 - looked up again at the next tick
                log.warning("could not read the store group's positions: %r", exc)
                return
            store_lag.update(lag_by_topic(committed, ends))

        @app.task
        async def store_stage() -> None:
            try:
                await store.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.critical("the store stage stopped: %r", exc)
                await app.crash(exc)  # a worker without its store stage must not look healthy
                raise

    stalls = StallDetector(patience=stream.stall_patience_seconds)
    positions = GroupPositions(settings.kafka.client_config(), app_id)

    async def close_positions(_app: Any, **_kwargs: Any) -> None:
        await asyncio.to_thread(positions.close)

    app.on_before_shutdown.connect(cast(Any, close_positions))

    lag_reports = {stage: LagReport(c.metrics.consumer_lag, stage) for stage in ("normaliser", "clinical")}

    @app.timer(interval=stream.stall_check_seconds)
    async def watch_stalls() -> None:
        """Faust can stop delivering a partition after a rebalance; read it again (streams/stalls.py).
        The same reading gives the Faust stages' lag."""
        if app.rebalancing or app.in_recovery:
            return
        stage_topics = {
            "normaliser": set(raw_names) if "normaliser" in roles else set(),  # grows with new topics
            "clinical": set(clinical_source.topics) if "clinical" in roles else set(),
        }
        sources = stage_topics["normaliser"] | stage_topics["clinical"]
        assigned = sorted((tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in sources)
        try:
            committed, ends = await asyncio.to_thread(positions.read, assigned) if assigned else ({}, {})
        except Exception as exc:  # noqa: BLE001 - looked up again at the next tick
            log.warning("could not read the group's positions: %r", exc)
            return
        lag = lag_by_topic(committed, ends)
        for stage, report in lag_reports.items():
            report.update(lag, stage_topics[stage])
        busy_since = min(in_flight.values(), default=None)
        for topic, partition in stalls.observe(time.monotonic(), committed, ends, busy_since):
            offset = committed[(topic, partition)]
            log.warning(
                "%s[%d] committed %d of %d and has not moved for %.0fs with nothing in flight: "
                "reading it again from %d (faust-streaming #596)",
                topic,
                partition,
                offset,
                ends[(topic, partition)],
                stream.stall_patience_seconds,
                offset,
            )
            c.metrics.stalls_reread.labels(topic=topic).inc()
            await reread_from_committed(app.consumer, topic, partition, offset)

    return app

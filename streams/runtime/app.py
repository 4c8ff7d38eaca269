"""The stream worker's wiring: two thin Faust agents, the store stage and the timers.

    raw.<institution>.<kind> ──normaliser──► norm.<kind>, norm.identity, deadletter
    norm.lab, norm.encounter, alerts.ack, alerts.escalation ──clinical──► alerts.critical, alerts.escalation
    norm.*, norm.identity, alerts.* ──store──► regional store (one transaction per batch)

Each stage is a handler (streams/runtime/normaliser.py, clinical.py, store.py) on the stage runtime
(stage.py: decode-and-catch, retry, dead letters, ack after confirm, stop on a bug). The store stage
needs no tables and runs on a plain librdkafka consumer (store_consumer.py). Reliability rules that
shape the Faust side (../shared/reference/faust-reliability.md): `concurrency=1` (faust-streaming #606);
events acked by hand after their outputs are confirmed (`linger_take`, Faust's `noack_take` with a
linger instead of a window); state in changelogged tables.

Kafka refusing the worker's principal while it runs (ACLs or credentials revoked) stops the worker with
the typed refusal, whichever client met it (access.py, stage.py `StageHealth.access_lost`); its clients
share one record of refusals (`ClientErrors`), which the access watch's new connections keep current.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any, cast

import faust

from core.contract import KINDS, RECORD_SCHEMAS, TopicNames
from core.exceptions import AccessDeniedError
from core.kafka_errors import ClientErrors
from core.settings import KafkaSettings, StreamSettings
from streams.exceptions import StageFailedError
from streams.runtime.access import refusals_reported_app, reporting
from streams.runtime.changelog import attach_changelogs
from streams.runtime.clinical import ANALYTES_TABLE, LEGACY_ANALYTES_TABLE, ClinicalHandler, ClinicalTables
from streams.runtime.delivery import inline_delivery_app
from streams.runtime.lag import LagReport
from streams.runtime.membership import group_instance_id
from streams.runtime.normaliser import NormaliserHandler
from streams.runtime.outputs import Publish, make_outputs
from streams.runtime.stage import Components, Stage, StageHealth, run_batches
from streams.runtime.stalls import GroupPositions, contiguous_offsets_app
from streams.runtime.startup import (
    PromptTableManager,
    heartbeat_seconds,
    prompt_app,
    start_early,
    warm_registry,
)
from streams.runtime.store import StoreHandler, store_topics
from streams.runtime.store_consumer import StoreConsumer, consumer_config, store_group
from streams.runtime.tables import RawKeyTable, store_url
from streams.runtime.timers import (
    AccessWatch,
    RawTopicWatch,
    StallWatch,
    StateExpiryWatch,
    StoreLagWatch,
    stage_topic_sets,
)

log = logging.getLogger("clinhub.streams")

ROLES = ("normaliser", "clinical", "store")
# A refused password counts once refused this long (a broker just started may not know it yet); the
# access watch opens a new connection this often, so deleted credentials stop a worker within ~20 s.
ACCESS_PATIENCE_SECONDS = 10.0
ACCESS_CHECK_SECONDS = 10.0
# how long a refused worker's orderly stop may take before it exits anyway (`exit_refused`)
ACCESS_STOP_GRACE_SECONDS = 15.0


def check_roles(roles: Collection[str]) -> None:
    unknown = set(roles) - set(ROLES)
    if unknown or not roles:
        raise ValueError(f"roles must be a non-empty subset of {', '.join(ROLES)}, not {sorted(roles)}")


def app_id_for(stream: StreamSettings, roles: Collection[str]) -> str:
    """All stages: the app id; a subset: its own app and consumer group, e.g. `clinhub-streams-clinical`."""
    return stream.app_id if set(roles) == set(ROLES) else "-".join([stream.app_id, *sorted(roles)])


def faust_credentials(kafka: KafkaSettings) -> Any:
    """The worker's principal for Faust's aiokafka clients, as `client_config` gives librdkafka's."""
    context = None
    if kafka.uses_tls:
        from aiokafka.helpers import create_ssl_context

        cafile = str(kafka.ssl_ca_location) if kafka.ssl_ca_location is not None else None
        context = create_ssl_context(cafile=cafile)  # verifies the broker's certificate and name
    if kafka.uses_sasl:
        config = kafka.client_config()  # refuses missing credentials, reads the password file
        return faust.SASLCredentials(
            username=config["sasl.username"],
            password=config["sasl.password"],
            ssl_context=context,
            mechanism=config["sasl.mechanism"],
        )
    return faust.SSLCredentials(context) if context is not None else None


def _faust_app(
    kafka: KafkaSettings,
    stream: StreamSettings,
    app_id: str,
    skipped_offsets: GroupPositions,
    health: StageHealth,
) -> faust.App:
    stream.data_dir.mkdir(parents=True, exist_ok=True)  # Faust makes only the last level, the app's own
    app_class = inline_delivery_app(
        prompt_app(contiguous_offsets_app(faust.App, skipped_offsets.first_record_offset))
    )
    return refusals_reported_app(app_class, kafka.sasl_username, health)(
        app_id,
        broker=[f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        broker_credentials=faust_credentials(kafka),
        store=store_url(stream.table_store),
        Table=RawKeyTable,
        TableManager=PromptTableManager,  # the tables registered without Faust's 1 s wait (startup.py)
        autodiscover=False,
        processing_guarantee="at_least_once",
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        stream_wait_empty=False,
        topic_partitions=kafka.topic_partitions,
        topic_replication_factor=kafka.topic_replication,
        table_standby_replicas=0,
        web_enabled=False,
        datadir=str(stream.data_dir / app_id),  # table state belongs to one app id (consumer group)
        broker_commit_every=1000,
        broker_commit_interval=stream.commit_interval_seconds,
        broker_session_timeout=stream.session_timeout_seconds,
        broker_heartbeat_interval=heartbeat_seconds(stream.session_timeout_seconds),  # rebalances seen soon
        consumer_group_instance_id=group_instance_id(stream, app_id),  # static member: fast restarts
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
    )


def table_memory(stream: StreamSettings) -> dict[str, int]:
    """RocksDB memory bounds of each table database (faust.stores.rocksdb.RocksDBOptions): two write
    buffers and a block cache of the configured sizes, instead of Faust's 3 x 64 MB and 2 GB per database."""
    if not stream.table_store.startswith("rocksdb://"):
        return {}
    mb = 1024 * 1024
    return {
        "write_buffer_size": stream.table_write_buffer_mb * mb,
        "max_write_buffer_number": 2,
        "block_cache_size": stream.table_block_cache_mb * mb,
    }


def clinical_sources(topics: TopicNames) -> list[str]:
    """What the clinical stage reads: results, encounters (the ward), acknowledgements, escalations."""
    return [topics.norm("lab"), topics.norm("encounter"), topics.acks_topic, topics.escalations_topic]


def source_topics(topics: TopicNames, stream: StreamSettings, roles: Collection[str]) -> list[str]:
    """The topics the given stages read (raw ones of the configured institutions; others found later)."""
    names: list[str] = []
    if "normaliser" in roles:
        names += [topics.raw(institution, kind) for institution in stream.institutions for kind in KINDS]
    if "clinical" in roles:
        names += clinical_sources(topics)
    if "store" in roles:
        names += sorted(topics.stored())
    return list(dict.fromkeys(names))


def _on_shutdown(app: faust.App, close: Any) -> None:
    async def run(_app: Any, **_kwargs: Any) -> None:
        await asyncio.to_thread(close)

    app.on_before_shutdown.connect(cast(Any, run))  # mode's handler type is narrower


def exit_refused(refused: BaseException) -> None:
    """The last resort of `stop_worker`: the refusal said as `clinhub stream worker` says it, exit 2."""
    log.critical(
        "the worker did not stop within %.0fs of being refused; exiting now", ACCESS_STOP_GRACE_SECONDS
    )
    logging.shutdown()
    sys.stderr.write(f"error: {refused}\n")
    sys.stderr.flush()
    os._exit(2)


def exit_deadline(
    refused: BaseException,
    seconds: float = ACCESS_STOP_GRACE_SECONDS,
    exit_now: Callable[[BaseException], None] = exit_refused,
) -> threading.Timer:
    """`exit_now(refused)` in `seconds`, on a thread of its own: not a timer of the event loop, which
    Faust's stop itself can block (mode's `ServiceThread.stop` waits on a threading.Event for the
    aiokafka consumer's thread, which a group coordinator refusing the principal held for over 30 s)."""
    timer = threading.Timer(seconds, exit_now, args=(refused,))
    timer.daemon = True
    timer.start()
    return timer


def create_app(
    kafka: KafkaSettings,
    stream: StreamSettings,
    components: Components,
    publish_override: Publish | None = None,
    raw_topics: Sequence[str] = (),
    roles: Collection[str] = ROLES,
) -> faust.App:
    """Build the Faust app, its agents and timers. Connections are made when the worker starts.

    `raw_topics` adds raw topics found on the cluster (`topics.discover_raw_topics`) to those of the
    configured institutions. `roles` picks the stages this worker runs. `publish_override` replaces
    publishing to Kafka, for `agent.test_context()` tests.
    """
    check_roles(roles)
    topics = TopicNames(prefix=stream.topic_prefix)
    app_id = app_id_for(stream, roles)
    # its own probe, so that checking skipped offsets never waits behind the stall watch's reads
    skipped_offsets = GroupPositions(kafka.client_config(), app_id)

    async def stop_worker(refused: BaseException) -> None:
        # Faust's stop may wait for ever on a consumer that is itself fine (seen when the database
        # refused the store stage of an all-stage worker, and on the aiokafka consumer's thread when
        # the group coordinator refused it): past the grace, the process exits anyway, saying the same.
        # Nothing unconfirmed was acknowledged, so nothing is lost (as after a kill).
        exit_deadline(refused)
        await app.crash(refused)  # the worker stops and exits non-zero with it (clinhub stream worker)

    health = StageHealth(components.metrics, stop_worker)
    errors = ClientErrors(kafka.sasl_username, patience=ACCESS_PATIENCE_SECONDS)  # every client's refusals
    app = _faust_app(kafka, stream, app_id, skipped_offsets, health)
    _on_shutdown(app, skipped_offsets.close)
    in_flight: dict[str, float] = {}  # Faust stage -> when its current batch started (stall watchdog)
    confirm_state = None  # without our producer, tables send their changelogs through Faust's
    if publish_override is not None:
        publish = publish_override
    else:
        outputs = make_outputs(kafka, errors=errors)
        publish = outputs.publish
        # table changelogs through the same librdkafka producer, confirmed before a batch's ack
        confirm_state = attach_changelogs(app, outputs.produce_nowait, kafka.sasl_username).confirm
        _on_shutdown(app, outputs.close)

    def stage(name: str) -> Stage:
        return Stage(name, components, topics, publish, health, confirm_state)

    async def warm_up() -> None:  # while Faust starts, not at each stage's first batch (startup.py)
        await asyncio.to_thread(warm_registry, components.registry, RECORD_SCHEMAS.values())

    start_early(app, "registry", warm_up)

    def table(name: str, **kwargs: Any) -> Any:
        # use_partitioner: the changelog partition follows the key's hash (murmur2 of the raw key, as on
        # the topics the agent reads), so tables can be written from batch handlers and timers, not only
        # inside stream iteration (streams/runtime/tables.py).
        return app.Table(
            name,
            default=None,
            partitions=kafka.topic_partitions,
            use_partitioner=True,
            options=table_memory(stream),
            **kwargs,
        )

    def raw_topic(*names: str) -> faust.TopicT:
        return app.topic(*names, key_serializer="raw", value_serializer="raw")

    configured = [topics.raw(institution, kind) for institution in stream.institutions for kind in KINDS]
    raw_names = sorted(set(configured) | set(raw_topics))
    clinical_names = clinical_sources(topics)

    if "normaliser" in roles:
        normaliser = stage("normaliser")
        normalise = NormaliserHandler(normaliser, table("identity-links"))

        @app.agent(raw_topic(*raw_names), concurrency=1, name="normaliser")
        async def normaliser_agent(events: faust.StreamT[Any]) -> None:
            await run_batches(
                events,
                normalise.handle,
                normaliser,
                stream.batch_size,
                stream.batch_linger_seconds,
                in_flight,
            )

        raw_watch = RawTopicWatch(
            app,
            kafka.client_config(),
            topics,
            raw_names,
            settle_seconds=min(45.0, stream.raw_topic_scan_seconds),
        )
        app.timer(interval=stream.raw_topic_scan_seconds, name="watch_raw_topics")(
            reporting(health, raw_watch.tick)
        )

    if "clinical" in roles:
        clinical = stage("clinical")
        tables = ClinicalTables(
            analytes=table(ANALYTES_TABLE, partition_by_prefix="|"),
            open_alerts=table("open-alerts"),
            wards=table("wards"),
            legacy_analytes=table(LEGACY_ANALYTES_TABLE),
        )
        judge = ClinicalHandler(clinical, tables, components.reference.policy)

        @app.agent(raw_topic(*clinical_names), concurrency=1, name="clinical")
        async def clinical_agent(events: faust.StreamT[Any]) -> None:
            await run_batches(
                events, judge.handle, clinical, stream.batch_size, stream.batch_linger_seconds, in_flight
            )

        async def escalation_timer() -> None:
            await judge.escalate_due()

        app.timer(interval=stream.escalation_check_seconds, name="escalation_timer")(
            reporting(health, escalation_timer)
        )

        # analyte state that can no longer change a decision leaves the tables (streams/domain/expiry.py)
        expiry = StateExpiryWatch(
            app,
            {ANALYTES_TABLE: tables.analytes, LEGACY_ANALYTES_TABLE: tables.legacy_analytes},
            judge.expire_states,
            components.metrics,
            keys_per_tick=stream.state_expiry_keys_per_tick,
        )
        log.info("analyte state expires %s after its newest result and its last write", judge.expiry_horizon)
        app.timer(interval=stream.state_expiry_check_seconds, name="state_expiry_timer")(
            reporting(health, expiry.tick)
        )

    if "store" in roles:
        _add_store_stage(app, kafka, stream, stage("store"), errors)

    if kafka.uses_sasl:
        access_watch = AccessWatch(kafka.client_config(), errors)
        app.timer(interval=ACCESS_CHECK_SECONDS, name="watch_access")(reporting(health, access_watch.tick))

    positions = GroupPositions(kafka.client_config(), app_id)
    _on_shutdown(app, positions.close)
    stall_watch = StallWatch(
        app,
        positions,
        stage_topic_sets(roles, raw_names, clinical_names),
        in_flight,
        components.metrics,
        patience=stream.stall_patience_seconds,
    )
    app.timer(interval=stream.stall_check_seconds, name="watch_stalls")(reporting(health, stall_watch.tick))
    return app


def _add_store_stage(
    app: faust.App, kafka: KafkaSettings, stream: StreamSettings, store: Stage, errors: ClientErrors
) -> None:
    """Not a Faust agent: a librdkafka consumer in its own group that marks offsets done only after the
    store transaction (streams/runtime/store_consumer.py), run from the worker's start on: it needs no
    table, so it does not wait for Faust's group, tables and recovery (startup.py `start_early`)."""
    group = store_group(stream.app_id)
    consumer = StoreConsumer(
        consumer_config(
            kafka.client_config(),
            group,
            stream.commit_interval_seconds,
            stream.session_timeout_seconds,
            instance_id=app.conf.consumer_group_instance_id,  # the worker's, as its Faust consumer's
        ),
        store_topics(store),
        StoreHandler(store).handle,
        stream.batch_size,
        stream.batch_linger_seconds,
        errors=errors,
    )
    lag_watch = StoreLagWatch(
        consumer.assignment,
        GroupPositions(kafka.client_config(), group),
        LagReport(store.metrics.consumer_lag, "store"),
    )
    app.timer(interval=stream.stall_check_seconds, name="watch_store_lag")(
        reporting(store.health, lag_watch.tick)
    )

    async def store_stage() -> None:
        try:
            await consumer.run()
        except StageFailedError:
            return  # reported down by the stage runtime; its batch was never marked stored
        except AccessDeniedError as exc:  # Kafka or the database refused us
            await store.health.stop_worker(exc)  # its batch was never marked stored either
        except Exception as exc:
            log.critical("the store stage stopped: %r", exc)
            store.failed("run the store consumer", 1, exc)
            await app.crash(exc)  # the consumer itself failed: a worker without it must not look healthy
            raise

    start_early(app, "store", store_stage)

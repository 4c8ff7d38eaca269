"""More fault tests on the real stack, from ../shared/reference/faust-reliability.md ("Fault tests a
pipeline like ours is judged by"): broker restart mid-stream (1), an exception inside the agent (3), the
poison messages test_lab_path.py does not cover (6), rebalance under load (8) and a slow sink (5).

Shared check: A = event ids Kafka acknowledged; every one is stored exactly once, none is both stored and
dead-lettered, and every critical result has exactly one alert.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import func, select, text

from clinhub.infra import kafka, postgres
from clinhub.infra.process import pid_alive
from clinhub.infra.registry import RegistryLayout
from producers.publisher import Receipt, make_publisher, message_key
from producers.simulator import simulate_events
from schemas import standard
from schemas.exceptions import SchemaError
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.models import Alert, IngestLog
from streams.runtime.store_consumer import store_group
from tests.factories import lab_record
from tests.integration.conftest import HubEnv, broker_layout, running_hub
from tests.integration.test_faults import assert_exactly_once, stored_counts, traffic
from tests.integration.test_lab_path import rows_for, wait_for

# The consumer session timeout the slow-sink test gives its worker (as conftest's workers have).
SESSION_TIMEOUT = 10.0
JOINED = re.compile(r"Joined group '(?P<group>[^']+)' \(generation (?P<generation>\d+)\)")


# -- helpers -------------------------------------------------------------------------------------------


def publish(hub: HubEnv, records: list[dict[str, Any]], delivery_timeout: float = 30.0) -> set[str]:
    """Publish lab results per institution with the SDK; returns the event ids Kafka acknowledged (A)."""
    acknowledged: set[str] = set()
    for institution in sorted({r["envelope"]["institution_id"] for r in records}):
        publisher = make_publisher(hub.settings, institution, delivery_timeout=delivery_timeout)
        mine = [r for r in records if r["envelope"]["institution_id"] == institution]
        acknowledged |= {r.event_id for r in publisher.publish_many_labs(mine) if isinstance(r, Receipt)}
        publisher.close()
    return acknowledged


def critical_results(count: int) -> list[dict[str, Any]]:
    """Critical potassium results (6.8 mmol/L, limit 6.1), each for a patient of its own.

    A new patient has no earlier result to suppress or delta-check against, so each of these must raise
    exactly one alert whatever order and whichever worker they are processed in.
    """
    return [
        lab_record(
            "H001" if i % 2 else "H002", "K" if i % 2 else "LAB0101", 6.8, "mmol/L", mrn=f"CRIT{i:06d}"
        )
        for i in range(count)
    ]


def ids(records: list[dict[str, Any]]) -> set[str]:
    return {str(r["envelope"]["event_id"]) for r in records}


def full_log(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def next_worker_log(hub: HubEnv) -> Path:
    """The log file the next `hub.start_worker()` writes (conftest numbers them by the files there)."""
    return hub.workdir / f"worker-{len(list(hub.workdir.glob('worker-*.log')))}.log"


def stored_times(hub: HubEnv, event_ids: set[str]) -> list[dt.datetime]:
    """When the store stored each of these events (ingest_log.ingested_time, the worker's clock), sorted."""
    with hub.engine.connect() as conn:
        times = conn.execute(select(IngestLog.ingested_time).where(IngestLog.event_id.in_(event_ids)))
        return sorted(times.scalars())


def print_gap(hub: HubEnv, what: str, since: dt.datetime, event_ids: set[str]) -> None:
    """Print (no timed assertion: speed is measured, not asserted) how long after `since` the first and the
    last of `event_ids` were stored; all of them must be stored already."""
    times = stored_times(hub, event_ids)
    assert len(times) == len(event_ids), "measured once all are stored"
    first, last = ((t - since).total_seconds() for t in (times[0], times[-1]))
    print(f"\n{what}: first of {len(times)} events stored {first:.2f} s, the last {last:.2f} s after")


def print_alert_gap(
    hub: HubEnv, what: str, since: dt.datetime, event_ids: set[str], clinical_group: str
) -> None:
    """Print how long after `since` the first and the last alert of `event_ids` was raised (the clinical
    stage's clock, `alerts.raised_time`): the gap clinicians see. Waits until the clinical stage's group
    (`clinical_group`) has committed all of norm.lab and the store all of the alerts topic."""
    store = store_group(hub.settings.stream.app_id)
    wait_for(
        lambda: (
            hub.caught_up(clinical_group, hub.topics.norm("lab"))
            and hub.caught_up(store, hub.topics.alerts_topic)
        ),
        hub,
        120,
        what="their alerts raised and stored",
    )
    with hub.engine.connect() as conn:
        times = sorted(
            conn.execute(select(Alert.raised_time).where(Alert.source_event_id.in_(event_ids))).scalars()
        )
    if not times:
        print(f"{what}: no alert among these events")
        return
    first, last = ((t - since).total_seconds() for t in (times[0], times[-1]))
    print(f"{what}: first of {len(times)} alerts raised {first:.2f} s, the last {last:.2f} s after")


def generations(log_text: str) -> list[int]:
    """Group generations this worker joined, in order (aiokafka logs every join at INFO)."""
    return [int(m["generation"]) for m in JOINED.finditer(log_text)]


def dead_letters(hub: HubEnv, wait: float = 5.0, at_least: int = 0) -> list[dict[str, Any]]:
    """Every record on the test's dead-letter topic, decoded (fastavro reads uuids as uuid.UUID)."""
    decode = hub.decoder()
    messages = hub.consume_all(
        hub.topics.deadletter_topic, wait, (lambda m: len(m) >= at_least) if at_least else (lambda m: False)
    )
    return [decode(m.value()) for m in messages]


def dead_lettered_event_ids(hub: HubEnv, letters: list[dict[str, Any]]) -> set[str]:
    """Event ids of the dead-lettered messages whose original value still decodes (set D)."""
    decode = hub.decoder()
    found = set()
    for letter in letters:
        try:
            record = decode(letter["original_value"])
        except SchemaError:
            continue  # a poison message: it has no event id to compare
        envelope = record.get("envelope") or {}
        if envelope.get("event_id") is not None:
            found.add(str(envelope["event_id"]))
    return found


def settled(hub: HubEnv) -> bool:
    """Both groups have committed the end of every topic a lab result passes through: the Faust
    agents' (normaliser, clinical) and the store consumer's."""
    topics = hub.topics
    faust_group, store = hub.settings.stream.app_id, store_group(hub.settings.stream.app_id)
    return all(
        hub.caught_up(group, topic)
        for group, topic in (
            (faust_group, topics.raw("H001", "lab")),
            (faust_group, topics.raw("H002", "lab")),
            (faust_group, topics.norm("lab")),
            (store, topics.norm("lab")),
            (store, topics.identity_topic),
            (store, topics.alerts_topic),
        )
    )


def lag_report(hub: HubEnv, group: str) -> str:
    """Partitions where the group's committed offset is behind the end of the topic, for failure messages."""
    consumer = Consumer({**hub.settings.kafka.client_config(), "group.id": group})
    lines = []
    try:
        for topic in hub.topics.all_for(hub.settings.stream.institutions):
            partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
            committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
            for tp in committed:
                high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)[1]
                if high > 0 and tp.offset < high:
                    lines.append(f"{topic}[{tp.partition}] committed {tp.offset} of {high}")
    finally:
        consumer.close()
    return "\n".join(lines) or "(no lag)"


def wait_reporting_lag(
    hub: HubEnv, condition: Callable[[], bool], timeout: float, what: str, state: Callable[[], str]
) -> None:
    """wait_for, with `state()` and the group's lag in the failure message."""
    try:
        wait_for(condition, hub, timeout, what=what)
    except AssertionError as exc:
        app_id = hub.settings.stream.app_id
        lags = "\n".join(
            f"lag of {group}:\n{lag_report(hub, group)}"
            for group in (app_id, store_group(app_id), f"{app_id}-normaliser", f"{app_id}-clinical")
        )
        raise AssertionError(f"{exc}\n{state()}\n{lags}") from None


def alerts_per_result(hub: HubEnv, event_ids: set[str]) -> dict[str, int]:
    with hub.engine.connect() as conn:
        rows = conn.execute(
            select(Alert.source_event_id, func.count())
            .where(Alert.source_event_id.in_(event_ids))
            .group_by(Alert.source_event_id)
        ).all()
    return {str(event_id): int(count) for event_id, count in rows}


def assert_shared_check(
    hub: HubEnv,
    acknowledged: set[str],
    critical: set[str],
    timeout: float = 120.0,
    is_settled: Callable[[HubEnv], bool] = settled,
) -> list[dict[str, Any]]:
    """A stored exactly once, A ∩ D = ∅, one alert per critical result; returns the dead letters.

    `timeout` bounds the wait for the store and for the group's commits together.
    """
    assert acknowledged, "nothing was acknowledged: the test proved nothing"
    deadline = time.monotonic() + timeout

    def state() -> str:
        return f"stored {stored_counts(hub, acknowledged)[1]} of {len(acknowledged)} acknowledged events"

    wait_reporting_lag(
        hub,
        lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged),
        timeout,
        "all acknowledged events stored",
        state,
    )
    # Committed offsets at the end of every topic: nothing is still in flight (dead letters, alerts), and
    # the group's lag drains. Checked last, so that a stuck commit position is reported as just that.
    stuck: AssertionError | None = None
    try:
        left = max(10.0, deadline - time.monotonic())
        wait_reporting_lag(hub, lambda: is_settled(hub), left, "the group committing every topic", state)
    except AssertionError as exc:
        stuck = exc
    assert_exactly_once(hub, acknowledged)
    letters = dead_letters(hub)
    both = acknowledged & dead_lettered_event_ids(hub, letters)
    assert not both, f"{len(both)} events both stored and dead-lettered, e.g. {sorted(both)[:3]}"
    critical &= acknowledged
    if critical:
        per_result = alerts_per_result(hub, critical)
        missing = critical - set(per_result)
        assert not missing, f"{len(missing)} critical results raised no alert, e.g. {sorted(missing)[:3]}"
        repeated = {k: v for k, v in per_result.items() if v != 1}
        assert not repeated, f"critical results with more than one alert: {repeated}"
    if stuck is not None:
        raise AssertionError(
            "every acknowledged event is stored exactly once, with one alert per critical result, but the "
            f"group's committed offsets stopped short of the end of its topics:\n{stuck}"
        )
    return letters


def install_trigger(hub: HubEnv, name: str, body: str, level: str = "STATEMENT") -> None:
    """A PL/pgSQL trigger before every insert into observations, running `body` as the owner who installs
    it (SECURITY DEFINER: the store's role need not be granted the fault's own sequences)."""
    with hub.engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS $$ "
                f"BEGIN {body} RETURN NULL; END $$"
            )
        )
        conn.execute(
            text(
                f"CREATE TRIGGER {name} BEFORE INSERT ON observations "
                f"FOR EACH {level} EXECUTE FUNCTION {name}()"
            )
        )


# -- 1. broker restart mid-stream ----------------------------------------------------------------------


@pytest.fixture()
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[kafka.KafkaLayout]:
    """A broker for one test, so that killing it cannot hurt any other test.

    Restarting the session broker would work too (same ports and data dir), but every later test would
    then depend on this one restoring it; a broker of its own costs one JVM start (~10 s) and isolates
    the fault completely. kafka.stop goes by the pid file, so it also stops the restarted process.
    """
    layout = broker_layout(tmp_path_factory.mktemp("kafka-restart"), heap="512m")
    kafka.start(layout)
    try:
        yield layout
    finally:
        kafka.stop(layout)


@pytest.fixture()
def restart_hub(
    own_broker: kafka.KafkaLayout,
    schema_registry: RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    tmp_path: Path,
) -> Iterator[HubEnv]:
    with running_hub(own_broker, schema_registry, postgres_cluster, tmp_path) as env:
        yield env


def stop_broker(layout: kafka.KafkaLayout, how: str) -> None:
    pid = kafka.running_pid(layout)
    assert pid is not None, "the broker is not running"
    if how == "kill":
        os.killpg(pid, signal.SIGKILL)  # no controlled shutdown, no final flush of its state
        deadline = time.monotonic() + 30
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not pid_alive(pid), "the broker survived SIGKILL"
    else:
        assert kafka.stop(layout), "the broker was not stopped"


@pytest.mark.parametrize("how", ["kill", "terminate"])
def test_broker_restart_mid_stream_loses_and_duplicates_nothing(
    restart_hub: HubEnv, own_broker: kafka.KafkaLayout, how: str
) -> None:
    hub = restart_hub
    hub.start_worker()
    critical = critical_results(20)
    before = publish(hub, traffic(seed=11, count=400) + critical[:10])
    wait_for(lambda: stored_counts(hub, before)[1] > 0, hub, what="processing started")

    stop_broker(own_broker, how)
    # Producers keep publishing while the broker is away: librdkafka holds the messages and delivers them
    # once it is back; only those acknowledged within the delivery timeout count in A.
    during: set[str] = set()
    publishing = threading.Thread(
        target=lambda: during.update(publish(hub, traffic(seed=12, count=200), delivery_timeout=90))
    )
    publishing.start()
    try:
        time.sleep(8)  # the worker loses its fetches, commits and sends meanwhile
    finally:
        kafka.start(own_broker)  # same ports, same data dir; returns once it answers metadata requests
    publishing.join(120)
    assert not publishing.is_alive()
    assert during, "what producers sent during the outage was delivered once the broker was back"
    after = publish(hub, traffic(seed=13, count=400) + critical[10:])

    assert_shared_check(hub, before | during | after, ids(critical), timeout=150)
    assert hub.workers[0].poll() is None, "the worker rode out the restart"


# -- 3. an exception inside the agent -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "count"),
    [
        ("40P01", 25),  # deadlock_detected: the driver calls it an OperationalError (transient)
        ("P0001", 25),  # raise_exception: a plain error, as any trigger or check may raise
        ("P0001", 1),  # ... in a batch of one event, where there is nothing to bisect
    ],
)
def test_the_database_raising_once_is_retried_not_skipped(hub: HubEnv, sqlstate: str, count: int) -> None:
    hub.start_worker()
    mrn = f"MRN{uuid.uuid4().int % 10**7:07d}"
    warm_up = lab_record("H001", "NA", 140.0, "mmol/L", mrn=mrn)
    first = publish(hub, [warm_up])
    wait_for(lambda: stored_counts(hub, first)[1] == 1, hub, what="warm-up stored")
    wait_for(lambda: settled(hub), hub, what="warm-up committed")

    # The first insert into observations from now on fails; sequences are not rolled back with the
    # failed transaction, so the retry gets 2 and passes.
    with hub.engine.begin() as conn:
        conn.execute(text("CREATE SEQUENCE fail_once_seq"))
    install_trigger(
        hub,
        "fail_once",
        "IF nextval('fail_once_seq') = 1 THEN "
        f"RAISE EXCEPTION 'injected failure' USING ERRCODE = '{sqlstate}'; END IF;",
    )
    # The same patient: no new identity link, so the store's batch holds these lab results only.
    batch = [lab_record("H001", "K", 4.0 + i / 100, "mmol/L", mrn=mrn) for i in range(count)]
    acknowledged = publish(hub, batch)
    assert len(acknowledged) == count

    letters = assert_shared_check(hub, acknowledged | first, set())
    assert letters == [], (
        f"nothing may be dead-lettered: {[(d['error_class'], d['reason']) for d in letters]}"
    )
    with hub.engine.connect() as conn:
        calls = conn.execute(text("SELECT last_value FROM fail_once_seq")).scalar_one()
    assert calls >= 2, "the injected failure really happened and the insert was tried again"


# -- 6. poison messages ---------------------------------------------------------------------------------


def test_every_kind_of_poison_message_is_dead_lettered_and_its_neighbours_stored(hub: HubEnv) -> None:
    """Covered in test_lab_path.py: wrong magic byte, truncated Avro. Here: unknown schema id, headers under
    5 bytes (including empty and null values), another record type's schema id, a body that breaks the
    uuid logical type, and records that decode but break the standard (wrong institution, impossible
    value, a time in the future)."""
    registry = ConfluentRegistry(hub.settings.registry.client_config())
    # check=False: encode records that break the standard, as a faulty producer without the SDK would.
    lab_encoder = make_encoder(registry, standard.load(standard.LAB_RESULT), check=False)
    vitals_encoder = make_encoder(registry, standard.load(standard.VITAL_SIGNS), check=False)
    mrn = "MRN0000999"
    good = [lab_record("H001", "K", 4.0 + i / 10, "mmol/L", mrn=mrn) for i in range(10)]
    future = lab_record("H001", "K", 4.0, "mmol/L", mrn=mrn)
    future["result_time"] = future["result_time"].replace(year=future["result_time"].year + 1)
    vitals = simulate_events(7, 1, kinds={"vitals": 1.0})[0][1]  # a valid VitalSigns record
    framed = lab_encoder(good[0])
    poison: dict[str, tuple[bytes | None, str, str | None]] = {  # name -> value, error class, field
        "unknown schema id": (
            framed[:1] + struct.pack(">I", 2_000_000_000) + framed[5:],
            "UnknownSchemaIdError",
            "schema_id",
        ),
        "3-byte header": (b"\x00\x00\x01", "ShortHeaderError", "header"),
        "empty value": (b"", "ShortHeaderError", "header"),
        "null value": (None, "ShortHeaderError", "header"),
        "another record's schema id": (vitals_encoder(vitals), "IncompatibleSchemaError", "schema_id"),
        "event id not a uuid": (
            lab_encoder(lab_record("H001", "K", 4.1, "mmol/L", mrn=mrn, event_id="not-a-uuid")),
            "PayloadDecodeError",
            "payload",
        ),
        "wrong institution": (
            lab_encoder(lab_record("H002", "LAB0101", 4.1, "mmol/L", mrn=mrn)),
            "RejectedEvent",
            "envelope.institution_id",
        ),
        "impossible value": (
            lab_encoder(lab_record("H001", "K", 60.0, "mmol/L", mrn=mrn)),
            "ImplausibleValueError",
            "value_numeric",
        ),
        "result in the future": (lab_encoder(future), "ImplausibleTimeError", "result_time"),
    }
    topic = hub.topics.raw("H001", "lab")
    key = message_key(good[0])
    # good, poison, good, poison, ..., good: one key, so one partition, processed in this order
    sequence: list[tuple[str, bytes | None]] = [("good 0", lab_encoder(good[0]))]
    for i, (name, (value, _, _)) in enumerate(poison.items(), start=1):
        sequence += [(name, value), (f"good {i}", lab_encoder(good[i]))]
    positions: dict[str, tuple[int, int]] = {}
    producer = hub.producer()
    for name, value in sequence:

        def remember(err: Any, msg: Any, name: str = name) -> None:
            assert err is None, err
            positions[name] = (msg.partition(), msg.offset())

        producer.produce(topic, key=key, value=value, on_delivery=remember)
    assert producer.flush(30) == 0
    assert len(positions) == len(sequence)

    hub.start_worker()
    letters = assert_shared_check(hub, ids(good), set())

    by_position = {(d["original_partition"], d["original_offset"]): d for d in letters}
    assert len(letters) == len(poison), [(d["error_class"], d["reason"]) for d in letters]
    for name, (value, error_class, field) in poison.items():
        letter = by_position.get(positions[name])
        assert letter is not None, f"{name}: not dead-lettered"
        assert letter["original_topic"] == topic, name
        assert letter["original_key"] == key, name
        assert letter["original_value"] == value, name
        assert (letter["error_class"], letter["field"]) == (error_class, field), (name, letter["reason"])
        assert letter["reason"], name
        assert letter["institution_id"] == "H001", name  # from the topic, whatever the payload claims
        assert letter["processor"] == "streams.normaliser", name
    for record in good:
        assert rows_for(hub, str(record["envelope"]["event_id"])) == 1


# -- 8. rebalance under load ----------------------------------------------------------------------------


ROLE_SOURCES = {
    "normaliser": lambda topics: [topics.raw("H001", "lab"), topics.raw("H002", "lab")],
    "clinical": lambda topics: [topics.norm("lab")],
    "store": lambda topics: [topics.norm("lab"), topics.identity_topic, topics.alerts_topic],
}


# What a stage's process is not given: it must run without it (least privilege, as in docker-compose.yml)
WITHHELD = {
    "normaliser": {"CLINHUB_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none"},
    "clinical": {
        "CLINHUB_DATABASE_URL": "postgresql+psycopg://nobody@127.0.0.1:9/none",
        "CLINHUB_SECURITY_PSEUDONYM_KEY": "",
    },
    "store": {"CLINHUB_SECURITY_PSEUDONYM_KEY": ""},
}


def start_node(hub: HubEnv, node: str) -> dict[str, subprocess.Popen[bytes]]:
    """One node of a scaled-out deployment: a worker process per stage, each in its stage's group, each
    without the secrets its stage does not use. Each keeps its state in a data dir of its node and stage,
    so a node started again under the same name is the same static group members (the instance id
    derives from the data dir)."""
    return {
        role: hub.start_worker(
            {
                "CLINHUB_STREAM_ROLES": f'["{role}"]',
                "CLINHUB_STREAM_DATA_DIR": str(hub.workdir / f"node-{node}-{role}"),
                **WITHHELD[role],
            }
        )
        for role in ROLE_SOURCES
    }


def stages_settled(hub: HubEnv) -> bool:
    """Every stage's group has committed the end of every topic it reads."""
    app_id = hub.settings.stream.app_id
    group = {
        "normaliser": f"{app_id}-normaliser",
        "clinical": f"{app_id}-clinical",
        "store": store_group(app_id),
    }
    return all(
        hub.caught_up(group[role], topic)
        for role, sources in ROLE_SOURCES.items()
        for topic in sources(hub.topics)
    )


def test_rebalance_under_load_workers_added_killed_and_stopped(hub: HubEnv) -> None:
    """Two nodes share the load; a third joins, one is SIGKILLed and started again, one stops cleanly,
    all while events keep arriving. Each node runs one worker per stage, as a scaled-out deployment does
    (see the `roles` setting: in one app, two agents share each norm.lab message, and faust-streaming
    0.15.3 can commit it after a rebalance when only one of them got it). The killed node's partitions
    wait for it (static members: it is back under the same instance ids, well within the session
    timeout, 10 s here); the cleanly stopped node's move at once (it leaves its groups). Both gaps are
    printed (run with -s).

    Two Faust faults are handled by the hub here (streams/runtime/stalls.py): after a rebalance Faust can drop
    fetched messages and then commit past them as a "gap", which the consumer refuses; the commit then
    stops, and the stall watchdog reads the partition again from its commit.
    """
    critical = critical_results(60)
    chunks = [traffic(seed=80 + i, count=300) + critical[i * 6 : (i + 1) * 6] for i in range(10)]
    first, second = start_node(hub, "first"), start_node(hub, "second")
    acknowledged = publish(hub, chunks[0])
    wait_for(lambda: stored_counts(hub, acknowledged)[1] > 0, hub, what="processing started")
    acknowledged |= publish(hub, chunks[1])

    third_log = next_worker_log(hub)  # its normaliser's
    start_node(hub, "third")
    for chunk in chunks[2:4]:
        acknowledged |= publish(hub, chunk)
    wait_for(lambda: bool(generations(full_log(third_log))), hub, what="the third node joining the groups")
    for chunk in chunks[4:6]:
        acknowledged |= publish(hub, chunk)

    for worker in first.values():
        hub.stop_worker(worker, kill=True)
    waiting = publish(hub, chunks[6])  # those on the killed node's partitions wait for it
    acknowledged |= waiting
    restarted = dt.datetime.now(dt.UTC)
    start_node(hub, "first")  # the same node again: the same static members
    wait_for(lambda: stored_counts(hub, waiting)[1] == len(waiting), hub, 150, what="the killed node back")
    print_gap(hub, "rebalance test: a SIGKILLed node started again, from its start", restarted, waiting)
    clinical_group = f"{hub.settings.stream.app_id}-clinical"
    print_alert_gap(hub, "  and its alerts", restarted, waiting, clinical_group)
    acknowledged |= publish(hub, chunks[7])

    stopped = dt.datetime.now(dt.UTC)
    for worker in second.values():
        worker.terminate()  # SIGTERM, all of the node at once
    # published while the node stops: those on its partitions wait for the hand-over to its survivors
    handed_over = publish(hub, chunks[8])
    acknowledged |= handed_over
    for worker in second.values():
        worker.wait(60)
        hub.workers.remove(worker)
    exited = (dt.datetime.now(dt.UTC) - stopped).total_seconds()
    wait_for(lambda: stored_counts(hub, handed_over)[1] == len(handed_over), hub, 150, what="handed over")
    print_gap(hub, "rebalance test: a node stopped cleanly, from its SIGTERM", stopped, handed_over)
    what = f"  and their alerts (the node had exited {exited:.2f} s after it)"
    print_alert_gap(hub, what, stopped, handed_over, clinical_group)
    acknowledged |= publish(hub, chunks[9])

    assert_shared_check(hub, acknowledged, ids(critical), timeout=150, is_settled=stages_settled)
    joined = generations(full_log(third_log))
    assert len(set(joined)) >= 2, f"the survivor saw the group change under it: generations {joined}"


# -- 5. slow sink, no rebalance storm -------------------------------------------------------------------


def test_a_slow_and_then_stuck_store_causes_no_rebalance(hub: HubEnv) -> None:
    """Every insert into observations sleeps, then the test locks the table for longer than the consumer
    session timeout. The store stage waits in a thread while librdkafka's own thread heartbeats: neither
    the Faust group nor the store consumer's group rebalances, and once the lock goes everything is
    stored exactly once."""
    log_path = next_worker_log(hub)
    hub.start_worker({"CLINHUB_STREAM_SESSION_TIMEOUT_SECONDS": str(SESSION_TIMEOUT)})
    warm_up = publish(hub, traffic(seed=51, count=40))
    wait_for(lambda: stored_counts(hub, warm_up)[1] == len(warm_up), hub, what="warm-up stored")
    joined_before = generations(full_log(log_path))
    assert joined_before, "the worker's log shows its group join"
    store_assignments = full_log(log_path).count("store consumer assigned")
    assert store_assignments == 1, "the store consumer joined its group once"

    install_trigger(hub, "slow_store", "PERFORM pg_sleep(0.3);")
    slow = publish(hub, traffic(seed=52, count=200))
    wait_for(lambda: stored_counts(hub, slow)[1] > 0, hub, what="slow inserts going on")

    with hub.engine.connect() as conn:
        conn.execute(text("LOCK TABLE observations IN SHARE MODE"))  # inserts wait; reads go on
        stuck = publish(hub, traffic(seed=53, count=300))
        deadline = time.monotonic() + 2 * SESSION_TIMEOUT + 5
        while time.monotonic() < deadline:
            assert hub.workers[0].poll() is None, hub.worker_log()
            time.sleep(1)
        assert stored_counts(hub, stuck)[1] == 0, "the lock really held the store back"
        conn.rollback()

    # No critical sentinels: traffic's critical results may be suppressed repeats, so no exact count.
    assert_shared_check(hub, warm_up | slow | stuck, set())
    log_text = full_log(log_path)
    assert generations(log_text) == joined_before, f"the group rebalanced: {generations(log_text)}"
    assert "Heartbeat session expired" not in log_text
    assert log_text.count("store consumer revoked") == 0, "the store consumer's group rebalanced"
    assert log_text.count("store consumer assigned") == store_assignments

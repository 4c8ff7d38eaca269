"""The thin path on real services: SDK -> Kafka -> Faust worker -> PostgreSQL, alerts and dead letters."""

from __future__ import annotations

import datetime as dt
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from clinhub.infra.process import free_port
from core.contract import RAW_TIMESTAMP_HEADER
from producers.publisher import make_publisher, message_key
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.models import Alert, Observation
from tests.factories import lab_record
from tests.integration.conftest import HubEnv


def wait_for(
    condition: Callable[[], bool], hub: HubEnv, timeout: float = 90.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for worker in hub.workers:
            assert worker.poll() is None, f"worker exited with {worker.returncode}:\n{hub.worker_log()}"
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{hub.worker_log()}")


def rows_for(hub: HubEnv, event_id: str) -> int:
    with hub.engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count()).select_from(Observation).where(Observation.event_id == event_id)
            ).scalar_one()
        )


def test_event_published_twice_is_stored_exactly_once(hub: HubEnv) -> None:
    """A redelivered event (same event id) must never create a second row."""
    publisher = make_publisher(hub.settings, "H001")
    record = lab_record("H001", "K", 4.2, "mmol/L")
    # same patient: same partition, so processed after both
    sentinel = lab_record("H001", "NA", 140.0, "mmol/L")
    first = publisher.publish_lab(record)
    second = publisher.publish_lab(record)
    publisher.publish_lab(sentinel)
    publisher.close()
    assert second.offset > first.offset, "both copies must really be on the topic"

    hub.start_worker()
    wait_for(lambda: rows_for(hub, sentinel["envelope"]["event_id"]) == 1, hub, what="sentinel stored")

    assert rows_for(hub, record["envelope"]["event_id"]) == 1
    with hub.engine.connect() as conn:
        stored = conn.execute(
            select(Observation).where(Observation.event_id == record["envelope"]["event_id"])
        ).one()
    assert stored.loinc_code == "2823-3"
    assert stored.value == 4.2 and stored.unit == "mmol/L"


def test_critical_potassium_raises_exactly_one_alert(hub: HubEnv) -> None:
    """6.8 mmol/L crosses the potassium limit: one alert on the alerts topic, even if the event repeats."""
    publisher = make_publisher(hub.settings, "H002")
    record = lab_record("H002", "LAB0101", 6.8, "mmol/L", mrn="0000012345")
    sentinel = lab_record("H002", "LAB0102", 140.0, "mmol/L", mrn="0000012345")
    publisher.publish_lab(record)
    publisher.publish_lab(record)
    publisher.publish_lab(sentinel)
    publisher.close()

    hub.start_worker()
    event_id = record["envelope"]["event_id"]
    wait_for(lambda: rows_for(hub, sentinel["envelope"]["event_id"]) == 1, hub, what="sentinel stored")

    def alert_stored() -> bool:
        with hub.engine.connect() as conn:
            alerts = conn.execute(select(Alert).where(Alert.source_event_id == event_id)).all()
        return len(alerts) == 1

    wait_for(alert_stored, hub, what="alert stored")
    decode = hub.decoder()
    messages = hub.consume_all(hub.topics.alerts_topic, timeout=10, until=lambda m: False)
    alerts = [decode(m.value()) for m in messages]
    mine = [a for a in alerts if str(a["source_event_id"]) == event_id]  # fastavro reads uuids as UUID
    assert len(mine) == 1, f"expected exactly one alert, got {mine}"
    alert = mine[0]
    assert alert["loinc_code"] == "2823-3"
    assert alert["limit_kind"] == "HIGH"
    assert alert["value"] == 6.8 and alert["unit"] == "mmol/L"
    assert alert["institution_id"] == "H002"
    assert alert["regional_patient_id"].startswith("rp-")
    assert alert["deadline_time"] > alert["raised_time"]
    assert dict(messages[0].headers() or [])["correlation_id"].decode() == alert["correlation_id"]


def test_poison_messages_go_to_dead_letter_and_the_next_good_one_is_processed(hub: HubEnv) -> None:
    """Wrong magic byte and truncated Avro are dead-lettered with their position and reason; nothing stops."""
    encoder = make_encoder(
        ConfluentRegistry(hub.settings.registry.client_config()), standard.load(standard.LAB_RESULT)
    )
    good = lab_record("H001", "GLU", 90.0, "mg/dL", mrn="MRN0000777")
    key = message_key(good)
    good_bytes = encoder(good)
    wrong_magic = b"\x01" + good_bytes[1:]
    truncated = good_bytes[: len(good_bytes) // 2]
    topic = hub.topics.raw("H001", "lab")
    positions: dict[bytes, tuple[int, int]] = {}

    def remember(err: Any, msg: Any) -> None:
        assert err is None, err
        positions[msg.value()] = (msg.partition(), msg.offset())

    producer = hub.producer()
    for value in (wrong_magic, truncated, good_bytes):
        producer.produce(topic, key=key, value=value, on_delivery=remember)
    assert producer.flush(30) == 0

    hub.start_worker()
    wait_for(lambda: rows_for(hub, good["envelope"]["event_id"]) == 1, hub, what="good message stored")

    decode = hub.decoder()
    dead = [
        decode(m.value()) for m in hub.consume_all(hub.topics.deadletter_topic, 30, lambda m: len(m) >= 2)
    ]
    by_value = {d["original_value"]: d for d in dead}
    assert set(by_value) == {wrong_magic, truncated}

    magic = by_value[wrong_magic]
    assert magic["error_class"] == "MagicByteError"
    assert magic["field"] == "header"
    assert "magic byte" in magic["reason"]
    assert (magic["original_partition"], magic["original_offset"]) == positions[wrong_magic]
    assert magic["original_topic"] == topic

    cut = by_value[truncated]
    assert cut["error_class"] == "PayloadDecodeError"
    assert cut["field"] == "payload"
    assert cut["reason"]
    assert (cut["original_partition"], cut["original_offset"]) == positions[truncated]
    assert cut["original_key"] == key

    with hub.engine.connect() as conn:
        glucose = conn.execute(
            select(Observation).where(Observation.event_id == good["envelope"]["event_id"])
        ).one()
    assert abs(glucose.value - 90.0 * 0.05551) < 1e-9
    assert glucose.unit == "mmol/L"


def test_a_record_the_database_refuses_is_dead_lettered_and_its_neighbours_stored(hub: HubEnv) -> None:
    """PostgreSQL enforces column lengths: one refused row must not block the partition forever."""
    publisher = make_publisher(hub.settings, "H001")
    before = lab_record("H001", "K", 4.1, "mmol/L", mrn="MRN0000555")
    refused = lab_record("H001", "K", 4.2, "mmol/L", mrn="MRN0000555")
    refused["abnormal_flag"] = "HIGH-HIGH-HIGH"  # longer than the column allows
    after = lab_record("H001", "K", 4.3, "mmol/L", mrn="MRN0000555")
    for record in (before, refused, after):
        publisher.publish_lab(record)
    publisher.close()

    hub.start_worker()
    wait_for(lambda: rows_for(hub, after["envelope"]["event_id"]) == 1, hub, what="neighbour stored")
    assert rows_for(hub, before["envelope"]["event_id"]) == 1
    assert rows_for(hub, refused["envelope"]["event_id"]) == 0

    decode = hub.decoder()
    dead = [
        decode(m.value()) for m in hub.consume_all(hub.topics.deadletter_topic, 30, lambda m: len(m) >= 1)
    ]
    assert len(dead) == 1
    assert dead[0]["error_class"] == "StoreRejectedError"
    assert "abnormal_flag" in dead[0]["reason"] or "too long" in dead[0]["reason"]
    assert decode(dead[0]["original_value"])["envelope"]["event_id"] == uuid.UUID(
        refused["envelope"]["event_id"]
    )


def test_a_new_institutions_raw_topics_are_found_by_pattern(hub: HubEnv) -> None:
    """X009 is in no configuration: its raw.X009.* topics are discovered when the worker starts."""
    from core.contract import KINDS

    added = hub.add_institution("X009")  # `clinhub institutions add X009`
    assert added.topics == [hub.topics.raw("X009", kind) for kind in KINDS]
    publisher = make_publisher(hub.settings, "X009")
    record = lab_record("X009", "NEWCODE", 12.5, "U/L", mrn="X-1")
    record["loinc_code"] = "2823-3"  # the producer sends LOINC itself; its local codes are not mapped yet
    record["unit"] = "mmol/L"
    record["value_numeric"] = 4.4
    publisher.publish_lab(record)
    publisher.close()

    hub.start_worker()  # CLINHUB_STREAM_INSTITUTIONS is ["H001","H002"]
    wait_for(lambda: rows_for(hub, record["envelope"]["event_id"]) == 1, hub, what="X009 result stored")
    with hub.engine.connect() as conn:
        stored = conn.execute(
            select(Observation).where(Observation.event_id == record["envelope"]["event_id"])
        ).one()
    assert (stored.institution_id, stored.loinc_code) == ("X009", "2823-3")


def test_raw_topics_created_after_start_up_join_the_subscription(hub: HubEnv) -> None:
    """A hospital that joins while the worker runs: its topics are found at the next scan, no restart."""

    hub.start_worker({"CLINHUB_STREAM_RAW_TOPIC_SCAN_SECONDS": "2"})
    known = lab_record("H001", "K", 4.1, "mmol/L", mrn="MRN-KNOWN")
    publisher = make_publisher(hub.settings, "H001")
    publisher.publish_lab(known)
    publisher.close()
    wait_for(lambda: rows_for(hub, known["envelope"]["event_id"]) == 1, hub, what="worker running")

    hub.add_institution("X010")  # its principal, raw topics, ACLs and registry user
    newcomer = lab_record("X010", "NEWCODE", 4.4, "mmol/L", mrn="X-10", loinc_code="2823-3")
    publisher = make_publisher(hub.settings, "X010")
    publisher.publish_lab(newcomer)
    publisher.close()
    wait_for(lambda: rows_for(hub, newcomer["envelope"]["event_id"]) == 1, hub, 90, what="X010 result stored")
    assert [worker.poll() for worker in hub.workers] == [None], "the one worker, never restarted"


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_latency_is_measured_from_the_broker_timestamp_of_the_raw_event(hub: HubEnv) -> None:
    """A critical result sent an hour after it happened (its event and produced time an hour old): the
    normalised records and the alert carry the raw message's broker timestamp as a header, and the
    worker's end-to-end histograms are observed from it (each observation between that timestamp and the
    scrape), while the store's clinical age says the result was an hour old."""
    metrics_port = free_port()
    hour_ago = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    publisher = make_publisher(hub.settings, "H002")
    record = lab_record("H002", "LAB0101", 6.8, "mmol/L", mrn="0000054321", at=hour_ago)
    sentinel = lab_record("H002", "LAB0102", 140.0, "mmol/L", mrn="0000054321", at=hour_ago)
    publisher.publish_lab(record)
    publisher.publish_lab(sentinel)
    publisher.close()
    hub.start_worker({"CLINHUB_INFRA_METRICS_PORT": str(metrics_port)})
    event_id = record["envelope"]["event_id"]

    def alert_stored() -> bool:
        with hub.engine.connect() as conn:
            return conn.execute(select(Alert).where(Alert.source_event_id == event_id)).first() is not None

    wait_for(lambda: rows_for(hub, sentinel["envelope"]["event_id"]) == 1, hub, what="sentinel stored")
    wait_for(alert_stored, hub, what="alert stored")

    decode = hub.decoder()
    raw = hub.consume_all(hub.topics.raw("H002", "lab"), 30, lambda m: len(m) >= 2)
    raw_ms = {str(decode(m.value())["envelope"]["event_id"]): m.timestamp()[1] for m in raw}
    norm = hub.consume_all(hub.topics.norm("lab"), 30, lambda m: len(m) >= 2)
    assert len(norm) == 2
    for message in norm:
        carried = dict(message.headers() or [])[RAW_TIMESTAMP_HEADER]
        assert int(carried) == raw_ms[str(decode(message.value())["envelope"]["event_id"])]
    (alert_message,) = hub.consume_all(hub.topics.alerts_topic, 30, lambda m: len(m) >= 1)
    assert int(dict(alert_message.headers() or [])[RAW_TIMESTAMP_HEADER]) == raw_ms[event_id]

    def observed(name: str, **labels: str) -> bool:
        return scrape(metrics_port).get((f"{name}_count", tuple(sorted(labels.items()))), 0) >= 1

    wait_for(lambda: observed("clinhub_store_end_to_end_seconds", kind="alert"), hub, 30, what="alert stored")
    scraped_at = time.time()
    samples = scrape(metrics_port)
    since_raw = {event: scraped_at - ms / 1000 for event, ms in raw_ms.items()}

    def total(name: str, **labels: str) -> tuple[float, float]:
        key = tuple(sorted(labels.items()))
        return samples[(f"{name}_count", key)], samples[(f"{name}_sum", key)]

    count, seconds = total("clinhub_alert_latency_seconds")
    alert_after_raw = alert_message.timestamp()[1] / 1000 - raw_ms[event_id] / 1000
    assert count == 1 and alert_after_raw <= seconds <= since_raw[event_id]
    count, seconds = total("clinhub_store_end_to_end_seconds", kind="lab")
    assert count == 2 and 0 <= seconds <= sum(since_raw.values())
    count, seconds = total("clinhub_store_end_to_end_seconds", kind="alert")
    assert count == 1 and alert_after_raw <= seconds <= since_raw[event_id]
    count, seconds = total("clinhub_store_clinical_age_seconds", kind="lab")
    assert count == 2 and seconds >= 2 * 3600, "an hour old clinically, whatever the hub's latency"

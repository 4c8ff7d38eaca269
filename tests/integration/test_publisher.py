"""The publisher SDK against the real broker and registry."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections import Counter
from functools import partial
from typing import Any

import pytest

from clinhub.infra.process import free_port
from core.settings import HubSettings
from producers.exceptions import ClusterUnreachableError, DeliveryFailedError
from producers.publisher import Publisher, Receipt, make_publisher
from producers.simulator import simulate_events
from schemas.exceptions import RecordValidationError
from tests.factories import lab_record
from tests.integration.conftest import HubEnv


def test_delivery_is_confirmed_with_topic_partition_and_offset(hub: HubEnv) -> None:
    publisher = make_publisher(hub.settings, "H001")
    records = [lab_record("H001", "K", 4.0 + i / 10, "mmol/L", mrn=f"MRN{i:07d}") for i in range(20)]
    receipts = publisher.publish_many_labs(records)
    publisher.close()
    assert all(isinstance(r, Receipt) for r in receipts)
    assert [r.event_id for r in receipts] == [r["envelope"]["event_id"] for r in records]
    on_topic = hub.consume_all(hub.topics.raw("H001", "lab"), 20, lambda m: len(m) >= 20)
    positions = {(m.partition(), m.offset()) for m in on_topic}
    assert {(r.partition, r.offset) for r in receipts} == positions  # type: ignore[union-attr]


def test_events_of_one_patient_keep_their_order_on_one_partition(hub: HubEnv) -> None:
    publisher = make_publisher(hub.settings, "H002")
    same_patient = [lab_record("H002", "LAB0101", 4.0, "mmol/L", mrn="0000000042") for _ in range(30)]
    for sequence, record in enumerate(same_patient):
        record["result_id"] = f"SEQ-{sequence:03d}"
    others = [lab_record("H002", "LAB0101", 4.0, "mmol/L", mrn=f"00000{n:05d}") for n in range(30)]
    interleaved = [r for pair in zip(same_patient, others, strict=True) for r in pair]
    results = publisher.publish_many_labs(interleaved)
    publisher.close()
    assert all(isinstance(r, Receipt) for r in results)

    decode = hub.decoder()
    messages = hub.consume_all(hub.topics.raw("H002", "lab"), 20, lambda m: len(m) >= 60)
    mine = [
        (m.partition(), m.offset(), decode(m.value())["result_id"])
        for m in messages
        if m.key() == b"H002|0000000042"
    ]
    assert len({partition for partition, _, _ in mine}) == 1, "one patient's events must share a partition"
    in_offset_order = [result_id for _, _, result_id in sorted(mine)]
    assert in_offset_order == [f"SEQ-{n:03d}" for n in range(30)]


def test_invalid_events_are_refused_before_anything_is_sent(hub: HubEnv) -> None:
    publisher = make_publisher(hub.settings, "H001")
    good = lab_record("H001", "K", 4.0, "mmol/L")
    bad_value = lab_record("H001", "K", 4.0, "mmol/L")
    bad_value["value_numeric"] = "high"
    with pytest.raises(RecordValidationError) as caught:
        publisher.publish_many_labs([good, bad_value])
    assert caught.value.field == "value_numeric"
    assert "'high'" in str(caught.value) and "double" in str(caught.value)

    other_institution = lab_record("H002", "K", 4.0, "mmol/L")
    with pytest.raises(RecordValidationError) as caught:
        publisher.publish_lab(other_institution)
    assert caught.value.field == "envelope.institution_id"
    publisher.close()
    assert hub.consume_all(hub.topics.raw("H001", "lab"), 5, lambda m: False) == [], "nothing was sent"


def test_every_kind_is_published_to_its_own_raw_topic(hub: HubEnv) -> None:
    events = simulate_events(seed=11, count=40)
    kinds = {kind for kind, _ in events}
    assert kinds >= {"lab", "vitals", "encounter", "medication", "diagnosis"}
    publishers: dict[str, Publisher] = {}
    for kind, record in events:
        institution = record["envelope"]["institution_id"]
        if institution not in hub.settings.stream.institutions:
            continue
        publisher = publishers.setdefault(institution, make_publisher(hub.settings, institution))
        receipt = publisher.publish(kind, record)
        assert receipt.topic == hub.topics.raw(institution, kind)
    for publisher in publishers.values():
        publisher.close()


def test_a_broker_that_is_down_gives_a_clear_error_within_the_timeout(hub: HubEnv) -> None:
    """Nothing listens on the port: the publish fails with DeliveryFailedError, not silently, not forever."""
    unreachable = HubSettings(
        kafka=hub.settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{free_port()}"}),
        registry=hub.settings.registry,
        database=hub.settings.database,
        security=hub.settings.security,
        stream=hub.settings.stream,
        infra=hub.settings.infra,
    )
    publisher = make_publisher(unreachable, "H001", delivery_timeout=3.0)
    started = time.monotonic()
    with pytest.raises(DeliveryFailedError) as caught:
        publisher.publish_lab(lab_record("H001", "K", 4.0, "mmol/L"))
    elapsed = time.monotonic() - started
    assert elapsed < 15, f"publish waited {elapsed:.1f}s"
    assert caught.value.reason
    assert caught.value.retriable


def test_connect_returns_once_the_cluster_answers_and_names_an_unreachable_one(hub: HubEnv) -> None:
    publisher = make_publisher(hub.settings, "H001")
    publisher.connect(timeout=30)
    receipt = publisher.publish_lab(lab_record("H001", "K", 4.0, "mmol/L"))
    assert receipt.topic == hub.topics.raw("H001", "lab")
    publisher.close()

    port = free_port()
    unreachable = hub.settings.model_copy(
        update={"kafka": hub.settings.kafka.model_copy(update={"bootstrap_servers": f"127.0.0.1:{port}"})}
    )
    started = time.monotonic()
    with pytest.raises(ClusterUnreachableError) as caught:
        make_publisher(unreachable, "H001", delivery_timeout=3.0).connect(timeout=2)
    assert time.monotonic() - started < 10
    assert caught.value.timeout == 2 and caught.value.reason
    assert caught.value.retry_after > 0


def test_a_stream_confirms_every_event_without_waiting_for_each(hub: HubEnv) -> None:
    """The asynchronous path: many in flight, every delivery report collected, each event on its topic."""
    publisher = make_publisher(hub.settings, "H001")
    records = [lab_record("H001", "K", 4.0, "mmol/L", mrn=f"MRN{i:07d}") for i in range(500)]
    receipts: list[Receipt | DeliveryFailedError] = []
    stream = publisher.stream(max_in_flight=64, on_result=receipts.append)
    for record in records:
        stream.send("lab", record)
        assert stream.in_flight <= 64
    outcome = stream.close()
    publisher.close()
    assert (outcome.sent, outcome.confirmed, outcome.failures) == (500, 500, [])
    assert {r.event_id for r in receipts} == {r["envelope"]["event_id"] for r in records}
    on_topic = hub.consume_all(hub.topics.raw("H001", "lab"), 30, lambda m: len(m) >= 500)
    assert len(on_topic) == 500


def _at_least(count: int, messages: list[Any]) -> bool:
    return len(messages) >= count


def test_simulate_publishes_at_its_rate_and_stamps_produced_time_when_it_publishes(hub: HubEnv) -> None:
    """`clinhub simulate --rate`: every event confirmed, the achieved rate printed, and each envelope's
    produced_time when it was published (the broker's timestamp of its message), not its event time."""
    hub.add_institution("C003")  # the simulator's third institution
    run = subprocess.run(
        [sys.executable, "-m", "clinhub.cli", "simulate", "--count", "300", "--rate", "500", "--seed", "3"],
        env=hub.env(),
        capture_output=True,
        text=True,
        timeout=180,
        cwd=hub.workdir,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    printed = re.search(
        r"published 300 events at ([\d.]+) events/s \(offered 500/s\); confirmed 300 of 300", run.stdout
    )
    assert printed, run.stdout
    expected = Counter(
        (record["envelope"]["institution_id"], kind)
        for kind, record in simulate_events(3, 300, critical_share=0.15, abnormal_share=0.2)
    )
    decode = hub.decoder()
    messages = []
    for (institution, kind), count in expected.items():
        on_topic = hub.consume_all(hub.topics.raw(institution, kind), 30, partial(_at_least, count))
        assert len(on_topic) == count, (institution, kind)
        messages.extend(on_topic)
    for message in messages:
        envelope = decode(message.value())["envelope"]
        broker_ms = message.timestamp()[1]
        produced_ms = envelope["produced_time"].timestamp() * 1000
        # stamped just before it was queued; the broker (or librdkafka) timestamps it on its way
        assert 0 <= broker_ms - produced_ms < 5000, (broker_ms, produced_ms)
        assert envelope["event_time"] < envelope["produced_time"]

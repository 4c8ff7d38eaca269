"""Dead letters in the store, on the real stack: a result the normaliser rejects ends as a dead_letters row
for its institution's integration staff, and a dead letter the store cannot read is passed over, never
dead-lettered again onto the topic the store reads."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from producers.publisher import make_publisher
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.models import DeadLetterRow
from streams.runtime.store_consumer import store_group
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import rows_for, wait_for

POTASSIUM = "2823-3"


def dead_letters(hub: HubEnv, *where: Any) -> list[Any]:
    with hub.engine.connect() as conn:
        return list(conn.execute(select(DeadLetterRow.__table__).where(*where)).all())


def test_a_result_the_normaliser_rejects_is_a_dead_letter_in_the_store(hub: HubEnv) -> None:
    """A potassium in a unit the hub cannot convert: possibly critical, unreadable, and now visible in the
    store with its institution, field and reason (the bytes stay on the dead-letter topic)."""
    publisher = make_publisher(hub.settings, "H001")
    rejected = lab_record("H001", "K", 7.4, "furlongs", mrn="MRN0000901")
    sentinel = lab_record("H001", "NA", 140.0, "mmol/L", mrn="MRN0000901")  # same patient: read after
    receipt = publisher.publish_lab(rejected)
    publisher.publish_lab(sentinel)
    publisher.close()
    topic = hub.topics.raw("H001", "lab")
    assert receipt.topic == topic

    hub.start_worker()
    wait_for(lambda: rows_for(hub, sentinel["envelope"]["event_id"]) == 1, hub, what="sentinel stored")
    at = (DeadLetterRow.original_topic == topic, DeadLetterRow.original_offset == receipt.offset)
    wait_for(lambda: len(dead_letters(hub, *at)) == 1, hub, what="the rejected result's dead letter stored")

    (row,) = dead_letters(hub, *at)
    assert row.original_partition == receipt.partition
    assert (row.kind, row.institution_id, row.field) == ("lab", "H001", "unit")
    assert "furlongs" in row.reason
    assert (row.possibly_critical, row.loinc_code) == (True, POTASSIUM)
    assert row.correlation_id == rejected["envelope"]["correlation_id"]
    assert (row.error_class, row.processor) == ("UnknownUnitError", "streams.normaliser")
    assert row.failed_time is not None and row.ingested_time >= row.failed_time
    assert len(dead_letters(hub)) == 1, "nothing else was rejected"
    assert not {"original_key", "original_value"} & set(DeadLetterRow.__table__.columns.keys())


def test_a_dead_letter_the_store_cannot_read_is_passed_over_never_dead_lettered_again(hub: HubEnv) -> None:
    topic = hub.topics.deadletter_topic
    encode = make_encoder(
        ConfluentRegistry(hub.settings.registry.client_config()), standard.load(standard.DEAD_LETTER)
    )
    readable = {
        "deadletter_id": str(uuid.uuid4()),
        "original_topic": hub.topics.raw("H002", "lab"),
        "original_partition": 1,
        "original_offset": 12,
        "original_key": b"H002|MRN0000902",
        "original_value": b"\x01 not avro",
        "error_class": "MagicByteError",
        "field": "header",
        "reason": "magic byte 1, expected 0",
        "institution_id": "H002",
        "correlation_id": None,
        "failed_time": lab_record("H002", "K", 1.0, "mmol/L")["envelope"]["event_time"],
        "processor": "streams.normaliser",
        "possibly_critical": False,
        "loinc_code": None,
    }
    producer = hub.producer()
    for value in (b"\x00\x00\x00\x00\x07 not a dead letter", None, encode(readable)):
        producer.produce(topic, key=b"k", value=value, partition=0)
    assert producer.flush(30) == 0

    hub.start_worker()
    wait_for(lambda: len(dead_letters(hub)) == 1, hub, what="the readable dead letter stored")
    group = store_group(hub.settings.stream.app_id)
    wait_for(
        lambda: hub.caught_up(group, topic), hub, 60, what="the store committed past the unreadable ones"
    )

    (row,) = dead_letters(hub)
    assert (row.deadletter_id, row.kind, row.institution_id) == (readable["deadletter_id"], "lab", "H002")
    on_topic = hub.consume_all(topic, 5, lambda messages: len(messages) > 3)
    assert len(on_topic) == 3, "no dead letter of a dead letter"
    log = "\n".join(path.read_text(errors="replace") for path in hub.workdir.glob("worker-*.log"))
    assert log.count("not dead-lettered again") == 2, hub.worker_log()

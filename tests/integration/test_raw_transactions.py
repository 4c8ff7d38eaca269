"""Transactions on the raw topics (a FHIR transaction Bundle is one), on the real broker and worker: the
normaliser reads committed, so an aborted transaction never reaches the store; its commit passes the
transaction markers and aborted records, mid-partition, at the end of a partition and after a restart,
without holding the commit or reading the partition again."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import select

from core import principals
from producers.publisher import make_publisher, message_key
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.models import Observation
from streams.runtime.stalls import group_positions
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

MRN = "MRN0000311"  # every event of the test: one key, one partition


def lab() -> dict[str, Any]:
    return lab_record("H001", "K", 4.1, "mmol/L", mrn=MRN)


def stored_result_ids(hub: HubEnv) -> set[str]:
    with hub.engine.connect() as conn:
        rows = conn.execute(select(Observation.result_id).where(Observation.institution_id == "H001"))
        return {row.result_id for row in rows}


def publish_aborted(hub: HubEnv, records: list[dict[str, Any]]) -> None:
    """Records written to raw.H001.lab in a transaction that is then aborted."""
    encode = make_encoder(
        ConfluentRegistry(hub.settings.registry.client_config()), standard.load(standard.LAB_RESULT)
    )
    producer = Producer(
        hub.settings.kafka.transactional_producer_config(10.0, f"test-aborted-{uuid.uuid4().hex[:8]}")
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for record in records:
        producer.produce(hub.topics.raw("H001", "lab"), value=encode(record), key=message_key(record))
    producer.flush(30)  # on the log, uncommitted
    producer.abort_transaction(30)


def commit_position(hub: HubEnv, partition: int) -> tuple[int, int]:
    """The worker group's committed offset and the end of raw.H001.lab[partition]."""
    tp = (hub.topics.raw("H001", "lab"), partition)
    committed, ends = group_positions(hub.settings.kafka.client_config(), hub.settings.stream.app_id, [tp])
    return committed[tp], ends[tp]


def test_aborted_transactions_never_reach_the_store_and_commits_pass_every_marker(hub: HubEnv) -> None:
    # as the FHIR gateway publishes a transaction: its principal, a transactional id of its prefix
    as_gateways = hub.settings.as_principal(principals.GATEWAYS)
    transactional_id = f"{principals.FHIR_TRANSACTIONAL_PREFIX}test-{uuid.uuid4().hex[:8]}"
    publisher = make_publisher(as_gateways, "H001", transactional_id=transactional_id)
    worker = hub.start_worker()
    first, aborted, plain, last = [lab(), lab()], [lab(), lab()], lab(), [lab(), lab()]
    receipts = publisher.publish_atomically([("lab", r) for r in first])
    publish_aborted(hub, aborted)
    publisher.publish("lab", plain)
    receipts += publisher.publish_atomically([("lab", r) for r in last])  # its marker ends the partition
    partition = receipts[0].partition
    assert {r.partition for r in receipts} == {partition}
    wanted = {r["result_id"] for r in [*first, plain, *last]}
    wait_for(lambda: wanted <= stored_result_ids(hub), hub, what="the committed events in the store")

    last_event = receipts[-1].offset
    wait_for(
        lambda: commit_position(hub, partition)[0] == last_event + 1,
        hub,
        what="the commit past the markers and the aborted records, up to the last event",
    )
    committed, end = commit_position(hub, partition)
    assert end == committed + 1, "only the last transaction's marker is after the commit"
    time.sleep(15)  # the stall watch (patience 10 s, every 2 s) would have read the partition again
    assert "reading it again" not in hub.worker_log(), "a partition ending in a marker was taken for a stall"

    hub.stop_worker(worker)  # a new worker starts at that marker, with nothing delivered before it
    after_restart = lab()
    publisher.publish("lab", after_restart)
    hub.start_worker()
    wanted.add(after_restart["result_id"])
    wait_for(lambda: wanted <= stored_result_ids(hub), hub, what="the event after the restart in the store")
    wait_for(
        lambda: commit_position(hub, partition)[0] == commit_position(hub, partition)[1],
        hub,
        what="the commit at the end after the restart",
    )
    publisher.close()

    assert not {r["result_id"] for r in aborted} & stored_result_ids(hub), "aborted events were stored"
    log = hub.worker_log()
    assert "reading it again" not in log, "a partition ending in a marker was taken for a stall"
    assert "were never delivered" not in log

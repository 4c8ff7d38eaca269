"""Publishing acknowledgements: an AlertAcknowledgement record on alerts.ack, keyed by the patient's
regional id (so it meets the alert's state on the clinical stage's partition), confirmed by the broker
(acks=all) before the console tells the clinician it is done."""

from __future__ import annotations

import datetime as dt
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Producer

from console.exceptions import PublishFailedError
from core import contract
from core.contract import TopicNames
from core.settings import KafkaSettings
from schemas import standard
from schemas.wire import AvroEncoder, ConfluentRegistry, make_encoder

CONSOLE_CHANNEL = "CONSOLE"


def acknowledgement_record(
    *,
    alert_id: str,
    regional_patient_id: str,
    username: str,
    role: str | None,
    read_back: bool,
    note: str | None,
    now: dt.datetime,
) -> dict[str, Any]:
    """An AlertAcknowledgement record; a fresh id each time (a second record is an action note)."""
    return {
        "ack_id": str(uuid.uuid4()),
        "alert_id": alert_id,
        "acknowledged_by": username,
        "role": role,
        "channel": CONSOLE_CHANNEL,
        "read_back": read_back,
        "acknowledged_time": now,
        "note": (note or "").strip() or None,
        "regional_patient_id": regional_patient_id,
    }


class AckPublisher:
    """Blocking publish-and-confirm; call it off the event loop (asyncio.to_thread)."""

    def __init__(self, producer: Any, encoder: AvroEncoder, topic: str, timeout: float) -> None:
        self._producer = producer
        self._encoder = encoder
        self._topic = topic
        self._timeout = timeout
        self._lock = threading.Lock()

    def publish(self, record: Mapping[str, Any]) -> None:
        value = self._encoder(record)
        outcome: dict[str, Any] = {}
        done = threading.Event()

        def on_delivery(err: Any, _msg: Any) -> None:
            outcome["error"] = err
            done.set()

        with self._lock:
            self._producer.produce(
                self._topic,
                value=value,
                key=contract.regional_key(str(record["regional_patient_id"])),
                on_delivery=on_delivery,
            )
        deadline = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._timeout)
        while not done.is_set():
            self._producer.poll(0.05)
            if dt.datetime.now(dt.UTC) > deadline:
                raise PublishFailedError("the broker did not confirm the acknowledgement in time; try again")
        if outcome.get("error") is not None:
            raise PublishFailedError(f"the broker refused the acknowledgement: {outcome['error']}")

    def close(self) -> None:
        self._producer.flush(self._timeout)


def build_ack_publisher(
    kafka: KafkaSettings, registry_config: Mapping[str, str], topics: TopicNames, timeout: float = 10.0
) -> AckPublisher:
    encoder = make_encoder(ConfluentRegistry(registry_config), standard.load(contract.ACK.schema))
    producer = Producer(kafka.producer_config(delivery_timeout=timeout))
    return AckPublisher(producer, encoder, topics.acks_topic, timeout)

"""End-to-end latency from the raw event's broker timestamp: the normaliser puts it on what it makes of
a raw message (as the RAW_TIMESTAMP_HEADER), the clinical stage carries it to alerts and their states,
and the clinical and store stages observe their latency from it. No Kafka, no database."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from core.contract import RAW_TIMESTAMP_HEADER
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from streams.metrics import make_stream_metrics
from streams.runtime.clinical import alert_latencies
from streams.runtime.messages import (
    RawMessage,
    carried_headers,
    kafka_timestamp_ms,
    raw_event_headers,
    seconds_since_raw_event,
)
from streams.runtime.normaliser import NormaliserHandler
from streams.runtime.outputs import Output
from streams.runtime.store import StoreHandler, end_to_end
from tests.factories import lab_record, normalised
from tests.unit.streams.runtime.test_app import NOW, make_components, stage_of
from tests.unit.streams.runtime.test_clinical_states import Clinical, _potassium

NOW_MS = int(NOW.timestamp() * 1000)
RAW_MS = NOW_MS - 180  # the raw event reached the broker 180 ms before NOW


def stamped(ms: int) -> dict[str, bytes]:
    return {RAW_TIMESTAMP_HEADER: str(ms).encode()}


def sample(histogram: MetricWrapperBase, suffix: str) -> float:
    (family,) = histogram.collect()
    return next(s.value for s in family.samples if s.name == family.name + suffix)


# -- the pure parts --------------------------------------------------------------------------------


def test_faust_seconds_become_the_brokers_milliseconds_and_none_is_none() -> None:
    assert kafka_timestamp_ms(1_764_000_000.123) == 1_764_000_000_123
    assert kafka_timestamp_ms(None) is None
    assert kafka_timestamp_ms(0.0) is None
    assert kafka_timestamp_ms(-0.001) is None  # Kafka's -1: no timestamp


def test_the_raw_events_header_is_its_own_broker_timestamp_never_one_an_institution_sent() -> None:
    forged = RawMessage("raw.H001.lab", 0, 1, b"k", b"v", stamped(NOW_MS - 10**9), timestamp_ms=RAW_MS)
    assert raw_event_headers(forged) == stamped(RAW_MS)
    assert raw_event_headers(RawMessage("raw.H001.lab", 0, 1, b"k", b"v")) == {}


def test_a_normalised_message_carries_its_raw_events_header_on() -> None:
    carrying = RawMessage("norm.lab", 0, 1, b"rp", b"v", {"correlation_id": b"c", **stamped(RAW_MS)}, NOW_MS)
    assert carried_headers(carrying) == stamped(RAW_MS), "the raw event's, not the norm message's own"
    assert carried_headers(RawMessage("norm.lab", 0, 1, b"rp", b"v", {}, NOW_MS)) == {}


def test_seconds_since_the_raw_event() -> None:
    assert seconds_since_raw_event(stamped(RAW_MS), NOW) == pytest.approx(0.18)
    assert seconds_since_raw_event(stamped(NOW_MS + 40), NOW) == 0.0, "a broker clock a little ahead"
    assert seconds_since_raw_event({}, NOW) is None
    assert seconds_since_raw_event({RAW_TIMESTAMP_HEADER: b"soon"}, NOW) is None


def test_alert_latencies_are_of_alerts_with_the_header_only() -> None:
    outputs = [
        Output("alerts.critical", b"rp", b"a", {"correlation_id": b"c", **stamped(RAW_MS)}),
        Output("alerts.state", b"id", b"s", stamped(RAW_MS)),  # a state, not an alert
        Output("alerts.critical", b"rp", b"a", {}),  # no raw event known
    ]
    assert alert_latencies(outputs, "alerts.critical", NOW) == [pytest.approx(0.18)]


def test_end_to_end_is_by_the_stored_records_kind_for_records_of_a_raw_event() -> None:
    stored = [
        RawMessage("norm.lab", 0, 1, b"rp", b"v", stamped(RAW_MS)),
        RawMessage("alerts.critical", 0, 2, b"rp", b"v", stamped(RAW_MS - 820)),
        RawMessage("alerts.ack", 0, 3, b"rp", b"v", {}),  # a clinician's: no raw event
    ]
    kinds = {"norm.lab": "lab", "alerts.critical": "alert", "alerts.ack": "ack"}
    assert end_to_end(stored, kinds, NOW) == [("lab", pytest.approx(0.18)), ("alert", pytest.approx(1.0))]


# -- the stages ------------------------------------------------------------------------------------


def test_the_normaliser_stamps_its_outputs_with_the_raw_messages_broker_timestamp() -> None:
    components = make_components(ConfluentRegistry({"url": "mock://raw-timestamps-normaliser"}))
    published: list[Output] = []

    async def capture(outputs: Sequence[Output]) -> None:
        published.extend(outputs)

    encode = make_encoder(components.registry, standard.load(standard.LAB_RESULT))
    record = lab_record("H001", "K", 4.1, "mmol/L", at=NOW, patient_national_id="11010519491231002X")
    forged = stamped(NOW_MS - 3_600_000)  # an institution's header of that name counts for nothing
    message = RawMessage("raw.H001.lab", 0, 0, b"H001|MRN", encode(record), forged, timestamp_ms=RAW_MS)
    handler = NormaliserHandler(stage_of("normaliser", components, capture), {})
    asyncio.run(handler.handle([message]))

    assert {output.topic for output in published} >= {"norm.lab"}
    for output in published:  # the normalised record and, when one was made, its identity link
        assert output.headers[RAW_TIMESTAMP_HEADER] == str(RAW_MS).encode(), output.topic


def test_the_clinical_stage_carries_it_to_the_alert_and_its_state_and_observes_the_alert_latency() -> None:
    clinical = Clinical("raw-timestamps-clinical")
    lab = _potassium(6.9, 5)
    message = clinical.message("norm.lab", lab["regional_patient_id"], "lab", lab)
    carrying = RawMessage(message.topic, 0, message.offset, message.key, message.value, stamped(RAW_MS))
    clinical.handle(carrying)

    alerts = [o for o in clinical.sent if o.topic == "alerts.critical"]
    states = [o for o in clinical.sent if o.topic == "alerts.state"]
    assert len(alerts) == 1 and len(states) == 1
    for output in alerts + states:
        assert output.headers[RAW_TIMESTAMP_HEADER] == str(RAW_MS).encode()
    latency = clinical.components.metrics.alert_latency_seconds
    assert sample(latency, "_count") == 1
    assert sample(latency, "_sum") == pytest.approx(0.18)


def test_the_store_observes_end_to_end_from_the_header_by_kind() -> None:
    components = make_components(ConfluentRegistry({"url": "mock://raw-timestamps-store"}))

    async def nothing(_outputs: Sequence[Output]) -> None:
        raise AssertionError("nothing is dead-lettered")

    encode = make_encoder(components.registry, standard.load(standard.LAB_RESULT))
    value = encode(normalised("lab", lab_record("H001", "K", 4.1, "mmol/L", at=NOW)))
    handler = StoreHandler(stage_of("store", components, nothing))
    asyncio.run(
        handler.handle(
            [
                RawMessage("norm.lab", 0, 1, b"rp", value, stamped(RAW_MS)),
                RawMessage("norm.lab", 0, 2, b"rp", value, {}),  # from a worker before the header
            ]
        )
    )
    end_to_end_lab = components.metrics.store_end_to_end_seconds.labels(kind="lab")
    assert sample(end_to_end_lab, "_count") == 1, "the record without the header is not measured"
    assert sample(end_to_end_lab, "_sum") == pytest.approx(0.18)


def test_every_latency_bucket_resolves_milliseconds_to_a_minute() -> None:
    metrics = make_stream_metrics(CollectorRegistry())
    for histogram in (metrics.store_end_to_end_seconds.labels(kind="lab"), metrics.alert_latency_seconds):
        (family,) = histogram.collect()
        bounds = sorted(float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket"))
        assert bounds[0] == 0.005 and bounds[-2] == 60, family.name  # the last is +Inf
        assert {0.25, 0.5, 1} <= set(bounds), family.name

"""One batch of raw messages in, normalised events and dead letters out; no Kafka, no database."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from core.contract import TopicNames
from schemas import standard
from schemas.exceptions import RegistryUnavailableError
from schemas.wire import AvroDecoder, AvroEncoder, ConfluentRegistry, make_encoder
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import load_reference
from streams.runtime.messages import RawMessage
from streams.runtime.normaliser import NormaliseOutcome, normalise_batch
from streams.runtime.stage import Codecs
from tests.factories import lab_record

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
RESULT_TIME = dt.datetime(2026, 11, 23, 11, 55, 0, 250000, tzinfo=dt.UTC)


def lab(
    institution: str = "H001", local_code: str = "K", value: float = 4.2, unit: str = "mmol/L", **fields: Any
) -> dict[str, Any]:
    """A result of MRN0000042 (no known age or sex) taken at RESULT_TIME."""
    return lab_record(
        institution,
        local_code,
        value,
        unit,
        mrn="MRN0000042",
        at=RESULT_TIME,
        patient_birth_year=None,
        patient_sex=None,
        **fields,
    )


@pytest.fixture
def codec() -> tuple[AvroEncoder, AvroDecoder]:
    registry = ConfluentRegistry({"url": f"mock://pipeline-{uuid.uuid4().hex}"})
    schema = standard.load(standard.LAB_RESULT)
    return make_encoder(registry, schema), AvroDecoder(registry, schema)


def message(value: bytes | None, offset: int, topic: str = "raw.H001.lab", partition: int = 1) -> RawMessage:
    return RawMessage(topic=topic, partition=partition, offset=offset, key=b"H001|MRN0000042", value=value)


def normalise(
    messages: list[RawMessage], decode: Callable[[bytes | None], dict[str, Any]]
) -> NormaliseOutcome:
    """The normaliser's batch step over lab topics, with an empty link table."""
    codecs = Codecs(ConfluentRegistry({"url": "mock://normaliser-stage"}))
    codecs.decoders["lab"] = decode  # type: ignore[assignment]
    return normalise_batch(messages, codecs, TopicNames(), REFERENCE, CODES, IDENTITY, lambda _key: None, NOW)


def event_ids(outcome: NormaliseOutcome) -> list[str]:
    return [str(event.record["envelope"]["event_id"]) for _, event in outcome.events]


def _unknown_schema_id(encode: AvroEncoder) -> bytes:
    good = encode(lab())
    return b"\x00" + (encode.schema_id + 999).to_bytes(4, "big") + good[5:]


def _event_id_not_a_uuid(encode: AvroEncoder) -> bytes:
    """The store keys on a 36-character UUID; a producer that skipped validation wrote anything else."""
    foreign = AvroEncoder(encode.schema_id, encode.schema, check=False)
    record = lab()
    record["envelope"]["event_id"] = "H001-LIS-20261123-000000000000000000000000042"
    return foreign(record)


# description -> (the poison message's bytes, expected error class, expected field)
POISON: dict[str, tuple[Callable[[AvroEncoder], bytes | None], str, str]] = {
    "wrong magic byte": (lambda encode: b"\x01" + encode(lab())[1:], "MagicByteError", "header"),
    "truncated Avro body": (lambda encode: encode(lab())[:-3], "PayloadDecodeError", "payload"),
    "impossible value": (lambda encode: encode(lab(value=40.0)), "ImplausibleValueError", "value_numeric"),
    "tombstone without a value": (lambda encode: None, "ShortHeaderError", "header"),
    "unit unknown for the analyte": (
        lambda encode: encode(lab(local_code="GLU", value=90.0, unit="mg%")),
        "UnknownUnitError",
        "unit",
    ),
    "institution other than the topic's": (
        lambda encode: encode(lab(institution="H002", local_code="LAB0101")),
        "RejectedEvent",
        "envelope.institution_id",
    ),
    "schema id unknown to the registry": (_unknown_schema_id, "UnknownSchemaIdError", "schema_id"),
    "event id that is not a UUID": (_event_id_not_a_uuid, "PayloadDecodeError", "payload"),
}


@pytest.mark.parametrize("case", sorted(POISON))
def test_a_poison_message_is_dead_lettered_and_its_neighbours_go_on(
    codec: tuple[AvroEncoder, AvroDecoder], case: str
) -> None:
    """A message's own fault (not an outage) rejects that message only, naming class and field."""
    encode, decode = codec
    poison, error_class, field_name = POISON[case]
    before, after = lab(), lab(value=7.5)  # a critical value is news, not poison
    batch = [message(encode(before), 1), message(poison(encode), 2), message(encode(after), 3)]

    outcome = normalise(batch, decode)

    assert event_ids(outcome) == [before["envelope"]["event_id"], after["envelope"]["event_id"]]
    (rejection,) = outcome.rejections
    assert (rejection.message, rejection.error_class, rejection.field) == (batch[1], error_class, field_name)
    assert rejection.reason


def test_mixed_batch_splits_into_events_and_rejections(codec: tuple[AvroEncoder, AvroDecoder]) -> None:
    """Every kind of poison in one batch: each is dead-lettered in order, good events keep their order."""
    encode, decode = codec
    cases = sorted(POISON)
    # potassium up to 7.0 mmol/L: critical values are news, not poison
    good = [lab(local_code="GLU", value=90.0, unit="mg/dL")] + [
        lab(value=3.5 + n / 2) for n in range(1, len(cases))
    ]
    batch: list[RawMessage] = []
    for n, (record, case) in enumerate(zip(good, cases, strict=True)):
        batch += [message(encode(record), 2 * n), message(POISON[case][0](encode), 2 * n + 1)]

    outcome = normalise(batch, decode)

    assert event_ids(outcome) == [record["envelope"]["event_id"] for record in good]
    got = [(r.message.offset, r.error_class, r.field) for r in outcome.rejections]
    assert got == [(2 * n + 1, POISON[case][1], POISON[case][2]) for n, case in enumerate(cases)]
    for rejection in outcome.rejections:
        assert (rejection.message.topic, rejection.message.partition) == ("raw.H001.lab", 1)
        assert rejection.message in batch
    glucose = next(event.record for _, event in outcome.events if event.record["local_code"] == "GLU")
    factor = REFERENCE.analytes[glucose["loinc_code"]].factors["mg/dL"]
    assert glucose["canonical_value"] == pytest.approx(90.0 * factor)


def test_rejection_keeps_what_could_be_read(codec: tuple[AvroEncoder, AvroDecoder]) -> None:
    """Decoded-but-rejected events keep their correlation id; undecodable ones get the topic's institution."""
    encode, decode = codec
    impossible = lab(value=40.0)
    batch = [message(encode(impossible), 1), message(b"\x00\x00", 2, topic="raw.H002.lab")]
    decoded_rejection, undecodable = normalise(batch, decode).rejections
    assert decoded_rejection.correlation_id == impossible["envelope"]["correlation_id"]
    assert decoded_rejection.institution_id == "H001"
    assert (undecodable.institution_id, undecodable.correlation_id) == ("H002", None)


@pytest.mark.parametrize(
    ("decoded", "error"),
    [({"envelope": None}, TypeError), ({}, KeyError), ({"envelope": {}}, KeyError)],
)
def test_an_error_of_the_hubs_own_code_is_not_dead_lettered(
    decoded: dict[str, Any], error: type[Exception]
) -> None:
    """A decoder that returns something odd is a bug of the hub, not a hospital's bad input: it
    propagates (the stage retries, then stops), and no message of the batch becomes a dead letter."""
    with pytest.raises(error):
        normalise([message(b"x", 3)], lambda _: decoded)


def test_a_message_on_a_topic_that_is_not_raw_is_rejected_naming_the_topic(
    codec: tuple[AvroEncoder, AvroDecoder],
) -> None:
    encode, decode = codec
    (rejection,) = normalise([message(encode(lab()), 1, topic="norm.lab")], decode).rejections
    assert (rejection.error_class, rejection.field) == ("RejectedEvent", "topic")


class DownRegistry:
    """A registry whose lookups fail as when the registry is unreachable."""

    def register(self, subject: str, schema_text: str) -> int:
        raise RegistryUnavailableError("connection refused")

    def schema_text(self, schema_id: int) -> str:
        raise RegistryUnavailableError("connection refused")


def test_registry_outage_propagates_so_the_batch_is_retried(codec: tuple[AvroEncoder, AvroDecoder]) -> None:
    """An outage is not the message's fault: nothing may be dead-lettered, the batch must be retried whole."""
    encode, _ = codec
    decode = AvroDecoder(DownRegistry(), standard.load(standard.LAB_RESULT))
    with pytest.raises(RegistryUnavailableError):
        normalise([message(encode(lab()), 1)], decode)

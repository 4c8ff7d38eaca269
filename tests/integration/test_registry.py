"""Schema governance against the real Confluent-compatible registry (Apicurio, ccompat API)."""

from __future__ import annotations

import json
import uuid

import pytest

from schemas import standard
from schemas.exceptions import IncompatibleSchemaError, UnknownSchemaIdError
from schemas.registration import register_standard
from schemas.wire import AvroDecoder, ConfluentRegistry, make_encoder


@pytest.fixture()
def registry(schema_registry_url: str) -> ConfluentRegistry:
    return ConfluentRegistry({"url": schema_registry_url})


def test_registering_the_standard_reports_new_then_unchanged_subjects(registry: ConfluentRegistry) -> None:
    first = {c.subject: c for c in register_standard(registry)}
    assert set(first) == set(standard.record_names())
    again = register_standard(registry)
    assert all(not change.changed for change in again), [c.describe() for c in again]
    assert {c.subject: c.schema_id for c in again} == {s: c.schema_id for s, c in first.items()}
    assert set(standard.record_names()) <= set(registry.subjects())


def test_registry_refuses_an_incompatible_version_under_backward_transitive(
    registry: ConfluentRegistry,
) -> None:
    subject = f"test.{uuid.uuid4().hex[:8]}.LabResult"
    v1 = json.loads(standard.load(standard.LAB_RESULT).text)
    registry.set_compatibility(subject, "BACKWARD_TRANSITIVE")
    registry.register(subject, json.dumps(v1))

    compatible = json.loads(json.dumps(v1))
    compatible["fields"].append({"name": "specimen_type", "type": ["null", "string"], "default": None})
    registry.register(subject, json.dumps(compatible))
    assert registry.versions(subject) == [1, 2]

    breaking = json.loads(json.dumps(compatible))
    breaking["fields"].append({"name": "bed_number", "type": "string"})  # required, no default
    with pytest.raises(IncompatibleSchemaError):
        registry.register(subject, json.dumps(breaking))
    assert registry.versions(subject) == [1, 2]


def test_decoder_resolves_ids_from_the_registry_and_rejects_unknown_ids(registry: ConfluentRegistry) -> None:
    schema = standard.load(standard.DEAD_LETTER)
    encode = make_encoder(registry, schema)
    import datetime as dt

    record = {
        "deadletter_id": str(uuid.uuid4()),
        "original_topic": "raw.H001.lab",
        "original_partition": 0,
        "original_offset": 7,
        "original_key": None,
        "original_value": b"\x01\x02",
        "error_class": "MagicByteError",
        "field": "header",
        "reason": "first byte is 1",
        "institution_id": "H001",
        "correlation_id": None,
        "failed_time": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        "processor": "test",
    }
    decoded = AvroDecoder(registry, schema)(encode(record))
    assert decoded["original_value"] == b"\x01\x02"
    unknown = b"\x00" + (2**31 - 7).to_bytes(4, "big") + b"\x00"
    with pytest.raises(UnknownSchemaIdError):
        AvroDecoder(registry)(unknown)

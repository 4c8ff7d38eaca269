"""Schema governance against the real Confluent-compatible registry (Apicurio, ccompat API), behind its
authenticating TLS proxy: every principal reads, only the admin registers."""

from __future__ import annotations

import json
import uuid

import pytest

from clinhub.infra.registry import RegistryLayout
from core import principals
from schemas import standard
from schemas.exceptions import IncompatibleSchemaError, RegistryAccessError, SchemaError, UnknownSchemaIdError
from schemas.registration import register_standard
from schemas.wire import AvroDecoder, ConfluentRegistry, make_encoder


@pytest.fixture()
def registry(schema_registry: RegistryLayout) -> ConfluentRegistry:
    return ConfluentRegistry(schema_registry.settings_for(principals.ADMIN).client_config())


def test_only_the_admin_registers_every_principal_looks_up_and_no_one_reads_anonymously(
    schema_registry: RegistryLayout, registry: ConfluentRegistry
) -> None:
    lab = standard.load(standard.LAB_RESULT)
    for principal in ("H001", principals.NORMALISER, principals.GATEWAYS):
        reader = ConfluentRegistry(schema_registry.settings_for(principal).client_config())
        assert reader.register(lab.subject, lab.text) == registry.register(lab.subject, lab.text), "a lookup"
        subject = f"test.{uuid.uuid4().hex[:8]}.Forged"
        with pytest.raises(RegistryAccessError, match="only the admin"):
            reader.register(subject, lab.text)
        assert subject not in registry.subjects(), f"{principal} registered a schema"
    ca = str(schema_registry.settings_for("H001").ssl_ca_location)
    anonymous = ConfluentRegistry({"url": schema_registry.url, "ssl.ca.location": ca})
    with pytest.raises(RegistryAccessError):
        anonymous.subjects()
    plain = schema_registry.url.replace("https://", "http://")
    with pytest.raises(SchemaError):
        ConfluentRegistry({"url": plain}).subjects()  # TLS only


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

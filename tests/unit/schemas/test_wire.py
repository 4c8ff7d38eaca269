"""The Confluent wire format and the standard's Avro records, against the in-process (mock://) registry."""

from __future__ import annotations

import datetime as dt
import json
import struct
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka.schema_registry.error import SchemaRegistryError

from schemas import standard
from schemas.exceptions import (
    IncompatibleSchemaError,
    MagicByteError,
    PayloadDecodeError,
    RecordValidationError,
    RegistryUnavailableError,
    ShortHeaderError,
    UnknownSchemaIdError,
    UnknownSchemaNameError,
    WireFormatError,
)
from schemas.standard import StandardSchema
from schemas.wire import (
    AvroDecoder,
    AvroEncoder,
    ConfluentRegistry,
    _translate,
    make_encoder,
    validate_record,
)
from tests.factories import lab_record

# Millisecond precision: timestamp-millis cannot carry microseconds.
T0 = dt.datetime(2026, 11, 23, 8, 30, 15, 123000, tzinfo=dt.UTC)
NATIONAL_ID = "11010519491231002X"  # the sample number printed in GB 11643-1999, not a real person

EXTREME_DOUBLES = [
    1.7976931348623157e308,  # largest finite double
    -1.7976931348623157e308,
    5e-324,  # smallest subnormal
    2.2250738585072014e-308,  # smallest normal
    -0.0,
    float("inf"),
    float("-inf"),
    float("nan"),
]


@pytest.fixture
def registry(request: pytest.FixtureRequest) -> ConfluentRegistry:
    """A fresh in-process registry per test, so schema ids never leak between tests."""
    return ConfluentRegistry({"url": f"mock://{request.node.originalname}-{uuid.uuid4().hex}"})


def lab_result(**overrides: Any) -> dict[str, Any]:
    """A LabResult with every field filled in."""
    return lab_record(
        "H002",
        "LAB0301",
        131.0,
        "g/L",
        mrn="0000012345",
        at=T0,
        **{
            "source_system": "LIS-LabWin",
            "source_message_id": "MSG000000001",
            "produced_time": T0 + dt.timedelta(seconds=1),
            "result_id": "H002-R000000001",
            "patient_national_id": NATIONAL_ID,
            "patient_birth_year": 1949,
            "patient_sex": "male",
            "encounter_id": "V000001",
            "local_code_system": "LIS-H002",
            "local_display": "血红蛋白 Hemoglobin",
            "reference_low": 115.0,
            "reference_high": 150.0,
            "abnormal_flag": "N",
            "specimen_collected_time": T0 - dt.timedelta(minutes=40),
            "performing_lab": "Riverside University Hospital Central Laboratory",
            "ordering_clinician": "DR0001",
            **overrides,
        },
    )


def lab_result_all_nulls() -> dict[str, Any]:
    """Only the required fields carry values; every optional union is null."""
    record = lab_result()
    schema = json.loads(standard.load(standard.LAB_RESULT).text)
    for field in schema["fields"]:
        if isinstance(field["type"], list) and "null" in field["type"]:
            record[field["name"]] = None
    record["envelope"]["source_message_id"] = None
    return record


def critical_alert(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "alert_id": str(uuid.uuid4()),
        "source_event_id": str(uuid.uuid4()),
        "regional_patient_id": "rp-" + "0" * 32,
        "institution_id": "H001",
        "ward": None,
        "loinc_code": "2823-3",
        "analyte": "Potassium",
        "value": 7.2,
        "unit": "mmol/L",
        "limit_kind": "HIGH",
        "limit_value": 6.1,
        "severity": "CRITICAL",
        "message": "Critical potassium: 7.2 mmol/L (> 6.1 mmol/L)",
        "rule_source": "ARUP: ARUP Laboratories, Critical Values, rev. 34 (2019)",
        "previous_value": None,
        "previous_time": None,
        "result_time": T0,
        "raised_time": T0 + dt.timedelta(seconds=2),
        "deadline_time": T0 + dt.timedelta(minutes=15),
        "correlation_id": str(uuid.uuid4()),
    }
    record.update(overrides)
    return record


def dead_letter(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "deadletter_id": str(uuid.uuid4()),
        "original_topic": "raw.H001.lab",
        "original_partition": 2**31 - 1,
        "original_offset": 2**63 - 1,
        "original_key": None,
        "original_value": bytes(range(256)),
        "error_class": "MagicByteError",
        "field": None,
        "reason": "first byte is 255, expected magic byte 0",
        "institution_id": None,
        "correlation_id": None,
        "failed_time": T0,
        "processor": "clinhub-streams",
    }
    record.update(overrides)
    return record


def comparable(value: Any) -> Any:
    """Make decoded and original values comparable: UUIDs as text, doubles by their exact bits."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items()}
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, float):
        return ("double", struct.pack("<d", value))  # distinguishes -0.0 and keeps NaN equal to itself
    return value


ROUND_TRIPS = [
    pytest.param(standard.LAB_RESULT, lab_result(), id="lab-full"),
    pytest.param(standard.LAB_RESULT, lab_result_all_nulls(), id="lab-all-nulls"),
    pytest.param(
        standard.LAB_RESULT,
        lab_result(local_display="空腹葡萄糖 𠮷 Glucose ✓", value_text="阴性"),
        id="lab-chinese-and-astral",
    ),
    *[
        pytest.param(
            standard.LAB_RESULT,
            lab_result(value_numeric=v, reference_low=v, reference_high=-v),
            id=f"lab-double-{v!r}",
        )
        for v in EXTREME_DOUBLES
    ],
    pytest.param(standard.CRITICAL_VALUE_ALERT, critical_alert(), id="alert-nulls"),
    pytest.param(
        standard.CRITICAL_VALUE_ALERT,
        critical_alert(
            ward="心内科 CCU",
            previous_value=5.9,
            previous_time=T0 - dt.timedelta(hours=8),
            limit_kind="LOW",
            severity="MODERATE",
        ),
        id="alert-previous",
    ),
    *[
        pytest.param(
            standard.CRITICAL_VALUE_ALERT,
            critical_alert(value=v, limit_value=-v, previous_value=v),
            id=f"alert-double-{v!r}",
        )
        for v in EXTREME_DOUBLES
    ],
    pytest.param(standard.DEAD_LETTER, dead_letter(), id="deadletter-nulls"),
    pytest.param(
        standard.DEAD_LETTER,
        dead_letter(
            original_key=b"H001|MRN0000001",
            original_value=b"",
            field="value_numeric",
            reason="钾 40 mmol/L is outside the possible range",
            institution_id="H001",
            correlation_id=str(uuid.uuid4()),
            original_partition=0,
            original_offset=0,
        ),
        id="deadletter-values",
    ),
]


@pytest.mark.parametrize(("name", "record"), ROUND_TRIPS)
def test_round_trip_preserves_every_field(
    registry: ConfluentRegistry, name: str, record: dict[str, Any]
) -> None:
    """What a producer encodes is exactly what the hub decodes, including nulls, unicode and odd doubles."""
    schema = standard.load(name)
    encoder = make_encoder(registry, schema)
    data = encoder(record)
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == encoder.schema_id
    decoded = AvroDecoder(registry, schema)(data)
    # fields the record leaves out come back as their schema defaults; compare what was sent
    assert comparable({key: decoded[key] for key in record}) == comparable(record)


def test_registration_is_idempotent_and_ids_differ_per_subject(registry: ConfluentRegistry) -> None:
    """Registering the same schema again gives the same id; another record type gets another id."""
    lab = standard.load(standard.LAB_RESULT)
    first = registry.register(lab.subject, lab.text)
    assert registry.register(lab.subject, lab.text) == first
    alert = standard.load(standard.CRITICAL_VALUE_ALERT)
    assert registry.register(alert.subject, alert.text) != first
    assert lab.subject in registry.subjects()


def _good(encoder: AvroEncoder) -> bytes:
    return encoder(lab_result())


DECODE_ERRORS: list[Any] = [
    pytest.param(lambda enc: None, ShortHeaderError, "header", id="none"),
    pytest.param(lambda enc: b"", ShortHeaderError, "header", id="empty"),
    pytest.param(lambda enc: b"\x00", ShortHeaderError, "header", id="1-byte"),
    pytest.param(lambda enc: _good(enc)[:4], ShortHeaderError, "header", id="4-bytes"),
    pytest.param(lambda enc: b"\x01" + _good(enc)[1:], MagicByteError, "header", id="magic-1"),
    pytest.param(lambda enc: b"\xff" + _good(enc)[1:], MagicByteError, "header", id="magic-255"),
    pytest.param(lambda enc: b'{"envelope": {}}', MagicByteError, "header", id="json-not-avro"),
    pytest.param(
        lambda enc: b"\x00" + (enc.schema_id + 4242).to_bytes(4, "big") + _good(enc)[5:],
        UnknownSchemaIdError,
        "schema_id",
        id="unknown-schema-id",
    ),
    pytest.param(lambda enc: _good(enc)[:5], PayloadDecodeError, "payload", id="header-only"),
    pytest.param(lambda enc: _good(enc)[:-1], PayloadDecodeError, "payload", id="truncated-by-1"),
    pytest.param(
        lambda enc: _good(enc)[: len(_good(enc)) // 2], PayloadDecodeError, "payload", id="truncated-half"
    ),
    pytest.param(lambda enc: _good(enc) + b"\x00", PayloadDecodeError, "payload", id="trailing-byte"),
    pytest.param(lambda enc: _good(enc) + b"garbage", PayloadDecodeError, "payload", id="trailing-garbage"),
    pytest.param(
        lambda enc: _good(enc) + _good(enc)[5:], PayloadDecodeError, "payload", id="two-bodies-one-header"
    ),
]


@pytest.mark.parametrize(("make", "error", "field"), DECODE_ERRORS)
def test_decode_errors_raise_the_specific_class_with_field(
    registry: ConfluentRegistry,
    make: Callable[[AvroEncoder], bytes | None],
    error: type[Exception],
    field: str,
) -> None:
    """Each way a message can be broken is told apart, so dead letters say what to fix."""
    schema = standard.load(standard.LAB_RESULT)
    encoder = make_encoder(registry, schema)
    decoder = AvroDecoder(registry, schema)
    with pytest.raises(WireFormatError) as info:
        decoder(make(encoder))
    assert type(info.value) is error
    assert info.value.field == field
    assert info.value.reason


def _set(record: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    target = record
    *parents, leaf = path.split(".")
    for part in parents:
        target = target[part]
    target[leaf] = value
    return record


@pytest.mark.parametrize(
    ("path", "bad_value"),
    [
        ("result_id", 5),
        ("patient_mrn", None),
        ("status", "amended"),
        ("value_numeric", "7.1"),
        ("patient_birth_year", 1949.5),
        ("local_display", b"\xe8\xa1\x80"),
        ("result_time", "2026-11-23T08:30:15Z"),
        ("envelope.event_time", "yesterday"),
        ("envelope.institution_id", 1),
    ],
)
def test_validate_record_names_the_offending_field(path: str, bad_value: Any) -> None:
    """A producer learns which field to fix (dotted path inside the envelope) before anything is sent."""
    record = _set(lab_result(), path, bad_value)
    with pytest.raises(RecordValidationError) as info:
        validate_record(record, standard.load(standard.LAB_RESULT))
    assert info.value.field == path


@pytest.mark.parametrize("path", ["result_id", "patient_mrn", "envelope.correlation_id", "envelope.event_id"])
def test_validate_record_names_a_missing_required_field(path: str) -> None:
    """A missing required field is named like a mistyped one."""
    record = lab_result()
    *parents, leaf = path.split(".")
    del (record[parents[0]] if parents else record)[leaf]
    with pytest.raises(RecordValidationError) as info:
        validate_record(record, standard.load(standard.LAB_RESULT))
    assert info.value.field == path


@pytest.mark.parametrize("path", ["ordering_clinician", "envelope.source_message_id", "status"])
def test_fields_with_defaults_may_be_left_out(path: str) -> None:
    """Optional fields (union with null, or with a default) need not be sent."""
    record = lab_result()
    *parents, leaf = path.split(".")
    del (record[parents[0]] if parents else record)[leaf]
    validate_record(record, standard.load(standard.LAB_RESULT))


def test_validate_record_rejects_unknown_fields() -> None:
    """A misspelt field (here the national id) must not be dropped silently by the encoder."""
    record = lab_result(patient_national_id=None)
    record["patient_nationalid"] = NATIONAL_ID
    with pytest.raises(RecordValidationError) as info:
        validate_record(record, standard.load(standard.LAB_RESULT))
    assert info.value.field is not None and "patient_nationalid" in info.value.field


@pytest.mark.parametrize(
    "break_it",
    [
        pytest.param(lambda r: r.pop("result_id"), id="missing-field"),
        pytest.param(lambda r: r.update(result_id=5), id="mistyped-field"),
        pytest.param(lambda r: r.update(unexpected="x"), id="unknown-field"),
        pytest.param(lambda r: r.update(envelope="not a record"), id="envelope-not-a-record"),
    ],
)
def test_validation_errors_do_not_echo_the_national_id(break_it: Callable[[dict[str, Any]], Any]) -> None:
    """Error text ends up in logs; it must not carry the patient's national identifier."""
    record = lab_result()
    break_it(record)
    with pytest.raises(RecordValidationError) as info:
        validate_record(record, standard.load(standard.LAB_RESULT))
    assert NATIONAL_ID not in str(info.value)


def test_validate_record_rejects_a_non_uuid_event_id() -> None:
    """The publisher promises local validation; an id the hub cannot decode must fail there."""
    record = lab_result()
    record["envelope"]["event_id"] = "H001-LIS-20261123-0042"
    with pytest.raises(RecordValidationError) as info:
        validate_record(record, standard.load(standard.LAB_RESULT))
    assert info.value.field == "envelope.event_id"


def test_encoder_checks_before_encoding(registry: ConfluentRegistry) -> None:
    """With checking on, an invalid record raises instead of producing bytes."""
    encoder = make_encoder(registry, standard.load(standard.LAB_RESULT), check=True)
    with pytest.raises(RecordValidationError) as info:
        encoder(lab_result(value_numeric="high"))
    assert info.value.field == "value_numeric"


def _variant(base: StandardSchema, edit: Callable[[dict[str, Any]], None]) -> StandardSchema:
    """Another version of a standard schema, as an older or foreign producer might have registered it."""
    doc = json.loads(base.text)
    edit(doc)
    text = json.dumps(doc)
    import fastavro

    return StandardSchema(name=base.name, text=text, parsed=fastavro.parse_schema(json.loads(text)))


OLD_FIELDS = ("performing_lab", "ordering_clinician", "encounter_id")


def _drop_fields(doc: dict[str, Any]) -> None:
    doc["fields"] = [f for f in doc["fields"] if f["name"] not in OLD_FIELDS]


def test_reads_an_older_writer_schema_filling_defaults(registry: ConfluentRegistry) -> None:
    """Records from a producer still on an older version decode as the current version, new fields null."""
    current = standard.load(standard.LAB_RESULT)
    older = _variant(current, _drop_fields)
    old_id = registry.register(f"{current.subject}-old", older.text)
    old_record = {k: v for k, v in lab_result().items() if k not in OLD_FIELDS}
    data = AvroEncoder(old_id, older)(old_record)

    decoded = AvroDecoder(registry, current)(data)

    assert comparable({k: decoded[k] for k in old_record}) == comparable(old_record)
    assert all(decoded[name] is None for name in OLD_FIELDS)


def test_unknown_enum_symbol_falls_back_to_reader_default(registry: ConfluentRegistry) -> None:
    """A writer status the reader does not know becomes the enum default 'unknown' (Avro resolution rule)."""
    current = standard.load(standard.LAB_RESULT)

    def add_symbol(doc: dict[str, Any]) -> None:
        status = next(f for f in doc["fields"] if f["name"] == "status")
        status["type"]["symbols"].append("amended")

    newer = _variant(current, add_symbol)
    writer_id = registry.register(f"{current.subject}-newer", newer.text)
    data = AvroEncoder(writer_id, newer)(lab_result(status="amended"))
    assert AvroDecoder(registry, current)(data)["status"] == "unknown"


@pytest.mark.parametrize(
    "edit",
    [
        pytest.param(
            lambda doc: next(f for f in doc["fields"] if f["name"] == "result_id").update(type="long"),
            id="string-field-written-as-long",
        ),
        pytest.param(
            lambda doc: doc.update(fields=[f for f in doc["fields"] if f["name"] != "result_id"]),
            id="required-field-missing",
        ),
    ],
)
def test_incompatible_writer_schema_is_reported(
    registry: ConfluentRegistry, edit: Callable[..., None]
) -> None:
    """A writer that cannot be resolved to the reader is an IncompatibleSchemaError on schema_id."""
    current = standard.load(standard.LAB_RESULT)
    other = _variant(current, edit)
    writer_id = registry.register(f"{current.subject}-other", other.text)
    record = lab_result()
    if "result_id" not in {f["name"] for f in json.loads(other.text)["fields"]}:
        del record["result_id"]
    else:
        record["result_id"] = 42
    data = AvroEncoder(writer_id, other)(record)
    with pytest.raises(IncompatibleSchemaError) as info:
        AvroDecoder(registry, current)(data)
    assert info.value.field == "schema_id"


class CountingRegistry:
    """A registry that serves fixed texts and counts lookups."""

    def __init__(self, texts: dict[int, str]) -> None:
        self.texts = texts
        self.lookups = 0

    def register(self, subject: str, schema_text: str) -> int:
        raise NotImplementedError

    def schema_text(self, schema_id: int) -> str:
        self.lookups += 1
        return self.texts[schema_id]


def test_writer_schema_is_fetched_once_per_id() -> None:
    """The per-message path must not call the registry: one lookup per schema id."""
    schema = standard.load(standard.LAB_RESULT)
    fake = CountingRegistry({7: schema.text})
    encoder = AvroEncoder(7, schema)
    decoder = AvroDecoder(fake, schema)
    for n in range(5):
        assert decoder(encoder(lab_result(result_id=f"R{n}")))["result_id"] == f"R{n}"
    assert fake.lookups == 1


def test_unusable_schema_text_is_a_decode_error() -> None:
    """A registry entry that is not Avro is the message's problem, reported on schema_id."""
    schema = standard.load(standard.LAB_RESULT)
    decoder = AvroDecoder(CountingRegistry({7: "this is not json"}), schema)
    with pytest.raises(PayloadDecodeError) as info:
        decoder(AvroEncoder(7, schema)(lab_result()))
    assert info.value.field == "schema_id"


def test_registry_outage_propagates_from_decoder() -> None:
    """An unreachable registry is not the message's fault and is not turned into a decode error."""

    class Down(CountingRegistry):
        def schema_text(self, schema_id: int) -> str:
            raise RegistryUnavailableError("connection refused")

    schema = standard.load(standard.LAB_RESULT)
    with pytest.raises(RegistryUnavailableError):
        AvroDecoder(Down({}), schema)(AvroEncoder(7, schema)(lab_result()))


@pytest.mark.parametrize(
    ("exc", "expected", "field"),
    [
        (SchemaRegistryError(404, 40403, "Schema not found"), UnknownSchemaIdError, "schema_id"),
        (SchemaRegistryError(409, 409, "incompatible"), IncompatibleSchemaError, "schema"),
        (SchemaRegistryError(422, 42201, "invalid schema"), RecordValidationError, "schema"),
        (SchemaRegistryError(500, 50001, "store error"), RegistryUnavailableError, None),
        (SchemaRegistryError(503, 50003, "unavailable"), RegistryUnavailableError, None),
        (ConnectionRefusedError("refused"), RegistryUnavailableError, None),
        (TimeoutError("timed out"), RegistryUnavailableError, None),
    ],
)
def test_registry_errors_are_translated(exc: Exception, expected: type[Exception], field: str | None) -> None:
    """Only 5xx and transport failures are transient; client errors say what is wrong with the schema."""
    translated = _translate(exc, "doing something")
    assert type(translated) is expected
    assert translated.field == field  # type: ignore[attr-defined]


def test_unknown_schema_name_is_refused() -> None:
    """Only record types of the standard can be loaded."""
    with pytest.raises(UnknownSchemaNameError) as info:
        standard.load("org.clinhub.lab.NoSuchRecord")
    assert info.value.field == "schema"


def test_record_names_are_the_event_records_without_shared_parts() -> None:
    """The envelope is a shared part, not an event type with its own subject; every event type loads."""
    names = standard.record_names()
    assert {standard.LAB_RESULT, standard.CRITICAL_VALUE_ALERT, standard.DEAD_LETTER} <= set(names)
    assert "org.clinhub.common.Envelope" not in names
    for name in names:
        assert json.loads(standard.load(name).text)["name"] == name


def test_loaded_schema_inlines_the_envelope() -> None:
    """Registry text must be self-contained: the Envelope reference is expanded inline."""
    doc = json.loads(standard.load(standard.LAB_RESULT).text)
    envelope = next(f for f in doc["fields"] if f["name"] == "envelope")
    assert isinstance(envelope["type"], dict)
    assert {f["name"] for f in envelope["type"]["fields"]} >= {"event_id", "institution_id", "correlation_id"}

"""The Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary body).

This is the only module in the hub that parses or writes the framing. Schemas are fetched from
the registry once per id and cached parsed, so the per-message path is header check + fastavro.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Mapping
from typing import Any, Protocol

import fastavro
from fastavro.validation import validate

from schemas.exceptions import (
    IncompatibleSchemaError,
    MagicByteError,
    PayloadDecodeError,
    RecordValidationError,
    RegistryUnavailableError,
    ShortHeaderError,
    UnknownSchemaIdError,
)
from schemas.standard import StandardSchema

MAGIC_BYTE = 0
HEADER = struct.Struct(">bI")


class SchemaRegistry(Protocol):
    """What the hub needs of a Confluent-compatible registry."""

    def register(self, subject: str, schema_text: str) -> int: ...

    def schema_text(self, schema_id: int) -> str: ...


class ConfluentRegistry:
    """confluent-kafka's registry client (HTTP, or `mock://` in-process) behind the hub's small interface."""

    def __init__(self, config: Mapping[str, str]) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient.new_client(dict(config))  # mock:// gives the in-process one

    def register(self, subject: str, schema_text: str) -> int:
        from confluent_kafka.schema_registry import Schema

        try:
            return int(self._client.register_schema(subject, Schema(schema_text, "AVRO")))
        except Exception as exc:
            raise _translate(exc, f"registering {subject}") from exc

    def schema_text(self, schema_id: int) -> str:
        try:
            return str(self._client.get_schema(schema_id).schema_str)
        except Exception as exc:
            raise _translate(exc, f"fetching schema id {schema_id}") from exc

    def set_compatibility(self, subject: str, level: str) -> None:
        try:
            self._client.set_compatibility(subject_name=subject, level=level)
        except Exception as exc:
            raise _translate(exc, f"setting compatibility of {subject}") from exc

    def subjects(self) -> list[str]:
        try:
            return sorted(self._client.get_subjects())
        except Exception as exc:
            raise _translate(exc, "listing subjects") from exc

    def versions(self, subject: str) -> list[int]:
        try:
            return sorted(int(v) for v in self._client.get_versions(subject))
        except Exception as exc:
            raise _translate(exc, f"listing versions of {subject}") from exc


def _translate(exc: Exception, doing: str) -> Exception:
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    if isinstance(exc, SchemaRegistryError):
        if exc.http_status_code == 404:
            return UnknownSchemaIdError(
                f"registry has nothing for {doing}: {exc.error_message}", field="schema_id"
            )
        if exc.http_status_code == 409:
            return IncompatibleSchemaError(f"registry refused {doing}: {exc.error_message}", field="schema")
        if exc.http_status_code >= 500:
            return RegistryUnavailableError(f"registry error while {doing}: {exc.error_message}")
        return RecordValidationError(f"registry refused {doing}: {exc.error_message}", field="schema")
    return RegistryUnavailableError(f"registry unreachable while {doing}: {exc}")


class AvroEncoder:
    """Callable: record -> framed bytes under one registered schema id."""

    def __init__(self, schema_id: int, schema: StandardSchema, check: bool = True) -> None:
        self.schema_id = schema_id
        self.schema = schema
        self._header = HEADER.pack(MAGIC_BYTE, schema_id)
        self._check = check

    def __call__(self, record: Mapping[str, Any]) -> bytes:
        if self._check:
            validate_record(record, self.schema)
        out = io.BytesIO()
        out.write(self._header)
        fastavro.schemaless_writer(out, self.schema.parsed, record)
        return out.getvalue()


def validate_record(record: Mapping[str, Any], schema: StandardSchema) -> None:
    """Raise RecordValidationError naming the field(s) that break the schema."""
    try:
        validate(record, schema.parsed, raise_errors=True, strict=True)
    except fastavro.validation.ValidationError as exc:
        fields = ", ".join(dict.fromkeys(_field_of(err) for err in exc.errors))
        raise RecordValidationError(
            f"does not match {schema.name}: {'; '.join(map(str, exc.errors))}", field=fields or None
        ) from exc
    except ValueError as exc:  # strict mode: unexpected fields
        raise RecordValidationError(f"does not match {schema.name}: {exc}", field=None) from exc


def _field_of(error: Any) -> str:
    # fastavro reports "<path> is <value> of type <type> expected <schema>"; the path is the field.
    text = str(error)
    return text.split(" is ", 1)[0].rsplit(".", 1)[-1].rstrip(")") if " is " in text else text


def make_encoder(registry: SchemaRegistry, schema: StandardSchema, check: bool = True) -> AvroEncoder:
    """Register (or find) the schema once and return an encoder bound to its id."""
    return AvroEncoder(registry.register(schema.subject, schema.text), schema, check)


class AvroDecoder:
    """Callable: framed bytes -> record, resolved to the reader's schema; writer schemas cached by id."""

    def __init__(self, registry: SchemaRegistry, reader: StandardSchema | None = None) -> None:
        self._registry = registry
        self._reader = reader
        self._writers: dict[int, Any] = {}
        self._lock = threading.Lock()

    def writer_schema(self, schema_id: int) -> Any:
        parsed = self._writers.get(schema_id)
        if parsed is None:
            text = self._registry.schema_text(schema_id)
            try:
                parsed = fastavro.parse_schema(json.loads(text))
            except Exception as exc:
                raise PayloadDecodeError(
                    f"schema id {schema_id} is not a usable Avro schema: {exc}", field="schema_id"
                ) from exc
            with self._lock:
                self._writers[schema_id] = parsed
        return parsed

    def __call__(self, data: bytes | None) -> dict[str, Any]:
        if data is None or len(data) < HEADER.size:
            raise ShortHeaderError(
                f"message has {0 if data is None else len(data)} bytes, fewer than the 5-byte header",
                field="header",
            )
        magic, schema_id = HEADER.unpack_from(data)
        if magic != MAGIC_BYTE:
            raise MagicByteError(f"first byte is {magic & 0xFF}, expected magic byte 0", field="header")
        writer = self.writer_schema(schema_id)
        body = io.BytesIO(data)
        body.seek(HEADER.size)
        reader = self._reader.parsed if self._reader is not None else None
        try:
            record = fastavro.schemaless_reader(body, writer, reader)
        except fastavro.read.SchemaResolutionError as exc:
            raise IncompatibleSchemaError(
                f"writer schema id {schema_id} cannot be read as "
                f"{self._reader.name if self._reader else '?'}: {exc}",
                field="schema_id",
            ) from exc
        except Exception as exc:
            raise PayloadDecodeError(
                f"Avro body unreadable with schema id {schema_id}: {type(exc).__name__}: {exc}",
                field="payload",
            ) from exc
        if body.tell() != len(data):
            raise PayloadDecodeError(
                f"{len(data) - body.tell()} bytes left after the record; not a body of schema id {schema_id}",
                field="payload",
            )
        if not isinstance(record, dict):
            raise PayloadDecodeError("top-level value is not a record", field="payload")
        return record

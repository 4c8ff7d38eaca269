"""The Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary body).

This is the only module in the hub that parses or writes the framing. Schemas are fetched from
the registry once per id and cached parsed, so the per-message path is header check + fastavro.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import threading
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

import fastavro
from fastavro.validation import validate

from schemas.exceptions import (
    IncompatibleSchemaError,
    MagicByteError,
    PayloadDecodeError,
    RecordValidationError,
    RegistryAccessError,
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

    def __init__(self, config: Mapping[str, Any]) -> None:
        from confluent_kafka.schema_registry import SchemaRegistryClient

        self._client = SchemaRegistryClient.new_client(dict(config))  # mock:// gives the in-process one

    def register(self, subject: str, schema_text: str) -> int:
        """The schema's id: looked up when registered (any principal may), else registered (only the
        admin may, behind the authenticating proxy)."""
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        schema = Schema(schema_text, "AVRO")
        try:
            found = self._client.lookup_schema(subject, schema).schema_id
            if found is not None:
                return int(found)
        except SchemaRegistryError as exc:
            if exc.http_status_code != 404:
                raise _translate(exc, f"looking up {subject}") from exc
        except Exception as exc:
            raise _translate(exc, f"looking up {subject}") from exc
        try:
            return int(self._client.register_schema(subject, schema))
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
        if exc.http_status_code in (401, 403):
            return RegistryAccessError(f"registry refused {doing}: {exc.error_message}")
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


@functools.lru_cache(maxsize=256)
def _spec(text: str) -> dict[str, Any]:
    """A schema's JSON, parsed once per text (read only)."""
    return dict(json.loads(text))


def validate_record(record: Mapping[str, Any], schema: StandardSchema) -> None:
    """Raise RecordValidationError naming each field that breaks the schema, its value and the rule.

    A valid record is checked without collecting errors: fastavro's raise_errors builds a described
    error (the datum as JSON) for every union branch a value is not, most of a valid record's cost."""
    spec = _spec(schema.text)
    problems = _missing_or_unknown(record, spec, "")
    if not problems:
        try:
            if not validate(record, schema.parsed, raise_errors=False, strict=True):
                validate(record, schema.parsed, raise_errors=True, strict=True)  # raises, describing
        except fastavro.validation.ValidationError as exc:
            problems = _describe_all(exc.errors, _nested_field_names(spec))
        except ValueError as exc:  # strict mode: fields the schema does not have
            problems = [("(unknown field)", str(exc))]
    if problems:
        fields = ", ".join(dict.fromkeys(field for field, _ in problems))
        raise RecordValidationError(f"{schema.name}: {'; '.join(text for _, text in problems)}", field=fields)


def _missing_or_unknown(record: Any, spec: dict[str, Any], prefix: str) -> list[tuple[str, str]]:
    """Required fields that are absent and fields the schema does not know, with their dotted paths."""
    if type(record) is not dict and not isinstance(record, Mapping):  # dict first: the ABC check is slow
        return [(prefix.rstrip(".") or "(record)", f"value {_short(record)} is not a record")]
    problems = []
    known = {field["name"] for field in spec["fields"]}
    for name in record:
        if name not in known:
            problems.append((f"{prefix}{name}", f"field {prefix}{name}: not part of {spec['name']}"))
    for field in spec["fields"]:
        path = f"{prefix}{field['name']}"
        if field["name"] not in record:
            if "default" not in field:
                problems.append((path, f"field {path}: missing, and it is required (no default)"))
            continue
        value = record[field["name"]]
        if isinstance(field["type"], dict) and field["type"].get("type") == "record":
            problems.extend(_missing_or_unknown(value, field["type"], f"{path}."))
        elif (
            isinstance(field["type"], dict)
            and field["type"].get("logicalType") == "uuid"
            and not _is_uuid(value)
        ):
            problems.append((path, f"field {path}: value {_short(value)} is not a UUID"))
    return problems


def _is_uuid(value: Any) -> bool:
    """fastavro does not check the uuid logical type; the hub's decoder would reject the event later."""
    if isinstance(value, uuid.UUID):
        return True
    try:
        uuid.UUID(str(value))
    except ValueError:
        return False
    return True


def _nested_field_names(spec: dict[str, Any]) -> dict[str, str]:
    """Full names of nested records -> the field that holds them, for readable error paths."""
    names: dict[str, str] = {}
    for field in spec["fields"]:
        candidates = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for candidate in candidates:
            if isinstance(candidate, dict) and candidate.get("type") == "array":
                candidate = candidate["items"]
            if isinstance(candidate, dict) and candidate.get("type") == "record":
                names[candidate["name"]] = field["name"]
    return names


def _type_label(avro_type: Any) -> str:
    if isinstance(avro_type, str):
        return avro_type.rsplit(".", 1)[-1]
    if isinstance(avro_type, list):
        return " or ".join(_type_label(t) for t in avro_type)
    if avro_type.get("logicalType"):
        return f"{avro_type['type']} ({avro_type['logicalType']})"
    if avro_type.get("type") == "enum":
        return f"one of {', '.join(avro_type['symbols'])}"
    if avro_type.get("type") == "array":
        return f"array of {_type_label(avro_type['items'])}"
    return f"{avro_type.get('type')} {str(avro_type.get('name', '')).rsplit('.', 1)[-1]}".strip()


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_all(errors: Any, nested: dict[str, str]) -> list[tuple[str, str]]:
    """One line per field; a value that fits no branch of a union lists every branch it tried."""
    rules: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for error in errors:
        path = str(getattr(error, "field", "") or "")
        record_name, _, leaf = path.rpartition(".")
        parent = nested.get(record_name)
        field = f"{parent}.{leaf}" if parent else leaf or path
        rules.setdefault(field, []).append(_type_label(getattr(error, "schema", None)))
        values[field] = getattr(error, "datum", None)
    return [
        (
            field,
            f"field {field}: value {_short(values[field])} ({type(values[field]).__name__}) "
            f"is not {' or '.join(dict.fromkeys(rule))}",
        )
        for field, rule in rules.items()
    ]


def make_encoder(registry: SchemaRegistry, schema: StandardSchema, check: bool = True) -> AvroEncoder:
    """Register (or find) the schema once and return an encoder bound to its id."""
    return AvroEncoder(registry.register(schema.subject, schema.text), schema, check)


class AvroDecoder:
    """Callable: framed bytes -> record, resolved to the reader's schema; writer schemas cached by id."""

    def __init__(self, registry: SchemaRegistry, reader: StandardSchema | None = None) -> None:
        self._registry = registry
        self._reader = reader
        self._writers: dict[int, Any] = {}
        # Per writer id: the reader schema to resolve to, or None when writer and reader are the same
        # schema. fastavro compares and resolves on every call when given a reader schema, which costs
        # more than the decode itself, so resolution is only asked for when it changes the result.
        self._resolve_to: dict[int, Any] = {}
        self._reader_form = (
            fastavro.schema.to_parsing_canonical_form(reader.parsed) if reader is not None else None
        )
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
            same = self._reader_form == fastavro.schema.to_parsing_canonical_form(parsed)
            with self._lock:
                self._resolve_to[schema_id] = None if same or self._reader is None else self._reader.parsed
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
        reader = self._resolve_to[schema_id]
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

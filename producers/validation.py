"""Checks an institution's event before anything is sent: the schema, plus rules Avro cannot express."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from typing import Any

from core import contract
from schemas.exceptions import RecordValidationError
from schemas.standard import StandardSchema
from schemas.wire import validate_record


def _fail(field: str, value: Any, rule: str) -> RecordValidationError:
    return RecordValidationError(f"field {field}: value {value!r} {rule}", field=field)


def check_event(kind: str, record: Mapping[str, Any], schema: StandardSchema, institution_id: str) -> None:
    """Raise RecordValidationError naming the field, the value and the rule broken; return if valid."""
    validate_record(record, schema)
    envelope = record["envelope"]
    claimed = envelope["institution_id"]
    if claimed != institution_id:
        raise _fail(
            "envelope.institution_id", claimed, f"is not this publisher's institution {institution_id!r}"
        )
    try:
        uuid.UUID(str(envelope["event_id"]))
    except ValueError:
        raise _fail("envelope.event_id", envelope["event_id"], "is not a UUID") from None
    if not str(envelope["correlation_id"]).strip():
        raise _fail("envelope.correlation_id", envelope["correlation_id"], "must not be empty")
    for name in ("patient_mrn", contract.KIND_SPECS[kind].natural_key):
        if not str(record[name]).strip():
            raise _fail(name, record[name], "must not be empty")
    _check_bound(record)
    _check_times(record, "")


COMPARATORS = ("<", "<=", ">=", ">")


def _check_bound(record: Mapping[str, Any]) -> None:
    """A result outside the measuring range is sent as a bound: the number and its comparator."""
    comparator = record.get("value_comparator")
    if comparator is None:
        return
    if comparator not in COMPARATORS:
        raise _fail("value_comparator", comparator, f"is not one of {', '.join(COMPARATORS)}")
    if record.get("value_numeric") is None:
        raise _fail(
            "value_numeric", None, f"must be the bound's number when value_comparator is {comparator!r}"
        )


_PLAIN = frozenset({str, int, float, bool, type(None)})  # no datetime, no record: most values, skipped fast


def _check_times(record: Mapping[str, Any], prefix: str) -> None:
    """Naive datetimes are ambiguous (whose local time?); the standard carries UTC instants only."""
    for name, value in record.items():
        if type(value) in _PLAIN:
            continue
        if isinstance(value, dt.datetime) and value.tzinfo is None:
            raise _fail(f"{prefix}{name}", value.isoformat(), "has no time zone; send an aware datetime")
        if isinstance(value, Mapping):
            _check_times(value, f"{prefix}{name}.")

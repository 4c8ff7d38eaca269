"""Loads the `.avsc` files of the regional standard, with named references to other files inlined."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from core import contract
from schemas.exceptions import UnknownSchemaNameError

AVRO_DIR = Path(__file__).resolve().parent / "avro"

# Schema names, for code that reads one record type; the kinds and records are listed in core.contract.
LAB_RESULT = contract.KIND_SPECS["lab"].schema
VITAL_SIGNS = contract.KIND_SPECS["vitals"].schema
ENCOUNTER_EVENT = contract.KIND_SPECS["encounter"].schema
MEDICATION_ORDER = contract.KIND_SPECS["medication"].schema
DIAGNOSIS = contract.KIND_SPECS["diagnosis"].schema
IDENTITY_LINK = contract.IDENTITY.schema
CRITICAL_VALUE_ALERT = contract.ALERT.schema
ALERT_ESCALATION = contract.ESCALATION.schema
ALERT_ACKNOWLEDGEMENT = contract.ACK.schema
ALERT_STATE = contract.ALERT_STATE.schema
DEAD_LETTER = contract.DEADLETTER.schema

# The clinical event kinds institutions publish, each on raw.<institution>.<kind>, to their schemas.
KIND_SCHEMAS = {spec.name: spec.schema for spec in contract.CLINICAL_KINDS}


@dataclass(frozen=True)
class StandardSchema:
    """One record schema of the standard: its full name, registry text and fastavro-parsed form."""

    name: str
    text: str
    parsed: Any

    @property
    def subject(self) -> str:
        """Registry subject under the record-name strategy: one subject per record type, any topic."""
        return self.name


@cache
def load(name: str, directory: Path = AVRO_DIR) -> StandardSchema:
    path = directory / f"{name}.avsc"
    if not path.exists():
        raise UnknownSchemaNameError(f"no schema file {path.name} in {directory}", field="schema")
    expanded = fastavro.schema.load_schema(str(path), _write_hint=False)
    text = json.dumps(expanded, sort_keys=True, ensure_ascii=False)
    return StandardSchema(name=name, text=text, parsed=fastavro.parse_schema(json.loads(text)))


def record_names(directory: Path = AVRO_DIR) -> list[str]:
    """Full names of the top-level event records (envelope and other shared parts are excluded)."""
    names = []
    for path in sorted(directory.glob("*.avsc")):
        if json.loads(path.read_text()).get("namespace") != "org.clinhub.common":
            names.append(path.stem)
    return names


def timestamp_fields(schema: StandardSchema) -> tuple[str, ...]:
    """Top-level fields holding an instant (timestamp-millis, optional or not), in schema order."""

    def is_timestamp(avro_type: Any) -> bool:
        if isinstance(avro_type, list):
            return any(is_timestamp(branch) for branch in avro_type)
        return isinstance(avro_type, dict) and str(avro_type.get("logicalType", "")).startswith("timestamp")

    return tuple(f["name"] for f in json.loads(schema.text).get("fields", []) if is_timestamp(f["type"]))

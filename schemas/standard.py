"""Loads the `.avsc` files of the regional standard, with named references to other files inlined."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import fastavro.schema

from schemas.exceptions import UnknownSchemaNameError

AVRO_DIR = Path(__file__).resolve().parent / "avro"

LAB_RESULT = "org.clinhub.lab.LabResult"
CRITICAL_VALUE_ALERT = "org.clinhub.alert.CriticalValueAlert"
DEAD_LETTER = "org.clinhub.ops.DeadLetter"
VITAL_SIGNS = "org.clinhub.vitals.VitalSigns"
ENCOUNTER_EVENT = "org.clinhub.encounter.EncounterEvent"
MEDICATION_ORDER = "org.clinhub.medication.MedicationOrder"
DIAGNOSIS = "org.clinhub.diagnosis.Diagnosis"
ALERT_ACKNOWLEDGEMENT = "org.clinhub.alert.AlertAcknowledgement"
ALERT_ESCALATION = "org.clinhub.alert.AlertEscalation"
IDENTITY_LINK = "org.clinhub.identity.IdentityLink"

# The clinical event kinds institutions publish, each on raw.<institution>.<kind>.
KIND_SCHEMAS = {
    "lab": LAB_RESULT,
    "vitals": VITAL_SIGNS,
    "encounter": ENCOUNTER_EVENT,
    "medication": MEDICATION_ORDER,
    "diagnosis": DIAGNOSIS,
}


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

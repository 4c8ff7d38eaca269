"""Reference data (terminology, unit factors, critical-value rules) loaded from versioned JSON files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.exceptions import ReferenceDataError

DATA_DIR = Path(__file__).resolve().parent / "data"


@dataclass(frozen=True)
class Analyte:
    loinc: str
    name: str
    canonical_unit: str
    factors: dict[str, float]
    plausible_low: float
    plausible_high: float


@dataclass(frozen=True)
class ThresholdRule:
    loinc: str
    analyte: str
    low: float | None
    high: float | None
    low_inclusive: bool
    high_inclusive: bool
    severity: str
    message: str
    source: str


@dataclass(frozen=True)
class ReferenceData:
    """Everything the normaliser and rule engine look up, immutable once loaded."""

    terminology: dict[str, dict[str, str]]
    analytes: dict[str, Analyte]
    rules: dict[str, ThresholdRule]
    versions: dict[str, str] = field(default_factory=dict)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ReferenceDataError(f"{path.name}: top level must be an object")
    return data


def _strict_bool(entry: dict[str, Any], key: str) -> bool:
    """A quoted "false" must not silently become True."""
    value = entry[key]
    if not isinstance(value, bool):
        raise ReferenceDataError(
            f"critical_rules.json: {entry.get('loinc')} {key} must be true or false, not {value!r}"
        )
    return value


def load_reference(directory: Path = DATA_DIR) -> ReferenceData:
    """Load and cross-check the three files; a rule for an analyte without units is an error."""
    terminology_doc = _read(directory / "terminology.json")
    units_doc = _read(directory / "units.json")
    rules_doc = _read(directory / "critical_rules.json")
    try:
        analytes = {
            loinc: Analyte(
                loinc=loinc,
                name=entry["name"],
                canonical_unit=entry["canonical"],
                factors={unit: float(f) for unit, f in entry["factors"].items()},
                plausible_low=float(entry["plausible"][0]),
                plausible_high=float(entry["plausible"][1]),
            )
            for loinc, entry in units_doc["analytes"].items()
        }
        sources = rules_doc["sources"]
        rules = {}
        for entry in rules_doc["rules"]:
            if entry["source"] not in sources:
                raise ReferenceDataError(f"critical_rules.json: rule {entry['loinc']} cites unknown source")
            analyte = analytes.get(entry["loinc"])
            if analyte is None:
                raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} has no entry in units.json")
            unit = entry.get("unit", analyte.canonical_unit)
            factor = analyte.factors.get(unit)
            if factor is None:
                raise ReferenceDataError(
                    f"critical_rules.json: {entry['loinc']} limit unit {unit!r} is not in units.json"
                )
            rules[entry["loinc"]] = ThresholdRule(
                loinc=entry["loinc"],
                analyte=entry["analyte"],
                low=None if entry["low"] is None else float(entry["low"]) * factor,
                high=None if entry["high"] is None else float(entry["high"]) * factor,
                low_inclusive=_strict_bool(entry, "low_inclusive"),
                high_inclusive=_strict_bool(entry, "high_inclusive"),
                severity=entry["severity"],
                message=entry["message"],
                source=f"{entry['source']}: {sources[entry['source']]}",
            )
        terminology = {inst: dict(codes) for inst, codes in terminology_doc["institutions"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ReferenceDataError(f"malformed reference data: {exc!r}") from exc
    return ReferenceData(
        terminology=terminology,
        analytes=analytes,
        rules=rules,
        versions={
            "terminology": str(terminology_doc.get("version")),
            "units": str(units_doc.get("version")),
            "rules": str(rules_doc.get("version")),
        },
    )

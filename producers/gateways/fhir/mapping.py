"""FHIR R4 resources to the raw records of the regional standard: pure functions, no I/O, no clock.

- `parse_resource(raw)` checks a JSON object against FHIR R4 (with `fhir.resources.R4B`, whose models
  parse R4 payloads) and returns it unchanged; a failure is `InvalidFhirError` with the FHIRPath of
  the first problem (`Observation.valueQuantity.value`).
- `map_resource(resource, institution, ...)` makes the events: Observation (laboratory → lab,
  vital-signs → vitals), Encounter → encounter, MedicationRequest → medication, Condition → diagnosis.
  What cannot be mapped without guessing is `UnmappableError` (422) with its path.

Values are taken from the JSON as sent (not from the parsed models): nothing rounded, trimmed or guessed.
The patient is the MRN of `subject` (its identifier, or the identifier of the contained or bundled
Patient it references); birth year, sex and the name come from that Patient (the first `name` whose use
is official, else the first: its family, and its given names joined by spaces, as sent), for the
institution's own users. The institution is the caller's (the token's), never what the resource claims
(meta.source, assigner).

Event ids are deterministic: `event_id_for("fhir", institution, "<type>/<key>#<content hash>", n)`, where
key is the resource id, else its first identifier, else the content hash, and the hash is the SHA-256
of the canonical JSON (sorted keys, `meta` left out) with the resolved patient's identity (MRN, national
id, birth year, sex; not the name of a bundled Patient, so that resources sent before names were carried
keep their event ids): the same resource sent again makes the same events, a corrected one (same key,
new content) new ones.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from producers.gateways.common import event_id_for
from producers.gateways.fhir.errors import InvalidFhirError, UnmappableError

GATEWAY = "fhir"
SOURCE_SYSTEM = "FHIR"
SCHEMA_VERSION = "1"

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"

# Resource types a client may create; Patient only travels inside a Bundle or `contained`, for identity.
MAPPED_TYPES = ("Observation", "Encounter", "MedicationRequest", "Condition")

JsonObject = Mapping[str, Any]
Resolver = Callable[[str], JsonObject | None]


@dataclass(frozen=True)
class MappedEvent:
    kind: str
    record: dict[str, Any]


@dataclass(frozen=True)
class MappedResource:
    """What one resource becomes: its events and what the ledger keeps to find it again."""

    resource_type: str
    source_id: str  # "<type>/<key>#<hash>", the event ids' source
    logical_id: str  # the id this server gives the resource (deterministic)
    identifiers: tuple[tuple[str | None, str], ...]  # (system, value) as sent, for If-None-Exist
    content_hash: str
    events: tuple[MappedEvent, ...] = field(default_factory=tuple)


# --- FHIR validation -------------------------------------------------------------------------------


def _model(resource_type: str) -> Any:
    from fhir.resources.R4B import get_fhir_model_class

    return get_fhir_model_class(resource_type)


def loc_expression(resource_type: str, loc: Sequence[int | str]) -> str:
    """A pydantic error location as FHIRPath: ('component', 0, 'valueQuantity') →
    `Observation.component[0].valueQuantity`."""
    path = resource_type
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif not str(part).startswith("__"):
            path += f".{part}"
    return path


def parse_resource(raw: Any, allowed: Sequence[str] = MAPPED_TYPES) -> dict[str, Any]:
    """Return the resource if it is a JSON object of an allowed type that FHIR R4 accepts."""
    if not isinstance(raw, dict):
        raise InvalidFhirError(None, "the body must be a JSON object (a FHIR resource)")
    resource_type = raw.get("resourceType")
    if not isinstance(resource_type, str) or resource_type not in allowed:
        raise InvalidFhirError(
            "resourceType", f"resourceType {resource_type!r} is not one of {', '.join(allowed)}"
        )
    try:
        _model(resource_type).model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidFhirError(
            loc_expression(resource_type, first["loc"]), f"{first['msg']} (FHIR R4 {resource_type})"
        ) from None
    return raw


# --- small readers over the JSON ---------------------------------------------------------------------


def _obj(value: Any) -> JsonObject | None:
    return value if isinstance(value, Mapping) else None


def _list(value: Any) -> list[JsonObject]:
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Mapping)]
    return []


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _number(value: Any, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnmappableError(path, f"{value!r} is not a number")
    return float(value)


def _codings(concept: JsonObject | None) -> list[JsonObject]:
    return _list(concept.get("coding")) if concept else []


def _first_code(concept: JsonObject | None) -> str | None:
    for coding in _codings(concept):
        code = _str(coding.get("code"))
        if code is not None:
            return code
    return None


def _has_code(concept: JsonObject | None, system: str, code: str) -> bool:
    return any(c.get("system") == system and c.get("code") == code for c in _codings(concept))


_DATE_ONLY = re.compile(r"^\d{4}(-\d{2}(-\d{2})?)?$")


def instant(value: Any, path: str, required: bool = True) -> dt.datetime | None:
    """A FHIR dateTime/instant with a time and a zone, as an aware datetime; a date alone or a time
    without zone is refused (the standard carries instants: whose midnight, whose local time?)."""
    if value is None:
        if required:
            raise UnmappableError(path, "is required for the regional event")
        return None
    text = _str(value)
    if text is None:
        raise UnmappableError(path, f"{value!r} is not a dateTime")
    if _DATE_ONLY.match(text):
        raise UnmappableError(path, f"{text!r} is a date without a time; send a dateTime with its zone")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UnmappableError(path, f"{text!r} is not a FHIR dateTime") from None
    if parsed.tzinfo is None:
        raise UnmappableError(path, f"{text!r} has no time zone; FHIR requires one with a time")
    return parsed


def _reference_text(ref: JsonObject | None) -> str | None:
    """Who, as sent: the identifier's value, else the display, else the reference."""
    if ref is None:
        return None
    identifier = _obj(ref.get("identifier"))
    if identifier and _str(identifier.get("value")):
        return _str(identifier.get("value"))
    return _str(ref.get("display")) or _str(ref.get("reference"))


# --- identity ------------------------------------------------------------------------------------

NATIONAL_ID_TYPES = ("NI", "NNCHN", "CZ")
SEXES = ("male", "female", "other", "unknown")


@dataclass(frozen=True)
class PatientFields:
    mrn: str
    national_id: str | None
    birth_year: int | None
    sex: str | None
    family_name: str | None = None
    given_name: str | None = None

    def identity(self) -> dict[str, Any]:
        """Who the patient is, without the name: what the content hash covers."""
        return {
            "patient_mrn": self.mrn,
            "patient_national_id": self.national_id,
            "patient_birth_year": self.birth_year,
            "patient_sex": self.sex,
        }

    def as_record(self) -> dict[str, Any]:
        return {
            **self.identity(),
            "patient_family_name": self.family_name,
            "patient_given_name": self.given_name,
        }


def _identifier_type(identifier: JsonObject) -> str | None:
    return _first_code(_obj(identifier.get("type")))


def _patient_mrn(patient: JsonObject, path: str) -> str:
    identifiers = [i for i in _list(patient.get("identifier")) if _str(i.get("value"))]
    typed = [i for i in identifiers if _identifier_type(i) == "MR"]
    local = [i for i in identifiers if _identifier_type(i) not in NATIONAL_ID_TYPES]
    chosen = typed or (local if len(local) == 1 else [])
    if not chosen:
        raise UnmappableError(
            f"{path}.identifier",
            "the Patient needs its MRN: an identifier of type MR, or exactly one local identifier",
        )
    return str(chosen[0]["value"])


def patient_name(patient: JsonObject | None) -> tuple[str | None, str | None]:
    """(family, given) of the Patient's official name, else of its first: as sent, the given names
    joined by a space; None for what is not sent."""
    names = _list(patient.get("name")) if patient is not None else []
    chosen = next((n for n in names if n.get("use") == "official"), names[0] if names else None)
    if chosen is None:
        return None, None
    sent = chosen.get("given")
    given = [part for part in sent if isinstance(part, str) and part] if isinstance(sent, list) else []
    return _str(chosen.get("family")) or None, " ".join(given) or None


def _patient_details(patient: JsonObject | None) -> tuple[str | None, int | None, str | None]:
    if patient is None:
        return None, None, None
    national = next(
        (
            str(i["value"])
            for i in _list(patient.get("identifier"))
            if _identifier_type(i) in NATIONAL_ID_TYPES and _str(i.get("value"))
        ),
        None,
    )
    birth = _str(patient.get("birthDate"))
    birth_year = int(birth[:4]) if birth and re.match(r"^\d{4}", birth) else None
    gender = _str(patient.get("gender"))
    return national, birth_year, gender if gender in SEXES else None


def _resolve(reference: str | None, resource: JsonObject, resolve: Resolver | None) -> JsonObject | None:
    if not reference:
        return None
    if reference.startswith("#"):
        return next((c for c in _list(resource.get("contained")) if c.get("id") == reference[1:]), None)
    return resolve(reference) if resolve else None


def patient_fields(resource: JsonObject, resolve: Resolver | None) -> PatientFields:
    """The patient of `subject`: the identifier on the reference, or the referenced Patient's MRN."""
    resource_type = str(resource.get("resourceType"))
    subject = _obj(resource.get("subject"))
    path = f"{resource_type}.subject"
    if subject is None:
        raise UnmappableError(path, "the patient (subject) is required, with the MRN as its identifier")
    patient = _resolve(_str(subject.get("reference")), resource, resolve)
    if patient is not None and patient.get("resourceType") != "Patient":
        raise UnmappableError(f"{path}.reference", "does not reference a Patient")
    identifier = _obj(subject.get("identifier"))
    mrn = _str(identifier.get("value")) if identifier else None
    if mrn is None or not mrn.strip():
        if patient is None:
            raise UnmappableError(
                f"{path}.identifier.value",
                "the patient's MRN is required: subject.identifier, or a contained or bundled Patient",
            )
        mrn = _patient_mrn(patient, f"{path}.reference")
    national, birth_year, sex = _patient_details(patient)
    family, given = patient_name(patient)
    return PatientFields(mrn, national, birth_year, sex, family, given)


# --- keys, hashes, envelopes -------------------------------------------------------------------------


def content_hash(resource: JsonObject, patient: PatientFields | None) -> str:
    canonical = {k: v for k, v in resource.items() if k != "meta"}
    text = json.dumps(
        [canonical, patient.identity() if patient else None],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def identifiers_of(resource: JsonObject) -> tuple[tuple[str | None, str], ...]:
    return tuple(
        (_str(i.get("system")), str(i["value"]))
        for i in _list(resource.get("identifier"))
        if _str(i.get("value"))
    )


def _natural_id(resource: JsonObject, digest: str) -> str:
    """The institution's own id of the thing: its first identifier's value, else its id, else a hash."""
    identifiers = identifiers_of(resource)
    if identifiers:
        return identifiers[0][1]
    return _str(resource.get("id")) or f"fhir-{digest[:32]}"


def _source_key(resource: JsonObject, digest: str) -> str:
    rid = _str(resource.get("id"))
    if rid:
        return rid
    identifiers = identifiers_of(resource)
    if identifiers:
        system, value = identifiers[0]
        return f"{system or ''}|{value}"
    return digest


class _Events:
    def __init__(self, institution: str, source_id: str, correlation_id: str, now: dt.datetime) -> None:
        self.institution = institution
        self.source_id = source_id
        self.correlation_id = correlation_id
        self.now = now
        self.events: list[MappedEvent] = []

    def add(self, kind: str, event_time: dt.datetime, fields: dict[str, Any], message_id: str) -> None:
        envelope = {
            "event_id": event_id_for(GATEWAY, self.institution, self.source_id, len(self.events)),
            "institution_id": self.institution,
            "source_system": SOURCE_SYSTEM,
            "source_message_id": message_id,
            "event_time": event_time,
            "produced_time": self.now,
            "schema_version": SCHEMA_VERSION,
            "correlation_id": self.correlation_id,
        }
        self.events.append(MappedEvent(kind, {"envelope": envelope, **fields}))


def _encounter_id(resource: JsonObject, resolve: Resolver | None) -> str | None:
    ref = _obj(resource.get("encounter"))
    if ref is None:
        return None
    identifier = _obj(ref.get("identifier"))
    if identifier and _str(identifier.get("value")):
        return _str(identifier.get("value"))
    reference = _str(ref.get("reference"))
    target = _resolve(reference, resource, resolve)
    if target is not None:
        ids = identifiers_of(target)
        return ids[0][1] if ids else _str(target.get("id"))
    if reference and reference.startswith("Encounter/"):
        return reference.split("/")[1]
    return None


# --- Observation ---------------------------------------------------------------------------------

OBSERVATION_STATUS = {
    "preliminary": "preliminary",
    "final": "final",
    "amended": "corrected",
    "corrected": "corrected",
    "cancelled": "cancelled",
    "entered-in-error": "cancelled",
    "unknown": "unknown",
}


def _observation_status(resource: JsonObject) -> str:
    status = _str(resource.get("status"))
    if status not in OBSERVATION_STATUS:
        raise UnmappableError(
            "Observation.status",
            f"{status!r} has no regional meaning; one of {', '.join(OBSERVATION_STATUS)}",
        )
    return OBSERVATION_STATUS[status]


def _category(resource: JsonObject) -> str:
    categories = {
        str(c.get("code"))
        for concept in _list(resource.get("category"))
        for c in _codings(concept)
        if c.get("system") == OBSERVATION_CATEGORY
    }
    if "vital-signs" in categories:
        return "vitals"
    if "laboratory" in categories or not categories:
        return "lab"
    raise UnmappableError(
        "Observation.category", f"{', '.join(sorted(categories))}: only laboratory and vital-signs are taken"
    )


def _codes(concept: JsonObject | None, path: str) -> tuple[str, str | None, str | None, str | None]:
    """(local code, its system, display, LOINC code): the first non-LOINC coding is the local code; with
    LOINC alone, the LOINC code is."""
    codings = [c for c in _codings(concept) if _str(c.get("code"))]
    if not codings:
        raise UnmappableError(f"{path}.coding", "a coded test (coding with a code) is required")
    loinc = next((str(c["code"]) for c in codings if c.get("system") == LOINC), None)
    local = next((c for c in codings if c.get("system") != LOINC), codings[0])
    display = _str(local.get("display")) or (_str(concept.get("text")) if concept else None)
    return str(local["code"]), _str(local.get("system")), display, loinc


def _unit(quantity: JsonObject) -> str | None:
    """The unit as sent: the UCUM code when the quantity is UCUM-coded, else the unit text."""
    code = _str(quantity.get("code"))
    if code is not None and quantity.get("system") == UCUM:
        return code
    return _str(quantity.get("unit")) or code


def _value(resource: JsonObject, path: str) -> tuple[float | None, str | None, str | None, str | None]:
    """(number, comparator, text, unit) from value[x]."""
    quantity = _obj(resource.get("valueQuantity"))
    if quantity is not None:
        number = _number(quantity.get("value"), f"{path}.valueQuantity.value")
        comparator = _str(quantity.get("comparator"))
        if comparator is not None and number is None:
            raise UnmappableError(f"{path}.valueQuantity.value", "a comparator needs its bound's number")
        return number, comparator, None, _unit(quantity)
    if "valueString" in resource:
        return None, None, _str(resource.get("valueString")), None
    if "valueInteger" in resource:
        return _number(resource.get("valueInteger"), f"{path}.valueInteger"), None, None, None
    concept = _obj(resource.get("valueCodeableConcept"))
    if concept is not None:
        coding = next(iter(_codings(concept)), {})
        text = _str(coding.get("display")) or _str(concept.get("text")) or _str(coding.get("code"))
        return None, None, text, None
    others = [k for k in resource if k.startswith("value")]
    if others:
        raise UnmappableError(
            f"{path}.{others[0]}",
            "not taken: send valueQuantity, valueString, valueInteger or valueCodeableConcept",
        )
    return None, None, None, None


def _interpretation(resource: JsonObject) -> str | None:
    concepts = _list(resource.get("interpretation"))
    if not concepts:
        return None
    return _first_code(concepts[0]) or _str(concepts[0].get("text"))


def _reference_range(resource: JsonObject) -> tuple[float | None, float | None]:
    ranges = _list(resource.get("referenceRange"))
    if not ranges:
        return None, None
    low = _obj(ranges[0].get("low"))
    high = _obj(ranges[0].get("high"))
    return (
        _number(low.get("value"), "Observation.referenceRange[0].low.value") if low else None,
        _number(high.get("value"), "Observation.referenceRange[0].high.value") if high else None,
    )


def _performer(resource: JsonObject, kind: str) -> str | None:
    for ref in _list(resource.get("performer")):
        reference = _str(ref.get("reference")) or ""
        if reference.startswith(kind) or ref.get("type") == kind:
            return _reference_text(ref)
    return None


def _lab(
    resource: JsonObject, patient: PatientFields, digest: str, events: _Events, resolve: Resolver | None
) -> None:
    local_code, system, display, loinc = _codes(_obj(resource.get("code")), "Observation.code")
    number, comparator, text, unit = _value(resource, "Observation")
    low, high = _reference_range(resource)
    collected = instant(resource.get("effectiveDateTime"), "Observation.effectiveDateTime", required=False)
    issued = instant(resource.get("issued"), "Observation.issued", required=False)
    result_time = issued or collected
    if result_time is None:
        raise UnmappableError(
            "Observation.issued", "the release time (issued) or effectiveDateTime is required"
        )
    result_id = _natural_id(resource, digest)
    events.add(
        "lab",
        result_time,
        {
            "result_id": result_id,
            **patient.as_record(),
            "encounter_id": _encounter_id(resource, resolve),
            "local_code": local_code,
            "local_code_system": system,
            "local_display": display,
            "loinc_code": loinc,
            "value_numeric": number,
            "value_comparator": comparator,
            "value_text": text,
            "unit": unit,
            "reference_low": low,
            "reference_high": high,
            "abnormal_flag": _interpretation(resource),
            "status": _observation_status(resource),
            "specimen_collected_time": collected,
            "result_time": result_time,
            "performing_lab": _performer(resource, "Organization"),
            "ordering_clinician": None,
        },
        f"Observation/{result_id}",
    )


def _measurement(part: JsonObject, path: str) -> dict[str, Any]:
    local_code, _system, _display, loinc = _codes(_obj(part.get("code")), f"{path}.code")
    quantity = _obj(part.get("valueQuantity"))
    if quantity is None:
        raise UnmappableError(f"{path}.valueQuantity", "a vital sign needs its valueQuantity")
    value = _number(quantity.get("value"), f"{path}.valueQuantity.value")
    if value is None:
        raise UnmappableError(f"{path}.valueQuantity.value", "a vital sign needs its value")
    if quantity.get("comparator") is not None:
        raise UnmappableError(
            f"{path}.valueQuantity.comparator", "a vital sign is a measurement, not a bound"
        )
    unit = _unit(quantity)
    if unit is None:
        raise UnmappableError(f"{path}.valueQuantity.unit", "a vital sign needs its unit")
    return {"loinc_code": loinc, "local_code": local_code, "value": value, "unit": unit}


def _vitals(
    resource: JsonObject, patient: PatientFields, digest: str, events: _Events, resolve: Resolver | None
) -> None:
    components = _list(resource.get("component"))
    if components:
        measurements = [_measurement(c, f"Observation.component[{i}]") for i, c in enumerate(components)]
        if "valueQuantity" in resource:
            measurements.insert(0, _measurement(resource, "Observation"))
    else:
        measurements = [_measurement(resource, "Observation")]
    effective = _str(resource.get("effectiveDateTime"))
    period = _obj(resource.get("effectivePeriod"))
    if effective is None and period is not None:
        measured = instant(period.get("start"), "Observation.effectivePeriod.start")
    else:
        measured = instant(effective, "Observation.effectiveDateTime")
    assert measured is not None  # noqa: S101 - required=True above
    device = _obj(resource.get("device"))
    observation_id = _natural_id(resource, digest)
    events.add(
        "vitals",
        measured,
        {
            "observation_id": observation_id,
            **patient.as_record(),
            "encounter_id": _encounter_id(resource, resolve),
            "measured_time": measured,
            "device_id": _reference_text(device),
            "status": _observation_status(resource),
            "measurements": measurements,
        },
        f"Observation/{observation_id}",
    )


# --- Encounter -----------------------------------------------------------------------------------

ENCOUNTER_CLASS = {
    "IMP": "INPATIENT",
    "ACUTE": "INPATIENT",
    "NONAC": "INPATIENT",
    "AMB": "OUTPATIENT",
    "EMER": "EMERGENCY",
    "SS": "DAY_CASE",
}
ENCOUNTER_STATUS = {
    "planned": "REGISTER",
    "arrived": "REGISTER",
    "triaged": "REGISTER",
    "in-progress": "ADMIT",
    "onleave": "UPDATE",
    "finished": "DISCHARGE",
    "cancelled": "CANCEL",
    "entered-in-error": "CANCEL",
    "unknown": "UNKNOWN",
}


def _locations(
    resource: JsonObject,
) -> tuple[dict[str, str | None], dict[str, str | None], dt.datetime | None]:
    """(current ward/bed, prior ward/bed, when the current location started): current locations are
    active (or without status), prior ones completed; physicalType bd is a bed, anything else a ward."""
    current: dict[str, str | None] = {"ward": None, "bed": None}
    prior: dict[str, str | None] = {"ward": None, "bed": None}
    since = None
    for i, entry in enumerate(_list(resource.get("location"))):
        name = _reference_text(_obj(entry.get("location")))
        if name is None:
            continue
        slot = "bed" if _first_code(_obj(entry.get("physicalType"))) == "bd" else "ward"
        status = _str(entry.get("status"))
        if status in (None, "active"):
            current[slot] = current[slot] or name
            period = _obj(entry.get("period"))
            if period and since is None:
                since = instant(period.get("start"), f"Encounter.location[{i}].period.start", required=False)
        elif status == "completed":
            prior[slot] = name
    return current, prior, since


def _encounter(
    resource: JsonObject, patient: PatientFields, digest: str, events: _Events, resolve: Resolver | None
) -> None:
    status = _str(resource.get("status"))
    if status not in ENCOUNTER_STATUS:
        raise UnmappableError(
            "Encounter.status", f"{status!r} has no regional meaning; one of {', '.join(ENCOUNTER_STATUS)}"
        )
    identifiers = identifiers_of(resource)
    encounter_id = identifiers[0][1] if identifiers else _str(resource.get("id"))
    if encounter_id is None:
        raise UnmappableError("Encounter.identifier", "the encounter (visit) id is required")
    klass = _obj(resource.get("class"))
    class_code = _str(klass.get("code")) if klass else None
    current, prior, since = _locations(resource)
    event_type = ENCOUNTER_STATUS[status]
    if event_type == "ADMIT" and prior["ward"] is not None and current["ward"] is not None:
        event_type = "TRANSFER"
    period = _obj(resource.get("period")) or {}
    admit = instant(period.get("start"), "Encounter.period.start", required=False)
    discharge = instant(period.get("end"), "Encounter.period.end", required=False)
    if event_type == "DISCHARGE":
        occurred = discharge
        occurred_path = "Encounter.period.end"
    elif event_type == "TRANSFER":
        occurred = since or admit
        occurred_path = "Encounter.location.period.start"
    else:
        occurred = admit
        occurred_path = "Encounter.period.start"
    if occurred is None:
        raise UnmappableError(occurred_path, f"when the {event_type.lower()} took effect is required")
    attending = next(
        (
            _reference_text(_obj(p.get("individual")))
            for p in _list(resource.get("participant"))
            if any(_first_code(t) in ("ATND", "attender") for t in _list(p.get("type")))
        ),
        None,
    )
    events.add(
        "encounter",
        occurred,
        {
            "encounter_id": encounter_id,
            **patient.as_record(),
            "event_type": event_type,
            "encounter_class": ENCOUNTER_CLASS.get(class_code or "", "UNKNOWN"),
            "ward": current["ward"],
            "bed": current["bed"],
            "prior_ward": prior["ward"] if event_type == "TRANSFER" else None,
            "prior_bed": prior["bed"] if event_type == "TRANSFER" else None,
            "attending_clinician": attending,
            "occurred_time": occurred,
            "admit_time": admit,
            "discharge_time": discharge,
        },
        f"Encounter/{encounter_id}",
    )


# --- MedicationRequest ---------------------------------------------------------------------------

MEDICATION_STATUS = {
    "active": "ACTIVE",
    "on-hold": "ON_HOLD",
    "cancelled": "CANCELLED",
    "completed": "COMPLETED",
    "entered-in-error": "ENTERED_IN_ERROR",
    "stopped": "STOPPED",
    "draft": "DRAFT",
    "unknown": "UNKNOWN",
}


def _frequency(timing: JsonObject | None) -> str | None:
    """As sent: the timing code (BID, q8h) or its text; else the repeat as `<frequency>/<period><unit>`
    (2/1d)."""
    if timing is None:
        return None
    code = _obj(timing.get("code"))
    if code is not None:
        return _first_code(code) or _str(code.get("text"))
    repeat = _obj(timing.get("repeat"))
    if repeat and repeat.get("frequency") is not None and repeat.get("period") is not None:
        return f"{repeat['frequency']}/{repeat['period']}{repeat.get('periodUnit', '')}"
    return None


def _medication(
    resource: JsonObject, patient: PatientFields, digest: str, events: _Events, resolve: Resolver | None
) -> None:
    status = _str(resource.get("status"))
    if status not in MEDICATION_STATUS:
        raise UnmappableError(
            "MedicationRequest.status",
            f"{status!r} has no regional meaning; one of {', '.join(MEDICATION_STATUS)}",
        )
    concept = _obj(resource.get("medicationCodeableConcept"))
    if concept is None:
        raise UnmappableError(
            "MedicationRequest.medicationCodeableConcept",
            "the drug must be coded in medicationCodeableConcept (medicationReference is not taken)",
        )
    coding = next((c for c in _codings(concept) if _str(c.get("code"))), None)
    if coding is None:
        raise UnmappableError("MedicationRequest.medicationCodeableConcept.coding", "a drug code is required")
    ordered = instant(resource.get("authoredOn"), "MedicationRequest.authoredOn")
    assert ordered is not None  # noqa: S101 - required=True
    dosages = _list(resource.get("dosageInstruction"))
    dosage = dosages[0] if dosages else {}
    rates = _list(dosage.get("doseAndRate"))
    dose = _obj(rates[0].get("doseQuantity")) if rates else None
    timing = _obj(dosage.get("timing"))
    repeat = _obj(timing.get("repeat")) if timing else None
    bounds = _obj(repeat.get("boundsPeriod")) if repeat else None
    route = _obj(dosage.get("route"))
    base = "MedicationRequest.dosageInstruction[0]"
    order_id = _natural_id(resource, digest)
    events.add(
        "medication",
        ordered,
        {
            "order_id": order_id,
            **patient.as_record(),
            "encounter_id": _encounter_id(resource, resolve),
            "drug_code": str(coding["code"]),
            "drug_code_system": _str(coding.get("system")),
            "drug_display": _str(coding.get("display")) or _str(concept.get("text")),
            "regional_drug_code": None,
            "dose_value": _number(dose.get("value"), f"{base}.doseAndRate[0].doseQuantity.value")
            if dose
            else None,
            "dose_unit": _unit(dose) if dose else None,
            "route": (_first_code(route) or _str(route.get("text"))) if route else None,
            "frequency": _frequency(timing),
            "status": MEDICATION_STATUS[status],
            "ordered_time": ordered,
            "start_time": instant(bounds.get("start"), f"{base}.timing.repeat.boundsPeriod.start", False)
            if bounds
            else None,
            "end_time": instant(bounds.get("end"), f"{base}.timing.repeat.boundsPeriod.end", False)
            if bounds
            else None,
            "prescriber": _reference_text(_obj(resource.get("requester"))),
        },
        f"MedicationRequest/{order_id}",
    )


# --- Condition -----------------------------------------------------------------------------------

ICD10_SYSTEMS = {
    "http://hl7.org/fhir/sid/icd-10": "ICD-10",
    "http://hl7.org/fhir/sid/icd-10-cm": "ICD-10-CM",
    "http://hl7.org/fhir/sid/icd-10-cn": "ICD-10-CN",
    "urn:oid:2.16.156.10011.2.3.3.11": "ICD-10-CN",  # GB/T 14396
}
CLINICAL_STATUS = ("active", "recurrence", "relapse", "inactive", "remission", "resolved")
DIAGNOSIS_ROLE = {"AD": "ADMISSION", "DD": "DISCHARGE", "CM": "SECONDARY", "CC": "PRINCIPAL"}


def _condition(
    resource: JsonObject, patient: PatientFields, digest: str, events: _Events, resolve: Resolver | None
) -> None:
    concept = _obj(resource.get("code"))
    coding = next(
        (c for c in _codings(concept) if c.get("system") in ICD10_SYSTEMS and _str(c.get("code"))), None
    )
    if coding is None:
        raise UnmappableError(
            "Condition.code.coding",
            f"an ICD-10 coding is required (system one of {', '.join(ICD10_SYSTEMS)})",
        )
    clinical = _obj(resource.get("clinicalStatus"))
    if clinical is not None and _first_code(clinical) not in CLINICAL_STATUS:
        raise UnmappableError(
            "Condition.clinicalStatus",
            f"{_first_code(clinical)!r} is not one of {', '.join(CLINICAL_STATUS)}",
        )
    if _first_code(_obj(resource.get("verificationStatus"))) == "entered-in-error":
        raise UnmappableError(
            "Condition.verificationStatus", "entered-in-error: a diagnosis cannot be withdrawn this way yet"
        )
    recorded = instant(resource.get("recordedDate"), "Condition.recordedDate")
    assert recorded is not None  # noqa: S101 - required=True
    roles = [_first_code(c) for c in _list(resource.get("category"))]
    kind = next((DIAGNOSIS_ROLE[r] for r in roles if r in DIAGNOSIS_ROLE), "UNKNOWN")
    diagnosis_id = _natural_id(resource, digest)
    events.add(
        "diagnosis",
        recorded,
        {
            "diagnosis_id": diagnosis_id,
            **patient.as_record(),
            "encounter_id": _encounter_id(resource, resolve),
            "icd10_code": str(coding["code"]),
            "code_system": ICD10_SYSTEMS[str(coding["system"])],
            "display": _str(coding.get("display")) or (_str(concept.get("text")) if concept else None),
            "kind": kind,
            "recorded_time": recorded,
            "clinician": _reference_text(_obj(resource.get("recorder")) or _obj(resource.get("asserter"))),
        },
        f"Condition/{diagnosis_id}",
    )


# --- entry point ---------------------------------------------------------------------------------


def map_resource(
    resource: JsonObject,
    institution: str,
    *,
    now: dt.datetime,
    correlation_id: str,
    resolve: Resolver | None = None,
) -> MappedResource:
    """The regional events of one (already validated) resource, for the token's institution."""
    resource_type = str(resource.get("resourceType"))
    if resource_type not in MAPPED_TYPES:
        raise InvalidFhirError("resourceType", f"{resource_type!r} is not one of {', '.join(MAPPED_TYPES)}")
    patient = patient_fields(resource, resolve)
    digest = content_hash(resource, patient)
    source_id = f"{resource_type}/{_source_key(resource, digest)}#{digest[:32]}"
    events = _Events(institution, source_id, correlation_id, now)
    if resource_type == "Observation":
        (_vitals if _category(resource) == "vitals" else _lab)(resource, patient, digest, events, resolve)
    elif resource_type == "Encounter":
        _encounter(resource, patient, digest, events, resolve)
    elif resource_type == "MedicationRequest":
        _medication(resource, patient, digest, events, resolve)
    else:
        _condition(resource, patient, digest, events, resolve)
    return MappedResource(
        resource_type=resource_type,
        source_id=source_id,
        logical_id=event_id_for(GATEWAY, institution, source_id, -1).replace("-", ""),
        identifiers=identifiers_of(resource),
        content_hash=digest,
        events=tuple(events.events),
    )

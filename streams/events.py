"""Every event kind to the regional standard, as the record published on `norm.<kind>`.

The normalised record is the kind's own schema with the hub's fields filled in (regional patient
id; for labs LOINC, canonical value and unit, flags) and the national identifier removed.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from streams.codes import CodeMaps
from streams.exceptions import ImplausibleValueError, RejectedEvent
from streams.identity import RegionalIdentity, normalise_national_id
from streams.normalise import FLAG_INVALID_NATIONAL_ID, checked_utc, convert, normalise_lab
from streams.reference import ReferenceData

LINK_NAMESPACE = uuid.UUID("5d0c6e43-7d36-4bb8-9e1f-2c8a4b1e9a01")
ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
FLAG_UNMAPPED_DRUG = "unmapped_drug_code"

TIME_FIELDS = {
    "lab": ("result_time", "specimen_collected_time"),
    "vitals": ("measured_time",),
    "encounter": ("occurred_time", "admit_time", "discharge_time"),
    "medication": ("ordered_time", "start_time", "end_time"),
    "diagnosis": ("recorded_time",),
}


def link_key(institution: str, mrn: str) -> str:
    """Key of the identity-link table; the SDK keys raw messages the same way (`institution|mrn`)."""
    return f"{institution}|{mrn}"


@dataclass(frozen=True)
class IdentityDecision:
    regional_patient_id: str
    flags: tuple[str, ...]
    remember: str | None  # new value for the link table when the link changed
    link: dict[str, Any] | None  # IdentityLink record to publish when the link changed


def resolve_identity(
    identity: RegionalIdentity,
    known: str | None,
    institution: str,
    mrn: str,
    raw_national_id: str | None,
    now: dt.datetime,
) -> IdentityDecision:
    """Regional id for (institution, MRN): from a valid national id when sent, else the id already
    linked to the MRN, else one derived from the MRN. A change of link is announced once."""
    flags: list[str] = []
    national = normalise_national_id(raw_national_id) if raw_national_id else None
    if raw_national_id and national is None:
        flags.append(FLAG_INVALID_NATIONAL_ID)
    if national is not None:
        regional = identity.from_national_id(national)
    else:
        regional = known or identity.from_local(institution, mrn)
    if regional == known:
        return IdentityDecision(regional, tuple(flags), None, None)
    alias = known if known is not None and known != regional else None
    link = {
        "link_id": str(uuid.uuid5(LINK_NAMESPACE, f"{institution}|{mrn}|{regional}")),
        "institution_id": institution,
        "patient_mrn": mrn,
        "regional_patient_id": regional,
        "alias_of": alias,
        "linked_time": now,
    }
    return IdentityDecision(regional, tuple(flags), regional, link)


@dataclass(frozen=True)
class NormalisedEvent:
    kind: str
    record: dict[str, Any]
    regional_patient_id: str
    flags: tuple[str, ...]
    identity: IdentityDecision


def _common_checks(
    kind: str, record: Mapping[str, Any], topic_institution: str | None, now: dt.datetime
) -> str:
    institution = str(record["envelope"]["institution_id"])
    if topic_institution is not None and institution != topic_institution:
        raise RejectedEvent(
            "envelope.institution_id",
            f"payload claims institution {institution!r} on a topic of {topic_institution!r}",
        )
    if not str(record["patient_mrn"]).strip():
        raise RejectedEvent("patient_mrn", "empty local patient identifier")
    checked_utc(record["envelope"]["event_time"], "envelope.event_time", now)
    for name in TIME_FIELDS[kind]:
        if record.get(name) is not None:
            checked_utc(record[name], name, now)
    return institution


def normalise_event(
    kind: str,
    record: Mapping[str, Any],
    reference: ReferenceData,
    codes: CodeMaps,
    identity: RegionalIdentity,
    known_link: Callable[[str], str | None],
    topic_institution: str | None,
    now: dt.datetime,
) -> NormalisedEvent:
    """Normalise one decoded event of any kind, or raise RejectedEvent naming the field and reason."""
    institution = _common_checks(kind, record, topic_institution, now)
    mrn = str(record["patient_mrn"]).strip()
    decision = resolve_identity(
        identity,
        known_link(link_key(institution, mrn)),
        institution,
        mrn,
        record.get("patient_national_id"),
        now,
    )
    out = dict(record)
    out["patient_mrn"] = mrn
    out["patient_national_id"] = None  # never leaves the normaliser
    out["regional_patient_id"] = decision.regional_patient_id
    flags = list(decision.flags)
    if kind == "lab":
        lab = normalise_lab(
            record,
            reference,
            identity,
            topic_institution,
            now,
            regional_patient_id=decision.regional_patient_id,
        )
        flags = list(dict.fromkeys([*flags, *lab.flags]))
        out.update(
            {
                "local_code": lab.local_code,
                "loinc_code": lab.loinc_code,
                "canonical_value": lab.value if lab.loinc_code is not None else None,
                "canonical_unit": lab.unit if lab.loinc_code is not None else None,
                "normalisation_flags": flags,
                "patient_national_id": None,
            }
        )
    elif kind == "vitals":
        out["measurements"] = [_vital(m, i, reference, codes) for i, m in enumerate(record["measurements"])]
        if not out["measurements"]:
            raise RejectedEvent("measurements", "a vital-signs event needs at least one measurement")
    elif kind == "medication":
        regional = record.get("regional_drug_code") or codes.drugs.get(institution, {}).get(
            record["drug_code"]
        )
        out["regional_drug_code"] = regional
        if regional is None:
            flags.append(FLAG_UNMAPPED_DRUG)
    elif kind == "diagnosis":
        out["icd10_code"] = _icd10(record["icd10_code"])
    return NormalisedEvent(kind, out, decision.regional_patient_id, tuple(flags), decision)


def _vital(
    measurement: Mapping[str, Any], index: int, reference: ReferenceData, codes: CodeMaps
) -> dict[str, Any]:
    field = f"measurements[{index}]"
    loinc = measurement.get("loinc_code") or codes.vital_signs.get(str(measurement["local_code"]).upper())
    if loinc is None:
        raise RejectedEvent(
            f"{field}.local_code", f"vital-sign code {measurement['local_code']!r} has no LOINC map"
        )
    try:
        value, unit = convert(float(measurement["value"]), measurement["unit"], loinc, reference)
    except RejectedEvent as exc:
        raise type(exc)(f"{field}.{exc.field}", exc.reason) from exc
    analyte = reference.analytes[loinc]
    if not analyte.plausible_low <= value <= analyte.plausible_high:
        raise ImplausibleValueError(
            f"{field}.value",
            f"{analyte.name} {measurement['value']} {measurement['unit']} is outside the possible range "
            f"{analyte.plausible_low:g}-{analyte.plausible_high:g} {unit}",
        )
    return {"loinc_code": loinc, "local_code": measurement["local_code"], "value": value, "unit": unit}


def _icd10(raw: str) -> str:
    code = raw.strip().upper()
    if "." not in code and len(code) > 3:
        code = f"{code[:3]}.{code[3:]}"
    if not ICD10.match(code):
        raise RejectedEvent(
            "icd10_code", f"{raw!r} is not an ICD-10 code (letter, two digits, optional .suffix)"
        )
    return code

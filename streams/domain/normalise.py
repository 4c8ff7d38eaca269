"""Every event kind to the regional standard: `normalise_event`, the one entry point.

The normalised record is the kind's own schema with the hub's fields filled in (regional patient id;
for labs LOINC, canonical value and unit, flags) and the national identifier removed; the patient's name
(`patient_family_name`, `patient_given_name`) passes through unchanged, for the store, and nothing here
reads it, logs it or puts it in a rejection's reason. What every kind
shares (the institution the topic authenticated, the MRN, plausible times, the regional identity) is
checked here once; what is particular to a kind is its normaliser, registered with `@normaliser(kind)`.
A new kind of `core.contract` needs one.

Only `RejectedEvent` (bad input, naming the field) leaves these functions on purpose; any other
exception is a bug of the hub and must not be mistaken for a hospital's error.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from core import contract
from core.national_id import normalise_national_id
from schemas import standard
from streams.domain.codes import CodeMaps
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import Analyte, ReferenceData, UnitSpellings
from streams.domain.values import COMPARATORS, FLAG_NOT_JUDGED, ValueFormat, read_value_text
from streams.exceptions import ImplausibleTimeError, ImplausibleValueError, RejectedEvent, UnknownUnitError

EARLIEST = dt.datetime(1900, 1, 1, tzinfo=dt.UTC)
FUTURE_TOLERANCE = dt.timedelta(minutes=10)
LINK_NAMESPACE = uuid.UUID("5d0c6e43-7d36-4bb8-9e1f-2c8a4b1e9a01")
ICD10 = re.compile(r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$")
LOINC_FORM = re.compile(r"[0-9]{1,7}-[0-9]")  # ^\d{1,7}-\d$ in ASCII digits only, for fullmatch

FLAG_UNMAPPED_CODE = "unmapped_code"
FLAG_UNMAPPED_DRUG = "unmapped_drug_code"
FLAG_INVALID_NATIONAL_ID = "invalid_national_id"


@dataclass(frozen=True)
class IdentityDecision:
    regional_patient_id: str
    flags: tuple[str, ...]
    remember: str | None  # new value for the link table when the link changed
    link: dict[str, Any] | None  # IdentityLink record to publish when the link changed


@dataclass(frozen=True)
class NormalisedEvent:
    kind: str
    record: dict[str, Any]
    regional_patient_id: str
    flags: tuple[str, ...]
    identity: IdentityDecision


@dataclass(frozen=True)
class KindResult:
    """What a kind's normaliser adds: fields that replace the raw ones, and flags."""

    fields: Mapping[str, Any]
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class KindInput:
    """What a kind's normaliser is given: the decoded record and the reference data."""

    record: Mapping[str, Any]
    institution: str
    reference: ReferenceData
    codes: CodeMaps


KindNormaliser = Callable[[KindInput], KindResult]
_NORMALISERS: dict[str, KindNormaliser] = {}


def normaliser(kind: str) -> Callable[[KindNormaliser], KindNormaliser]:
    """Register the normaliser of one kind of the contract."""

    def register(function: KindNormaliser) -> KindNormaliser:
        if kind in _NORMALISERS:
            raise ValueError(f"kind {kind!r} has two normalisers")
        _NORMALISERS[contract.check_kind(kind)] = function
        return function

    return register


def missing_normalisers() -> list[str]:
    """Kinds of the contract nobody normalises (the normaliser stage refuses to start with any)."""
    return [kind for kind in contract.KINDS if kind not in _NORMALISERS]


@cache
def time_fields(kind: str) -> tuple[str, ...]:
    """The instants of a kind, read from its schema: every one of them must be plausible."""
    return standard.timestamp_fields(standard.load(contract.KIND_SPECS[kind].schema))


@cache
def _carries_flags(kind: str) -> bool:
    schema = standard.load(contract.KIND_SPECS[kind].schema)
    return any(f["name"] == "normalisation_flags" for f in schema.parsed["fields"])


def checked_utc(value: dt.datetime, field: str, now: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ImplausibleTimeError(field, "time has no time zone; the standard carries UTC instants")
    value = value.astimezone(dt.UTC)
    if value < EARLIEST:
        raise ImplausibleTimeError(field, f"{value.isoformat()} is before 1900")
    if value > now + FUTURE_TOLERANCE:
        raise ImplausibleTimeError(field, f"{value.isoformat()} is in the future (now {now.isoformat()})")
    return value


def convert(value: float, unit: str | None, loinc: str, reference: ReferenceData) -> tuple[float, str]:
    """Value in the analyte's canonical unit. The unit may come in another spelling of an accepted one
    (UCUM's case-insensitive form, an alias, another case); one that is unknown, or could mean two
    units, is an error, never a guess."""
    analyte = reference.analytes.get(loinc)
    if analyte is None:
        raise UnknownUnitError("loinc_code", f"no canonical unit is configured for LOINC {loinc}")
    key = (unit or "").strip()
    factor = analyte.factors[accepted_unit(key, analyte, reference.unit_spellings)]
    return value * factor, analyte.canonical_unit


def accepted_unit(sent: str, analyte: Analyte, spellings: UnitSpellings) -> str:
    """The unit of the analyte's factor table that `sent` spells: itself; else the analyte's spelling of
    the UCUM unit an alias (in any case) names; else the one accepted unit equal to it but for case.

    Hospital systems and HL7 v2 feeds send units in upper case (MMOL/L) or in spellings of their own
    (x10E9/L); UCUM tells some units apart by case alone (mU milli-unit, MU mega-unit), so a spelling
    equal but for case to two different accepted units is refused, naming them.
    """
    factors = analyte.factors
    if sent in factors:
        return sent
    code = spellings.exact.get(sent) or spellings.folded.get(sent.casefold())
    if code is None and sent in spellings.ucum:
        code = sent
    if code is not None:
        spelled = sorted(unit for unit in factors if spellings.unit_of(unit) == code)
        if spelled:
            return code if code in spelled else spelled[0]  # equal factors: the load checked
    matches = sorted(unit for unit in factors if unit.casefold() == sent.casefold())
    if len({spellings.unit_of(unit) for unit in matches}) == 1:
        return matches[0]
    where = f"{analyte.name} ({analyte.loinc})"
    if matches:
        raise UnknownUnitError(
            "unit",
            f"unit {sent!r} is ambiguous for {where}: equal but for case to {' and '.join(matches)}, "
            "which UCUM tells apart by case; send the case-sensitive UCUM code",
        )
    read_as = f" (UCUM {code})" if code is not None and code != sent else ""
    accepted = ", ".join(sorted(u for u in factors if u)) or "(none)"
    raise UnknownUnitError(
        "unit", f"unit {sent!r}{read_as} is not accepted for {where}; accepted: {accepted}"
    )


def loinc_check_digit(body: str) -> int:
    """The Mod 10 check digit of the digits before a LOINC code's hyphen, step by step as the LOINC
    Users' Guide gives it (appendix C, "Calculating Mod 10 Check Digits")."""
    from_right = body[::-1]
    doubled = str(int(from_right[0::2]) * 2)  # digits in odd positions from the right, as a number, x2
    digits = from_right[1::2] + doubled  # digits in even positions from the right, prepended
    return -sum(int(digit) for digit in digits) % 10  # up to the next multiple of ten


def is_loinc(code: str) -> bool:
    """Whether `code` has the form of a LOINC code (1 to 7 digits, hyphen, check digit) and the right
    check digit. A mistyped code fails the check; so do the 14 LOINC codes published with a wrong check
    digit (Users' Guide appendix C), all deprecated: sent as `loinc_code` or mapped, they still count."""
    if not LOINC_FORM.fullmatch(code):
        return False
    body, check = code.split("-")
    return loinc_check_digit(body) == int(check)


def lab_loinc(record: Mapping[str, Any], institution: str, reference: ReferenceData) -> str | None:
    """The LOINC code of a lab result: the `loinc_code` sent; else the institution's terminology map of
    the local code; else the local code itself when it is a LOINC code (a common shortcut) with a valid
    check digit and reference data here. A LOINC code the hub has no units for stays unmapped, as
    before, rather than reject the results of a local code that only looks like LOINC."""
    local_code = str(record["local_code"]).strip()
    mapped = record.get("loinc_code") or reference.terminology.get(institution, {}).get(local_code)
    if mapped:
        return str(mapped)
    if is_loinc(local_code) and local_code in reference.analytes:
        return local_code
    return None


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
class _Common:
    institution: str
    mrn: str
    event_time: dt.datetime
    times: dict[str, dt.datetime]  # the kind's instants, in UTC


def _common_checks(
    kind: str, record: Mapping[str, Any], topic_institution: str | None, now: dt.datetime
) -> _Common:
    """The institution (as the topic authenticated it), the MRN and the times in UTC, once every shared
    rule holds."""
    institution = str(record["envelope"]["institution_id"])
    if topic_institution is not None and institution != topic_institution:
        raise RejectedEvent(
            "envelope.institution_id",
            f"payload claims institution {institution!r} on a topic of {topic_institution!r}",
        )
    mrn = str(record["patient_mrn"]).strip()
    if not mrn:
        raise RejectedEvent("patient_mrn", "empty local patient identifier")
    event_time = checked_utc(record["envelope"]["event_time"], "envelope.event_time", now)
    times = {
        name: checked_utc(record[name], name, now)
        for name in time_fields(kind)
        if record.get(name) is not None
    }
    return _Common(institution, mrn, event_time, times)


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
    common = _common_checks(kind, record, topic_institution, now)
    institution, mrn = common.institution, common.mrn
    decision = resolve_identity(
        identity,
        known_link(contract.patient_key(institution, mrn)),
        institution,
        mrn,
        record.get("patient_national_id"),
        now,
    )
    particular = _NORMALISERS[kind](KindInput(record, institution, reference, codes))
    flags = tuple(dict.fromkeys([*decision.flags, *particular.flags]))
    out = dict(record)
    out["envelope"] = {**record["envelope"], "event_time": common.event_time}
    out.update(common.times)
    out.update(particular.fields)
    out["patient_mrn"] = mrn
    out["patient_national_id"] = None  # never leaves the normaliser
    out["regional_patient_id"] = decision.regional_patient_id
    if _carries_flags(kind):
        out["normalisation_flags"] = list(flags)
    return NormalisedEvent(kind, out, decision.regional_patient_id, flags, decision)


@normaliser("lab")
def _lab(given: KindInput) -> KindResult:
    """LOINC as sent, from the institution's terminology map or in the local code (`lab_loinc`), the value
    in the analyte's canonical unit: a number as sent, a bound (`value_comparator`), or the one number
    the value text means (`streams.domain.values`); text that means none is flagged not_judged."""
    record, reference = given.record, given.reference
    local_code = str(record["local_code"]).strip()
    loinc = lab_loinc(record, given.institution, reference)
    fields: dict[str, Any] = {
        "local_code": local_code,
        "loinc_code": loinc,
        "canonical_value": None,
        "canonical_unit": None,
    }
    if loinc is None:
        return KindResult(fields, (FLAG_UNMAPPED_CODE,))
    sent = _sent_value(record, local_code, reference.value_formats.get(given.institution, ValueFormat()))
    if sent is None:
        fields["canonical_unit"] = record.get("unit")
        return KindResult(fields, (FLAG_NOT_JUDGED,) if record.get("value_text") else ())
    fields.update(sent.fields)
    value, unit = convert(sent.number, sent.unit, loinc, reference)
    analyte = reference.analytes[loinc]
    if not analyte.plausible_low <= value <= analyte.plausible_high:
        bound = f"{sent.comparator} " if sent.comparator else ""
        raise ImplausibleValueError(
            sent.field,
            f"{analyte.name} {bound}{sent.number:g} {sent.unit} = {value:g} {unit} is outside the possible "
            f"range {analyte.plausible_low:g}-{analyte.plausible_high:g} {unit}",
        )
    fields.update(canonical_value=value, canonical_unit=unit)
    return KindResult(fields)


@dataclass(frozen=True)
class _SentValue:
    """The number of a lab result in the unit it came in, and where it came from."""

    number: float
    unit: str | None
    comparator: str | None
    field: str  # the field a rejection names
    fields: Mapping[str, Any]  # what the normalised record says of it, besides the canonical value


def _sent_value(record: Mapping[str, Any], local_code: str, value_format: ValueFormat) -> _SentValue | None:
    comparator = record.get("value_comparator")
    if comparator is not None and comparator not in COMPARATORS:
        raise RejectedEvent("value_comparator", f"{comparator!r} is not one of {', '.join(COMPARATORS)}")
    number = record.get("value_numeric")
    if number is not None:
        return _SentValue(float(number), record.get("unit"), comparator, "value_numeric", {})
    if comparator is not None:
        raise RejectedEvent("value_numeric", f"a bound ({comparator}) needs its number in value_numeric")
    text = record.get("value_text")
    read = read_value_text(text, local_code, value_format) if text else None
    if read is None:
        return None
    unit = read.unit or record.get("unit")
    fields: dict[str, Any] = {"value_numeric": read.number, "value_comparator": read.comparator, "unit": unit}
    if read.flag and not record.get("abnormal_flag"):
        fields["abnormal_flag"] = read.flag
    return _SentValue(read.number, unit, read.comparator, "value_text", fields)


@normaliser("vitals")
def _vitals(given: KindInput) -> KindResult:
    measurements = [_vital(m, i, given) for i, m in enumerate(given.record["measurements"])]
    if not measurements:
        raise RejectedEvent("measurements", "a vital-signs event needs at least one measurement")
    return KindResult({"measurements": measurements})


def _vital(measurement: Mapping[str, Any], index: int, given: KindInput) -> dict[str, Any]:
    field = f"measurements[{index}]"
    reference = given.reference
    local_code = measurement["local_code"]
    loinc = measurement.get("loinc_code") or given.codes.vital_signs.get(str(local_code).upper())
    if loinc is None:
        raise RejectedEvent(f"{field}.local_code", f"vital-sign code {local_code!r} has no LOINC map")
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
    return {"loinc_code": loinc, "local_code": local_code, "value": value, "unit": unit}


@normaliser("encounter")
def _encounter(_given: KindInput) -> KindResult:
    """Encounters carry no local codes; the shared checks are all they need."""
    return KindResult({})


@normaliser("medication")
def _medication(given: KindInput) -> KindResult:
    record = given.record
    regional = record.get("regional_drug_code") or given.codes.drugs.get(given.institution, {}).get(
        record["drug_code"]
    )
    return KindResult({"regional_drug_code": regional}, () if regional else (FLAG_UNMAPPED_DRUG,))


@normaliser("diagnosis")
def _diagnosis(given: KindInput) -> KindResult:
    raw = given.record["icd10_code"]
    code = raw.strip().upper()
    if "." not in code and len(code) > 3:
        code = f"{code[:3]}.{code[3:]}"
    if not ICD10.match(code):
        raise RejectedEvent(
            "icd10_code", f"{raw!r} is not an ICD-10 code (letter, two digits, optional .suffix)"
        )
    return KindResult({"icd10_code": code})

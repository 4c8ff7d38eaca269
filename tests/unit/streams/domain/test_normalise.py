"""Normalisation of decoded LabResult records: LOINC, canonical units, UTC times, pseudonymous patient id.

Expected conversions come from the factor table in shared/reference/clinical.md, not from units.json.
"""

from __future__ import annotations

import datetime as dt
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import FLAG_INVALID_NATIONAL_ID, FLAG_UNMAPPED_CODE, normalise_event
from streams.domain.reference import load_reference
from streams.exceptions import ImplausibleTimeError, ImplausibleValueError, RejectedEvent, UnknownUnitError
from tests.factories import lab_record

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
NID = "11010519491231002X"  # the GB 11643-1999 sample number
NID_BAD_CHECK = "110105194912310021"


def record(envelope: dict[str, Any] | None = None, /, **fields: Any) -> dict[str, Any]:
    """A decoded LabResult as AvroDecoder returns it (aware UTC datetimes, UUID event id)."""
    rec = lab_record(
        "H001",
        "K",
        4.2,
        "mmol/L",
        mrn="MRN0000001",
        at=NOW - dt.timedelta(minutes=5),
        **{
            "event_id": uuid.UUID("5f0c8a52-0d6e-4a4f-a0b6-0a2b1c3d4e5f"),
            "source_system": "LIS-Cerner",
            "correlation_id": "corr-1",
            "result_id": "H001-R1",
            "patient_birth_year": 1949,
            "patient_sex": "male",
            "encounter_id": "V000001",
            "local_code_system": "LIS-H001",
            "local_display": "Potassium",
            "reference_low": 3.5,
            "reference_high": 5.1,
            "specimen_collected_time": NOW - dt.timedelta(minutes=60),
            **fields,
        },
    )
    rec["envelope"].update(envelope or {})
    return rec


def normalise(rec: dict[str, Any], topic_institution: str | None = None) -> SimpleNamespace:
    """The normalised LabResult, with the names these tests read: `value` and `unit` are canonical when
    the code is mapped, as sent otherwise; `original_*` as sent."""
    event = normalise_event("lab", rec, REFERENCE, CODES, IDENTITY, lambda _key: None, topic_institution, NOW)
    out = event.record
    mapped = out["loinc_code"] is not None
    return SimpleNamespace(
        record=out,
        flags=event.flags,
        loinc_code=out["loinc_code"],
        analyte=REFERENCE.analytes[out["loinc_code"]].name if mapped else None,
        local_code=out["local_code"],
        value=out["canonical_value"] if mapped else out["value_numeric"],
        unit=out["canonical_unit"] if mapped else out["unit"],
        original_value=out["value_numeric"],
        original_unit=out["unit"],
        value_text=out["value_text"],
        result_time=out["result_time"],
        institution_id=out["envelope"]["institution_id"],
        regional_patient_id=event.regional_patient_id,
    )


# LOINC codes as published by Regenstrief for these tests, independent of terminology.json.
@pytest.mark.parametrize(
    ("institution", "local_code", "value", "unit", "loinc", "analyte"),
    [
        ("H001", "K", 4.1, "mmol/L", "2823-3", "Potassium"),
        ("H001", "NA", 140.0, "mmol/L", "2951-2", "Sodium"),
        ("H001", "GLU", 5.2, "mmol/L", "2345-7", "Glucose"),
        ("H001", "HGB", 135.0, "g/L", "718-7", "Hemoglobin"),
        ("H001", "CREA", 80.0, "umol/L", "2160-0", "Creatinine"),
        ("H002", "LAB0101", 4.1, "mmol/L", "2823-3", "Potassium"),
        ("H002", "LAB0201", 5.2, "mmol/L", "2345-7", "Glucose"),
        ("H002", "LAB0301", 135.0, "g/L", "718-7", "Hemoglobin"),
        ("H002", "LAB0302", 250.0, "10*9/L", "777-3", "Platelets"),
        ("H002", "LAB0701", 12.0, "ng/L", "10839-9", "Troponin I, cardiac"),
    ],
)
def test_local_codes_map_to_loinc_per_institution(
    institution: str, local_code: str, value: float, unit: str, loinc: str, analyte: str
) -> None:
    """Each hospital's own code resolves to the one LOINC code the region uses."""
    lab = normalise(
        record({"institution_id": institution}, local_code=local_code, unit=unit, value_numeric=value)
    )
    assert (lab.loinc_code, lab.analyte) == (loinc, analyte)
    assert lab.local_code == local_code
    assert FLAG_UNMAPPED_CODE not in lab.flags


def test_local_code_whitespace_is_ignored() -> None:
    """A padded code from a fixed-width LIS export still maps."""
    assert normalise(record(local_code=" K ")).loinc_code == "2823-3"


def test_producer_supplied_loinc_is_used() -> None:
    """A producer that already codes in LOINC does not need a terminology entry."""
    lab = normalise(record(local_code="SERUM-POT", loinc_code="2823-3"))
    assert lab.loinc_code == "2823-3"
    assert FLAG_UNMAPPED_CODE not in lab.flags


@pytest.mark.parametrize(
    ("institution", "local_code"),
    [
        ("H001", "ZZZ"),
        ("H001", "LAB0101"),  # H002's potassium code means nothing at H001
        ("H002", "K"),  # and H001's means nothing at H002
        ("H999", "K"),  # an institution without a terminology at all
    ],
)
def test_unmapped_code_is_flagged_and_value_kept(institution: str, local_code: str) -> None:
    """Unmapped codes are stored as sent for terminology staff to map later, never rejected."""
    lab = normalise(
        record({"institution_id": institution}, local_code=local_code, value_numeric=123.4, unit="weird-unit")
    )
    assert FLAG_UNMAPPED_CODE in lab.flags
    assert lab.loinc_code is None and lab.analyte is None
    assert (lab.value, lab.unit) == (123.4, "weird-unit")
    assert (lab.original_value, lab.original_unit) == (123.4, "weird-unit")


# (local code at H001, value, unit as sent, expected value, canonical unit), factors from clinical.md.
CONVERSIONS = [
    ("GLU", 100.0, "mg/dL", 100.0 * 0.05551, "mmol/L"),
    ("GLU", 5.5, "mmol/L", 5.5, "mmol/L"),
    ("CREA", 1.0, "mg/dL", 88.4, "umol/L"),
    ("CREA", 0.75, "mg/dL", 0.75 * 88.4, "umol/L"),
    ("CA", 10.0, "mg/dL", 10.0 * 0.2495, "mmol/L"),
    ("CA", 5.0, "mEq/L", 5.0 * 0.5, "mmol/L"),
    ("HGB", 12.5, "g/dL", 125.0, "g/L"),
    ("HGB", 125.0, "g/L", 125.0, "g/L"),
    ("PLT", 250.0, "10*3/uL", 250.0, "10*9/L"),
    ("PLT", 250.0, "10^3/uL", 250.0, "10*9/L"),
    ("WBC", 7.2, "10*3/uL", 7.2, "10*9/L"),
    ("PO2", 80.0, "mmHg", 80.0 * 0.1333, "kPa"),
    ("PO2", 80.0, "mm[Hg]", 80.0 * 0.1333, "kPa"),
    ("TNI", 0.05, "ng/mL", 50.0, "ng/L"),
    ("TNI", 0.05, "ug/L", 50.0, "ng/L"),  # 1 ug/L = 1 ng/mL
    ("LAC", 18.0, "mg/dL", 18.0 * 0.111, "mmol/L"),
    ("K", 4.0, "mEq/L", 4.0, "mmol/L"),
    ("NA", 140.0, "meq/L", 140.0, "mmol/L"),
]


@pytest.mark.parametrize(("local_code", "value", "unit", "expected", "canonical"), CONVERSIONS)
def test_values_are_converted_to_the_canonical_unit(
    local_code: str, value: float, unit: str, expected: float, canonical: str
) -> None:
    """Conventional units become SI with the analyte's factor; the value as sent is kept alongside."""
    lab = normalise(record(local_code=local_code, value_numeric=value, unit=unit))
    assert lab.value == pytest.approx(expected, rel=1e-12)
    assert lab.unit == canonical
    assert (lab.original_value, lab.original_unit) == (value, unit)


@pytest.mark.parametrize(
    ("local_code", "unit"),
    [
        ("GLU", "mmol/dL"),
        ("GLU", "mg/L"),
        ("GLU", None),  # glucose without a unit is ambiguous (mg/dL or mmol/L?)
        ("GLU", ""),
        ("HGB", "mg/dL"),
        ("K", "mg/dL"),  # a mass unit for potassium needs a molar mass: refused, not guessed
        ("PLT", "/uL"),
        ("TNI", "pg/mL"),
        ("PO2", "cmH2O"),
    ],
)
def test_unknown_unit_is_rejected_on_field_unit(local_code: str, unit: str | None) -> None:
    """A unit without a known factor for the analyte is never guessed."""
    with pytest.raises(UnknownUnitError) as info:
        normalise(record(local_code=local_code, value_numeric=1.0, unit=unit))
    assert info.value.field == "unit"


@pytest.mark.parametrize("unit", [None, "", "{INR}", "1", "INR"])
def test_unitless_analytes_accept_a_missing_unit(unit: str | None) -> None:
    """INR is a ratio: no unit, '1' and '{INR}' all mean the same."""
    lab = normalise(record(local_code="INR", value_numeric=2.5, unit=unit))
    assert lab.value == 2.5


@pytest.mark.parametrize(
    ("local_code", "value", "unit"),
    [
        ("K", 40.0, "mmol/L"),  # a decimal slip, not hyperkalaemia
        ("K", 0.0, "mmol/L"),
        ("NA", 1400.0, "mmol/L"),
        ("GLU", -1.0, "mmol/L"),
        ("GLU", 4000.0, "mg/dL"),  # 222 mmol/L: impossible only after conversion
        ("HGB", 0.1, "g/dL"),
        ("PH", 14.0, "[pH]"),
        ("K", float("nan"), "mmol/L"),
        ("K", float("inf"), "mmol/L"),
    ],
)
def test_implausible_values_are_rejected(local_code: str, value: float, unit: str) -> None:
    """Physiologically impossible values are data errors, not critical results."""
    with pytest.raises(ImplausibleValueError) as info:
        normalise(record(local_code=local_code, value_numeric=value, unit=unit))
    assert info.value.field == "value_numeric"


@pytest.mark.parametrize("loinc", sorted(REFERENCE.analytes))
def test_plausible_range_is_inclusive(loinc: str) -> None:
    """The ends of the possible range are still possible values."""
    analyte = REFERENCE.analytes[loinc]
    for value in (analyte.plausible_low, analyte.plausible_high):
        lab = normalise(
            record(local_code="X", loinc_code=loinc, value_numeric=value, unit=analyte.canonical_unit)
        )
        assert lab.value == value


def test_text_result_keeps_text_and_unit() -> None:
    """A coded result (no number) on a mapped code passes without conversion."""
    lab = normalise(record(local_code="K", value_numeric=None, value_text="haemolysed", unit=None))
    assert (lab.value, lab.value_text, lab.loinc_code) == (None, "haemolysed", "2823-3")


@pytest.mark.parametrize(
    ("where", "field"),
    [
        ("result_time", "result_time"),
        ("specimen_collected_time", "specimen_collected_time"),
        ("envelope.event_time", "envelope.event_time"),
    ],
)
def test_naive_times_are_rejected(where: str, field: str) -> None:
    """A time without a zone is ambiguous by up to a day; the standard carries UTC instants."""
    naive = (NOW - dt.timedelta(minutes=30)).replace(tzinfo=None)
    rec = record({"event_time": naive}) if where.startswith("envelope.") else record(**{where: naive})
    with pytest.raises(ImplausibleTimeError) as info:
        normalise(rec)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("result_time", "accepted"),
    [
        (NOW + dt.timedelta(minutes=9), True),  # clock skew within tolerance
        (NOW + dt.timedelta(minutes=10), True),
        (NOW + dt.timedelta(minutes=10, seconds=1), False),
        (NOW + dt.timedelta(days=365), False),
        (dt.datetime(1900, 1, 1, tzinfo=dt.UTC), True),
        (dt.datetime(1899, 12, 31, 23, 59, 59, tzinfo=dt.UTC), False),
        (dt.datetime(1, 1, 1, tzinfo=dt.UTC), False),
    ],
)
def test_time_window(result_time: dt.datetime, accepted: bool) -> None:
    """Times more than 10 minutes ahead of the hub's clock, or before 1900, are data errors."""
    rec = record(result_time=result_time, specimen_collected_time=None)
    if accepted:
        assert normalise(rec).result_time == result_time
    else:
        with pytest.raises(ImplausibleTimeError) as info:
            normalise(rec)
        assert info.value.field == "result_time"


def test_times_are_converted_to_utc() -> None:
    """A Beijing-time instant is stored as the same instant in UTC."""
    beijing = dt.timezone(dt.timedelta(hours=8))
    lab = normalise(record(result_time=dt.datetime(2026, 11, 23, 19, 30, tzinfo=beijing)))
    assert lab.result_time == dt.datetime(2026, 11, 23, 11, 30, tzinfo=dt.UTC)
    assert lab.result_time.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("payload", "topic", "accepted"),
    [
        ("H001", "H001", True),
        ("H001", None, True),  # no topic context (e.g. replay tool): payload is trusted
        ("H001", "H002", False),
        ("h001", "H001", False),  # institution codes are exact
    ],
)
def test_institution_must_match_topic(payload: str, topic: str | None, accepted: bool) -> None:
    """One hospital cannot write another's results through its own topic."""
    rec = record({"institution_id": payload})
    if accepted:
        assert normalise(rec, topic_institution=topic).institution_id == payload
    else:
        with pytest.raises(RejectedEvent) as info:
            normalise(rec, topic_institution=topic)
        assert info.value.field == "envelope.institution_id"


@pytest.mark.parametrize("bad", [NID_BAD_CHECK, "12345", "not an id", "11010519491231002Y"])
def test_invalid_national_id_is_flagged_and_mrn_used(bad: str) -> None:
    """An invalid national id is not trusted for linkage; the event is kept under its MRN-based id."""
    lab = normalise(record(patient_national_id=bad))
    assert FLAG_INVALID_NATIONAL_ID in lab.flags
    assert lab.regional_patient_id == IDENTITY.from_local("H001", "MRN0000001")


def test_valid_national_id_links_institutions() -> None:
    """The same person seen at two hospitals under two MRNs gets one regional id."""
    at_h001 = normalise(record(patient_national_id=NID))
    at_h002 = normalise(
        record(
            {"institution_id": "H002"},
            patient_national_id=NID.lower(),
            patient_mrn="0000099999",
            local_code="LAB0101",
        )
    )
    assert at_h001.regional_patient_id == at_h002.regional_patient_id == IDENTITY.from_national_id(NID)
    assert FLAG_INVALID_NATIONAL_ID not in at_h001.flags


def test_without_national_id_the_mrn_path_is_used() -> None:
    """No national id is not an error and raises no flag."""
    lab = normalise(record(patient_national_id=None))
    assert lab.regional_patient_id == IDENTITY.from_local("H001", "MRN0000001")
    assert lab.flags == ()


@pytest.mark.parametrize("mrn", ["", "   "])
def test_empty_mrn_is_rejected(mrn: str) -> None:
    """Without a local patient id the result cannot be attributed."""
    with pytest.raises(RejectedEvent) as info:
        normalise(record(patient_mrn=mrn))
    assert info.value.field == "patient_mrn"


@pytest.mark.parametrize("national_id", [NID, NID.lower(), NID_BAD_CHECK, f" {NID} "])
def test_no_raw_national_id_in_the_normalised_result(national_id: str) -> None:
    """The national identifier never leaves the normaliser, in any field or in the repr."""
    lab = normalise(record(patient_national_id=national_id))
    needles = {national_id.strip(), national_id.strip().upper(), national_id.strip().lower()}
    for name, value in lab.record.items():
        assert not any(needle in str(value) for needle in needles), name
    assert not any(needle in repr(lab.record) for needle in needles)

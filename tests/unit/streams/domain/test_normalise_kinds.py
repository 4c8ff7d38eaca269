"""Normalisation of every event kind, and identity linking, with tables of cases."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest

from core.contract import patient_key
from producers.simulator import simulate_events
from schemas import standard
from schemas.wire import validate_record
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import (
    FLAG_INVALID_NATIONAL_ID,
    FLAG_UNMAPPED_CODE,
    FLAG_UNMAPPED_DRUG,
    normalise_event,
    resolve_identity,
)
from streams.domain.reference import load_reference
from streams.exceptions import ImplausibleValueError, RejectedEvent, UnknownUnitError

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"k" * 32)
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
EVENTS = simulate_events(seed=99, count=300, now=NOW)
NID = "11010519491231002X"


def first(kind: str, **changes: Any) -> dict[str, Any]:
    record = copy.deepcopy(next(r for k, r in EVENTS if k == kind))
    record.update(changes)
    return record


def run(kind: str, record: dict[str, Any], links: dict[str, str] | None = None) -> Any:
    links = links or {}
    return normalise_event(
        kind, record, REFERENCE, CODES, IDENTITY, links.get, record["envelope"]["institution_id"], NOW
    )


NAMES = {"patient_family_name": "區", "patient_given_name": "瑋東 Tony"}


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_patient_names_pass_through_to_the_normalised_record_unchanged(kind: str) -> None:
    record = first(kind, **NAMES)
    event = run(kind, record)
    validate_record(event.record, standard.load(standard.KIND_SCHEMAS[kind]))
    assert {name: event.record[name] for name in NAMES} == NAMES
    unnamed = run(kind, first(kind, patient_family_name=None, patient_given_name=None))
    assert (unnamed.record["patient_family_name"], unnamed.record["patient_given_name"]) == (None, None)


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_normalised_records_match_their_schema_and_carry_no_national_id(kind: str) -> None:
    for record in [r for k, r in EVENTS if k == kind][:15]:
        record = copy.deepcopy(record)
        record["patient_national_id"] = NID
        event = run(kind, record)
        validate_record(event.record, standard.load(standard.KIND_SCHEMAS[kind]))
        assert event.record["patient_national_id"] is None
        assert NID not in repr(event.record)
        assert (
            event.record["regional_patient_id"] == event.regional_patient_id == IDENTITY.from_national_id(NID)
        )


def test_lab_gets_loinc_and_canonical_value() -> None:
    record = first("lab", local_code="GLU", unit="mg/dL", value_numeric=90.0)
    record["envelope"]["institution_id"] = "H001"
    event = run("lab", record)
    assert event.record["loinc_code"] == "2345-7"
    assert event.record["canonical_unit"] == "mmol/L"
    assert event.record["canonical_value"] == pytest.approx(90.0 * 0.05551)
    assert event.record["value_numeric"] == 90.0 and event.record["unit"] == "mg/dL"  # as sent, kept


def test_unmapped_lab_code_is_kept_and_flagged() -> None:
    record = first("lab", local_code="NEWTEST", unit="U/L", value_numeric=12.0)
    event = run("lab", record)
    assert event.record["loinc_code"] is None and event.record["canonical_value"] is None
    assert FLAG_UNMAPPED_CODE in event.record["normalisation_flags"]


@pytest.mark.parametrize(
    ("code", "value", "unit", "expected_loinc", "expected_value", "expected_unit"),
    [
        ("HR", 72.0, "/min", "8867-4", 72.0, "/min"),
        ("SBP", 16.0, "kPa", "8480-6", 16.0 * 7.50062, "mm[Hg]"),
        ("spo2", 97.0, "%", "59408-5", 97.0, "%"),
        ("TEMP", 37.2, "Cel", "8310-5", 37.2, "Cel"),
    ],
)
def test_vital_signs_are_coded_and_converted(
    code: str, value: float, unit: str, expected_loinc: str, expected_value: float, expected_unit: str
) -> None:
    record = first(
        "vitals", measurements=[{"loinc_code": None, "local_code": code, "value": value, "unit": unit}]
    )
    (measurement,) = run("vitals", record).record["measurements"]
    assert measurement["loinc_code"] == expected_loinc
    assert measurement["value"] == pytest.approx(expected_value)
    assert measurement["unit"] == expected_unit


@pytest.mark.parametrize(
    ("measurement", "error", "field"),
    [
        (
            {"loinc_code": None, "local_code": "XYZ", "value": 1.0, "unit": "/min"},
            RejectedEvent,
            "measurements[0].local_code",
        ),
        (
            {"loinc_code": None, "local_code": "TEMP", "value": 98.6, "unit": "[degF]"},
            UnknownUnitError,
            "measurements[0].unit",
        ),
        (
            {"loinc_code": None, "local_code": "SPO2", "value": 140.0, "unit": "%"},
            ImplausibleValueError,
            "measurements[0].value",
        ),
    ],
)
def test_bad_vital_signs_are_rejected_naming_the_measurement(
    measurement: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as caught:
        run("vitals", first("vitals", measurements=[measurement]))
    assert caught.value.field == field  # type: ignore[attr-defined]


@pytest.mark.parametrize(("drug", "expected"), [("AMOX500", "J01CA04"), ("KCL20", "A12BA01"), ("NOPE", None)])
def test_drug_codes_map_to_the_regional_code(drug: str, expected: str | None) -> None:
    record = first("medication", drug_code=drug, regional_drug_code=None)
    record["envelope"]["institution_id"] = "H001"
    event = run("medication", record)
    assert event.record["regional_drug_code"] == expected
    assert (FLAG_UNMAPPED_DRUG in event.flags) is (expected is None)


@pytest.mark.parametrize(
    ("raw", "expected"), [("E87.5", "E87.5"), ("e875", "E87.5"), (" I10 ", "I10"), ("N18.30", "N18.30")]
)
def test_icd10_codes_are_normalised(raw: str, expected: str) -> None:
    assert run("diagnosis", first("diagnosis", icd10_code=raw)).record["icd10_code"] == expected


@pytest.mark.parametrize("raw", ["87.5", "EE7.5", "E8", "E87.12345", "hyperkalaemia"])
def test_malformed_icd10_codes_are_rejected(raw: str) -> None:
    with pytest.raises(RejectedEvent) as caught:
        run("diagnosis", first("diagnosis", icd10_code=raw))
    assert caught.value.field == "icd10_code"


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_a_payload_claiming_another_institution_is_rejected(kind: str) -> None:
    record = first(kind)
    with pytest.raises(RejectedEvent) as caught:
        normalise_event(kind, record, REFERENCE, CODES, IDENTITY, {}.get, "SOMEONE-ELSE", NOW)
    assert caught.value.field == "envelope.institution_id"


@pytest.mark.parametrize("kind", list(standard.KIND_SCHEMAS))
def test_a_future_time_is_rejected_for_every_kind(kind: str) -> None:
    record = first(kind)
    record["envelope"]["event_time"] = NOW + dt.timedelta(days=2)
    with pytest.raises(RejectedEvent) as caught:
        run(kind, record)
    assert caught.value.field == "envelope.event_time"


MRN_ID = IDENTITY.from_local("H001", "MRN1")
NID_ID = IDENTITY.from_national_id(NID)


@pytest.mark.parametrize(
    ("known", "national_id", "regional", "remember", "alias", "flags"),
    [
        (None, None, MRN_ID, MRN_ID, None, ()),  # first sight, no national id: MRN-derived id, remembered
        (MRN_ID, None, MRN_ID, None, None, ()),  # already known: nothing to announce
        (None, NID, NID_ID, NID_ID, None, ()),  # first sight with national id
        (MRN_ID, NID, NID_ID, NID_ID, MRN_ID, ()),  # national id arrives later: the MRN id becomes an alias
        (NID_ID, None, NID_ID, None, None, ()),  # linked earlier: later events without national id keep it
        (NID_ID, NID, NID_ID, None, None, ()),  # same again: nothing to announce
        (None, "110105194912310021", MRN_ID, MRN_ID, None, (FLAG_INVALID_NATIONAL_ID,)),  # bad check char
    ],
)
def test_identity_resolution_and_linking(
    known: str | None,
    national_id: str | None,
    regional: str,
    remember: str | None,
    alias: str | None,
    flags: tuple[str, ...],
) -> None:
    decision = resolve_identity(IDENTITY, known, "H001", "MRN1", national_id, NOW)
    assert decision.regional_patient_id == regional
    assert decision.remember == remember
    assert decision.flags == flags
    if remember is None:
        assert decision.link is None
    else:
        assert decision.link is not None
        assert decision.link["alias_of"] == alias
        assert decision.link["regional_patient_id"] == regional
        validate_record(decision.link, standard.load(standard.IDENTITY_LINK))


def test_linked_mrn_keeps_the_national_id_based_id_across_kinds() -> None:
    """After one event links the MRN to the national id, every kind from that MRN uses that id."""
    links: dict[str, str] = {}
    lab = first("lab", patient_national_id=NID)
    first_event = run("lab", lab, links)
    assert first_event.identity.remember is not None
    links[patient_key(lab["envelope"]["institution_id"], lab["patient_mrn"])] = first_event.identity.remember
    for kind in ("vitals", "encounter", "medication", "diagnosis"):
        record = first(kind, patient_national_id=None, patient_mrn=lab["patient_mrn"])
        record["envelope"]["institution_id"] = lab["envelope"]["institution_id"]
        if kind == "medication":
            record["drug_code"] = "X"
        assert run(kind, record, links).regional_patient_id == NID_ID

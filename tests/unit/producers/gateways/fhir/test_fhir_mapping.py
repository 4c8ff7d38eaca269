"""FHIR R4 resources (fixtures/) to regional records: values as sent, deterministic ids, FHIRPath errors."""

from __future__ import annotations

import copy
import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest

from producers.gateways.common import event_id_for
from producers.gateways.fhir.errors import InvalidFhirError, UnmappableError
from producers.gateways.fhir.mapping import MappedResource, map_resource, parse_resource
from producers.validation import check_event
from schemas import standard

FIXTURES = Path(__file__).parent / "fixtures"
NOW = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
CST = dt.timezone(dt.timedelta(hours=8))


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def mapped(resource: dict[str, Any], institution: str = "H001") -> MappedResource:
    result = map_resource(parse_resource(resource), institution, now=NOW, correlation_id="corr-1")
    for event in result.events:
        check_event(event.kind, event.record, standard.load(standard.KIND_SCHEMAS[event.kind]), institution)
    return result


def only(resource: dict[str, Any], kind: str) -> dict[str, Any]:
    result = mapped(resource)
    assert [e.kind for e in result.events] == [kind]
    return result.events[0].record


def test_lab_observation_with_comparator_is_carried_as_sent() -> None:
    record = only(fixture("observation-lab-comparator"), "lab")
    assert record["value_numeric"] == 600.0 and record["value_comparator"] == ">"
    assert record["unit"] == "mg/dL"
    assert (record["reference_low"], record["reference_high"]) == (70.0, 99.5)
    assert record["abnormal_flag"] == "HH"
    assert record["status"] == "final"
    assert record["local_code"] == "GLU" and record["loinc_code"] == "2345-7"
    assert record["result_id"] == "R-20261123-0007"
    assert record["encounter_id"] == "V000123"
    assert record["result_time"] == dt.datetime(2026, 11, 23, 10, 15, 30, 250000, tzinfo=CST)
    assert record["specimen_collected_time"] == dt.datetime(2026, 11, 23, 9, 40, tzinfo=CST)
    assert record["performing_lab"] == "H001 Central Laboratory"


def test_patient_identity_and_name_from_the_contained_patient() -> None:
    record = only(fixture("observation-lab-comparator"), "lab")
    assert record["patient_mrn"] == "MRN0000042"
    assert record["patient_birth_year"] == 1958 and record["patient_sex"] == "female"
    assert (record["patient_family_name"], record["patient_given_name"]) == ("Zhang", "Wei")


def _named(names: list[dict[str, Any]] | None) -> dict[str, Any]:
    resource = fixture("observation-lab-comparator")
    patient = resource["contained"][0]
    if names is None:
        del patient["name"]
    else:
        patient["name"] = names
    return only(resource, "lab")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # the official name wins wherever it is; its given names joined by a space, as sent
        (
            [
                {"use": "usual", "family": "Ouyang", "given": ["Tony"]},
                {"use": "official", "family": "欧阳", "given": ["晓明"]},
            ],
            ("欧阳", "晓明"),
        ),
        ([{"use": "official", "family": "Smith", "given": ["John", "Paul"]}], ("Smith", "John Paul")),
        # no official name: the first
        ([{"use": "nickname", "given": ["Jo"]}, {"use": "old", "family": "Smith"}], (None, "Jo")),
        ([{"family": "區", "given": ["瑋東"]}, {"use": "maiden", "family": "Au"}], ("區", "瑋東")),
        ([{"text": "Zhang Wei"}], (None, None)),  # text only: nothing guessed from it
        ([], (None, None)),
        (None, (None, None)),
    ],
)
def test_patient_name_official_else_first(
    names: list[dict[str, Any]] | None, expected: tuple[str | None, str | None]
) -> None:
    record = _named(names)
    assert (record["patient_family_name"], record["patient_given_name"]) == expected


def test_no_name_without_a_patient_resource() -> None:
    """subject.identifier alone says who, not what the patient is called."""
    resource = fixture("observation-lab-comparator")
    del resource["contained"]
    resource["subject"] = {"identifier": {"value": "MRN0000042"}}
    record = only(resource, "lab")
    assert (record["patient_mrn"], record["patient_family_name"], record["patient_given_name"]) == (
        "MRN0000042",
        None,
        None,
    )


def _bundle(patient: dict[str, Any]) -> Any:
    return {"urn:uuid:p1": patient}.get


def test_every_kind_carries_the_name_of_a_bundled_patient() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"value": "MRN9"}],
        "name": [{"use": "official", "family": "欧阳", "given": ["晓明"]}],
    }
    for name in ("observation-vitals-bp", "encounter-transfer", "medicationrequest", "condition"):
        resource = fixture(name)
        resource.pop("contained", None)
        resource["subject"] = {"reference": "urn:uuid:p1"}
        result = map_resource(
            parse_resource(resource), "H001", now=NOW, correlation_id="c", resolve=_bundle(patient)
        )
        for event in result.events:
            record = event.record
            check_event(event.kind, record, standard.load(standard.KIND_SCHEMAS[event.kind]), "H001")
            assert (record["patient_family_name"], record["patient_given_name"]) == ("欧阳", "晓明"), name


def test_a_bundled_patients_name_does_not_change_event_ids() -> None:
    """The content hash covers the patient's identity, not the name of a bundled Patient: a resource sent
    before names were carried makes the same events (the same alerts) when it is sent again."""
    resource = fixture("observation-lab-string")
    resource["subject"] = {"reference": "urn:uuid:p1"}
    ids = []
    for names in ([], [{"family": "Ouyang", "given": ["Xiaoming"]}]):
        patient = {"resourceType": "Patient", "identifier": [{"value": "MRN9"}], "name": names}
        result = map_resource(
            parse_resource(resource), "H001", now=NOW, correlation_id="c", resolve=_bundle(patient)
        )
        ids.append([e.record["envelope"]["event_id"] for e in result.events])
    assert ids[0] == ids[1]


def test_value_string_is_not_trimmed_and_interpretation_h_kept() -> None:
    record = only(fixture("observation-lab-string"), "lab")
    assert record["value_text"] == " 6.80 (haemolysed) "
    assert record["value_numeric"] is None and record["value_comparator"] is None
    assert record["abnormal_flag"] == "H" and record["status"] == "preliminary"


def test_value_codeable_concept_becomes_text() -> None:
    resource = fixture("observation-lab-string")
    del resource["valueString"]
    resource["valueCodeableConcept"] = {
        "coding": [{"system": "http://snomed.info/sct", "code": "10828004", "display": "Positive"}]
    }
    assert only(resource, "lab")["value_text"] == "Positive"


def test_numbers_are_not_rounded() -> None:
    resource = fixture("observation-lab-string")
    del resource["valueString"]
    resource["valueQuantity"] = {"value": 6.849999, "unit": "mmol/L"}
    record = only(resource, "lab")
    assert record["value_numeric"] == 6.849999 and record["unit"] == "mmol/L"


def test_vital_signs_blood_pressure_components() -> None:
    record = only(fixture("observation-vitals-bp"), "vitals")
    assert record["measurements"] == [
        {"loinc_code": "8480-6", "local_code": "SBP", "value": 182.0, "unit": "mm[Hg]"},
        {"loinc_code": "8462-4", "local_code": "DBP", "value": 101.5, "unit": "mm[Hg]"},
    ]
    assert record["observation_id"] == "bp-77" and record["device_id"] == "MON-017"
    assert record["measured_time"] == dt.datetime(2026, 11, 23, 8, 0, tzinfo=CST)


def test_encounter_with_locations_is_a_transfer() -> None:
    record = only(fixture("encounter-transfer"), "encounter")
    assert record["event_type"] == "TRANSFER" and record["encounter_class"] == "INPATIENT"
    assert (record["ward"], record["bed"], record["prior_ward"]) == ("ICU", "ICU-07", "ED")
    assert record["occurred_time"] == dt.datetime(2026, 11, 23, 1, 0, tzinfo=CST)
    assert record["admit_time"] == dt.datetime(2026, 11, 22, 21, 5, tzinfo=CST)
    assert record["attending_clinician"] == "DR0042"


def test_finished_encounter_is_a_discharge_at_period_end() -> None:
    resource = fixture("encounter-transfer")
    resource["status"] = "finished"
    resource["period"]["end"] = "2026-11-25T09:00:00+08:00"
    record = only(resource, "encounter")
    assert record["event_type"] == "DISCHARGE"
    assert record["discharge_time"] == record["occurred_time"] == dt.datetime(2026, 11, 25, 9, tzinfo=CST)


def test_medication_request() -> None:
    record = only(fixture("medicationrequest"), "medication")
    assert (record["drug_code"], record["drug_code_system"]) == ("KCL10", "urn:h001:formulary")
    assert (record["dose_value"], record["dose_unit"], record["route"]) == (10.0, "mmol", "PO")
    assert record["frequency"] == "BID" and record["status"] == "ACTIVE"
    assert record["ordered_time"] == dt.datetime(2026, 11, 23, 10, 30, tzinfo=CST)
    assert record["start_time"] == dt.datetime(2026, 11, 23, 12, 0, tzinfo=CST)
    assert record["prescriber"] == "DR0042" and record["encounter_id"] == "V000123"


def test_medication_frequency_from_repeat_when_no_code() -> None:
    resource = fixture("medicationrequest")
    del resource["dosageInstruction"][0]["timing"]["code"]
    assert only(resource, "medication")["frequency"] == "2/1d"


def test_condition_icd10() -> None:
    record = only(fixture("condition"), "diagnosis")
    assert (record["icd10_code"], record["code_system"], record["display"]) == (
        "E87.5",
        "ICD-10",
        "Hyperkalaemia",
    )
    assert record["kind"] == "ADMISSION" and record["diagnosis_id"] == "D-9001"


def test_event_ids_are_deterministic_and_follow_content() -> None:
    first = mapped(fixture("observation-lab-comparator"))
    again = mapped(fixture("observation-lab-comparator"))
    assert first.events[0].record["envelope"]["event_id"] == again.events[0].record["envelope"]["event_id"]
    assert first.logical_id == again.logical_id
    assert first.events[0].record["envelope"]["event_id"] == event_id_for("fhir", "H001", first.source_id, 0)
    assert first.source_id.startswith("Observation/glu-20261123-0007#")
    corrected = fixture("observation-lab-comparator")
    corrected["status"] = "corrected"
    other = mapped(corrected)
    assert other.events[0].record["envelope"]["event_id"] != first.events[0].record["envelope"]["event_id"]
    assert other.events[0].record["result_id"] == first.events[0].record["result_id"]


def test_meta_changes_do_not_change_ids() -> None:
    resource = fixture("observation-lab-comparator")
    resource["meta"]["lastUpdated"] = "2026-11-23T11:00:00+08:00"
    assert mapped(resource).source_id == mapped(fixture("observation-lab-comparator")).source_id


def test_institution_is_the_callers_not_the_resources() -> None:
    """meta.source names another institution's LIS: the record is still the caller's."""
    record = only(fixture("observation-lab-comparator"), "lab")
    assert record["envelope"]["institution_id"] == "H001"
    assert (
        mapped(fixture("observation-lab-comparator"), "H002").events[0].record["envelope"]["institution_id"]
        == "H002"
    )


def test_bundled_patient_by_reference() -> None:
    patient = {
        "resourceType": "Patient",
        "identifier": [{"value": "MRN9"}],
        "gender": "male",
        "birthDate": "1971",
    }
    resource = fixture("observation-lab-string")
    resource["subject"] = {"reference": "urn:uuid:p1"}
    result = map_resource(
        parse_resource(resource), "H001", now=NOW, correlation_id="c", resolve={"urn:uuid:p1": patient}.get
    )
    record = result.events[0].record
    assert (record["patient_mrn"], record["patient_birth_year"], record["patient_sex"]) == (
        "MRN9",
        1971,
        "male",
    )


@pytest.mark.parametrize(
    ("mutate", "expression"),
    [
        (lambda r: r.update(valueQuantity={"value": "six"}), "Observation.valueQuantity.value"),
        (lambda r: r.update(resourceType="Patient"), "resourceType"),
        (lambda r: r.update(bogus=1), "Observation.bogus"),
        (
            lambda r: r["referenceRange"].append({"low": {"value": True}}),
            "Observation.referenceRange[1].low.value",
        ),
    ],
)
def test_invalid_fhir_names_its_path(mutate: Any, expression: str) -> None:
    resource = fixture("observation-lab-comparator")
    mutate(resource)
    with pytest.raises(InvalidFhirError) as caught:
        parse_resource(resource)
    assert caught.value.expression == expression
    assert caught.value.status == 400


def test_invalid_fixture() -> None:
    with pytest.raises(InvalidFhirError) as caught:
        parse_resource(fixture("invalid-value-not-decimal"))
    assert caught.value.expression == "Observation.valueQuantity.value"


@pytest.mark.parametrize(
    ("name", "mutate", "expression"),
    [
        ("unmappable-no-mrn", None, "Observation.subject.identifier.value"),
        ("unmappable-status", None, "Observation.status"),
        ("observation-lab-string", lambda r: r.pop("subject"), "Observation.subject"),
        ("observation-lab-string", lambda r: r.pop("issued"), "Observation.issued"),
        (
            "observation-lab-string",
            lambda r: r.update(effectiveDateTime="2026-11-23"),  # a date: whose midnight?
            "Observation.effectiveDateTime",
        ),
        ("observation-lab-string", lambda r: r.update(code={"text": "K"}), "Observation.code.coding"),
        (
            "observation-vitals-bp",
            lambda r: r["component"][1]["valueQuantity"].pop("value"),
            "Observation.component[1].valueQuantity.value",
        ),
        ("encounter-transfer", lambda r: r.update(status="bogus"), "Encounter.status"),
        ("encounter-transfer", lambda r: r.pop("identifier"), "Encounter.identifier"),
        ("medicationrequest", lambda r: r.pop("authoredOn"), "MedicationRequest.authoredOn"),
        (
            "medicationrequest",
            lambda r: r.update(medicationCodeableConcept={"text": "KCl"}),
            "MedicationRequest.medicationCodeableConcept.coding",
        ),
        (
            "condition",
            lambda r: r["code"]["coding"][0].update(system="http://snomed.info/sct"),
            "Condition.code.coding",
        ),
        ("condition", lambda r: r.pop("recordedDate"), "Condition.recordedDate"),
    ],
)
def test_unmappable_names_its_path(name: str, mutate: Any, expression: str) -> None:
    resource = copy.deepcopy(fixture(name))
    if mutate:
        mutate(resource)
    with pytest.raises(UnmappableError) as caught:
        mapped(resource)
    assert caught.value.expression == expression
    assert caught.value.status == 422

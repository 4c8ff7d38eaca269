"""Every sample to records the publisher accepts, with values exactly as sent."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from core.contract import KIND_SPECS, KINDS
from producers.gateways.common import event_id_for
from producers.gateways.exceptions import HL7ContentError, InstitutionMismatchError, UnsupportedMessageError
from producers.gateways.hl7 import samples
from producers.gateways.hl7.charset import decode_message
from producers.gateways.hl7.mapping import Mapped, map_message, parse_header, salvage_header
from producers.validation import check_event
from schemas.standard import load
from schemas.wire import validate_record
from tests.factories import NOW, normalised

RECEIVED = dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)
INSTITUTION_OF = {"oru_r01_v23": "C003", "omp_o09": "H002", "oru_gb18030": "H002"}


def _map(raw: bytes, institution: str = "H001") -> Mapped:
    return map_message(decode_message(raw), institution, RECEIVED)


def _kind(mapped: Mapped, kind: str) -> list[dict[str, Any]]:
    return [record for k, record in mapped.events if k == kind]


def _labs(mapped: Mapped) -> dict[str, dict[str, Any]]:
    return {r["local_code"]: r for r in _kind(mapped, "lab")}


@pytest.mark.parametrize("name", sorted(samples.all_samples()))
def test_every_sample_maps_to_valid_records(name: str) -> None:
    institution = INSTITUTION_OF.get(name, "H001")
    mapped = _map(samples.all_samples()[name], institution)
    assert mapped.events
    for kind, record in mapped.events:
        assert kind in KINDS
        schema = load(KIND_SPECS[kind].schema)
        validate_record(record, schema)
        check_event(kind, record, schema, institution)
        assert record["envelope"]["institution_id"] == institution
        assert record["envelope"]["source_message_id"] == mapped.header.control_id


def test_event_ids_are_deterministic() -> None:
    first, again = _map(samples.oru_r01()), _map(samples.oru_r01())
    ids = [r["envelope"]["event_id"] for _, r in first.events]
    assert ids == [r["envelope"]["event_id"] for _, r in again.events]
    assert ids[0] == event_id_for("mllp", "H001", "H001|ORU0001", 0)
    assert len(set(ids)) == len(ids)
    assert len({r["envelope"]["correlation_id"] for _, r in first.events}) == 1
    other = _map(samples.oru_r01(control_id="ORU0002"))
    assert not set(ids) & {r["envelope"]["event_id"] for _, r in other.events}


def test_values_exactly_as_sent() -> None:
    mapped = _map(samples.oru_r01(potassium="6.80"))
    labs = _labs(mapped)
    k = labs["K"]
    assert (k["value_numeric"], k["value_text"], k["value_comparator"]) == (6.8, "6.80", None)
    assert (k["unit"], k["reference_low"], k["reference_high"], k["abnormal_flag"]) == (
        "mmol/L",
        3.5,
        5.1,
        "HH",
    )
    glucose = labs["GLU"]
    assert (glucose["value_comparator"], glucose["value_numeric"], glucose["abnormal_flag"]) == (
        ">",
        600.0,
        "H",
    )
    creatinine = labs["CREA"]
    assert (creatinine["value_numeric"], creatinine["value_text"]) == (
        None,
        "5.2 (H)",
    )  # the normaliser reads it
    assert labs["UPRO"]["value_text"] == "POS"
    assert labs["NA"]["reference_low"] == 136.0  # "136 - 145" is plainly a range
    assert k["patient_mrn"] == "MRN0000001" and k["patient_national_id"] == "11010519491231002X"
    assert (k["patient_birth_year"], k["patient_sex"], k["status"]) == (1960, "female", "final")
    assert k["result_time"] == dt.datetime(2026, 11, 23, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))
    assert k["specimen_collected_time"] == k["result_time"] - dt.timedelta(minutes=40)
    assert k["encounter_id"] == "E20261123001" and k["ordering_clinician"] == "D1234"


def _names(mapped: Mapped) -> set[tuple[str | None, str | None]]:
    return {(r["patient_family_name"], r["patient_given_name"]) for _, r in mapped.events}


@pytest.mark.parametrize("name", sorted(samples.all_samples()))
def test_every_event_carries_the_patient_name_of_pid5(name: str) -> None:
    mapped = _map(samples.all_samples()[name], INSTITUTION_OF.get(name, "H001"))
    expected = {
        "oru_r01_v23": ("CHAN", "Tai Man"),  # PID-5 CHAN^Tai Man: the given name as sent, space and all
        "oru_gb18030": (samples.TRAP_FAMILY_NAME, samples.TRAP_GIVEN_NAME),
    }.get(name, ("WANG", "Li"))
    assert _names(mapped) == {expected}


def _with_name(pid5: str, charset: str = "UNICODE UTF-8", encoding: str = "utf-8") -> bytes:
    text = samples.oru_r01().decode("utf-8").replace("WANG^Li^^^^^L", pid5)
    return text.replace("UNICODE UTF-8", charset).encode(encoding)


def test_gb18030_name_whose_gbk_bytes_hold_separators_reaches_the_records_intact() -> None:
    """區 is 0x85 0x5E (`^`), 瑋 0xAC 0x7C and 東 0x96 0x7C (`|`): split as raw bytes, the name and
    the whole PID would fall apart."""
    raw = samples.oru_gb18030()
    assert (samples.TRAP_FAMILY_NAME + samples.TRAP_GIVEN_NAME).encode("gb18030")[1::2] == b"^||"
    assert f"||{samples.TRAP_FAMILY_NAME}^{samples.TRAP_GIVEN_NAME}^".encode("gb18030") in raw
    mapped = _map(raw, "H002")
    assert _names(mapped) == {("區", "瑋東")}
    assert {r["patient_mrn"] for _, r in mapped.events} == {"0000000042"}
    assert _kind(mapped, "lab")[0]["patient_birth_year"] == 1960  # PID-7 after the name, still in place


def test_gb18030_name_of_a_chinese_hospital() -> None:
    raw = _with_name("张^三丰^^^^^L", "GB 18030-2000", "gb18030")
    assert "张^三丰".encode("gb18030") in raw and "张".encode() not in raw
    assert _names(_map(raw)) == {("张", "三丰")}


@pytest.mark.parametrize(
    ("pid5", "expected"),
    [
        # XPN.1 is FN: the surname is its first subcomponent (FN.2-5: own surname prefix, own surname...)
        ("VAN DER BERG&van der&BERG^Anna^Maria^^Dr^^L", ("VAN DER BERG", "Anna Maria")),
        ("SMITH^John^Paul Edward~SMYTH^Jon^^^^^A", ("SMITH", "John Paul Edward")),  # first repetition
        ("O\\T\\BRIEN^Sean", ("O&BRIEN", "Sean")),  # an escaped & is text, not a subcomponent
        ("OUYANG", ("OUYANG", None)),
        ("^Xiaoming", (None, "Xiaoming")),
        ("^^Wei", (None, "Wei")),  # middle names alone are the given name
        ("", (None, None)),
        ('""^""', (None, None)),  # the HL7 null value: nothing sent
    ],
)
def test_pid5_family_and_given_names(pid5: str, expected: tuple[str | None, str | None]) -> None:
    assert _names(_map(_with_name(pid5))) == {expected}


def test_an_unnamed_patient_in_a_message_without_pid5() -> None:
    raw = samples.oru_r01().decode("utf-8").replace("||WANG^Li^^^^^L||", "||||").encode("utf-8")
    assert _names(_map(raw)) == {(None, None)}


def test_escape_sequences() -> None:
    comment = _labs(_map(samples.oru_r01()))["COMMENT"]
    assert comment["value_text"] == "haemolysed&repeat | see ^ lab"
    raw = samples.oru_r01().replace(b"haemolysed\\T\\repeat", b"\\XE992BE\\ \\E\\ \\R\\ \\H\\x\\N\\")
    assert _labs(_map(raw))["COMMENT"]["value_text"].startswith("钾 \\ ~ x |")


def test_hex_escape_in_gb18030_and_bad_hex() -> None:
    raw = samples.oru_gb18030().replace(
        "钾".encode("gb18030"), b"\\X" + "钾".encode("gb18030").hex().encode() + b"\\"
    )
    assert _labs(_map(raw, "H002"))["LAB0101"]["local_display"] == samples.TRAP_DISPLAY
    bad = samples.oru_r01().replace(b"haemolysed", b"\\XFF\\")
    with pytest.raises(HL7ContentError) as caught:
        _map(bad)
    assert (caught.value.segment, caught.value.sequence, caught.value.field) == ("OBX", 5, 5)


def test_gb18030_trap_text_reaches_the_records_intact() -> None:
    mapped = _map(samples.oru_gb18030(), "H002")
    lab = _labs(mapped)["LAB0101"]
    assert lab["local_display"] == samples.TRAP_DISPLAY
    assert (lab["value_numeric"], lab["abnormal_flag"]) == (2.6, "LL")
    assert _kind(mapped, "diagnosis")[0]["display"] == "低钾血症(東區)"


def test_gbk_ward_reaches_the_encounter_intact() -> None:
    raw = samples.adt("A01", "H002", mrn="0000000042").decode().replace("ICU", samples.TRAP_WARD)
    raw = raw.replace("UNICODE UTF-8", "GBK")
    mapped = _map(raw.encode("gb18030"), "H002")
    assert _kind(mapped, "encounter")[0]["ward"] == samples.TRAP_WARD


def test_repeated_obx_and_vitals() -> None:
    mapped = _map(samples.oru_r01())
    assert [r["local_code"] for r in _kind(mapped, "lab")] == ["K", "GLU", "NA", "CREA", "COMMENT", "UPRO"]
    (vitals,) = _kind(mapped, "vitals")
    assert vitals["measurements"] == [
        {"loinc_code": None, "local_code": "HR", "value": 128.0, "unit": "/min"},
        {"loinc_code": "8480-6", "local_code": "8480-6", "value": 85.0, "unit": "mm[Hg]"},
    ]
    assert vitals["device_id"] == "MON-ICU-12"


def test_v23_local_times_and_statuses() -> None:
    mapped = _map(samples.oru_r01_v23(), "C003")
    labs = _labs(mapped)
    assert labs["K+"]["status"] == "corrected" and labs["GLUC"]["status"] == "preliminary"
    assert labs["K+"]["unit"] == "meq/L"  # sent as the CE's text
    when = labs["K+"]["result_time"]
    assert when.utcoffset() == dt.timedelta(hours=8) and when.hour == 9  # Asia/Hong_Kong clock
    assert labs["K+"]["patient_birth_year"] == 1975 and labs["K+"]["patient_sex"] == "male"
    assert mapped.header.charset is None and mapped.header.version == "2.3"


@pytest.mark.parametrize("terminator", ["\r", "\n", "\r\n"])
def test_segment_terminators(terminator: str) -> None:
    assert len(_kind(_map(samples.oru_r01_v23(terminator=terminator), "C003"), "lab")) == 2


def test_adt_events() -> None:
    admit = _map(samples.adt("A01"))
    (encounter,) = _kind(admit, "encounter")
    assert (encounter["event_type"], encounter["encounter_class"], encounter["ward"], encounter["bed"]) == (
        "ADMIT",
        "INPATIENT",
        "ICU",
        "3",
    )
    assert [d["icd10_code"] for d in _kind(admit, "diagnosis")] == ["E87.5", "N18.3"]
    assert {d["kind"] for d in _kind(admit, "diagnosis")} == {"ADMISSION"}
    (transfer,) = _kind(_map(samples.adt("A02")), "encounter")
    assert (transfer["event_type"], transfer["ward"], transfer["prior_ward"], transfer["prior_bed"]) == (
        "TRANSFER",
        "CCU",
        "ICU",
        "3",
    )
    discharge = _map(samples.adt("A03"))
    assert _kind(discharge, "encounter")[0]["discharge_time"] is not None
    assert _kind(discharge, "diagnosis")[0]["kind"] == "PRINCIPAL"
    assert _kind(_map(samples.adt("A08", version="2.3.1")), "encounter")[0]["event_type"] == "UPDATE"


def test_medication_orders() -> None:
    orders = _kind(_map(samples.rde_o11(dose="20.5")), "medication")
    assert [(o["order_id"], o["status"]) for o in orders] == [("RX9001", "ACTIVE"), ("RX9000", "STOPPED")]
    kcl = orders[0]
    assert (kcl["drug_code"], kcl["dose_value"], kcl["dose_unit"], kcl["route"], kcl["frequency"]) == (
        "KCL20",
        20.5,
        "mmol",
        "IV",
        "q8h",
    )
    (omp,) = _kind(_map(samples.omp_o09(), "H002"), "medication")
    assert (omp["drug_display"], omp["frequency"], omp["start_time"] is not None) == (
        "呋塞米注射液",
        "BID",
        True,
    )


def test_unsupported_types() -> None:
    with pytest.raises(UnsupportedMessageError) as caught:
        _map(samples.unsupported())
    assert caught.value.code == 200 and "SIU^S12" in str(caught.value)
    with pytest.raises(UnsupportedMessageError) as event:
        _map(samples.adt("A05"))
    assert event.value.code == 201


def test_msh_4_of_another_institution_is_refused() -> None:
    with pytest.raises(InstitutionMismatchError) as caught:
        _map(samples.oru_r01("H002"), "H001")
    assert (caught.value.segment, caught.value.field, caught.value.claimed) == ("MSH", 4, "H002")
    assert _map(samples.oru_r01("h001"), "H001").events  # case-insensitive
    empty = samples.oru_r01().replace(b"|LIS-Cerner|H001|", b"|LIS-Cerner||")
    assert _map(empty).events[0][1]["envelope"]["institution_id"] == "H001"


@pytest.mark.parametrize(
    ("old", "new", "segment", "field"),
    [
        (b"MRN0000001^^^H001^MR~11010519491231002X^^^CHN^NNCHN", b"", "PID", 3),
        (b"K^Potassium^L", b"^Potassium^L", "OBX", 3),
        (b"|ORU0001|", b"||", "MSH", 10),
        (b"20261123093000+0800||ORU", b"2026112x||ORU", "MSH", 7),
        (b"|19600314|F|", b"|1960031|F|", "PID", 7),
        (b"|19600314|F|", b"|19600314|Q|", "PID", 8),
        (b"|2.5.1|", b"|2.9|", "MSH", 12),
        (b">^600", b"<>^600", "OBX", 5),
    ],
)
def test_content_errors_name_the_position(old: bytes, new: bytes, segment: str, field: int) -> None:
    raw = samples.oru_r01()
    assert old in raw
    with pytest.raises(HL7ContentError) as caught:
        _map(raw.replace(old, new, 1))
    assert (caught.value.segment, caught.value.field) == (segment, field)
    assert f"{segment}" in str(caught.value)


def test_a_malformed_obx_time_names_its_repetition() -> None:
    old = b"|20261123085000+0800|||||20261123093000+0800"
    assert old in samples.oru_r01()
    raw = samples.oru_r01().replace(old, b"|202611231|||||x", 1)
    with pytest.raises(HL7ContentError) as caught:
        _map(raw)
    assert (caught.value.segment, caught.value.sequence) == ("OBX", 1)


def test_headers() -> None:
    header = parse_header(decode_message(samples.oru_gb18030()))
    assert (header.control_id, header.message_type, header.charset, header.version) == (
        "GB0001",
        "ORU^R01",
        "GB 18030-2000",
        "2.4",
    )
    bad = samples.oru_r01().replace(b"UNICODE UTF-8", b"KLINGON")
    salvaged = salvage_header(bad)
    assert salvaged is not None and salvaged.control_id == "ORU0001" and salvaged.charset is None
    assert salvage_header(b"\x00\x01garbage") is None


def test_a_number_too_large_for_a_double_is_an_error() -> None:
    with pytest.raises(HL7ContentError) as caught:
        _map(samples.oru_r01(potassium="9" * 400))
    assert (caught.value.segment, caught.value.field) == ("OBX", 5)


@pytest.mark.parametrize("name", sorted(samples.all_samples()))
def test_every_sample_passes_the_real_normaliser(name: str) -> None:
    institution = INSTITUTION_OF.get(name, "H001")
    for kind, record in map_message(decode_message(samples.all_samples()[name]), institution, NOW).events:
        out = normalised(kind, record)
        assert out["regional_patient_id"]
        if kind == "lab" and record["local_code"] in ("K", "K+", "LAB0101", "GLU"):
            assert out["loinc_code"] and out["canonical_value"] is not None


def test_a_local_time_needs_the_institutions_clock() -> None:
    with pytest.raises(HL7ContentError) as caught:
        _map(samples.oru_r01_v23("X999"), "X999")
    assert (caught.value.segment, caught.value.field) == ("MSH", 7)
    assert "time zone" in caught.value.reason
    zone = dt.timezone(dt.timedelta(hours=5))
    mapped = map_message(decode_message(samples.oru_r01_v23("X999")), "X999", RECEIVED, zone=zone)
    assert _kind(mapped, "lab")[0]["result_time"].utcoffset() == dt.timedelta(hours=5)


def test_the_mrn_is_the_mr_identifier_wherever_it_is() -> None:
    raw = samples.oru_r01().replace(
        b"PID|1||MRN0000001^^^H001^MR~11010519491231002X^^^CHN^NNCHN",
        b"PID|1||11010519491231002X^^^CHN^NNCHN~V-77^^^H001^VN~MRN0000009^^^H001^MR",
    )
    lab = _kind(_map(raw), "lab")[0]
    assert (lab["patient_mrn"], lab["patient_national_id"]) == ("MRN0000009", "11010519491231002X")
    first = samples.oru_r01().replace(b"MRN0000001^^^H001^MR~11010519491231002X^^^CHN^NNCHN", b"A-1~B-2")
    assert _kind(_map(first), "lab")[0]["patient_mrn"] == "A-1"


def test_cancelled_result_without_value() -> None:
    raw = samples.oru_r01().replace(b"||6.8|mmol/L|3.5-5.1|HH|||F|", b"|||mmol/L|3.5-5.1||||X|")
    k = _labs(_map(raw))["K"]
    assert (k["status"], k["value_numeric"], k["value_text"], k["abnormal_flag"]) == (
        "cancelled",
        None,
        None,
        None,
    )

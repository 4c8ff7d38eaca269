"""Lab results as laboratories write them, through the normaliser and the rules, end to end."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from streams.domain.rules import LabFacts, evaluate
from streams.domain.values import FLAG_NOT_JUDGED
from streams.exceptions import ImplausibleValueError, RejectedEvent
from tests.factories import NOW, REFERENCE, lab_record, normalised

AT = NOW - dt.timedelta(minutes=5)


def lab(
    code: str, value: float | None, unit: str | None, institution: str = "H001", **fields: Any
) -> dict[str, Any]:
    return normalised("lab", lab_record(institution, code, value, unit, at=AT, **fields))


def alerts(record: dict[str, Any]) -> list[str]:
    facts = LabFacts.from_record(record)
    if facts is None:
        return []
    return [a.limit_kind for a in evaluate(facts, None, REFERENCE.rulebook, NOW, REFERENCE.policy).alerts]


@pytest.mark.parametrize(
    ("code", "text", "unit", "comparator", "number", "limit"),
    [
        ("GLU", ">600", "mg/dL", ">", 600.0, "HIGH"),  # a glucose analyser above its range: critical
        ("GLU", "> 600", "mg/dL", ">", 600.0, "HIGH"),
        ("K", "<1.0", "mmol/L", "<", 1.0, "LOW"),
        ("GLU", "HI", None, ">", 600.0, "HIGH"),  # H001's glucose analyser: HI = above 600 mg/dL
        ("K", "LO", None, "<", 1.0, "LOW"),
        ("GLU", ">100", "mg/dL", ">", 100.0, None),  # more than 100 mg/dL may be 101: nothing to say
        ("K", "5.2 (H)", "mmol/L", None, 5.2, None),
        ("K", "6.9 (HH)", "mmol/L", None, 6.9, "HIGH"),
    ],
)
def test_numbers_in_the_value_text_are_judged(
    code: str, text: str, unit: str | None, comparator: str | None, number: float, limit: str | None
) -> None:
    record = lab(code, None, unit, value_text=text)
    analyte = REFERENCE.analytes[record["loinc_code"]]
    assert (record["value_numeric"], record["value_comparator"]) == (number, comparator)
    assert record["canonical_unit"] == analyte.canonical_unit, "stored in the canonical unit"
    assert FLAG_NOT_JUDGED not in record["normalisation_flags"]
    assert alerts(record) == ([limit] if limit else [])


def test_an_interpretation_flag_in_the_text_fills_an_empty_abnormal_flag() -> None:
    assert lab("K", None, "mmol/L", value_text="5.2 (H)")["abnormal_flag"] == "H"
    assert lab("K", None, "mmol/L", value_text="5.2 (H)", abnormal_flag="A")["abnormal_flag"] == "A"


@pytest.mark.parametrize("text", ["positive", "haemolysed", "7,1", "1,234", "HI "])
def test_text_without_one_number_is_stored_as_text_and_flagged_not_judged(text: str) -> None:
    record = lab("NA" if text.strip() == "HI" else "K", None, "mmol/L", value_text=text)
    assert record["canonical_value"] is None and record["value_text"] == text
    assert FLAG_NOT_JUDGED in record["normalisation_flags"]
    assert alerts(record) == []


def test_a_bound_sent_by_the_sdk_is_converted_like_a_value() -> None:
    record = lab("GLU", 600.0, "mg/dL", value_comparator=">")
    factor = REFERENCE.analytes[record["loinc_code"]].factors["mg/dL"]
    assert record["canonical_value"] == pytest.approx(600 * factor)
    assert record["value_comparator"] == ">"
    assert alerts(record) == ["HIGH"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"value_numeric": 600.0, "value_comparator": "~"}, "value_comparator"),
        ({"value_numeric": None, "value_comparator": ">"}, "value_numeric"),
    ],
)
def test_a_malformed_bound_is_rejected_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(RejectedEvent) as caught:
        normalised("lab", {**lab_record("H001", "GLU", None, "mg/dL", at=AT), **fields})
    assert caught.value.field == field


def test_an_impossible_number_in_the_text_is_rejected_naming_the_text() -> None:
    with pytest.raises(ImplausibleValueError) as caught:
        lab("K", None, "mmol/L", value_text="> 400")
    assert caught.value.field == "value_text"

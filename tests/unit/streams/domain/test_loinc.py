"""LOINC codes sent in the local-code field: recognised by form and Mod 10 check digit, after the
explicit LOINC code and the institution's terminology map.

Check digits below are those LOINC publishes for the codes (loinc.org), not computed by the code under
test; the algorithm is the LOINC Users' Guide's, appendix C "Calculating Mod 10 Check Digits".
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import (
    FLAG_UNMAPPED_CODE,
    is_loinc,
    lab_loinc,
    loinc_check_digit,
    normalise_event,
)
from streams.domain.reference import load_reference
from streams.domain.rules import LabFacts, evaluate
from tests.factories import lab_record

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)

REAL_CODES = [
    ("2823-3", "Potassium [Moles/volume] in Serum or Plasma"),
    ("2951-2", "Sodium [Moles/volume] in Serum or Plasma"),
    ("2345-7", "Glucose [Mass/volume] in Serum or Plasma"),
    ("718-7", "Hemoglobin [Mass/volume] in Blood"),
    ("2160-0", "Creatinine [Mass/volume] in Serum or Plasma"),
    ("777-3", "Platelets [#/volume] in Blood by Automated count"),
    ("10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma"),
    ("6690-2", "Leukocytes [#/volume] in Blood by Automated count"),
    ("17861-6", "Calcium [Mass/volume] in Serum or Plasma"),
    ("8867-4", "Heart rate"),
    ("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry"),
    ("2093-3", "Cholesterol [Mass/volume] in Serum or Plasma"),  # not configured in units.json
    ("85353-1", "Vital signs panel"),
]


@pytest.mark.parametrize(("code", "name"), REAL_CODES)
def test_real_loinc_codes_have_a_valid_check_digit(code: str, name: str) -> None:
    assert is_loinc(code), name


def test_every_configured_analyte_has_a_valid_loinc_code() -> None:
    assert [loinc for loinc in REFERENCE.analytes if not is_loinc(loinc)] == []


def test_the_users_guide_example() -> None:
    """Appendix C works 12345 through: odd positions 531, x2 = 1062, prepend 42, digit sum 15, so 5."""
    assert loinc_check_digit("12345") == 5


@pytest.mark.parametrize(
    "code",
    [
        "2823-4",  # potassium, mistyped check digit
        "2823-2",
        "2951-3",
        "2345-8",
        "718-6",
        "2160-1",
        "777-4",
        "10839-0",
        "2832-3",  # two digits swapped
        "5895-7",  # deprecated: one of the 14 codes with a wrong published check digit (appendix C)
        "11491-6",  # likewise
    ],
)
def test_a_wrong_check_digit_is_not_loinc(code: str) -> None:
    assert not is_loinc(code)


@pytest.mark.parametrize(
    "code",
    [
        "",
        "2823",
        "2823-",
        "-3",
        "2823-33",
        "12345678-3",  # at most 7 digits before the hyphen
        "2823_3",
        "2823 3",
        " 2823-3",
        "2823-3\n",
        "\uff12\uff18\uff12\uff13-\uff13",  # fullwidth digits are digits to \d, not to LOINC
        "LP12345-6",  # a LOINC part, not a term
        "K",
        "LAB0101",
    ],
)
def test_what_lacks_the_loinc_form_is_not_loinc(code: str) -> None:
    assert not is_loinc(code)


BODIES = st.text(alphabet="0123456789", min_size=1, max_size=7)


@given(body=BODIES)
def test_exactly_one_check_digit_fits_each_code(body: str) -> None:
    assert [digit for digit in range(10) if is_loinc(f"{body}-{digit}")] == [loinc_check_digit(body)]


@given(body=BODIES, data=st.data())
def test_a_single_mistyped_digit_is_caught(body: str, data: st.DataObject) -> None:
    """What a Mod 10 check digit is for: one wrong digit anywhere makes the code invalid."""
    code = f"{body}-{loinc_check_digit(body)}"
    position = data.draw(st.sampled_from([i for i, c in enumerate(code) if c != "-"]))
    wrong = data.draw(st.sampled_from([d for d in "0123456789" if d != code[position]]))
    assert not is_loinc(code[:position] + wrong + code[position + 1 :])


# --- order of the sources of a lab result's LOINC code ------------------------------------------------

# An institution whose local codes look like LOINC: its map says what they are, whatever they look like.
LOOKALIKE_MAP = dataclasses.replace(
    REFERENCE, terminology={**REFERENCE.terminology, "H009": {"2951-2": "2823-3", "NA": "2951-2"}}
)

# (institution, local code, loinc_code sent, expected LOINC)
ORDER = [
    pytest.param("H001", "2823-3", None, "2823-3", id="local-code-is-loinc"),
    pytest.param("H001", " 2823-3 ", None, "2823-3", id="local-code-is-loinc-padded"),
    pytest.param("H999", "2951-2", None, "2951-2", id="institution-without-a-map"),
    pytest.param("H001", "2951-2", "2823-3", "2823-3", id="explicit-loinc-wins-over-local-loinc"),
    pytest.param("H001", "K", "2951-2", "2951-2", id="explicit-loinc-wins-over-map"),
    pytest.param("H009", "2951-2", None, "2823-3", id="map-wins-over-local-loinc"),
    pytest.param("H009", "2823-3", None, "2823-3", id="local-loinc-when-the-map-lacks-it"),
    pytest.param("H001", "K", None, "2823-3", id="map-as-before"),
    pytest.param("H001", "2823-4", None, None, id="wrong-check-digit"),
    pytest.param("H001", "02823-3", None, None, id="leading-zero-is-not-the-code"),
    pytest.param("H001", "2093-3", None, None, id="valid-loinc-without-reference-data"),
    pytest.param("H001", "ZZZ", None, None, id="unmapped-as-before"),
]


@pytest.mark.parametrize(("institution", "local_code", "sent", "expected"), ORDER)
def test_loinc_from_sent_code_then_map_then_local_code(
    institution: str, local_code: str, sent: str | None, expected: str | None
) -> None:
    record = lab_record(institution, local_code, 4.2, "mmol/L", loinc_code=sent)
    assert lab_loinc(record, institution, LOOKALIKE_MAP) == expected


def _normalise(institution: str, local_code: str, value: float, unit: str, **fields: Any) -> Any:
    raw = lab_record(institution, local_code, value, unit, at=NOW - dt.timedelta(minutes=5), **fields)
    return normalise_event("lab", raw, REFERENCE, CODES, IDENTITY, lambda _key: None, institution, NOW)


def test_a_loinc_local_code_without_a_map_is_normalised_and_judged() -> None:
    event = _normalise("H001", "2823-3", 6.8, "mmol/L")
    record = event.record
    assert record["loinc_code"] == "2823-3"
    assert record["local_code"] == "2823-3"
    assert (record["canonical_value"], record["canonical_unit"]) == (6.8, "mmol/L")
    assert FLAG_UNMAPPED_CODE not in event.flags
    facts = LabFacts.from_record(record)
    assert facts is not None
    decision = evaluate(facts, None, REFERENCE.rulebook, NOW, REFERENCE.policy)
    assert [(alert.limit_kind, alert.severity) for alert in decision.alerts] == [("HIGH", "CRITICAL")]


def test_a_loinc_local_code_in_capital_units_is_normalised() -> None:
    """Both items together: a LOINC code as local code and the unit in UCUM's case-insensitive form."""
    record = _normalise("H002", "2951-2", 108.0, "MMOL/L").record
    assert (record["loinc_code"], record["canonical_value"], record["canonical_unit"]) == (
        "2951-2",
        108.0,
        "mmol/L",
    )


@pytest.mark.parametrize("local_code", ["2823-4", "2093-3"])
def test_a_wrong_check_digit_or_unknown_analyte_stays_unmapped_and_kept(local_code: str) -> None:
    """Stored as sent and flagged for terminology staff, as any unmapped code; never rejected."""
    event = _normalise("H001", local_code, 123.4, "weird-unit")
    assert FLAG_UNMAPPED_CODE in event.flags
    assert event.record["loinc_code"] is None
    assert (event.record["value_numeric"], event.record["unit"]) == (123.4, "weird-unit")
    assert event.record["canonical_value"] is None

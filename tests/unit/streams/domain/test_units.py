"""Units as hospitals send them: UCUM's case-insensitive forms, aliases, other cases; never a guess.

Expected values use the factors of shared/reference/clinical.md and the c/i symbols of the UCUM
specification (§3 ■4 and the c/i columns of its tables), not unit_aliases.json itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.normalise import convert, normalise_event
from streams.domain.reference import DATA_DIR, Analyte, ReferenceData, UnitSpellings, load_reference
from streams.domain.rules import LabFacts, evaluate
from streams.exceptions import ReferenceDataError, UnknownUnitError
from tests.factories import lab_record
from tests.unit.streams.domain.reference_files import copy_reference, edit_json

REFERENCE = load_reference()
CODES = load_codes()
IDENTITY = RegionalIdentity(b"unit-test-pseudonym-key-32-bytes")
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)

K, NA, GLU, CA, HB, PLT, WBC = "2823-3", "2951-2", "2345-7", "17861-6", "718-7", "777-3", "6690-2"
INR, CREA, PH, PO2, TNI, HR, SBP, TEMP = (
    "6301-6",
    "2160-0",
    "2744-1",
    "2703-7",
    "10839-9",
    "8867-4",
    "8480-6",
    "8310-5",
)

# (LOINC, unit as sent, value, expected canonical value, canonical unit)
ACCEPTED = [
    # UCUM case-insensitive forms (c/i column), as HL7 v2 feeds send them
    (NA, "MMOL/L", 108.0, 108.0, "mmol/L"),
    (K, "MMOL/L", 6.8, 6.8, "mmol/L"),
    (GLU, "MG/DL", 100.0, 100.0 * 0.05551, "mmol/L"),
    (CREA, "UMOL/L", 90.0, 90.0, "umol/L"),
    (NA, "MEQ/L", 140.0, 140.0, "mmol/L"),
    (CA, "MEQ/L", 5.0, 5.0 * 0.5, "mmol/L"),  # meq of calcium: 0.5 mmol
    (HB, "G/DL", 12.5, 125.0, "g/L"),
    (HB, "G/L", 125.0, 125.0, "g/L"),
    (PLT, "10*3/UL", 250.0, 250.0, "10*9/L"),
    (TNI, "NG/ML", 0.05, 50.0, "ng/L"),
    (TNI, "UG/L", 0.05, 50.0, "ng/L"),
    (PO2, "KPAL", 10.0, 10.0, "kPa"),  # pascal is PAL in UCUM's c/i variant
    (PO2, "MM[HG]", 80.0, 80.0 * 0.1333, "kPa"),
    (PH, "[PH]", 7.4, 7.4, "[pH]"),
    (HR, "/MIN", 72.0, 72.0, "/min"),
    (TEMP, "CEL", 37.0, 37.0, "Cel"),
    # the same forms in other cases: case has no meaning in them (UCUM §3 ■4)
    (NA, "mmol/l", 108.0, 108.0, "mmol/L"),
    (NA, "Mmol/l", 108.0, 108.0, "mmol/L"),
    (GLU, "mg/dl", 100.0, 100.0 * 0.05551, "mmol/L"),
    (GLU, "Mg/Dl", 100.0, 100.0 * 0.05551, "mmol/L"),
    (CREA, "umol/l", 90.0, 90.0, "umol/L"),
    (PO2, "kpal", 10.0, 10.0, "kPa"),
    # powers of ten as senders write them
    (PLT, "10*9/L", 250.0, 250.0, "10*9/L"),
    (PLT, "10^9/L", 250.0, 250.0, "10*9/L"),
    (PLT, "10^9/l", 250.0, 250.0, "10*9/L"),
    (PLT, "x10E9/L", 250.0, 250.0, "10*9/L"),
    (PLT, "X10E9/L", 250.0, 250.0, "10*9/L"),
    (PLT, "x10e9/l", 250.0, 250.0, "10*9/L"),
    (PLT, "10E9/L", 250.0, 250.0, "10*9/L"),
    (WBC, "x10^9/L", 7.2, 7.2, "10*9/L"),
    (WBC, "x10E3/uL", 7.2, 7.2, "10*9/L"),  # 10^3/uL = 10^9/L
    (WBC, "10^3/µL", 7.2, 7.2, "10*9/L"),
    (WBC, "10*3/μL", 7.2, 7.2, "10*9/L"),
    # micro as µ (micro sign), μ (Greek mu), u or mc
    (CREA, "µmol/L", 90.0, 90.0, "umol/L"),
    (CREA, "μmol/L", 90.0, 90.0, "umol/L"),
    (CREA, "µMOL/L", 90.0, 90.0, "umol/L"),
    (TNI, "µg/L", 0.05, 50.0, "ng/L"),
    (TNI, "mcg/L", 0.05, 50.0, "ng/L"),
    # mEq, mmHg, degC and friends: the variants units.json accepts, in any case
    (K, "mEq/L", 4.0, 4.0, "mmol/L"),
    (K, "meq/L", 4.0, 4.0, "mmol/L"),
    (K, "MEq/l", 4.0, 4.0, "mmol/L"),
    (PO2, "mmHg", 80.0, 80.0 * 0.1333, "kPa"),
    (PO2, "MMHG", 80.0, 80.0 * 0.1333, "kPa"),
    (PO2, "KPA", 10.0, 10.0, "kPa"),  # ANSI X3.50 single case: pascal is PA
    (PO2, "kpa", 10.0, 10.0, "kPa"),
    (SBP, "KPA", 16.0, 16.0 * 7.50062, "mm[Hg]"),
    (TEMP, "DEGC", 37.0, 37.0, "Cel"),
    (TEMP, "°C", 37.0, 37.0, "Cel"),
    (HR, "BPM", 72.0, 72.0, "/min"),
    (HR, "{BEATS}/MIN", 72.0, 72.0, "/min"),
    (INR, "inr", 2.5, 2.5, "{INR}"),
    (INR, "{inr}", 2.5, 2.5, "{INR}"),
    (PH, "PH", 7.4, 7.4, "[pH]"),
    (PH, " [PH] ", 7.4, 7.4, "[pH]"),  # padding from a fixed-width export
]


@pytest.mark.parametrize(("loinc", "unit", "value", "expected", "canonical"), ACCEPTED)
def test_unit_spellings_convert_like_the_ucum_code(
    loinc: str, unit: str, value: float, expected: float, canonical: str
) -> None:
    converted, unit_out = convert(value, unit, loinc, REFERENCE)
    assert converted == pytest.approx(expected, rel=1e-12)
    assert unit_out == canonical == REFERENCE.analytes[loinc].canonical_unit


# (LOINC, unit as sent, what the reason must say)
REFUSED = [
    (
        K,
        "MG/DL",
        "'MG/DL' (UCUM mg/dL) is not accepted for Potassium (2823-3); accepted: mEq/L, meq/L, mmol/L",
    ),
    (K, "mg/dl", "(UCUM mg/dL) is not accepted for Potassium"),  # a mass unit needs a molar mass
    (GLU, "MMOL/DL", "'MMOL/DL' is not accepted for Glucose (2345-7); accepted: mg/dL, mmol/L"),
    (GLU, "MG/L", "accepted: mg/dL, mmol/L"),
    (GLU, "", "'' is not accepted for Glucose"),
    (HB, "MG/DL", "(UCUM mg/dL) is not accepted for Hemoglobin (718-7)"),
    (PLT, "/UL", "accepted: 10*3/uL, 10*9/L, 10^3/uL, 10^9/L"),
    (PLT, "x10E12/L", "is not accepted for Platelets"),
    (TNI, "PG/ML", "is not accepted for Troponin I, cardiac"),
    (CREA, "MMOL/L", "'MMOL/L' (UCUM mmol/L) is not accepted for Creatinine"),  # c/i form, unit not accepted
    (CREA, "mmol/L", "'mmol/L' is not accepted for Creatinine (2160-0); accepted: mg/dL, umol/L"),
    (PO2, "cmH2O", "is not accepted for pO2, arterial"),
]


@pytest.mark.parametrize(("loinc", "unit", "reason"), REFUSED)
def test_unknown_units_are_refused_with_the_accepted_ones(loinc: str, unit: str, reason: str) -> None:
    with pytest.raises(UnknownUnitError) as info:
        convert(1.0, unit, loinc, REFERENCE)
    assert info.value.field == "unit"
    assert reason in info.value.reason


# --- two units that differ only in case ---------------------------------------------------------------

MILLI, MEGA = 1.0, 1e9  # mU/L and MU/L, in mU/L
TEST_LOINC = "0000-0"
CASE_PAIR = dataclasses.replace(
    REFERENCE,
    analytes={
        TEST_LOINC: Analyte(TEST_LOINC, "Test activity", "mU/L", {"mU/L": MILLI, "MU/L": MEGA}, 0.0, 1e12)
    },
    unit_spellings=UnitSpellings(ucum=frozenset({"mU/L", "MU/L"})),
)


@pytest.mark.parametrize(("unit", "factor"), [("mU/L", MILLI), ("MU/L", MEGA), (" MU/L ", MEGA)])
def test_the_exact_ucum_code_is_read_as_sent_when_case_tells_two_units_apart(
    unit: str, factor: float
) -> None:
    assert convert(3.0, unit, TEST_LOINC, CASE_PAIR) == (3.0 * factor, "mU/L")


@pytest.mark.parametrize("unit", ["mu/l", "MU/l", "Mu/L", "mu/L", "Mu/l"])
def test_a_spelling_that_could_mean_two_units_is_refused_naming_both(unit: str) -> None:
    """mU (milli-unit) and MU (mega-unit) differ only in case: anything else is not guessed."""
    with pytest.raises(UnknownUnitError) as info:
        convert(3.0, unit, TEST_LOINC, CASE_PAIR)
    assert info.value.field == "unit"
    assert "ambiguous" in info.value.reason
    assert "MU/L and mU/L" in info.value.reason


# --- properties -------------------------------------------------------------------------------------


def _spellings_of(loinc: str) -> list[str]:
    """Every spelling the analyte accepts: its units, and the UCUM codes and aliases of those units."""
    analyte, spellings = REFERENCE.analytes[loinc], REFERENCE.unit_spellings
    units = {spellings.unit_of(unit) for unit in analyte.factors}
    return sorted(
        set(analyte.factors)
        | (units & spellings.ucum)
        | {alias for alias, unit in spellings.exact.items() if unit in units}
    )


SPELLINGS = [(loinc, spelling) for loinc in sorted(REFERENCE.analytes) for spelling in _spellings_of(loinc)]
VALUES = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


def _recased(text: str, upper: list[bool]) -> str:
    return "".join(c.upper() if up else c.lower() for c, up in zip(text, upper, strict=True))


@pytest.mark.parametrize(("loinc", "spelling"), SPELLINGS, ids=[f"{p[0]}[{p[1]}]" for p in SPELLINGS])
@settings(max_examples=30, deadline=None)
@given(data=st.data(), value=VALUES)
def test_any_case_of_an_accepted_spelling_converts_like_it(
    loinc: str, spelling: str, data: st.DataObject, value: float
) -> None:
    """None of the shipped spellings is ambiguous, so every case variation gives the same value."""
    upper = data.draw(st.lists(st.booleans(), min_size=len(spelling), max_size=len(spelling)))
    assert convert(value, _recased(spelling, upper), loinc, REFERENCE) == convert(
        value, spelling, loinc, REFERENCE
    )


@settings(max_examples=200, deadline=None)
@given(upper=st.lists(st.booleans(), min_size=4, max_size=4), value=VALUES)
def test_any_other_case_of_two_units_told_apart_by_case_is_refused(upper: list[bool], value: float) -> None:
    """Only the exact codes convert; every other case variation of mU/L or MU/L is refused."""
    unit = _recased("mu/l", upper)
    if unit in ("mU/L", "MU/L"):
        assert (
            convert(value, unit, TEST_LOINC, CASE_PAIR)[0]
            == value * CASE_PAIR.analytes[TEST_LOINC].factors[unit]
        )
    else:
        with pytest.raises(UnknownUnitError, match="ambiguous"):
            convert(value, unit, TEST_LOINC, CASE_PAIR)


# --- end to end ----------------------------------------------------------------------------------------


def _normalise(local_code: str, value: float, unit: str, institution: str = "H001") -> dict[str, Any]:
    raw = lab_record(institution, local_code, value, unit, at=NOW - dt.timedelta(minutes=5))
    return normalise_event("lab", raw, REFERENCE, CODES, IDENTITY, lambda _key: None, institution, NOW).record


def test_a_sodium_of_108_sent_in_capitals_is_stored_canonical_and_alerts() -> None:
    record = _normalise("NA", 108.0, "MMOL/L")
    assert (record["canonical_value"], record["canonical_unit"]) == (108.0, "mmol/L")
    assert (record["value_numeric"], record["unit"]) == (108.0, "MMOL/L")  # as sent, kept
    assert record["normalisation_flags"] == []
    facts = LabFacts.from_record(record)
    assert facts is not None
    decision = evaluate(facts, None, REFERENCE.rulebook, NOW, REFERENCE.policy)
    assert [(alert.limit_kind, alert.severity) for alert in decision.alerts] == [("LOW", "CRITICAL")]


def test_a_platelet_count_in_a_senders_spelling_is_stored_in_the_ucum_unit() -> None:
    record = _normalise("PLT", 15.0, "x10E9/L")
    assert (record["canonical_value"], record["canonical_unit"]) == (15.0, "10*9/L")


def test_an_ambiguous_unit_is_rejected_on_the_unit_field() -> None:
    raw = lab_record("H001", "X", 3.0, "mu/l", at=NOW - dt.timedelta(minutes=5), loinc_code=TEST_LOINC)
    with pytest.raises(UnknownUnitError) as info:
        normalise_event("lab", raw, CASE_PAIR, CODES, IDENTITY, lambda _key: None, "H001", NOW)
    assert info.value.field == "unit"
    assert "ambiguous" in info.value.reason


# --- the alias file is checked at load time ------------------------------------------------------------


def _aliases(change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    return edit_json("unit_aliases.json", change)


def _alias(spelling: str, unit: str, source: str = "SENDERS") -> Callable[[Path], None]:
    return _aliases(lambda doc: doc["aliases"].update({spelling: {"unit": unit, "source": source}}))


def _duplicate_key(directory: Path) -> None:
    path = directory / "unit_aliases.json"
    text = path.read_text(encoding="utf-8")
    duplicated = text.replace(
        '"aliases": {', '"aliases": {"mEq/L": {"unit": "mmol/L", "source": "SENDERS"},', 1
    )
    path.write_text(duplicated, encoding="utf-8")


def _milli_and_mega_units(directory: Path) -> None:
    """An analyte accepting both mU/L and MU/L, with their real c/i forms MU/L and MAU/L."""
    units = {"name": "Test activity", "canonical": "mU/L", "factors": {"mU/L": 1.0, "MU/L": 1e9}}
    edit_json(
        "units.json", lambda doc: doc["analytes"].update({"0000-0": {**units, "plausible": [0, 1e12]}})
    )(directory)
    ucum = {"mU/L": {"ci": "MU/L", "source": "UCUM"}, "MU/L": {"ci": "MAU/L", "source": "UCUM"}}
    _aliases(lambda doc: doc["ucum"].update(ucum))(directory)


# (how the file is broken, what the error must name)
ALIAS_BREAKAGES = [
    pytest.param(lambda d: (d / "unit_aliases.json").unlink(), "unit_aliases.json", id="missing"),
    pytest.param(
        lambda d: (d / "unit_aliases.json").write_text("{", encoding="utf-8"),
        "unit_aliases.json",
        id="not-json",
    ),
    pytest.param(_aliases(lambda doc: doc.update(aliases=[])), "must be objects", id="aliases-not-an-object"),
    pytest.param(_aliases(lambda doc: doc.pop("ucum")), "malformed unit_aliases.json", id="no-ucum-section"),
    pytest.param(_duplicate_key, "'mEq/L' is given twice", id="alias-given-twice"),
    pytest.param(_alias("x10E12/L", "10*12/L"), "'x10E12/L' names '10*12/L'", id="target-not-a-ucum-unit"),
    pytest.param(_alias("mM", "mmol/l"), "'mM' names 'mmol/l'", id="target-in-the-wrong-case"),
    pytest.param(
        _aliases(lambda doc: doc["ucum"].update({"mol/L": {"ci": "MOL/L", "source": "UCUM"}})),
        "'mol/L' is accepted by no analyte",
        id="ucum-unit-no-analyte-uses",
    ),
    pytest.param(_alias("MMOL/l", "umol/L"), "'MMOL/l' (umol/L)", id="alias-is-another-unit-but-for-case"),
    pytest.param(_alias("x10e9/L", "10*3/uL"), "'x10e9/L'", id="two-aliases-equal-but-for-case"),
    pytest.param(_alias("NG/L", "ug/L"), "'NG/L' is the c/i form of 'ng/L'", id="alias-redefines-a-ci-form"),
    pytest.param(_alias("mg/dL", "g/L"), "'mg/dL' is itself a UCUM code", id="alias-redefines-a-ucum-code"),
    pytest.param(_alias(" mmHg", "mm[Hg]"), "without outer spaces", id="alias-with-padding"),
    pytest.param(
        _alias("mm Hg", "mm[Hg]", source="NOPE"), "'mm Hg' cites unknown source 'NOPE'", id="unknown-source"
    ),
    pytest.param(
        _milli_and_mega_units, "'MU/L', the c/i form of 'mU/L', is the UCUM code", id="milli-vs-mega-unit"
    ),
    pytest.param(
        edit_json("units.json", lambda doc: doc["analytes"]["2823-3"]["factors"].update({"mval/L": 1.0})),
        "units.json accepts 'mval/L', neither a UCUM unit",
        id="accepted-unit-without-meaning",
    ),
    pytest.param(
        edit_json("units.json", lambda doc: doc["analytes"]["2823-3"]["factors"].update({"mEq/L": 2.0})),
        "Potassium (2823-3) accepts",
        id="one-unit-two-factors",
    ),
]


@pytest.mark.parametrize(("break_it", "named"), ALIAS_BREAKAGES)
def test_a_broken_alias_file_refuses_to_start_naming_the_entry(
    tmp_path: Path, break_it: Callable[[Path], None], named: str
) -> None:
    directory = copy_reference(tmp_path)
    load_reference(directory)  # the untouched copy is fine
    break_it(directory)
    with pytest.raises(ReferenceDataError) as info:
        load_reference(directory)
    assert named in str(info.value)


def test_the_shipped_alias_file_cites_its_sources_and_targets_accepted_units() -> None:
    doc = json.loads((DATA_DIR / "unit_aliases.json").read_text(encoding="utf-8"))
    assert REFERENCE.versions["unit_aliases"] == doc["version"]
    accepted = {unit for analyte in REFERENCE.analytes.values() for unit in analyte.factors}
    assert set(doc["ucum"]) <= accepted
    assert {entry["unit"] for entry in doc["aliases"].values()} <= set(doc["ucum"])
    cited = {entry["source"] for section in ("ucum", "aliases") for entry in doc[section].values()}
    assert cited <= set(doc["sources"])


def test_reference_data_built_without_aliases_still_reads_exact_units() -> None:
    """ReferenceData made by hand (tests, tools) has no aliases: exact units and other cases still work."""
    bare = ReferenceData(terminology={}, analytes=REFERENCE.analytes)
    assert convert(108.0, "mmol/L", NA, bare) == (108.0, "mmol/L")
    assert convert(108.0, "MMOL/L", NA, bare) == (108.0, "mmol/L")
    with pytest.raises(UnknownUnitError, match="ambiguous"):
        convert(108.0, "MEQ/L", NA, bare)  # without the alias table mEq/L and meq/L are two spellings

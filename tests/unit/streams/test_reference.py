"""Reference data files: the shipped ones load and agree with each other; malformed copies are refused."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.exceptions import ReferenceDataError
from streams.reference import DATA_DIR, load_reference

REFERENCE = load_reference()
RULES_DOC = json.loads((DATA_DIR / "critical_rules.json").read_text(encoding="utf-8"))
UNITS_DOC = json.loads((DATA_DIR / "units.json").read_text(encoding="utf-8"))


def test_default_files_load_with_versions() -> None:
    """The processor can start on the shipped files, and knows which versions it runs."""
    assert REFERENCE.analytes and REFERENCE.rules and REFERENCE.terminology
    assert all(version not in ("", "None") for version in REFERENCE.versions.values())
    assert set(REFERENCE.versions) == {"terminology", "units", "rules"}


@pytest.mark.parametrize("entry", RULES_DOC["rules"], ids=lambda e: e["loinc"])
def test_every_rule_cites_a_known_source(entry: dict[str, Any]) -> None:
    """A critical limit without a traceable source cannot be defended clinically."""
    assert entry["source"] in RULES_DOC["sources"]
    loaded = REFERENCE.rules[entry["loinc"]]
    assert loaded.source == f"{entry['source']}: {RULES_DOC['sources'][entry['source']]}"


@pytest.mark.parametrize("loinc", sorted(REFERENCE.rules))
def test_every_rule_analyte_has_units(loinc: str) -> None:
    """A rule is compared in the canonical unit, so its analyte must be in units.json under the same name."""
    assert loinc in UNITS_DOC["analytes"]
    assert REFERENCE.rules[loinc].analyte == REFERENCE.analytes[loinc].name


@pytest.mark.parametrize("loinc", sorted(REFERENCE.rules))
def test_rule_limits_are_ordered_and_possible(loinc: str) -> None:
    """A limit outside the plausible range could never fire, since such values are rejected first."""
    rule, analyte = REFERENCE.rules[loinc], REFERENCE.analytes[loinc]
    limits = [limit for limit in (rule.low, rule.high) if limit is not None]
    assert limits, "a rule needs at least one limit"
    assert all(analyte.plausible_low < limit < analyte.plausible_high for limit in limits)
    if rule.low is not None and rule.high is not None:
        assert rule.low < rule.high
    assert rule.severity in {"CRITICAL", "HIGH", "MODERATE"}  # the Avro Severity enum


@pytest.mark.parametrize("loinc", sorted(REFERENCE.analytes))
def test_canonical_unit_has_factor_one_and_factors_are_positive(loinc: str) -> None:
    """Converting the canonical unit is the identity; a non-positive factor would invert the limits."""
    analyte = REFERENCE.analytes[loinc]
    assert analyte.factors[analyte.canonical_unit] == 1.0
    assert all(factor > 0 for factor in analyte.factors.values())
    assert analyte.plausible_low < analyte.plausible_high


@pytest.mark.parametrize(
    ("institution", "code"),
    [(inst, code) for inst, codes in sorted(REFERENCE.terminology.items()) for code in sorted(codes)],
)
def test_every_mapped_loinc_has_units(institution: str, code: str) -> None:
    """A mapped code whose LOINC has no unit entry would reject every numeric result of that test."""
    assert REFERENCE.terminology[institution][code] in REFERENCE.analytes


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(DATA_DIR, target)
    return target


def _edit(name: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        path = directory / name
        doc = json.loads(path.read_text(encoding="utf-8"))
        change(doc)
        path.write_text(json.dumps(doc), encoding="utf-8")

    return apply


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / name).write_text(text, encoding="utf-8")  # type: ignore[func-returns-value]


def _first_rule(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["rules"][0]


BREAKAGES = [
    pytest.param(_write("terminology.json", "{"), id="terminology-not-json"),
    pytest.param(_write("units.json", "[]"), id="units-top-level-list"),
    pytest.param(_write("critical_rules.json", ""), id="rules-empty-file"),
    pytest.param(lambda d: (d / "units.json").unlink(), id="units-missing"),
    pytest.param(
        _edit("critical_rules.json", lambda doc: _first_rule(doc).update(source="WIKIPEDIA")),
        id="rule-cites-unknown-source",
    ),
    pytest.param(
        _edit("critical_rules.json", lambda doc: _first_rule(doc).update(loinc="1994-3")),
        id="rule-analyte-without-units",
    ),
    pytest.param(
        _edit("critical_rules.json", lambda doc: _first_rule(doc).pop("low")), id="rule-without-low"
    ),
    pytest.param(
        _edit("critical_rules.json", lambda doc: _first_rule(doc).update(high="six")),
        id="rule-limit-not-a-number",
    ),
    pytest.param(_edit("critical_rules.json", lambda doc: doc.pop("sources")), id="rules-without-sources"),
    pytest.param(
        _edit("units.json", lambda doc: doc["analytes"]["2823-3"].update(plausible=[0.5])),
        id="plausible-one-bound",
    ),
    pytest.param(
        _edit("units.json", lambda doc: doc["analytes"]["2823-3"]["factors"].update({"mg/dL": "x"})),
        id="factor-not-a-number",
    ),
    pytest.param(
        _edit("units.json", lambda doc: doc["analytes"]["2823-3"].pop("canonical")),
        id="analyte-without-canonical-unit",
    ),
    pytest.param(
        _edit("terminology.json", lambda doc: doc.pop("institutions")), id="terminology-no-institutions"
    ),
    pytest.param(
        _edit("terminology.json", lambda doc: doc["institutions"].update(H003=["K"])),
        id="institution-codes-not-an-object",
    ),
]


@pytest.mark.parametrize("break_it", BREAKAGES)
def test_malformed_files_are_refused(tmp_path: Path, break_it: Callable[[Path], None]) -> None:
    """The processor refuses to start on broken reference data rather than misjudge results."""
    directory = _copy(tmp_path)
    load_reference(directory)  # the untouched copy is fine
    break_it(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)


@pytest.mark.parametrize("flag", ["low_inclusive", "high_inclusive"])
def test_inclusive_flags_must_be_booleans(tmp_path: Path, flag: str) -> None:
    """A quoted "false" would flip a limit to inclusive without anyone noticing."""
    directory = _copy(tmp_path)
    _edit("critical_rules.json", lambda doc: _first_rule(doc).update({flag: "false"}))(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)

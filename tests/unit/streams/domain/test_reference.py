"""Reference data files: the shipped ones load and agree with each other; malformed copies are refused."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streams.domain.reference import DATA_DIR, ThresholdRule, load_reference
from streams.exceptions import ReferenceDataError
from tests.unit.streams.domain.reference_files import copy_reference, edit_json

REFERENCE = load_reference()
RULES_DOC = json.loads((DATA_DIR / "critical_rules.json").read_text(encoding="utf-8"))
UNITS_DOC = json.loads((DATA_DIR / "units.json").read_text(encoding="utf-8"))


def test_default_files_load_with_versions() -> None:
    """The processor can start on the shipped files, and knows which versions it runs."""
    assert REFERENCE.analytes and REFERENCE.rulebook.thresholds and REFERENCE.terminology
    assert all(version not in ("", "None") for version in REFERENCE.versions.values())
    assert set(REFERENCE.versions) == {"terminology", "units", "rules", "unit_aliases"}


@pytest.mark.parametrize(
    "entry",
    [*RULES_DOC["rules"], *RULES_DOC["examples"], *RULES_DOC["delta_checks"]],
    ids=lambda e: f"{e['loinc']}-{e.get('kind', 'threshold')}-{e.get('age_max', '')}",
)
def test_every_rule_cites_a_known_source(entry: dict[str, Any]) -> None:
    """A critical limit or delta check without a traceable source cannot be defended clinically."""
    assert entry["source"] in RULES_DOC["sources"]
    cited = f"{entry['source']}: {RULES_DOC['sources'][entry['source']]}"
    loaded = [
        *REFERENCE.rulebook.thresholds.get(entry["loinc"], ()),
        *REFERENCE.rulebook.deltas_for(entry["loinc"]),
        *REFERENCE.example_rules,
    ]
    assert any(rule.source == cited and rule.message == entry["message"] for rule in loaded)


@pytest.mark.parametrize("section", ["suppression", "escalation"])
def test_policies_cite_a_known_source(section: str) -> None:
    """The suppression window and escalation deadlines are clinical choices too, so they name a source."""
    assert RULES_DOC[section]["source"] in RULES_DOC["sources"]


# every threshold rule, banded or not, and the examples that are checked but not applied
THRESHOLD_RULES = [
    *(rule for rules in REFERENCE.rulebook.thresholds.values() for rule in rules),
    *REFERENCE.example_rules,
]


def _rule_id(rule: ThresholdRule) -> str:
    return f"{rule.loinc}:{rule.describe_band()}"


@pytest.mark.parametrize("rule", THRESHOLD_RULES, ids=_rule_id)
def test_every_rule_analyte_has_units(rule: ThresholdRule) -> None:
    """A rule is compared in the canonical unit, so its analyte must be in units.json under the same name."""
    assert rule.loinc in UNITS_DOC["analytes"]
    assert rule.analyte == REFERENCE.analytes[rule.loinc].name


@pytest.mark.parametrize("rule", THRESHOLD_RULES, ids=_rule_id)
def test_rule_limits_are_ordered_and_possible(rule: ThresholdRule) -> None:
    """A limit outside the plausible range could never fire, since such values are rejected first."""
    analyte = REFERENCE.analytes[rule.loinc]
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
        edit_json("critical_rules.json", lambda doc: _first_rule(doc).update(source="WIKIPEDIA")),
        id="rule-cites-unknown-source",
    ),
    pytest.param(
        edit_json("critical_rules.json", lambda doc: _first_rule(doc).update(loinc="1994-3")),
        id="rule-analyte-without-units",
    ),
    pytest.param(
        edit_json("critical_rules.json", lambda doc: _first_rule(doc).pop("low")), id="rule-without-low"
    ),
    pytest.param(
        edit_json("critical_rules.json", lambda doc: _first_rule(doc).update(high="six")),
        id="rule-limit-not-a-number",
    ),
    pytest.param(
        edit_json("critical_rules.json", lambda doc: doc.pop("sources")), id="rules-without-sources"
    ),
    pytest.param(
        edit_json("units.json", lambda doc: doc["analytes"]["2823-3"].update(plausible=[0.5])),
        id="plausible-one-bound",
    ),
    pytest.param(
        edit_json("units.json", lambda doc: doc["analytes"]["2823-3"]["factors"].update({"mg/dL": "x"})),
        id="factor-not-a-number",
    ),
    pytest.param(
        edit_json("units.json", lambda doc: doc["analytes"]["2823-3"].pop("canonical")),
        id="analyte-without-canonical-unit",
    ),
    pytest.param(
        edit_json("terminology.json", lambda doc: doc.pop("institutions")), id="terminology-no-institutions"
    ),
    pytest.param(
        edit_json("terminology.json", lambda doc: doc["institutions"].update(H003=["K"])),
        id="institution-codes-not-an-object",
    ),
]


@pytest.mark.parametrize("break_it", BREAKAGES)
def test_malformed_files_are_refused(tmp_path: Path, break_it: Callable[[Path], None]) -> None:
    """The processor refuses to start on broken reference data rather than misjudge results."""
    directory = copy_reference(tmp_path)
    load_reference(directory)  # the untouched copy is fine
    break_it(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)


@pytest.mark.parametrize("flag", ["low_inclusive", "high_inclusive"])
def test_inclusive_flags_must_be_booleans(tmp_path: Path, flag: str) -> None:
    """A quoted "false" would flip a limit to inclusive without anyone noticing."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", lambda doc: _first_rule(doc).update({flag: "false"}))(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)


# --- bands, delta checks and policies -------------------------------------------------------------

GLUCOSE_MG_DL = 0.05551  # clinical.md: glucose mg/dL x 0.05551 = mmol/L


def test_shipped_policy_matches_the_clinical_reference() -> None:
    """clinical.md: escalate after 15 min; Mayo 30 min; CLSI GP47 1 h; repeats mostly >8 h apart."""
    policy = REFERENCE.policy
    assert policy.suppression_window == dt.timedelta(hours=8)
    assert policy.escalation.deadline_for("CRITICAL") == dt.timedelta(minutes=15)
    assert policy.escalation.deadline_for("HIGH") == dt.timedelta(minutes=30)
    assert policy.escalation.deadline_for("MODERATE") == dt.timedelta(hours=1)
    assert policy.escalation.recipients == (
        "responsible clinician",
        "attending physician",
        "department head",
        "medical director",
    )
    assert policy.escalation.repeat_interval == dt.timedelta(minutes=15)
    assert policy.suppression_source.startswith("REPEATS: ")
    assert policy.escalation.source.startswith("NOTIFY: ")


def test_policy_defaults_apply_when_the_file_has_none(tmp_path: Path) -> None:
    """An older rules file without policy sections still loads, with the documented defaults."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", lambda doc: [doc.pop("suppression"), doc.pop("escalation")])(directory)
    policy = load_reference(directory).policy
    assert policy.suppression_window == dt.timedelta(hours=8)
    assert policy.escalation.deadline_for("CRITICAL") == dt.timedelta(minutes=15)


def test_newborn_glucose_example_is_parsed_with_its_cited_limits_but_not_applied() -> None:
    """Houston Methodist: newborn glucose <=30 / >=250 mg/dL; birth-year ages cannot tell newborns apart."""
    (example,) = REFERENCE.example_rules
    assert (example.loinc, example.age_min, example.age_max, example.sex) == ("2345-7", None, 0, None)
    assert example.low == pytest.approx(30 * GLUCOSE_MG_DL)
    assert example.high == pytest.approx(250 * GLUCOSE_MG_DL)
    assert (example.low_inclusive, example.high_inclusive) == (True, True)
    assert example not in REFERENCE.rulebook.thresholds["2345-7"]
    applied = REFERENCE.rulebook.threshold_for("2345-7", 0, "female")
    assert applied is not None and applied.low == pytest.approx(50 * GLUCOSE_MG_DL)  # HM adult <=50


@pytest.mark.parametrize(
    ("loinc", "kind", "direction", "threshold", "hours"),
    [
        ("718-7", "absolute", "fall", 20.0, 24),  # local example: haemoglobin -20 g/L in 24 h
        ("2160-0", "absolute", "rise", 26.5, 48),  # KDIGO: +26.5 umol/L within 48 h
        ("2160-0", "percent", "rise", 50.0, 168),  # KDIGO: 1.5 x baseline within 7 days
    ],
)
def test_shipped_delta_checks(loinc: str, kind: str, direction: str, threshold: float, hours: int) -> None:
    """Delta checks load in the canonical unit with their windows, in file order."""
    loaded = [
        (d.kind, d.direction, d.threshold, d.window, d.inclusive)
        for d in REFERENCE.rulebook.deltas_for(loinc)
    ]
    assert (kind, direction, threshold, dt.timedelta(hours=hours), True) in loaded


def test_absolute_delta_thresholds_are_converted_to_the_canonical_unit(tmp_path: Path) -> None:
    """A haemoglobin delta given as 2 g/dL is 20 g/L (clinical.md: g/dL x 10 = g/L)."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", lambda doc: doc["delta_checks"][0].update(threshold=2.0, unit="g/dL"))(
        directory
    )
    (delta,) = load_reference(directory).rulebook.deltas_for("718-7")
    assert delta.threshold == pytest.approx(20.0)


def _add_rule(**changes: Any) -> Callable[[dict[str, Any]], None]:
    """Append a copy of the potassium rule with changes."""

    def change(doc: dict[str, Any]) -> None:
        doc["rules"].append({**_first_rule(doc), **changes})

    return change


def _add_rules(*many: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def change(doc: dict[str, Any]) -> None:
        for changes in many:
            _add_rule(**changes)(doc)

    return change


BAND_BREAKAGES = [
    pytest.param(_add_rule(), id="two-unbanded-rules"),
    pytest.param(_add_rule(age_min=10, age_max=5), id="age-min-above-max"),
    pytest.param(_add_rule(age_min=-1), id="negative-age"),
    pytest.param(_add_rule(age_max="17"), id="age-as-text"),
    pytest.param(_add_rule(age_max=17.5), id="fractional-age"),
    pytest.param(_add_rule(age_max=True), id="age-as-boolean"),
    pytest.param(_add_rule(sex="other"), id="sex-not-male-or-female"),
    pytest.param(_add_rule(sex="Male"), id="sex-wrong-case"),
    pytest.param(_add_rules({"age_max": 17}, {"age_min": 17}), id="age-bands-share-a-year"),
    pytest.param(_add_rules({"age_max": 17}, {"age_max": 5}), id="nested-age-bands"),
    pytest.param(_add_rules({"sex": "female"}, {"age_max": 17}), id="sex-only-and-age-only"),
    pytest.param(_add_rules({"sex": "male"}, {"sex": "male"}), id="same-sex-twice"),
    pytest.param(
        _add_rules({"sex": "male", "age_min": 60}, {"sex": "male", "age_min": 50, "age_max": 70}),
        id="sex-and-age-overlap",
    ),
    pytest.param(lambda doc: _first_rule(doc).update(age_min=18), id="no-unbanded-default"),
    pytest.param(lambda doc: _first_rule(doc).update(severity="PANIC"), id="severity-not-in-avro-enum"),
    pytest.param(lambda doc: _first_rule(doc).update(low=7.0, high=6.1), id="low-above-high"),
    pytest.param(lambda doc: _first_rule(doc).update(low=None, high=None), id="no-limit-at-all"),
    pytest.param(lambda doc: _first_rule(doc).update(low=True), id="limit-as-boolean"),
    pytest.param(lambda doc: doc["examples"][0].update(age_max=None), id="example-duplicates-the-default"),
]


@pytest.mark.parametrize("change", BAND_BREAKAGES)
def test_ambiguous_or_malformed_bands_are_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    """A patient must meet exactly one most-specific rule; anything else is refused at start-up."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", change)(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)


@pytest.mark.parametrize(
    "bands",
    [
        [{"age_max": 17}, {"age_min": 18}],  # children and adults apart
        [{"sex": "male"}, {"sex": "female"}],
        [{"sex": "male", "age_min": 60}, {"sex": "female", "age_min": 60}, {"age_max": 0}],
        [{"sex": "male", "age_max": 1}, {"sex": "male", "age_min": 2}, {"sex": "female"}],
    ],
)
def test_disjoint_bands_load(tmp_path: Path, bands: list[dict[str, Any]]) -> None:
    """Bands that never meet the same patient at the same specificity are accepted."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", _add_rules(*bands))(directory)
    assert len(load_reference(directory).rulebook.thresholds["2823-3"]) == 1 + len(bands)


def _delta(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["delta_checks"][0]


def _policy_part(section: str, **changes: Any) -> Callable[[dict[str, Any]], None]:
    return lambda doc: doc[section].update(changes)


DELTA_AND_POLICY_BREAKAGES = [
    pytest.param(lambda doc: _delta(doc).update(kind="rate"), id="delta-kind-unknown"),
    pytest.param(lambda doc: _delta(doc).update(direction="down"), id="delta-direction-unknown"),
    pytest.param(lambda doc: _delta(doc).update(threshold=0), id="delta-threshold-zero"),
    pytest.param(lambda doc: _delta(doc).update(threshold=-20), id="delta-threshold-negative"),
    pytest.param(lambda doc: _delta(doc).update(window_hours=0), id="delta-window-zero"),
    pytest.param(lambda doc: _delta(doc).update(inclusive="true"), id="delta-inclusive-quoted"),
    pytest.param(lambda doc: _delta(doc).update(unit="mmol/L"), id="delta-unit-unknown"),
    pytest.param(lambda doc: _delta(doc).update(kind="percent"), id="percent-delta-with-unit"),
    pytest.param(lambda doc: _delta(doc).update(source="FOLKLORE"), id="delta-unknown-source"),
    pytest.param(lambda doc: _delta(doc).update(loinc="1994-3"), id="delta-analyte-without-units"),
    pytest.param(lambda doc: _delta(doc).pop("window_hours"), id="delta-without-window"),
    pytest.param(_policy_part("suppression", window_hours=-1), id="suppression-negative"),
    pytest.param(_policy_part("suppression", source="HEARSAY"), id="suppression-unknown-source"),
    pytest.param(_policy_part("late_results", alert_within_hours=0), id="late-window-zero"),
    pytest.param(_policy_part("late_results", alert_within_hours="168"), id="late-window-quoted"),
    pytest.param(_policy_part("late_results", source="HEARSAY"), id="late-unknown-source"),
    pytest.param(lambda doc: doc["escalation"]["ack_deadline_minutes"].pop("HIGH"), id="deadline-missing"),
    pytest.param(
        lambda doc: doc["escalation"]["ack_deadline_minutes"].update(URGENT=5), id="deadline-unknown-severity"
    ),
    pytest.param(
        lambda doc: doc["escalation"]["ack_deadline_minutes"].update(CRITICAL=0), id="deadline-zero"
    ),
    pytest.param(_policy_part("escalation", recipients=[]), id="no-recipients"),
    pytest.param(_policy_part("escalation", recipients=["attending", " "]), id="blank-recipient"),
    pytest.param(_policy_part("escalation", repeat_minutes=0), id="repeat-zero"),
    pytest.param(_policy_part("escalation", repeat_minutes="15"), id="repeat-quoted"),
]


@pytest.mark.parametrize("change", DELTA_AND_POLICY_BREAKAGES)
def test_malformed_delta_checks_and_policies_are_refused(
    tmp_path: Path, change: Callable[[dict[str, Any]], None]
) -> None:
    """Delta checks and escalation settings are validated as strictly as limits."""
    directory = copy_reference(tmp_path)
    edit_json("critical_rules.json", change)(directory)
    with pytest.raises(ReferenceDataError):
        load_reference(directory)

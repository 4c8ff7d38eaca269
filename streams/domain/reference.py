"""Reference data (terminology, unit factors, critical-value rules) loaded from versioned JSON files.

`critical_rules.json` holds everything the rule engine (streams.domain.rules) and the escalation timer
(streams.domain.escalation) are configured with:

- ``rules``: threshold rules. Several may exist per LOINC code, told apart by optional ``age_min`` /
  ``age_max`` (whole years at result time, from the birth year, both inclusive) and ``sex``
  (``male``/``female``). For a result the most specific matching rule applies (sex and age > sex or
  age > neither). Every LOINC code needs exactly one rule without any band, so a patient of unknown
  age or sex is still judged, and two rules of equal specificity may never match the same patient:
  ambiguity is a load error, never a silent pick.
- ``examples``: rules in the same format that are parsed and checked but never applied.
- ``delta_checks``: change between consecutive results (CLSI EP33): ``kind`` ``absolute`` (threshold
  in ``unit``, default canonical) or ``percent`` (of the previous value), ``direction``
  ``rise``/``fall``/``any``, ``window_hours`` (the previous result must be at most this old),
  ``inclusive`` (whether a change of exactly the threshold fires).
- ``suppression``: ``window_hours`` during which a repeat that is not worse raises no new alert.
- ``escalation``: ``ack_deadline_minutes`` per severity, ``recipients`` (level 0 is the first
  recipient, who gets the alert itself), ``repeat_minutes`` at the last level.

Every rule, check and policy names a key of ``sources``.

`unit_aliases.json` gives the UCUM units the hub accepts their case-insensitive forms and the other
spellings senders use, each citing a source (`load_unit_spellings` says what is refused).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.domain.values import ValueFormat, load_value_formats
from streams.exceptions import ReferenceDataError

DATA_DIR = Path(__file__).resolve().parents[1] / "data"
ALIASES_FILE = "unit_aliases.json"

SEVERITIES = ("CRITICAL", "HIGH", "MODERATE")  # the Avro Severity enum of CriticalValueAlert
SEXES = ("male", "female")
DELTA_KINDS = ("absolute", "percent")
DIRECTIONS = ("rise", "fall", "any")

DEFAULT_SUPPRESSION_WINDOW = dt.timedelta(hours=8)
DEFAULT_ALERT_WITHIN = dt.timedelta(days=7)  # no longer than escalation.ACK_RETENTION
DEFAULT_ACK_DEADLINES = {
    "CRITICAL": dt.timedelta(minutes=15),
    "HIGH": dt.timedelta(minutes=30),
    "MODERATE": dt.timedelta(minutes=60),
}
DEFAULT_RECIPIENTS = ("responsible clinician", "attending physician", "department head", "medical director")
DEFAULT_REPEAT_INTERVAL = dt.timedelta(minutes=15)


@dataclass(frozen=True)
class Analyte:
    loinc: str
    name: str
    canonical_unit: str
    factors: dict[str, float]
    plausible_low: float
    plausible_high: float


@dataclass(frozen=True)
class ThresholdRule:
    """Critical limits in the analyte's canonical unit, optionally for an age band and/or sex."""

    loinc: str
    analyte: str
    low: float | None
    high: float | None
    low_inclusive: bool
    high_inclusive: bool
    severity: str
    message: str
    source: str
    age_min: int | None = None
    age_max: int | None = None
    sex: str | None = None

    @property
    def specificity(self) -> int:
        """2 for sex and age, 1 for either, 0 for an unbanded rule."""
        return int(self.sex is not None) + int(self.has_age_band)

    @property
    def has_age_band(self) -> bool:
        return self.age_min is not None or self.age_max is not None

    def matches(self, age: int | None, sex: str | None) -> bool:
        """Whether the rule applies to a patient of this age (years) and sex; unknown never fits a band."""
        if self.sex is not None and sex != self.sex:
            return False
        if self.has_age_band:
            if age is None:
                return False
            if self.age_min is not None and age < self.age_min:
                return False
            if self.age_max is not None and age > self.age_max:
                return False
        return True

    def overlaps(self, other: ThresholdRule) -> bool:
        """Whether some patient matches both rules."""
        if self.sex is not None and other.sex is not None and self.sex != other.sex:
            return False
        low = max(self.age_min or 0, other.age_min or 0)
        high = min(
            math.inf if self.age_max is None else self.age_max,
            math.inf if other.age_max is None else other.age_max,
        )
        return low <= high

    def describe_band(self) -> str:
        parts = []
        if self.sex is not None:
            parts.append(self.sex)
        if self.has_age_band:
            upper = "" if self.age_max is None else str(self.age_max)
            parts.append(f"age {self.age_min or 0}-{upper}")
        return ", ".join(parts) or "all patients"


@dataclass(frozen=True)
class DeltaRule:
    """A change between consecutive results of one patient and analyte that must be looked at."""

    loinc: str
    analyte: str
    kind: str  # "absolute" (threshold in the canonical unit) or "percent" (of the previous value)
    direction: str  # "rise", "fall" or "any"
    threshold: float
    window: dt.timedelta
    inclusive: bool
    severity: str
    message: str
    source: str

    def fires(self, previous: float, value: float) -> float | None:
        """The value the result had to reach to fire (in the canonical unit), or None if it did not."""
        if self.kind == "percent":
            if previous == 0:
                return None  # a percent change of zero is undefined
            amount = abs(previous) * self.threshold / 100.0
        else:
            amount = self.threshold
        change = value - previous
        if self.direction in ("rise", "any") and _reaches(change, amount, self.inclusive):
            return previous + amount
        if self.direction in ("fall", "any") and _reaches(-change, amount, self.inclusive):
            return previous - amount
        return None


def _reaches(change: float, amount: float, inclusive: bool) -> bool:
    """change >= amount (or >), tolerant of binary rounding: 5.3 - 5.0 is a change of 0.3."""
    tolerance = 1e-9 * max(abs(change), abs(amount), 1e-12)
    return change >= amount - tolerance if inclusive else change > amount + tolerance


@dataclass(frozen=True)
class RuleBook:
    """Threshold rules (with bands) and delta checks per LOINC code, checked for ambiguity."""

    thresholds: Mapping[str, tuple[ThresholdRule, ...]] = field(default_factory=dict)
    deltas: Mapping[str, tuple[DeltaRule, ...]] = field(default_factory=dict)

    @classmethod
    def build(cls, thresholds: Iterable[ThresholdRule], deltas: Iterable[DeltaRule] = ()) -> RuleBook:
        """Group by LOINC; raise ReferenceDataError on a missing unbanded rule or an ambiguous band."""
        grouped: dict[str, list[ThresholdRule]] = {}
        for rule in thresholds:
            grouped.setdefault(rule.loinc, []).append(rule)
        for loinc, rules in grouped.items():
            defaults = [rule for rule in rules if rule.specificity == 0]
            if len(defaults) != 1:
                raise ReferenceDataError(
                    f"critical_rules.json: {loinc} needs exactly one rule without age or sex band "
                    f"(found {len(defaults)}), so that patients of unknown age or sex are judged"
                )
            for i, rule in enumerate(rules):
                for other in rules[i + 1 :]:
                    if rule.specificity == other.specificity and rule.overlaps(other):
                        raise ReferenceDataError(
                            f"critical_rules.json: {loinc} rules for {rule.describe_band()} and "
                            f"{other.describe_band()} are equally specific and both match some patients"
                        )
        grouped_deltas: dict[str, list[DeltaRule]] = {}
        for delta in deltas:
            grouped_deltas.setdefault(delta.loinc, []).append(delta)
        return cls(
            thresholds={loinc: tuple(rules) for loinc, rules in grouped.items()},
            deltas={loinc: tuple(rules) for loinc, rules in grouped_deltas.items()},
        )

    def threshold_for(self, loinc: str, age: int | None, sex: str | None) -> ThresholdRule | None:
        """The most specific rule matching the patient; None when the analyte has no threshold rule."""
        candidates = [rule for rule in self.thresholds.get(loinc, ()) if rule.matches(age, sex)]
        return max(candidates, key=lambda rule: rule.specificity) if candidates else None

    def deltas_for(self, loinc: str) -> tuple[DeltaRule, ...]:
        return self.deltas.get(loinc, ())


@dataclass(frozen=True)
class EscalationPolicy:
    """How long an alert may stay unacknowledged, and who is told next."""

    ack_deadlines: Mapping[str, dt.timedelta] = field(default_factory=lambda: dict(DEFAULT_ACK_DEADLINES))
    recipients: tuple[str, ...] = DEFAULT_RECIPIENTS
    repeat_interval: dt.timedelta = DEFAULT_REPEAT_INTERVAL
    source: str = ""

    def deadline_for(self, severity: str) -> dt.timedelta:
        """Deadline of a severity; an unknown severity gets the shortest one configured."""
        deadline = self.ack_deadlines.get(severity)
        return deadline if deadline is not None else min(self.ack_deadlines.values())

    def recipient_for(self, level: int) -> str:
        """Level 0 is the first recipient (the alert itself); past the list, the last one again."""
        return self.recipients[min(level, len(self.recipients) - 1)]

    def step_after(self, level: int, severity: str) -> dt.timedelta:
        """Time allowed after an escalation to `level`: the severity's deadline, then the repeat interval."""
        if level >= len(self.recipients) - 1:
            return self.repeat_interval
        return self.deadline_for(severity)


@dataclass(frozen=True)
class AlertPolicy:
    """Suppression window and acknowledgement deadlines used when raising alerts."""

    suppression_window: dt.timedelta = DEFAULT_SUPPRESSION_WINDOW
    escalation: EscalationPolicy = field(default_factory=EscalationPolicy)
    suppression_source: str = ""
    alert_within: dt.timedelta = DEFAULT_ALERT_WITHIN  # older results raise no alert


@dataclass(frozen=True)
class UnitSpellings:
    """Other spellings of the UCUM units the hub accepts (unit_aliases.json), each naming one unit.

    `exact` maps a spelling (an alias or a case-insensitive UCUM form) to its UCUM code, `folded` the
    same by `str.casefold()` of the spelling: the load made sure that no spelling of another unit is
    equal to an alias but for case, so reading an alias in any case is never a guess. `ucum` holds the
    UCUM codes themselves.
    """

    exact: Mapping[str, str] = field(default_factory=dict)
    folded: Mapping[str, str] = field(default_factory=dict)
    ucum: frozenset[str] = frozenset()

    def unit_of(self, spelling: str) -> str:
        """The UCUM code an accepted unit of units.json spells (itself when it is no alias)."""
        return self.exact.get(spelling, spelling)


@dataclass(frozen=True)
class ReferenceData:
    """Everything the normaliser and rule engine look up, immutable once loaded.

    `rulebook` holds all threshold bands and delta checks, `policy` suppression and escalation,
    `unit_spellings` the aliases a unit may be sent as, `value_formats` how each institution's systems
    write numbers as text (institutions.json).
    """

    terminology: dict[str, dict[str, str]]
    analytes: dict[str, Analyte]
    versions: dict[str, str] = field(default_factory=dict)
    rulebook: RuleBook = field(default_factory=RuleBook)
    policy: AlertPolicy = field(default_factory=AlertPolicy)
    example_rules: tuple[ThresholdRule, ...] = ()
    unit_spellings: UnitSpellings = field(default_factory=UnitSpellings)
    value_formats: dict[str, ValueFormat] = field(default_factory=dict)  # how each institution writes numbers


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ReferenceDataError(f"{path.name}: top level must be an object")
    return data


def _read_unique(path: Path) -> dict[str, Any]:
    """Like `_read`, but a key given twice in one object is an error: JSON would keep the last silently."""

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise ReferenceDataError(f"{path.name}: {key!r} is given twice")
            seen[key] = value
        return seen

    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=unique)
    except (OSError, json.JSONDecodeError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc}") from exc
    if not isinstance(data, dict):
        raise ReferenceDataError(f"{path.name}: top level must be an object")
    return data


def _strict_bool(entry: dict[str, Any], key: str) -> bool:
    """A quoted "false" must not silently become True."""
    value = entry[key]
    if not isinstance(value, bool):
        raise ReferenceDataError(
            f"critical_rules.json: {entry.get('loinc')} {key} must be true or false, not {value!r}"
        )
    return value


def _number(entry: dict[str, Any], key: str, *, positive: bool = False) -> float:
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReferenceDataError(f"critical_rules.json: {entry.get('loinc')} {key} must be a number")
    if positive and value <= 0:
        raise ReferenceDataError(f"critical_rules.json: {entry.get('loinc')} {key} must be positive")
    return float(value)


def _optional_age(entry: dict[str, Any], key: str) -> int | None:
    value = entry.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ReferenceDataError(
            f"critical_rules.json: {entry.get('loinc')} {key} must be whole years >= 0, not {value!r}"
        )
    return value


def _choice(entry: dict[str, Any], key: str, allowed: tuple[str, ...]) -> str:
    value = entry[key]
    if value not in allowed:
        raise ReferenceDataError(
            f"critical_rules.json: {entry.get('loinc')} {key} must be one of "
            f"{', '.join(allowed)}, not {value!r}"
        )
    return str(value)


def _cite(entry: dict[str, Any], sources: dict[str, Any], what: str) -> str:
    key = entry["source"]
    if key not in sources:
        raise ReferenceDataError(f"critical_rules.json: {what} cites unknown source {key!r}")
    return f"{key}: {sources[key]}"


def _factor(entry: dict[str, Any], analytes: dict[str, Analyte]) -> float:
    analyte = analytes.get(entry["loinc"])
    if analyte is None:
        raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} has no entry in units.json")
    unit = entry.get("unit", analyte.canonical_unit)
    factor = analyte.factors.get(unit)
    if factor is None:
        raise ReferenceDataError(
            f"critical_rules.json: {entry['loinc']} limit unit {unit!r} is not in units.json"
        )
    return factor


def _threshold_rule(
    entry: dict[str, Any], sources: dict[str, Any], analytes: dict[str, Analyte]
) -> ThresholdRule:
    source = _cite(entry, sources, f"rule {entry['loinc']}")
    factor = _factor(entry, analytes)
    low = None if entry["low"] is None else _number(entry, "low") * factor
    high = None if entry["high"] is None else _number(entry, "high") * factor
    if low is None and high is None:
        raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} rule has neither low nor high limit")
    if low is not None and high is not None and not low < high:
        raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} low limit is not below high limit")
    age_min, age_max = _optional_age(entry, "age_min"), _optional_age(entry, "age_max")
    if age_min is not None and age_max is not None and age_min > age_max:
        raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} age_min is above age_max")
    sex = entry.get("sex")
    if sex is not None:
        sex = _choice(entry, "sex", SEXES)
    return ThresholdRule(
        loinc=entry["loinc"],
        analyte=entry["analyte"],
        low=low,
        high=high,
        low_inclusive=_strict_bool(entry, "low_inclusive"),
        high_inclusive=_strict_bool(entry, "high_inclusive"),
        severity=_choice(entry, "severity", SEVERITIES),
        message=entry["message"],
        source=source,
        age_min=age_min,
        age_max=age_max,
        sex=sex,
    )


def _delta_rule(entry: dict[str, Any], sources: dict[str, Any], analytes: dict[str, Analyte]) -> DeltaRule:
    source = _cite(entry, sources, f"delta check {entry['loinc']}")
    kind = _choice(entry, "kind", DELTA_KINDS)
    if kind == "percent":
        if "unit" in entry:
            raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} percent delta takes no unit")
        if entry["loinc"] not in analytes:
            raise ReferenceDataError(f"critical_rules.json: {entry['loinc']} has no entry in units.json")
        threshold = _number(entry, "threshold", positive=True)
    else:
        threshold = _number(entry, "threshold", positive=True) * _factor(entry, analytes)
    return DeltaRule(
        loinc=entry["loinc"],
        analyte=entry["analyte"],
        kind=kind,
        direction=_choice(entry, "direction", DIRECTIONS),
        threshold=threshold,
        window=dt.timedelta(hours=_number(entry, "window_hours", positive=True)),
        inclusive=_strict_bool(entry, "inclusive"),
        severity=_choice(entry, "severity", SEVERITIES),
        message=entry["message"],
        source=source,
    )


def _minutes(doc: dict[str, Any], key: str) -> dt.timedelta:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ReferenceDataError(
            f"critical_rules.json: escalation {key} must be a positive number of minutes"
        )
    return dt.timedelta(minutes=value)


def _policy(rules_doc: dict[str, Any], sources: dict[str, Any]) -> AlertPolicy:
    suppression = rules_doc.get("suppression")
    window, suppression_source = DEFAULT_SUPPRESSION_WINDOW, ""
    if suppression is not None:
        hours = suppression["window_hours"]
        if isinstance(hours, bool) or not isinstance(hours, int | float) or hours < 0:
            raise ReferenceDataError("critical_rules.json: suppression window_hours must be a number >= 0")
        window = dt.timedelta(hours=hours)
        suppression_source = _cite(suppression, sources, "suppression")
    escalation_doc = rules_doc.get("escalation")
    escalation = EscalationPolicy()
    if escalation_doc is not None:
        deadlines_doc = escalation_doc["ack_deadline_minutes"]
        missing = [severity for severity in SEVERITIES if severity not in deadlines_doc]
        unknown = [severity for severity in deadlines_doc if severity not in SEVERITIES]
        if missing or unknown:
            raise ReferenceDataError(
                f"critical_rules.json: ack_deadline_minutes must name each of {', '.join(SEVERITIES)} "
                f"(missing {missing}, unknown {unknown})"
            )
        recipients = escalation_doc["recipients"]
        if (
            not isinstance(recipients, list)
            or not recipients
            or not all(isinstance(r, str) and r.strip() for r in recipients)
        ):
            raise ReferenceDataError(
                "critical_rules.json: escalation recipients must be a non-empty list of names"
            )
        escalation = EscalationPolicy(
            ack_deadlines={severity: _minutes(deadlines_doc, severity) for severity in SEVERITIES},
            recipients=tuple(recipients),
            repeat_interval=_minutes(escalation_doc, "repeat_minutes"),
            source=_cite(escalation_doc, sources, "escalation"),
        )
    alert_within = DEFAULT_ALERT_WITHIN
    late_doc = rules_doc.get("late_results")
    if late_doc is not None:
        hours = late_doc.get("alert_within_hours")
        if isinstance(hours, bool) or not isinstance(hours, int | float) or not hours > 0:
            raise ReferenceDataError(
                "critical_rules.json: late_results alert_within_hours must be a positive number of hours"
            )
        alert_within = dt.timedelta(hours=hours)
        _cite(late_doc, sources, "late_results")
    return AlertPolicy(
        suppression_window=window,
        escalation=escalation,
        suppression_source=suppression_source,
        alert_within=alert_within,
    )


def load_rules(
    rules_doc: dict[str, Any], analytes: dict[str, Analyte]
) -> tuple[RuleBook, AlertPolicy, tuple[ThresholdRule, ...]]:
    """Rule book, alert policy and (unapplied) example rules from a parsed critical_rules.json."""
    try:
        sources = rules_doc["sources"]
        if not isinstance(sources, dict):
            raise ReferenceDataError("critical_rules.json: sources must be an object")
        thresholds = [_threshold_rule(entry, sources, analytes) for entry in rules_doc["rules"]]
        deltas = [_delta_rule(entry, sources, analytes) for entry in rules_doc.get("delta_checks", [])]
        examples = tuple(_threshold_rule(entry, sources, analytes) for entry in rules_doc.get("examples", []))
        rulebook = RuleBook.build(thresholds, deltas)
        RuleBook.build([*thresholds, *examples])  # an example must fit beside the live rules
        policy = _policy(rules_doc, sources)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ReferenceDataError(f"malformed critical_rules.json: {exc!r}") from exc
    return rulebook, policy, examples


def _spelling(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or value != value.strip():
        raise ReferenceDataError(f"{ALIASES_FILE}: {what} must be a non-empty string without outer spaces")
    return value


def _cited(entry: Any, sources: Mapping[str, Any], what: str) -> Mapping[str, Any]:
    if not isinstance(entry, dict):
        raise ReferenceDataError(f"{ALIASES_FILE}: {what} must be an object")
    if entry.get("source") not in sources:
        raise ReferenceDataError(f"{ALIASES_FILE}: {what} cites unknown source {entry.get('source')!r}")
    return entry


def load_unit_spellings(doc: Mapping[str, Any], analytes: Mapping[str, Analyte]) -> UnitSpellings:
    """Spellings from a parsed unit_aliases.json, refused when one could name two units.

    Every target is a UCUM unit of `ucum` that some analyte accepts; every unit units.json accepts is a
    UCUM unit or an alias (so each has a cited meaning); an alias equal but for case to a spelling of
    another unit is refused, as are two spellings of one unit that convert differently for an analyte.
    """
    try:
        sources, ucum_doc, aliases_doc = doc["sources"], doc["ucum"], doc["aliases"]
        if not all(isinstance(part, dict) for part in (sources, ucum_doc, aliases_doc)):
            raise ReferenceDataError(f"{ALIASES_FILE}: sources, ucum and aliases must be objects")
        accepted = {unit for analyte in analytes.values() for unit in analyte.factors}
        ucum = frozenset(ucum_doc)
        exact: dict[str, str] = {}
        for code, entry in ucum_doc.items():
            _spelling(code, "a UCUM code")
            form = _spelling(_cited(entry, sources, f"UCUM unit {code!r}")["ci"], f"the c/i form of {code!r}")
            if code not in accepted:
                raise ReferenceDataError(
                    f"{ALIASES_FILE}: UCUM unit {code!r} is accepted by no analyte of units.json"
                )
            if form != code and form in ucum:
                raise ReferenceDataError(
                    f"{ALIASES_FILE}: {form!r}, the c/i form of {code!r}, is the UCUM code of another unit"
                )
            if form != code:
                exact[form] = code
        for alias, entry in aliases_doc.items():
            _spelling(alias, "an alias")
            target = _cited(entry, sources, f"alias {alias!r}")["unit"]
            if target not in ucum:
                raise ReferenceDataError(
                    f"{ALIASES_FILE}: alias {alias!r} names {target!r}, which is not a UCUM unit of `ucum`"
                )
            if alias in ucum:
                raise ReferenceDataError(f"{ALIASES_FILE}: alias {alias!r} is itself a UCUM code of `ucum`")
            if alias in exact:
                raise ReferenceDataError(
                    f"{ALIASES_FILE}: alias {alias!r} is the c/i form of {exact[alias]!r}"
                )
            exact[alias] = target
    except (KeyError, TypeError, AttributeError) as exc:
        raise ReferenceDataError(f"malformed {ALIASES_FILE}: {exc!r}") from exc
    spellings = UnitSpellings(exact=exact, folded={a.casefold(): t for a, t in exact.items()}, ucum=ucum)
    undeclared = sorted(unit for unit in accepted if unit and unit not in ucum and unit not in exact)
    if undeclared:
        raise ReferenceDataError(
            f"{ALIASES_FILE}: units.json accepts {', '.join(map(repr, undeclared))}, neither a UCUM unit "
            "of `ucum` nor an alias: add it to one of them"
        )
    equal_but_for_case: dict[str, list[str]] = {}  # casefolded spelling -> every known spelling of it
    for spelling in sorted(ucum | accepted | exact.keys()):
        equal_but_for_case.setdefault(spelling.casefold(), []).append(spelling)
    for alias in exact:
        group = equal_but_for_case[alias.casefold()]
        if len({spellings.unit_of(spelling) for spelling in group}) > 1:
            named = ", ".join(f"{spelling!r} ({spellings.unit_of(spelling)})" for spelling in group)
            raise ReferenceDataError(
                f"{ALIASES_FILE}: alias {alias!r} is equal but for case to a spelling of another unit "
                f"({named}); read in any case it could mean either"
            )
    for analyte in analytes.values():
        first: dict[str, tuple[str, float]] = {}
        for unit, factor in analyte.factors.items():
            code = spellings.unit_of(unit)
            other, other_factor = first.setdefault(code, (unit, factor))
            if other_factor != factor:
                raise ReferenceDataError(
                    f"{ALIASES_FILE}: {analyte.name} ({analyte.loinc}) accepts {other!r} and {unit!r}, both "
                    f"{code}, with different factors in units.json ({other_factor:g} and {factor:g})"
                )
    return spellings


def load_reference(directory: Path = DATA_DIR) -> ReferenceData:
    """Load and cross-check the four files; a rule for an analyte without units is an error, and so
    is a unit spelling that could mean two units."""
    terminology_doc = _read(directory / "terminology.json")
    units_doc = _read(directory / "units.json")
    rules_doc = _read(directory / "critical_rules.json")
    aliases_doc = _read_unique(directory / ALIASES_FILE)
    try:
        analytes = {
            loinc: Analyte(
                loinc=loinc,
                name=entry["name"],
                canonical_unit=entry["canonical"],
                factors={unit: float(f) for unit, f in entry["factors"].items()},
                plausible_low=float(entry["plausible"][0]),
                plausible_high=float(entry["plausible"][1]),
            )
            for loinc, entry in units_doc["analytes"].items()
        }
        terminology = {inst: dict(codes) for inst, codes in terminology_doc["institutions"].items()}
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise ReferenceDataError(f"malformed reference data: {exc!r}") from exc
    rulebook, policy, examples = load_rules(rules_doc, analytes)
    spellings = load_unit_spellings(aliases_doc, analytes)
    return ReferenceData(
        terminology=terminology,
        analytes=analytes,
        versions={
            "terminology": str(terminology_doc.get("version")),
            "units": str(units_doc.get("version")),
            "rules": str(rules_doc.get("version")),
            "unit_aliases": str(aliases_doc.get("version")),
        },
        rulebook=rulebook,
        policy=policy,
        example_rules=examples,
        unit_spellings=spellings,
        value_formats=load_value_formats(directory),
    )

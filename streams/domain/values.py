"""Numbers that laboratories write as text: `"5.2 (H)"`, `"7,1"`, `"> 600"`, `"HI"`.

Read only where the text means one number; anything else stays text and is flagged `not_judged`
(counted, so operators see an institution whose values the rules cannot read). How an institution
writes numbers is its configuration (`streams/data/institutions.json`, `values`): whether its systems
use a decimal comma, and which analyser flags (`HI`, `LO`, `>RANGE`) stand for which end of the
measuring range of which test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streams.exceptions import ReferenceDataError

FLAG_NOT_JUDGED = "not_judged"
COMPARATORS = ("<", "<=", ">=", ">")
INTERPRETATION_FLAGS = ("HH", "LL", "H", "L", "A", "N")  # HL7 v2 table 0078, the ones labs append

_NUMBER = re.compile(
    r"^(?P<comparator><=|>=|<|>)?\s*(?P<number>[+-]?\d+(?:[.,]\d+)?)"
    r"\s*(?:\(\s*(?P<paren_flag>HH|LL|H|L|A|N)\s*\)|(?P<flag>HH|LL|H|L|A|N))?$",
    re.IGNORECASE,
)
_GROUPED = re.compile(r"^[+-]?\d{1,3}[.,]\d{3}$")  # 1,234 or 1.234: a thousands separator, or a decimal?


@dataclass(frozen=True)
class MeasuringRange:
    """What an analyser can measure for one local test code, in the unit it reports."""

    low: float | None
    high: float | None
    unit: str


@dataclass(frozen=True)
class ValueFormat:
    """How one institution's systems write numbers."""

    decimal_comma: bool = False
    range_flags: Mapping[str, str] = field(default_factory=dict)  # flag (upper case) -> "above" | "below"
    measuring_ranges: Mapping[str, MeasuringRange] = field(default_factory=dict)  # local code -> range


@dataclass(frozen=True)
class ReadValue:
    """The number a text carries, whether it is a bound, and what came with it."""

    number: float
    comparator: str | None = None
    unit: str | None = None  # the measuring range's unit, when the number is the range's end
    flag: str | None = None  # an interpretation flag written after the number ("5.2 (H)")


def read_value_text(text: str, local_code: str, value_format: ValueFormat) -> ReadValue | None:
    """The one number `text` means, or None when it means none or could mean two."""
    stripped = text.strip()
    flag = stripped.upper()
    if flag in value_format.range_flags:
        measuring = value_format.measuring_ranges.get(local_code.strip())
        if measuring is None:
            return None  # "HI" without a configured range says "high", not how high
        if value_format.range_flags[flag] == "above" and measuring.high is not None:
            return ReadValue(measuring.high, ">", measuring.unit)
        if value_format.range_flags[flag] == "below" and measuring.low is not None:
            return ReadValue(measuring.low, "<", measuring.unit)
        return None
    match = _NUMBER.match(stripped)
    if match is None:
        return None
    written = match.group("number")
    if _GROUPED.match(written):
        return None  # "1,234" is 1234 with a thousands separator, or 1.234 with a decimal comma
    if "," in written:
        if not value_format.decimal_comma:
            return None  # a decimal comma from a system not configured for one: a typo or a list
        written = written.replace(",", ".")
    interpretation = match.group("paren_flag") or match.group("flag")
    return ReadValue(
        float(written),
        match.group("comparator"),
        None,
        interpretation.upper() if interpretation else None,
    )


def load_value_formats(directory: Path) -> dict[str, ValueFormat]:
    """Each institution's `values` entry of institutions.json; an institution without one writes
    plain decimal points and no range flags, and so does every one when the folder has no such file."""
    path = directory / "institutions.json"
    if not path.exists():
        return {}
    try:
        institutions = json.loads(path.read_text(encoding="utf-8"))["institutions"]
        return {code: _value_format(code, entry.get("values") or {}) for code, entry in institutions.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc!r}") from exc


def _value_format(institution: str, entry: Mapping[str, Any]) -> ValueFormat:
    flags = {str(flag).upper(): end for flag, end in (entry.get("range_flags") or {}).items()}
    for flag, end in flags.items():
        if end not in ("above", "below"):
            raise ReferenceDataError(f"institutions.json {institution} range flag {flag!r}: {end!r}")
    ranges = {
        code: MeasuringRange(spec.get("low"), spec.get("high"), str(spec["unit"]))
        for code, spec in (entry.get("measuring_ranges") or {}).items()
    }
    decimal_comma = entry.get("decimal_comma", False)
    if not isinstance(decimal_comma, bool):
        raise ReferenceDataError(f"institutions.json {institution} decimal_comma: {decimal_comma!r}")
    return ValueFormat(decimal_comma, flags, ranges)

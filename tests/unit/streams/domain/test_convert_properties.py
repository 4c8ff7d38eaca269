"""Properties of unit conversion that must hold for every analyte and accepted unit in units.json."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.domain.normalise import convert
from streams.domain.reference import load_reference

REFERENCE = load_reference()
PAIRS = [
    (loinc, unit, factor)
    for loinc, analyte in sorted(REFERENCE.analytes.items())
    for unit, factor in sorted(analyte.factors.items())
]
VALUES = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@pytest.mark.parametrize(("loinc", "unit", "factor"), PAIRS, ids=[f"{p[0]}[{p[1]}]" for p in PAIRS])
@settings(max_examples=60, deadline=None)
@given(value=VALUES)
def test_conversion_round_trips(loinc: str, unit: str, factor: float, value: float) -> None:
    """Dividing the canonical value by the factor gives back the value as sent (no lossy rounding)."""
    converted, canonical = convert(value, unit, loinc, REFERENCE)
    assert canonical == REFERENCE.analytes[loinc].canonical_unit
    assert math.isclose(converted / factor, value, rel_tol=1e-12, abs_tol=1e-300)


@pytest.mark.parametrize(("loinc", "unit", "factor"), PAIRS, ids=[f"{p[0]}[{p[1]}]" for p in PAIRS])
@settings(max_examples=60, deadline=None)
@given(a=VALUES, b=VALUES)
def test_conversion_is_monotonic(loinc: str, unit: str, factor: float, a: float, b: float) -> None:
    """A higher value stays higher after conversion, so limits keep their meaning in any unit."""
    low, high = sorted((a, b))
    assert convert(low, unit, loinc, REFERENCE)[0] <= convert(high, unit, loinc, REFERENCE)[0]


@pytest.mark.parametrize(("loinc", "unit", "factor"), PAIRS, ids=[f"{p[0]}[{p[1]}]" for p in PAIRS])
@settings(max_examples=20, deadline=None)
@given(value=VALUES, pad=st.sampled_from(["", " ", "\t", "  "]))
def test_surrounding_whitespace_in_unit_is_ignored(
    loinc: str, unit: str, factor: float, value: float, pad: str
) -> None:
    """' mg/dL ' from a fixed-width export means mg/dL."""
    assert convert(value, f"{pad}{unit}{pad}", loinc, REFERENCE) == convert(value, unit, loinc, REFERENCE)

"""Numbers written as text: read where the text means one number, left as text otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streams.domain.reference import DATA_DIR
from streams.domain.values import (
    MeasuringRange,
    ReadValue,
    ValueFormat,
    load_value_formats,
    read_value_text,
)
from streams.exceptions import ReferenceDataError

POINT = ValueFormat()
COMMA = ValueFormat(decimal_comma=True)
ANALYSER = ValueFormat(
    range_flags={"HI": "above", "LO": "below", ">RANGE": "above"},
    measuring_ranges={"GLU": MeasuringRange(20.0, 600.0, "mg/dL")},
)


@pytest.mark.parametrize(
    ("text", "value_format", "expected"),
    [
        ("5.2", POINT, ReadValue(5.2)),
        (" 5.2 ", POINT, ReadValue(5.2)),
        ("5.2 (H)", POINT, ReadValue(5.2, flag="H")),
        ("5.2H", POINT, ReadValue(5.2, flag="H")),
        ("2.1 (ll)", POINT, ReadValue(2.1, flag="LL")),
        ("> 600", POINT, ReadValue(600.0, ">")),
        (">600", POINT, ReadValue(600.0, ">")),
        ("<1.0", POINT, ReadValue(1.0, "<")),
        ("<=0.5", POINT, ReadValue(0.5, "<=")),
        (">= 33.3", POINT, ReadValue(33.3, ">=")),
        ("7,1", COMMA, ReadValue(7.1)),
        ("7,1", POINT, None),  # a decimal comma from a system not configured for one
        ("1,234", COMMA, None),  # 1234 or 1.234?
        ("1.234", POINT, None),
        ("1.23", POINT, ReadValue(1.23)),
        ("HI", ANALYSER, None),  # no measuring range for this code: "high", not how high
        ("positive", POINT, None),
        ("haemolysed", POINT, None),
        ("5.2 7.1", POINT, None),
        ("", POINT, None),
        ("-2.5", POINT, ReadValue(-2.5)),
    ],
)
def test_numbers_in_text(text: str, value_format: ValueFormat, expected: ReadValue | None) -> None:
    assert read_value_text(text, "K", value_format) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("HI", ReadValue(600.0, ">", "mg/dL")),
        ("hi", ReadValue(600.0, ">", "mg/dL")),
        (">RANGE", ReadValue(600.0, ">", "mg/dL")),
        ("LO", ReadValue(20.0, "<", "mg/dL")),
    ],
)
def test_analyser_flags_mean_the_end_of_the_configured_measuring_range(
    text: str, expected: ReadValue
) -> None:
    assert read_value_text(text, "GLU", ANALYSER) == expected


@given(st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False, allow_infinity=False))
def test_every_plainly_written_decimal_reads_as_itself(number: object) -> None:
    text = f"{number:.2f}"
    read = read_value_text(text, "K", POINT)
    assert read is not None and read.number == pytest.approx(float(text))
    comma = read_value_text(text.replace(".", ","), "K", COMMA)
    assert comma is not None and comma.number == read.number


def test_the_shipped_institutions_configure_their_analysers(tmp_path: Path) -> None:
    formats = load_value_formats(DATA_DIR)
    assert set(formats) >= {"H001", "H002", "C003"}
    h001 = formats["H001"]
    assert read_value_text("HI", "GLU", h001) == ReadValue(600.0, ">", "mg/dL")


def test_a_range_flag_must_name_an_end(tmp_path: Path) -> None:
    (tmp_path / "institutions.json").write_text(
        '{"institutions": {"X": {"time_zone": "UTC", "values": {"range_flags": {"HI": "up"}}}}}'
    )
    with pytest.raises(ReferenceDataError, match="HI"):
        load_value_formats(tmp_path)

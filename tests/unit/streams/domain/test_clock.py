"""Local times from institutions become UTC instants on each institution's own clock."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from streams.domain.clock import InstitutionClocks, load_clocks
from streams.exceptions import RejectedEvent

CLOCKS = load_clocks()


@pytest.mark.parametrize(
    ("institution", "local", "utc"),
    [
        ("H001", dt.datetime(2026, 11, 23, 8, 0), dt.datetime(2026, 11, 23, 0, 0, tzinfo=dt.UTC)),  # UTC+8
        ("H002", dt.datetime(2026, 11, 23, 8, 0), dt.datetime(2026, 11, 23, 2, 0, tzinfo=dt.UTC)),  # UTC+6
        (
            "C003",
            dt.datetime(2026, 1, 1, 0, 30),
            dt.datetime(2025, 12, 31, 16, 30, tzinfo=dt.UTC),
        ),  # year change
    ],
)
def test_naive_local_times_are_read_on_the_institution_clock(
    institution: str, local: dt.datetime, utc: dt.datetime
) -> None:
    assert CLOCKS.to_utc(local, institution, "result_time") == utc


def test_aware_times_keep_their_instant() -> None:
    aware = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
    converted = CLOCKS.to_utc(aware, "H001", "result_time")
    assert converted == aware and converted.utcoffset() == dt.timedelta(0)


def test_unknown_institution_clock_is_a_reject_not_a_guess() -> None:
    with pytest.raises(RejectedEvent) as caught:
        CLOCKS.to_utc(dt.datetime(2026, 1, 1, 8, 0), "X999", "result_time")
    assert caught.value.field == "result_time"


def test_daylight_saving_gap_and_overlap() -> None:
    clocks = InstitutionClocks({"NY": ZoneInfo("America/New_York")})
    with pytest.raises(RejectedEvent):
        clocks.to_utc(dt.datetime(2026, 3, 8, 2, 30), "NY", "event_time")  # 02:30 never happened
    repeated = clocks.to_utc(dt.datetime(2026, 11, 1, 1, 30), "NY", "event_time")  # happened twice
    assert repeated == dt.datetime(2026, 11, 1, 5, 30, tzinfo=dt.UTC)  # first occurrence, EDT (UTC-4)

"""Read-back: the identifier and the value must match what the alert says, at the precision typed."""

from __future__ import annotations

import pytest

from console.domain.readback import ReadBackTarget, check_read_back
from console.exceptions import ReadBackMismatchError

TARGET = ReadBackTarget(regional_patient_id="rp-abc", mrn="MRN-7", values=(6.8, 6.8))
GLUCOSE = ReadBackTarget(regional_patient_id="rp-g", mrn=None, values=(33.3, 600.0), comparator=">")


@pytest.mark.parametrize(
    ("identifier", "value"),
    [("MRN-7", "6.8"), ("mrn-7", "6.80"), ("  rp-abc ", "6.8"), ("RP-ABC", "6,8")],
)
def test_a_matching_read_back_passes(identifier: str, value: str) -> None:
    check_read_back(TARGET, identifier, value)


@pytest.mark.parametrize(
    ("identifier", "value", "field"),
    [
        ("MRN-8", "6.8", "patient_identifier"),
        ("", "6.8", "patient_identifier"),
        ("MRN-7", "7", "value"),  # 6.8 read back as 7 is not a read-back
        ("MRN-7", "6.9", "value"),
        ("MRN-7", "six", "value"),
        ("MRN-7", "", "value"),
    ],
)
def test_a_mismatch_names_its_field(identifier: str, value: str, field: str) -> None:
    with pytest.raises(ReadBackMismatchError) as error:
        check_read_back(TARGET, identifier, value)
    assert error.value.field == field


def test_an_mrn_the_user_may_not_see_is_not_accepted() -> None:
    hidden = ReadBackTarget(regional_patient_id="rp-abc", mrn=None, values=(6.8,))
    with pytest.raises(ReadBackMismatchError):
        check_read_back(hidden, "MRN-7", "6.8")


def test_a_bound_is_read_back_as_sent_or_canonical_with_its_comparator() -> None:
    check_read_back(GLUCOSE, "rp-g", ">600")
    check_read_back(GLUCOSE, "rp-g", "33.3")
    with pytest.raises(ReadBackMismatchError) as error:
        check_read_back(GLUCOSE, "rp-g", "<600")
    assert error.value.field == "value"

"""GB 11643 resident identity numbers and the keyed pseudonymous regional patient id."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.national_id import normalise_national_id
from streams.domain.identity import RegionalIdentity

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def iso7064_mod11_2_check(body: str) -> str:
    """The check character by the ISO 7064 MOD 11-2 definition, not by the module's tables.

    The character at position i (counted from the right, check character = position 1) has weight
    2**(i-1) mod 11; the check value c makes the weighted sum congruent to 1 mod 11; 10 is written X.
    """
    total = sum(int(digit) * pow(2, position, 11) for position, digit in enumerate(reversed(body), start=1))
    check = (1 - total) % 11
    return "X" if check == 10 else str(check)


def valid_id(body: str) -> str:
    return body + iso7064_mod11_2_check(body)


def test_reference_check_function_agrees_with_the_published_sample() -> None:
    """The GB 11643-1999 text prints 11010519491231002X; the test's own checker must reproduce its X."""
    assert iso7064_mod11_2_check("11010519491231002") == "X"


@pytest.mark.parametrize(
    "body",
    [
        "11010519491231002",  # check X
        "44030519851103001",
        "31010419700101123",
        "51010720001231999",
        "00000000000000000",
        "99999999999999999",
    ],
)
def test_valid_numbers_are_accepted(body: str) -> None:
    """A number whose last character is the MOD 11-2 check of the first 17 is returned, upper-cased."""
    number = valid_id(body)
    assert normalise_national_id(number) == number


@given(st.text(alphabet="0123456789", min_size=17, max_size=17))
def test_exactly_one_check_character_is_accepted(body: str) -> None:
    """Of the 11 possible check characters only the computed one passes."""
    accepted = [c for c in "0123456789X" if normalise_national_id(body + c) is not None]
    assert accepted == [iso7064_mod11_2_check(body)]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("11010519491231002x", "11010519491231002X"),  # lower-case x is the same check character
        ("  11010519491231002X\n", "11010519491231002X"),  # surrounding whitespace from forms
    ],
)
def test_harmless_variants_are_normalised(raw: str, expected: str) -> None:
    """Case and surrounding whitespace do not change who the person is."""
    assert normalise_national_id(raw) == expected


WRONG_CHECK = "11010519491231002" + "0"


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(WRONG_CHECK, id="wrong-check"),
        pytest.param(valid_id("44030519851103001")[:-1] + "X", id="X-where-digit-due"),
        pytest.param("11010519491231002", id="17-chars"),
        pytest.param("110105194912310021X", id="19-chars"),
        pytest.param("110105491231002", id="old-15-digit-form"),
        pytest.param("", id="empty"),
        pytest.param("1101051949123100AX", id="letter-in-body"),
        pytest.param("X10105194912310021", id="X-first"),
        pytest.param("11010519491231002Y", id="letter-check-not-X"),
        pytest.param("110105-1949123100", id="punctuation"),
        pytest.param("".join(chr(ord(c) + 0xFEE0) for c in "11010519491231002X"), id="fullwidth-digits"),
        pytest.param("11010519491231002²", id="superscript-check"),
        pytest.param("1101051949123100²X", id="superscript-digit-in-body"),
    ],
)
def test_invalid_numbers_are_refused(raw: str) -> None:
    """Anything that is not 17 ASCII digits plus the right check character is None, never an exception."""
    assert normalise_national_id(raw) is None


def test_short_key_is_refused() -> None:
    """A pseudonym key under 16 bytes is too weak to keep ids unlinkable."""
    with pytest.raises(ValueError, match="16 bytes"):
        RegionalIdentity(b"short")


NID = valid_id("44030519851103001")


def test_ids_are_stable_across_instances_with_the_same_key() -> None:
    """Restarting the processor must not re-key every patient."""
    first, second = RegionalIdentity(KEY), RegionalIdentity(KEY)
    assert first.from_national_id(NID) == second.from_national_id(NID)
    assert first.from_local("H001", "MRN0000001") == second.from_local("H001", "MRN0000001")


@pytest.mark.parametrize(
    "derive",
    [
        pytest.param(lambda ident: ident.from_national_id(NID), id="national-id"),
        pytest.param(lambda ident: ident.from_local("H001", "MRN0000001"), id="mrn"),
    ],
)
def test_ids_differ_per_key(derive: Callable[[RegionalIdentity], str]) -> None:
    """Without the key the pseudonym cannot be recomputed from a known identifier."""
    assert derive(RegionalIdentity(KEY)) != derive(RegionalIdentity(OTHER_KEY))


@pytest.mark.parametrize(
    "derive",
    [
        pytest.param(lambda ident: ident.from_national_id(NID), id="national-id"),
        pytest.param(lambda ident: ident.from_local("H001", NID), id="mrn-equal-to-national-id"),
    ],
)
def test_id_format_reveals_nothing(derive: Callable[[RegionalIdentity], str]) -> None:
    """An id is 'rp-' plus 32 hex digits and contains no part of its input."""
    regional = derive(RegionalIdentity(KEY))
    assert regional.startswith("rp-")
    digest = regional.removeprefix("rp-")
    assert len(digest) == 32
    int(digest, 16)
    assert NID not in regional


def test_national_id_path_links_one_person_across_institutions() -> None:
    """The national id is institution-free, so one person has one regional id everywhere."""
    identity = RegionalIdentity(KEY)
    assert identity.from_national_id(NID) == identity.from_national_id(
        normalise_national_id(NID.lower()) or ""
    )


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("H001", "12345"), ("H002", "12345")),  # same MRN at two hospitals: two people
        (("H001", "12345"), ("H001", "12346")),
    ],
)
def test_mrn_path_is_scoped_to_the_institution(a: tuple[str, str], b: tuple[str, str]) -> None:
    """Local MRNs are only unique within their institution."""
    identity = RegionalIdentity(KEY)
    assert identity.from_local(*a) != identity.from_local(*b)


def test_mrn_whitespace_does_not_split_a_patient() -> None:
    """Padding added by a LIS export is not part of the MRN."""
    identity = RegionalIdentity(KEY)
    assert identity.from_local("H001", " 12345 ") == identity.from_local("H001", "12345")


def test_national_id_path_and_mrn_path_never_collide() -> None:
    """An MRN that looks like a national id still yields another id than the national-id path."""
    identity = RegionalIdentity(KEY)
    assert identity.from_national_id(NID) != identity.from_local("H001", NID)

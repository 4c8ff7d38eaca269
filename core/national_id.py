"""Chinese resident identity numbers (GB 11643-1999): what every package agrees a valid one is.

Producers make valid ones (the simulator) and the normaliser tells valid from mistyped ones; neither
owns the standard, so it lives here.
"""

from __future__ import annotations

WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
CHECK_CHARACTERS = "10X98765432"


def check_character(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of the first 17 digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, WEIGHTS, strict=True))
    return CHECK_CHARACTERS[total % 11]


def normalise_national_id(raw: str) -> str | None:
    """The identity number with a valid check character, upper-cased and stripped; None if not valid."""
    candidate = raw.strip().upper()
    if len(candidate) != 18 or not candidate.isascii() or not candidate[:17].isdigit():
        return None
    return candidate if check_character(candidate[:17]) == candidate[17] else None

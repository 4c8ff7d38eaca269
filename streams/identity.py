"""Pseudonymous regional patient ids: a keyed HMAC, so ids are stable but not reversible without the key."""

from __future__ import annotations

import hashlib
import hmac

NATIONAL_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
NATIONAL_ID_CHECK = "10X98765432"


def normalise_national_id(raw: str) -> str | None:
    """A GB 11643-1999 resident identity number with a valid ISO 7064 MOD 11-2 check character, or None."""
    candidate = raw.strip().upper()
    if len(candidate) != 18 or not candidate.isascii() or not candidate[:17].isdigit():
        return None
    total = sum(
        int(digit) * weight for digit, weight in zip(candidate[:17], NATIONAL_ID_WEIGHTS, strict=True)
    )
    return candidate if NATIONAL_ID_CHECK[total % 11] == candidate[17] else None


class RegionalIdentity:
    """Derives the regional id from a national id when valid, else from (institution, local MRN)."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")
        self._key = key

    def _digest(self, material: str) -> str:
        return hmac.new(self._key, material.encode("utf-8"), hashlib.sha256).hexdigest()[:32]

    def from_national_id(self, national_id: str) -> str:
        return "rp-" + self._digest(f"nid:{national_id}")

    def from_local(self, institution_id: str, mrn: str) -> str:
        return "rp-" + self._digest(f"mrn:{institution_id}:{mrn.strip()}")

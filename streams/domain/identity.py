"""Pseudonymous regional patient ids: a keyed HMAC, so ids are stable but not reversible without the key."""

from __future__ import annotations

import hashlib
import hmac


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

"""Local wall-clock times from institutions to UTC instants."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from streams.domain.reference import DATA_DIR
from streams.exceptions import ReferenceDataError, RejectedEvent


@dataclass(frozen=True)
class InstitutionClocks:
    zones: dict[str, ZoneInfo]

    def to_utc(self, value: dt.datetime, institution_id: str, field: str) -> dt.datetime:
        """An aware time is converted as it is; a naive one is read on the institution's clock.

        A wall-clock time that does not exist (skipped by a DST change) is rejected; an ambiguous
        one (repeated hour) takes the first occurrence, as HL7 v2 receivers conventionally do.
        """
        if value.tzinfo is not None:
            return value.astimezone(dt.UTC)
        zone = self.zones.get(institution_id)
        if zone is None:
            raise RejectedEvent(
                field, f"local time without offset from {institution_id!r}, whose clock is unknown"
            )
        local = value.replace(tzinfo=zone, fold=0)
        round_trip = local.astimezone(dt.UTC).astimezone(zone)
        if round_trip.replace(tzinfo=None) != value:
            raise RejectedEvent(field, f"{value.isoformat()} does not exist on {zone.key} clocks (DST gap)")
        return local.astimezone(dt.UTC)


def load_clocks(directory: Path = DATA_DIR) -> InstitutionClocks:
    path = directory / "institutions.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return InstitutionClocks({k: ZoneInfo(v["time_zone"]) for k, v in doc["institutions"].items()})
    except (OSError, ValueError, KeyError, TypeError, ZoneInfoNotFoundError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc!r}") from exc

"""Code maps that are not laboratory tests: vital-sign codes to LOINC, local drug codes to ATC."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from streams.domain.reference import DATA_DIR
from streams.exceptions import ReferenceDataError


@dataclass(frozen=True)
class CodeMaps:
    vital_signs: dict[str, str]
    drugs: dict[str, dict[str, str]]
    version: str


def load_codes(directory: Path = DATA_DIR) -> CodeMaps:
    path = directory / "codes.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return CodeMaps(
            vital_signs={str(k).upper(): str(v) for k, v in doc["vital_signs"].items()},
            drugs={inst: {str(k): str(v) for k, v in codes.items()} for inst, codes in doc["drugs"].items()},
            version=str(doc["version"]),
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ReferenceDataError(f"{path.name}: {exc!r}") from exc

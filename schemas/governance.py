"""Schema evolution under BACKWARD_TRANSITIVE: each new version must read data written by every older one.

Every released version of every record schema is kept in `schemas/history/<full name>/v<N>.avsc`
(the expanded registry text). Compatibility is proven on real encoded samples with fastavro's schema
resolution, not only by comparing text.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fastavro
from fastavro.utils import generate_many

from schemas import standard

HISTORY_DIR = Path(__file__).resolve().parent / "history"


@dataclass(frozen=True)
class Release:
    name: str
    version: int
    text: str

    @property
    def parsed(self) -> Any:
        return fastavro.parse_schema(json.loads(self.text))


def releases(name: str, history: Path = HISTORY_DIR) -> list[Release]:
    """Released versions of one schema, oldest first."""
    folder = history / name
    found = []
    for path in folder.glob("v*.avsc"):
        version = int(path.stem[1:])
        found.append(Release(name, version, json.dumps(json.loads(path.read_text()), sort_keys=True)))
    return sorted(found, key=lambda r: r.version)


def incompatibilities(
    reader: Any, writer: Any, samples: int = 200, seed_records: list[Any] | None = None
) -> list[str]:
    """Why data written with `writer` cannot be read with `reader`; empty when it can.

    Random records cover every branch of unions and every enum symbol with high probability;
    explicit `seed_records` add edge cases.
    """
    problems: list[str] = []
    records = list(seed_records or []) + list(generate_many(writer, samples))
    for index, record in enumerate(records):
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, writer, record)
        buffer.seek(0)
        try:
            fastavro.schemaless_reader(buffer, writer, reader)
        except Exception as exc:  # noqa: BLE001 - any failure to resolve is an incompatibility
            problems.append(f"sample {index}: {type(exc).__name__}: {exc}")
            break
    return problems


def check_backward_transitive(
    candidate_text: str, older: list[Release], samples: int = 200
) -> dict[int, list[str]]:
    """Problems per older version that the candidate cannot read."""
    reader = fastavro.parse_schema(json.loads(candidate_text))
    return {
        release.version: problems
        for release in older
        if (problems := incompatibilities(reader, release.parsed, samples))
    }


def pending_change(name: str, history: Path = HISTORY_DIR) -> bool:
    """True when the working schema differs from its latest released version."""
    released = releases(name, history)
    return not released or released[-1].text != standard.load(name).text


def release(name: str, history: Path = HISTORY_DIR) -> Release | None:
    """Record the working schema as the next version, after proving it reads every older version."""
    from schemas.exceptions import IncompatibleSchemaError

    if not pending_change(name, history):
        return None
    current = standard.load(name)
    released = releases(name, history)
    problems = check_backward_transitive(current.text, released)
    if problems:
        detail = "; ".join(f"v{v}: {p[0]}" for v, p in problems.items())
        raise IncompatibleSchemaError(f"{name} cannot read older versions: {detail}", field="schema")
    version = (released[-1].version + 1) if released else 1
    folder = history / name
    folder.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json.loads(current.text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (folder / f"v{version}.avsc").write_text(text, encoding="utf-8")
    return Release(name, version, json.dumps(json.loads(current.text), sort_keys=True))

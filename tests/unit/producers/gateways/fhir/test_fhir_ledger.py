"""The FHIR gateway's ledger keeps what If-None-Exist needs, never a patient's name: the names travel in
the published events only."""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from producers.gateways.fhir.ledger import ResourceLedger
from producers.gateways.fhir.service import FhirService
from producers.validation import check_event
from schemas import standard

FIXTURES = Path(__file__).parent / "fixtures"
NOW = dt.datetime(2026, 11, 23, 3, 0, tzinfo=dt.UTC)
NAMES = ("Ouyang", "Xiaoming", "Zhang", "欧阳", "晓明")


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


class Publisher:
    """Validates like the SDK and keeps what it is given (one call, or one transaction)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []

    def validate(self, kind: str, record: Mapping[str, Any]) -> None:
        check_event(kind, record, standard.load(standard.KIND_SCHEMAS[kind]), "H001")

    def publish_events(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[object]:
        self.published += [(kind, dict(r)) for kind, r in events]
        return [object() for _ in events]

    def publish_atomically(self, events: Sequence[tuple[str, Mapping[str, Any]]]) -> list[object]:
        self.published += [(kind, dict(r)) for kind, r in events]
        return [object() for _ in events]


def _ledger_text(path: Path) -> str:
    """Everything the ledger's file holds (its WAL too), as text."""
    return "".join(
        part.read_bytes().decode("utf-8", "replace") for part in sorted(path.parent.glob(f"{path.name}*"))
    )


def test_a_contained_patients_name_is_published_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "fhir-ledger.sqlite3"
    publisher = Publisher()
    service = FhirService(lambda _institution: publisher, ResourceLedger(path), clock=lambda: NOW)
    created = service.create("H001", "Observation", fixture("observation-lab-comparator"))
    ((_kind, record),) = publisher.published
    assert (record["patient_family_name"], record["patient_given_name"]) == ("Zhang", "Wei")
    contained = created.body["contained"][0]
    assert "name" not in contained and contained["identifier"]  # the body answered and kept: identity only
    assert "Zhang" not in _ledger_text(path) and "MRN0000042" in _ledger_text(path)


def test_a_bundled_patients_name_is_published_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "fhir-ledger.sqlite3"
    publisher = Publisher()
    service = FhirService(lambda _institution: publisher, ResourceLedger(path), clock=lambda: NOW)
    bundle = fixture("bundle-transaction")
    bundle["entry"][0]["resource"]["name"].insert(0, {"use": "official", "family": "欧阳", "given": ["晓明"]})
    body, events = service.bundle("H001", copy.deepcopy(bundle))
    names = {e.kind: (e.record["patient_family_name"], e.record["patient_given_name"]) for e in events}
    # the lab result and the diagnosis reference the bundled Patient; the order names its MRN only
    assert names == {"lab": ("欧阳", "晓明"), "diagnosis": ("欧阳", "晓明"), "medication": (None, None)}
    assert body["entry"][0]["response"]["status"] == "200 OK"  # the Patient: used, not stored
    kept = _ledger_text(path)
    assert not [name for name in NAMES if name in kept], "a name in the FHIR gateway's ledger"

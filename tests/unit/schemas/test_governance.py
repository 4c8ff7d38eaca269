"""Schema governance: every released version stays readable, and incompatible edits are caught."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fastavro
import pytest

from schemas import docs, governance, standard


def _lab_schema() -> dict[str, Any]:
    return json.loads(standard.load(standard.LAB_RESULT).text)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


@pytest.mark.parametrize("name", standard.record_names())
def test_working_schema_is_released(name: str) -> None:
    """A changed .avsc must be released (`clinhub schemas release`) so its compatibility gets checked."""
    assert not governance.pending_change(name), f"{name} changed since its last release"


@pytest.mark.parametrize("name", standard.record_names())
def test_every_release_reads_every_older_release(name: str) -> None:
    released = governance.releases(name)
    assert released, f"{name} has no released version"
    for index, newer in enumerate(released):
        problems = governance.check_backward_transitive(newer.text, released[:index])
        assert problems == {}, f"{name} v{newer.version}: {problems}"


def _evolved(change: str) -> dict[str, Any]:
    schema = _lab_schema()
    if change == "add optional field with default":
        schema["fields"].append({"name": "specimen_type", "type": ["null", "string"], "default": None})
    elif change == "add required field without default":
        schema["fields"].append({"name": "specimen_type", "type": "string"})
    elif change == "change a field's type":
        _field(schema, "result_id")["type"] = "long"
    elif change == "remove an enum symbol":
        status = _field(schema, "status")["type"]
        status["symbols"] = [s for s in status["symbols"] if s != "corrected"]
        status.pop("default", None)
    elif change == "widen int to long":
        _field(schema, "patient_birth_year")["type"] = ["null", "long"]
    elif change == "remove an optional field":
        schema["fields"] = [f for f in schema["fields"] if f["name"] != "ordering_clinician"]
    else:
        raise AssertionError(change)
    return schema


@pytest.mark.parametrize(
    ("change", "compatible"),
    [
        ("add optional field with default", True),
        ("widen int to long", True),
        ("remove an optional field", True),
        ("add required field without default", False),
        ("change a field's type", False),
        ("remove an enum symbol", False),
    ],
)
def test_candidate_versions_are_judged_on_encoded_samples(change: str, compatible: bool) -> None:
    """BACKWARD: the new schema must decode data written with v1; a breaking edit must be rejected."""
    candidate = json.dumps(_evolved(change), sort_keys=True)
    problems = governance.check_backward_transitive(candidate, governance.releases(standard.LAB_RESULT))
    assert (problems == {}) is compatible, problems


def test_release_writes_next_version_only_when_compatible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history = tmp_path / "history"
    name = standard.LAB_RESULT
    (history / name).mkdir(parents=True)
    v1 = governance.releases(name)[0]
    (history / name / "v1.avsc").write_text(v1.text)

    original_load = standard.load
    compatible = _evolved("add optional field with default")
    breaking = _evolved("add required field without default")
    working: dict[str, Any] = {}

    def fake_load(wanted: str, directory: Path = standard.AVRO_DIR) -> standard.StandardSchema:
        if wanted != name:
            return original_load(wanted, directory)
        text = json.dumps(working["schema"], sort_keys=True)
        return standard.StandardSchema(name, text, fastavro.parse_schema(json.loads(text)))

    monkeypatch.setattr(governance.standard, "load", fake_load)

    working["schema"] = compatible
    released = governance.release(name, history)
    assert released is not None and released.version == 2
    assert (history / name / "v2.avsc").exists()
    assert governance.release(name, history) is None, "an unchanged schema is not released again"

    working["schema"] = breaking
    from schemas.exceptions import IncompatibleSchemaError

    with pytest.raises(IncompatibleSchemaError) as caught:
        governance.release(name, history)
    assert "specimen_type" in str(caught.value)
    assert not (history / name / "v3.avsc").exists()


def test_generated_documentation_is_in_sync() -> None:
    """docs/standard.md is generated; regenerate with `clinhub schemas docs` after a schema change."""
    assert docs.DOC_PATH.read_text(encoding="utf-8") == docs.render()


def test_documentation_covers_every_field_of_every_schema() -> None:
    text = docs.render()
    for name in standard.record_names():
        schema = json.loads(standard.load(name).text)
        assert f"## {name}" in text
        for field in schema["fields"]:
            assert f"| `{field['name']}` |" in text

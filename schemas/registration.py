"""Registering the standard with a registry, reporting per subject what changed."""

from __future__ import annotations

from dataclasses import dataclass

from schemas import standard
from schemas.wire import ConfluentRegistry

COMPATIBILITY = "BACKWARD_TRANSITIVE"


@dataclass(frozen=True)
class SubjectChange:
    subject: str
    schema_id: int
    versions_before: tuple[int, ...]
    versions_after: tuple[int, ...]

    @property
    def changed(self) -> bool:
        return self.versions_before != self.versions_after

    def describe(self) -> str:
        if not self.versions_before:
            return f"new subject, version 1 (id {self.schema_id})"
        if self.changed:
            return f"new version {self.versions_after[-1]} (id {self.schema_id})"
        return f"unchanged at version {self.versions_after[-1]} (id {self.schema_id})"


def register_standard(registry: ConfluentRegistry, names: list[str] | None = None) -> list[SubjectChange]:
    """Set BACKWARD_TRANSITIVE on each subject, then register; the registry refuses incompatible changes."""
    from schemas.exceptions import UnknownSchemaIdError

    changes = []
    existing = set(registry.subjects())
    for name in names or standard.record_names():
        schema = standard.load(name)
        try:
            before = tuple(registry.versions(schema.subject)) if schema.subject in existing else ()
        except UnknownSchemaIdError:
            before = ()
        registry.set_compatibility(schema.subject, COMPATIBILITY)
        schema_id = registry.register(schema.subject, schema.text)
        after = tuple(registry.versions(schema.subject))
        changes.append(SubjectChange(schema.subject, schema_id, before, after))
    return changes

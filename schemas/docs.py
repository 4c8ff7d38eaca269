"""Human-readable documentation of the regional standard, generated from the `.avsc` files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from schemas import standard

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "standard.md"


def _type_name(avro_type: Any) -> str:
    if isinstance(avro_type, str):
        return avro_type.rsplit(".", 1)[-1]
    if isinstance(avro_type, list):
        return " or ".join(_type_name(t) for t in avro_type)
    kind = avro_type.get("type")
    if avro_type.get("logicalType"):
        return f"{avro_type['logicalType']}"
    if kind == "enum":
        return f"enum {avro_type['name'].rsplit('.', 1)[-1]} ({', '.join(avro_type['symbols'])})"
    if kind == "array":
        return f"array of {_type_name(avro_type['items'])}"
    if kind == "record":
        return f"record {avro_type['name'].rsplit('.', 1)[-1]}"
    return str(kind)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _record_tables(schema: dict[str, Any], seen: set[str], heading: str = "##") -> list[str]:
    name = schema["name"]
    if name in seen:
        return []
    seen.add(name)
    lines = [
        f"{heading} {name}",
        "",
        _cell(schema.get("doc", "")),
        "",
        "| field | type | default | meaning |",
        "|---|---|---|---|",
    ]
    nested: list[dict[str, Any]] = []
    for field in schema["fields"]:
        default = json.dumps(field["default"], ensure_ascii=False) if "default" in field else "(required)"
        lines.append(
            f"| `{field['name']}` | {_cell(_type_name(field['type']))} | {_cell(default)} | "
            f"{_cell(field.get('doc', ''))} |"
        )
        candidates = field["type"] if isinstance(field["type"], list) else [field["type"]]
        for candidate in candidates:
            if isinstance(candidate, dict) and candidate.get("type") == "record":
                nested.append(candidate)
            if isinstance(candidate, dict) and candidate.get("type") == "array":
                items = candidate["items"]
                if isinstance(items, dict) and items.get("type") == "record":
                    nested.append(items)
    lines.append("")
    for record in nested:
        lines.extend(_record_tables(record, seen, "###"))
    return lines


def render() -> str:
    """The whole standard as Markdown; `docs/standard.md` must equal this (a test checks)."""
    lines = [
        "# The regional clinical data standard",
        "",
        "Generated from `schemas/avro/*.avsc` by `clinhub schemas docs`; do not edit by hand.",
        "Compatibility rule: BACKWARD_TRANSITIVE. Wire format: Confluent framing (magic byte 0,",
        "4-byte schema id, Avro binary). Registry subjects use the record-name strategy.",
        "",
    ]
    seen: set[str] = set()  # shared parts such as the envelope are documented once, where first used
    for name in standard.record_names():
        schema = json.loads(standard.load(name).text)
        lines.extend(_record_tables(schema, seen))
    return "\n".join(lines).rstrip() + "\n"


def write(path: Path = DOC_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(), encoding="utf-8")
    return path

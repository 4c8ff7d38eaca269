"""A private copy of the shipped reference files, and edits to it, for tests of what loading refuses."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.domain.reference import DATA_DIR


def copy_reference(tmp_path: Path) -> Path:
    target = tmp_path / "data"
    shutil.copytree(DATA_DIR, target)
    return target


def edit_json(name: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    """An edit of one file of a reference folder: `change` mutates its parsed JSON."""

    def apply(directory: Path) -> None:
        path = directory / name
        doc = json.loads(path.read_text(encoding="utf-8"))
        change(doc)
        path.write_text(json.dumps(doc), encoding="utf-8")

    return apply

"""The import-layer contracts of pyproject.toml ([tool.importlinter]), run by `lint-imports` on small trees.

Each test lays out the hub's seven packages in a temporary folder, with one import added, and runs the
project's own contracts on it. The contracts must catch an import wherever it is written: at module
level, inside a function, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PYPROJECT = ROOT / "pyproject.toml"
PACKAGES = ("core", "schemas", "producers", "sinks", "streams", "console", "clinhub")

# Every layer, importing only what it may: the tree every test starts from.
ALLOWED = {
    "core/contract.py": "",
    "schemas/wire.py": "from core import contract\n",
    "producers/publisher.py": (
        "from schemas import wire\nfrom core import contract\nfrom producers import validation\n"
    ),
    "producers/validation.py": "from producers import exceptions\n",
    "producers/exceptions.py": "",
    "producers/simulator.py": "from producers import validation\n",
    "producers/gateways/mllp.py": "from producers import publisher\n",
    "sinks/store.py": "from schemas import wire\n",
    "streams/domain/rules.py": "from schemas import wire\n",
    "streams/runtime/app.py": (
        "from streams.domain import rules\nfrom producers import publisher\nfrom sinks import store\n"
    ),
    "console/domain/access.py": "from streams.domain import rules\n",
    "console/runtime/store.py": "from console.domain import access\nfrom sinks import store\n",
    "console/web/app.py": "from console.runtime import store\n",
    "clinhub/demo.py": (
        "from streams.runtime import app\nfrom producers import publisher\n"
        "from console.web import app as web\n"
    ),
}

IN_FUNCTION = "\n\ndef later() -> None:\n    from {target} import {name}\n"
TYPE_CHECKING_ONLY = (
    "\nfrom typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from {target} import {name}\n"
)


def importlinter_config() -> str:
    """The [tool.importlinter] tables of the project's pyproject.toml, verbatim."""
    lines = PYPROJECT.read_text().splitlines()
    kept: list[str] = []
    inside = False
    for line in lines:
        if line.startswith("["):
            inside = line.lstrip("[").startswith("tool.importlinter")
        if inside:
            kept.append(line)
    return "\n".join(kept) + "\n"


def lint_imports() -> list[str]:
    beside_python = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    found = beside_python or shutil.which("lint-imports")
    assert found, "lint-imports is not installed (import-linter, in the dev extra)"
    return [found]


def run_contracts(
    tree: Path, extra: dict[str, str], config: str | None = None
) -> subprocess.CompletedProcess[str]:
    for package in PACKAGES:
        (tree / package).mkdir(parents=True, exist_ok=True)
        (tree / package / "__init__.py").write_text("")
    for subpackage in (
        "streams/domain",
        "streams/runtime",
        "console/domain",
        "console/runtime",
        "console/web",
        "producers/gateways",
    ):
        (tree / subpackage).mkdir(parents=True, exist_ok=True)
        (tree / subpackage / "__init__.py").write_text("")
    for path, source in {**ALLOWED, **{p: "" for p in extra if p not in ALLOWED}}.items():
        (tree / path).write_text(source + extra.get(path, ""))
    (tree / "pyproject.toml").write_text(importlinter_config() if config is None else config)
    return subprocess.run(
        [*lint_imports(), "--no-cache", "--no-logo"],
        cwd=tree,  # lint-imports puts its working directory first on sys.path: these packages, not the hub's
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def broken(result: subprocess.CompletedProcess[str]) -> set[str]:
    """Names of the contracts reported broken (a long name may wrap over lines)."""
    report = " ".join(result.stdout.split())
    return {name for name in contract_names().values() if f"{name} BROKEN" in report}


def contract_names() -> dict[str, str]:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    return {contract["id"]: contract["name"] for contract in config["contracts"]}


def test_the_config_counts_every_import_of_all_seven_packages() -> None:
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) == set(PACKAGES)
    assert config.get("exclude_type_checking_imports", False) is False
    layers = next(c for c in config["contracts"] if c["id"] == "hub-layers")["layers"]
    assert [re.sub(r"\s+", " ", layer) for layer in layers] == [
        "clinhub",
        "console",
        "streams",
        "producers | sinks",
        "schemas",
        "core",
    ]


# Alembic's scripts: loaded by path (alembic.ini), never imported, so outside the import graph on purpose.
NOT_IMPORTED = {"sinks/migrations", "sinks/migrations/versions"}


def test_every_folder_of_modules_is_a_package_that_lint_imports_sees() -> None:
    """import-linter (grimp) skips a folder without __init__.py and every import written in it."""
    folders = {
        path.parent.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    unseen = sorted(f for f in folders - NOT_IMPORTED if not (ROOT / f / "__init__.py").is_file())
    assert unseen == [], f"add an __init__.py to each, or lint-imports ignores their imports: {unseen}"


def test_the_allowed_imports_keep_every_contract(tmp_path: Path) -> None:
    result = run_contracts(tmp_path, {})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BROKEN" not in result.stdout


@pytest.mark.parametrize(
    ("importer", "target", "name", "contract"),
    [
        ("core/contract.py", "schemas", "wire", "hub-layers"),  # core imports nothing of the hub
        ("schemas/wire.py", "sinks", "store", "hub-layers"),
        ("producers/publisher.py", "streams.runtime", "app", "hub-layers"),  # today's producers -> streams
        ("producers/publisher.py", "sinks", "store", "hub-layers"),  # independent siblings
        ("sinks/store.py", "producers", "publisher", "hub-layers"),
        ("streams/runtime/app.py", "clinhub", "demo", "hub-layers"),
        ("streams/domain/rules.py", "streams.runtime", "app", "streams-layers"),
        (
            "streams/runtime/app.py",
            "console.web",
            "app",
            "hub-layers",
        ),  # the stream never reaches the console
        ("console/domain/access.py", "console.runtime", "store", "console-layers"),
        ("console/runtime/store.py", "console.web", "app", "console-layers"),
        (
            "producers/publisher.py",
            "producers.gateways",
            "mllp",
            "producers-layers",
        ),  # the SDK knows no gateway
    ],
)
@pytest.mark.parametrize("where", ["module", "function", "type-checking"])
def test_an_upward_import_breaks_its_contract(
    tmp_path: Path, importer: str, target: str, name: str, contract: str, where: str
) -> None:
    line = {
        "module": f"from {target} import {name}\n",
        "function": IN_FUNCTION.format(target=target, name=name),
        "type-checking": TYPE_CHECKING_ONLY.format(target=target, name=name),
    }[where]
    result = run_contracts(tmp_path, {importer: line})
    assert result.returncode == 1, result.stdout + result.stderr
    assert contract_names()[contract] in broken(result), result.stdout


def test_a_cycle_between_sibling_modules_breaks_the_no_cycles_contract(tmp_path: Path) -> None:
    result = run_contracts(
        tmp_path,
        {
            "streams/runtime/app.py": "from streams.runtime import clinical\n",
            "streams/runtime/clinical.py": IN_FUNCTION.format(target="streams.runtime", name="app"),
        },
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert broken(result) == {contract_names()["no-cycles"]}, result.stdout


def test_the_type_checking_case_is_a_type_checking_import(tmp_path: Path) -> None:
    """The check above is meaningful: with type-checking imports excluded, the same import goes unseen."""
    config = importlinter_config()
    assert "exclude_type_checking_imports = false" in config
    excluding = config.replace(
        "exclude_type_checking_imports = false", "exclude_type_checking_imports = true"
    )
    line = TYPE_CHECKING_ONLY.format(target="schemas", name="wire")
    assert run_contracts(tmp_path / "excluded", {"core/contract.py": line}, excluding).returncode == 0
    assert run_contracts(tmp_path / "counted", {"core/contract.py": line}).returncode == 1

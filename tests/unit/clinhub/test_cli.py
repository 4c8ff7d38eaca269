from pathlib import Path

import pytest
from typer.testing import CliRunner

from clinhub.cli import app
from sinks.store import make_engine, upgrade


def test_an_unknown_stage_is_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(app, ["stream", "worker", "--role", "clinical", "--role", "reporting"])
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())  # rich wraps the error in a box
    assert "--role: reporting: a stage is one of normaliser, clinical, store" in message


def test_a_quiet_worker_does_not_build_debug_records() -> None:
    import logging
    import sys

    import faust

    from clinhub.cli import faust_worker

    root = logging.getLogger()
    saved = (root.level, list(root.handlers), sys.stdout, sys.stderr)
    try:
        app = faust.App("cli-test", broker="kafka://127.0.0.1:1", web_enabled=False)
        worker = faust_worker(app, "warning")
        worker._setup_logging()  # what execute_from_commandline does first
        assert not logging.getLogger("aiokafka.producer.producer").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("faust.topics").isEnabledFor(logging.INFO)
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        sys.stdout, sys.stderr = saved[2], saved[3]  # the worker redirects them to its logger


def test_users_are_added_listed_and_disabled_from_the_command_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    upgrade(make_engine(url))
    monkeypatch.setenv("CLINHUB_DATABASE_URL", url)
    runner = CliRunner()
    added = runner.invoke(
        app,
        ["users", "add", "dr.li", "--role", "clinician", "--institution", "H001", "--wards", "ICU,CCU",
         "--chain-level", "1", "--password-stdin"],
        input="a long enough password\n",
    )  # fmt: skip
    assert added.exit_code == 0, added.output
    assert "added dr.li (clinician, H001)" in added.output
    short = runner.invoke(app, ["users", "add", "dr.wu", "--role", "clinician", "--institution", "H001",
                                "--password-stdin"], input="short\n")  # fmt: skip
    assert short.exit_code != 0
    assert "password" in str(short.exception) or "password" in short.output
    no_institution = runner.invoke(
        app,
        ["users", "add", "dr.x", "--role", "clinician", "--password-stdin"],
        input="a long enough password\n",
    )
    assert no_institution.exit_code != 0
    listed = runner.invoke(app, ["users", "list"])
    assert "dr.li" in listed.output and "wards=CCU,ICU" in listed.output and "level=1" in listed.output
    assert "dr.wu" not in listed.output
    assert runner.invoke(app, ["users", "disable", "dr.li"]).exit_code == 0
    assert "disabled" in runner.invoke(app, ["users", "list"]).output

from typer.testing import CliRunner

from clinhub.cli import app


def test_an_unknown_stage_is_refused_before_anything_starts() -> None:
    result = CliRunner().invoke(app, ["stream", "worker", "--role", "clinical", "--role", "reporting"])
    assert result.exit_code == 2
    message = " ".join(result.output.replace("│", " ").split())  # rich wraps the error in a box
    assert "--role: reporting: a stage is one of normaliser, clinical, store" in message

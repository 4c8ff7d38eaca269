from typer.testing import CliRunner

from clinhub.cli import app


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

"""The demo keeps librdkafka's transient "no producer id yet" notice of a fresh broker off the terminal.

Only that notice: the publishers' other librdkafka lines still reach the terminal.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from clinhub import demo
from core.settings import KafkaSettings

# confluent-kafka hands each librdkafka line to the client's `logger` as log(level, "%s [%s] %s", ...).
CLIENT = "rdkafka#producer-4"
PID_NOTICE = (
    "[thrd:main]: Failed to acquire idempotence PID from broker 127.0.0.1:9092/1: "
    "Broker: Coordinator load in progress: retrying"
)


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def producer_log() -> Any:
    logger = logging.getLogger("test.demo.producer")
    logger.propagate = False
    kept = Kept()
    logger.addHandler(kept)
    logger.addFilter(demo._TRANSIENT_PID_NOTICE)
    yield logger, kept.lines
    logger.removeFilter(demo._TRANSIENT_PID_NOTICE)
    logger.removeHandler(kept)


def test_the_coordinator_load_pid_notice_is_dropped(producer_log: Any) -> None:
    logger, lines = producer_log
    logger.log(logging.WARNING, "%s [%s] %s", "GETPID", CLIENT, PID_NOTICE)
    assert lines == []


@pytest.mark.parametrize(
    ("level", "facility", "message"),
    [
        (logging.ERROR, "GETPID", PID_NOTICE),  # the same text at error level is not the transient notice
        (
            logging.WARNING,
            "GETPID",
            "[thrd:main]: Failed to acquire idempotence PID from broker 127.0.0.1:9092/1: "
            "Broker: Cluster authorization failed: retrying",
        ),
        (
            logging.ERROR,
            "FAIL",
            "[thrd:127.0.0.1:9092/1]: 127.0.0.1:9092/1: Connect to ipv4#127.0.0.1:9092 failed: "
            "Connection refused",
        ),
        (logging.WARNING, "OFFSETFETCH", "[thrd:main]: Broker: Coordinator load in progress"),
    ],
)
def test_every_other_line_still_shows(producer_log: Any, level: int, facility: str, message: str) -> None:
    logger, lines = producer_log
    logger.log(level, "%s [%s] %s", facility, CLIENT, message)
    assert lines == [f"{facility} [{CLIENT}] {message}"]


def publishers_producer_config() -> dict[str, Any]:
    kafka = KafkaSettings(security_protocol="PLAINTEXT")
    if hasattr(kafka, "producer_config"):  # the producer config in core.settings
        config: dict[str, Any] = kafka.producer_config(30.0)
        return config
    from producers.publisher import producer_config  # where it was before core.settings had it

    return producer_config(SimpleNamespace(kafka=kafka), 30.0)  # type: ignore[arg-type]


def test_the_filter_sits_on_the_logger_the_publishers_producers_use() -> None:
    assert publishers_producer_config()["logger"].name == demo.PRODUCER_LOGGER

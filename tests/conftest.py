"""Shared test configuration: integration tests are marked by folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

# Property tests judge our code, not the machine: on 2 shared cores under a CI run, drawing examples can
# take long enough for hypothesis's too_slow health check to fail a test whose every example passed.
settings.register_profile("clinhub", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("clinhub")

INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_DIR in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)

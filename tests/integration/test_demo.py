"""The README's main job, `clinhub demo`, run as a user runs it: its own services, worker and store.

It runs on its own loopback ports and folders (sharing only the jars Maven fetched), so it neither
needs nor disturbs a developer's `clinhub infra up` stack.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from clinhub.infra.process import free_port
from core.contract import KINDS
from sinks.models import Alert, IngestLog, Observation
from sinks.store import make_engine
from tests.integration.conftest import INFRA_HOME, PROJECT_ROOT

pytestmark = pytest.mark.integration

SEED = 7  # this seed's traffic holds critical results at several institutions


def test_the_demo_stores_every_event_and_every_alert_it_reports(tmp_path: Path) -> None:
    infra_home = tmp_path / "infra"
    infra_home.mkdir()
    for shared in ("kafka-lib", "registry-app"):
        (infra_home / shared).symlink_to(INFRA_HOME / shared)
    kafka_port, registry_port = free_port(), free_port()
    store = tmp_path / "store.sqlite3"
    env = {
        **os.environ,
        "CLINHUB_INFRA_HOME": str(infra_home),
        "CLINHUB_INFRA_KAFKA_PORT": str(kafka_port),
        "CLINHUB_INFRA_KAFKA_CONTROLLER_PORT": str(free_port()),
        "CLINHUB_INFRA_REGISTRY_PORT": str(registry_port),
        "CLINHUB_INFRA_REGISTRY_UPSTREAM_PORT": str(free_port()),
        "CLINHUB_INFRA_METRICS_PORT": "0",
        "CLINHUB_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
        "CLINHUB_REGISTRY_URL": f"https://127.0.0.1:{registry_port}/apis/ccompat/v7",
        "CLINHUB_DATABASE_URL": f"sqlite:///{store}",
        "CLINHUB_STREAM_DATA_DIR": str(tmp_path / "data" / "faust"),
        "CLINHUB_CONSOLE_PORT": str(free_port()),
    }
    run = subprocess.run(
        [sys.executable, "-m", "clinhub.cli", "demo", "--seed", str(SEED), "--count", "40"],
        env=env,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    worker_log = tmp_path / "data" / "worker.log"
    context = (
        f"{run.stdout}\n{run.stderr[-3000:]}\n{worker_log.read_text()[-3000:] if worker_log.exists() else ''}"
    )
    assert run.returncode == 0, context

    reported = re.search(
        r"(\d+) of (\d+) events stored, (\d+) critical alerts on \S+, (\d+) in the store", run.stdout
    )
    assert reported is not None, context
    stored, published, alerts_on_kafka, alerts_stored = map(int, reported.groups())
    assert stored == published == 40
    assert alerts_on_kafka == alerts_stored > 0, context
    assert run.stdout.count("[CRITICAL]") == alerts_on_kafka
    # issue 14: the broker's ACLs refuse an institution publishing as another, typed and at once
    assert re.search(
        r"H001's credentials publishing to \S*raw\.H002\.lab: refused in \d+\.\ds: KafkaAuthorizationError",
        run.stdout,
    ), context

    engine = make_engine(f"sqlite:///{store}")

    def simulated(column: Any) -> Any:
        """The simulator's events have random (version 4) ids; the gateways' are uuid5 of the message."""
        return func.substr(column, 15, 1) == "4"

    with engine.connect() as connection:
        clinical = select(func.count()).select_from(IngestLog).where(IngestLog.kind.in_(KINDS))
        assert connection.execute(clinical.where(simulated(IngestLog.event_id))).scalar_one() == 40
        assert connection.execute(clinical).scalar_one() > 40, "and the gateways' events"
        alerts = select(func.count()).select_from(Alert).where(simulated(Alert.source_event_id))
        assert connection.execute(alerts).scalar_one() == alerts_on_kafka
        unmapped = connection.execute(
            select(func.count())
            .select_from(Observation)
            .where(Observation.loinc_code.is_(None), simulated(Observation.event_id))
        ).scalar_one()
    assert unmapped == 0
    assert "One regional timeline" in run.stdout
    # the gateways: HL7 v2 over MLLP (one in GB 18030) and a FHIR transaction, acknowledged and stored
    assert run.stdout.count("-> ACK AA") == 3, context
    assert "C003 FHIR transaction Bundle -> HTTP 200" in run.stdout, context
    # over HTTPS, the gateway's certificate verified against the local CA (secure by default)
    assert re.search(r"HTTP 200, entries .* \(over https://127\.0\.0\.1:\d+/, verified against", run.stdout)
    assert "钾 Potassium(東區急診)" in run.stdout, "GB 18030 text with GBK second bytes | and ^, intact"
    # issue 13: the GB 18030 ORU's patient name in the store as sent (區 0x85 0x5E, 瑋 0xAC 0x7C)
    assert re.search(r"H002 patient GB\d{5}: family name 區, given name 瑋東\n", run.stdout), context
    assert re.search(r"C003 patient FH\d{5}: family name CHAN, given name Siu Ming\n", run.stdout), context
    assert "the gateways' messages did not all reach the store" not in run.stderr
    # the console: its address and login, an alert acknowledged with read-back and stored
    assert re.search(
        r"Clinician console: http://127\.0\.0\.1:\d+/  \(sign in as demo\.clinician / \S+\)", run.stdout
    )
    assert "with read-back" in run.stdout, context
    assert "the acknowledgement is in the regional store, by demo.clinician" in run.stdout, context
    with engine.connect() as connection:
        acknowledged_by = (
            connection.execute(select(Alert.acknowledged_by).where(Alert.acknowledged_by.is_not(None)))
            .scalars()
            .all()
        )
    assert acknowledged_by == ["demo.clinician"]
    # the demo ran its broker in the given home, and stopped the services it started
    assert (infra_home / "kafka" / "broker.log").exists()
    assert "services stopped" in run.stdout
    assert not (infra_home / "kafka" / "broker.pid").exists()

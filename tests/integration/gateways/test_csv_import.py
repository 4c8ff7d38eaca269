"""`clinhub import csv` on the real stack: the H002 export (GB18030, decimal comma, Chinese headers) reaches
the store with its values as sent, its rejects are written, and a re-run publishes nothing."""

from __future__ import annotations

import csv
import io
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import select

from clinhub.infra.registry import RegistryLayout
from sinks.models import Observation
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import wait_for

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "csv"


def _import(
    hub: HubEnv, export: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **hub.env(),
        "CLINHUB_GATEWAY_LEDGER_PATH": str(hub.workdir / "gateway-ledger.sqlite3"),
        **(extra_env or {}),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "clinhub.cli",
            "import",
            "csv",
            str(export),
            "--institution",
            "H002",
            "--mapping",
            str(DEPLOY / "h002-lab.toml"),
        ],
        env=env,
        cwd=hub.workdir,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def _messages_on(hub: HubEnv, topic: str) -> int:
    consumer = Consumer({**hub.settings.kafka.client_config(), "group.id": "counter"})
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        total = 0
        for p in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += high - low
        return total
    finally:
        consumer.close()


def _h002_rows(hub: HubEnv) -> dict[str, Observation]:
    with hub.engine.connect() as conn:
        rows = conn.execute(select(Observation).where(Observation.institution_id == "H002")).all()
    return {row.result_id: row for row in rows}


def test_h002_export_reaches_the_store_and_a_rerun_publishes_nothing(hub: HubEnv) -> None:
    export = hub.workdir / "h002-lab-example.csv"
    shutil.copyfile(DEPLOY / "h002-lab-example.csv", export)
    raw_topic = hub.topics.raw("H002", "lab")

    first = _import(hub, export)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "rows read: 8" in first.stdout and "published: 6" in first.stdout, first.stdout
    assert "rejected: 2" in first.stdout and "not published: 0" in first.stdout
    assert _messages_on(hub, raw_topic) == 6

    rejects = export.with_name("h002-lab-example.csv.rejects.csv")
    rows = list(csv.DictReader(io.StringIO(rejects.read_bytes().decode("gb18030")), delimiter=";"))
    assert [(r["reject_row"], r["reject_column"]) for r in rows] == [("8", "病历号"), ("9", "报告时间")]
    assert rows[0]["姓名"] == "王五"

    hub.start_worker()
    wait_for(lambda: len(_h002_rows(hub)) == 6, hub, timeout=120, what="six H002 observations stored")
    stored = _h002_rows(hub)
    potassium = stored["S2611300001-LAB0101"]
    assert potassium.loinc_code == "2823-3"
    assert (potassium.original_value, potassium.original_unit) == (4.2, "mmol/L")
    assert potassium.source_system == "LIS-LabWin"
    assert stored["S2611300001-LAB0102"].original_value == 139.5
    glucose = stored["S2611300001-LAB0201"]
    assert (glucose.value_comparator, glucose.original_value, glucose.original_unit) == (">", 33.3, "mmol/L")
    platelets = stored["S2611300002-LAB0302"]
    assert (platelets.value_comparator, platelets.original_value) == ("<", 5.0)
    haemolysed = stored["S2611300002-LAB0101"]
    assert haemolysed.value is None and haemolysed.value_text == "溶血"
    # 08:01 in Urumqi (UTC+6) is 02:01 UTC
    assert potassium.effective_time.isoformat().startswith("2026-11-30T02:01:00")

    again = _import(hub, export)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "published: 0" in again.stdout and "already imported: 6" in again.stdout, again.stdout
    assert _messages_on(hub, raw_topic) == 6, "a re-run must not send the rows again"
    assert len(_h002_rows(hub)) == 6


def test_a_broker_outage_publishes_nothing_silently_and_the_rerun_sends_every_row_once(
    schema_registry: RegistryLayout, postgres_cluster: Any, tmp_path: Path
) -> None:
    """On a broker of its own, stopped for the first run: the command exits non-zero saying how many rows
    were not published, nothing reaches the ledger, and the re-run once it is back sends every row once."""
    from clinhub.infra import kafka
    from tests.integration.conftest import broker_layout, running_hub

    layout = broker_layout(tmp_path / "kafka2")
    process = kafka.start(layout)
    try:
        with running_hub(layout, schema_registry, postgres_cluster, tmp_path) as hub:
            export = hub.workdir / "h002-lab-example.csv"
            shutil.copyfile(DEPLOY / "h002-lab-example.csv", export)
            process.stop()
            down = _import(hub, export, {"CLINHUB_GATEWAY_PUBLISH_TIMEOUT_SECONDS": "3"})
            assert down.returncode == 1, down.stdout + down.stderr
            assert "not published: 6" in down.stdout, down.stdout
            assert "run the same command again" in down.stdout + down.stderr
            process = kafka.start(layout)
            back = _import(hub, export)
            assert back.returncode == 0, back.stdout + back.stderr
            assert "published: 6" in back.stdout and "already imported: 0" in back.stdout, back.stdout
            hub.start_worker()
            wait_for(
                lambda: len(_h002_rows(hub)) == 6, hub, timeout=120, what="every row once the broker is back"
            )
            assert _messages_on(hub, hub.topics.raw("H002", "lab")) >= 6
    finally:
        process.stop()

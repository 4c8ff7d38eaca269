"""The clinical handler's escalation timer over plain-dict tables: what it publishes and what it keeps."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

from schemas.wire import ConfluentRegistry
from streams.domain.escalation import ACK_RETENTION, OpenAlerts, OpenAlertState
from streams.runtime.clinical import ClinicalHandler, ClinicalTables
from streams.runtime.outputs import Output
from tests.unit.streams.runtime.test_app import NOW, make_components, stage_of

ALERT_IDS = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"alert-{n}")) for n in range(4)]


def _state(
    patient: str, alert_id: str, deadline: dt.datetime, acknowledged: dt.datetime | None
) -> dict[str, Any]:
    entry = OpenAlertState(
        alert_id=alert_id,
        severity="CRITICAL",
        message="Critical potassium",
        institution_id="H001",
        regional_patient_id=patient,
        level=0,
        deadline_ms=int(deadline.timestamp() * 1000),
        acknowledged_ms=None if acknowledged is None else int(acknowledged.timestamp() * 1000),
    )
    return OpenAlerts({alert_id: entry}).to_dict()


def _run_timer(open_alerts: dict[str, Any]) -> list[Output]:
    components = make_components(ConfluentRegistry({"url": "mock://clinical-timer"}))
    sent: list[Output] = []

    async def capture(outputs: Sequence[Output]) -> None:
        sent.extend(outputs)

    tables = ClinicalTables(analytes={}, open_alerts=open_alerts, wards={})
    handler = ClinicalHandler(stage_of("clinical", components, capture), tables, components.reference.policy)
    asyncio.run(handler.escalate_due())
    return sent


def test_a_patient_whose_alerts_are_all_long_acknowledged_leaves_the_table() -> None:
    long_ago = NOW - ACK_RETENTION - dt.timedelta(hours=1)
    table = {"rp-old": _state("rp-old", ALERT_IDS[0], long_ago, acknowledged=long_ago)}
    assert _run_timer(table) == []
    assert table == {}


def test_recently_acknowledged_and_unacknowledged_alerts_stay_and_only_the_overdue_escalates() -> None:
    table = {
        "rp-acked": _state(
            "rp-acked", ALERT_IDS[1], NOW - dt.timedelta(hours=2), acknowledged=NOW - dt.timedelta(days=1)
        ),
        "rp-due": _state("rp-due", ALERT_IDS[2], NOW - dt.timedelta(minutes=1), acknowledged=None),
        "rp-waiting": _state("rp-waiting", ALERT_IDS[3], NOW + dt.timedelta(minutes=10), acknowledged=None),
    }
    before = dict(table)
    sent = _run_timer(table)
    assert table == before
    assert [(output.topic, output.key) for output in sent] == [("alerts.escalation", b"rp-due")]


def test_a_policy_that_alerts_on_results_older_than_acknowledgements_are_remembered_is_refused() -> None:
    components = make_components(ConfluentRegistry({"url": "mock://clinical-timer"}))
    policy = dataclasses.replace(
        components.reference.policy, alert_within=ACK_RETENTION + dt.timedelta(hours=1)
    )

    async def nowhere(outputs: Sequence[Output]) -> None:
        raise AssertionError("nothing is published")

    tables = ClinicalTables(analytes={}, open_alerts={}, wards={})
    with pytest.raises(ValueError, match="remembered"):
        ClinicalHandler(stage_of("clinical", components, nowhere), tables, policy)


def test_analyte_state_written_before_the_per_analyte_table_is_read_and_moved_on_write() -> None:
    """An upgrade keeps each patient's delta and suppression state: the legacy map is read, not lost."""
    from streams.domain.rules import AnalyteState
    from streams.runtime.clinical import _Overlay

    before = AnalyteState(last_value=4.1, last_time_ms=1_700_000_000_000, recent_event_ids=(ALERT_IDS[0],))
    legacy = {"rp-1": {"2823-3": before.to_dict()}}
    tables = ClinicalTables(analytes={}, open_alerts={}, wards={}, legacy_analytes=legacy)
    overlay = _Overlay(tables)
    assert overlay.analyte("rp-1", "2823-3") == before
    assert overlay.analyte("rp-1", "2951-2") is None
    after = dataclasses.replace(before, last_value=6.9)
    overlay.set_analyte("rp-1", "2823-3", after)
    assert overlay.analyte("rp-1", "2823-3") == after
    overlay.write_back(1_700_000_100_000)
    assert tables.analytes == {"rp-1|2823-3": {**after.to_dict(), "updated_ms": 1_700_000_100_000}}
    assert legacy == {"rp-1": {"2823-3": before.to_dict()}}  # never written
    assert _Overlay(tables).analyte("rp-1", "2823-3") == after  # the new table wins from now on

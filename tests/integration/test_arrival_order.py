"""The alerts do not depend on arrival order, on the real stack (issue 11, item 5).

The same haemoglobin results of patients known at two hospitals (linked by their national id) are
judged twice, each run with its own topics, group and database:
- undisturbed: each result published only once the one before it is stored, so the clinical stage
  sees them in result-time order;
- disturbed: the first hospital's results, a worker SIGKILLed mid-stream, then the second hospital's
  results, earlier ones among them, to a restarted worker.
Event ids are the same in both runs, so alert ids are too. Every alert of the undisturbed run must be
raised in the disturbed one; one raised only there must carry the note that a late result superseded
its comparison.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select

from clinhub.infra import kafka, postgres
from clinhub.infra.registry import RegistryLayout
from core.national_id import check_character
from sinks.models import Alert, AlertHistory
from streams.runtime.store_consumer import store_group
from tests.factories import lab_record
from tests.integration.conftest import HubEnv, running_hub
from tests.integration.test_faults import publish, stored_counts
from tests.integration.test_lab_path import wait_for

RUN = uuid.UUID("c0ffee00-0000-4000-8000-00000000a11e")
START = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(hours=12)
# Haemoglobin in g/L, every 40 minutes, alternating hospitals: falls of 20 g/L or more within 24 h are
# delta alerts (EP33), 60 g/L or less a critical low; H001 reports in g/dL, H002 in g/L.
SERIES = (130.0, 108.0, 125.0, 101.0, 118.0, 58.0, 96.0, 74.0)


def national_id(n: int) -> str:
    body = f"11010519{60 + n:02d}0101{n:03d}"
    return body + check_character(body)


def results() -> list[dict[str, Any]]:
    records = []
    for patient in range(3):
        for step, value in enumerate(SERIES):
            institution = ("H001", "H002")[step % 2]
            code, unit, sent = (
                ("HGB", "g/dL", value / 10) if institution == "H001" else ("LAB0301", "g/L", value)
            )
            name = f"{patient}-{step}"
            records.append(
                lab_record(
                    institution,
                    code,
                    sent,
                    unit,
                    mrn=f"{institution}-{patient:04d}",
                    at=START + dt.timedelta(minutes=40 * step + patient),
                    event_id=str(uuid.uuid5(RUN, f"event {name}")),
                    correlation_id=str(uuid.uuid5(RUN, f"correlation {name}")),
                    result_id=f"R-{name}",
                    patient_national_id=national_id(patient),
                )
            )
    return sorted(records, key=lambda r: r["result_time"])


def alert_ids(hub: HubEnv) -> set[str]:
    with hub.engine.connect() as conn:
        return set(conn.execute(select(Alert.alert_id)).scalars())


def judged(hub: HubEnv, expected: set[str]) -> bool:
    return stored_counts(hub, expected)[1] == len(expected) and hub.caught_up(
        hub.settings.stream.app_id, hub.topics.norm("lab")
    )


def settle(hub: HubEnv, expected: set[str]) -> set[str]:
    """Wait until every result is stored and judged and the alert set stops growing."""
    wait_for(lambda: judged(hub, expected), hub, 180, what="every result stored and judged")
    wait_for(lambda: hub.caught_up(store_group(hub.settings.stream.app_id), hub.topics.alerts_topic), hub, 60)
    return alert_ids(hub)


def test_a_restart_that_reorders_results_keeps_every_alert_of_the_undisturbed_run(
    hub: HubEnv,
    kafka_broker: kafka.KafkaLayout,
    schema_registry: RegistryLayout,
    postgres_cluster: postgres.PostgresLayout,
    tmp_path: Path,
) -> None:
    records = results()
    hub.start_worker()
    published: set[str] = set()
    for record in records:  # in result-time order, each after the one before is judged
        published |= publish(hub, [record])
        wait_for(lambda done=frozenset(published): judged(hub, set(done)), hub, 60, what="the result judged")
    undisturbed = settle(hub, published)
    assert undisturbed, "the series has delta and critical alerts"

    (tmp_path / "b").mkdir()
    with running_hub(kafka_broker, schema_registry, postgres_cluster, tmp_path / "b") as other:
        first = [r for r in records if r["envelope"]["institution_id"] == "H001"]
        worker = other.start_worker()
        sent = publish(other, first)
        wait_for(lambda: stored_counts(other, sent)[1] > 0, other, 120, what="processing started")
        other.stop_worker(worker, kill=True)
        sent |= publish(other, [r for r in records if r["envelope"]["institution_id"] == "H002"])
        other.start_worker()
        disturbed = settle(other, sent)
        with other.engine.connect() as conn:
            noted = set(
                conn.execute(select(AlertHistory.alert_id).where(AlertHistory.note.is_not(None))).scalars()
            )

    assert sent == published
    missing = undisturbed - disturbed
    assert not missing, f"{len(missing)} alerts of the undisturbed run were not raised after the restart"
    extra = disturbed - undisturbed
    assert extra <= noted, "an alert raised only because results arrived late carries a note"

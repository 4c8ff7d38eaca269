"""A bug in the hub's own code fails loudly on the real stack: no dead letter, no ack, the stage down.

The rules are given a bug (`evaluate` raises AttributeError, as a typo in the engine would) through a
`sitecustomize` module on the worker's PYTHONPATH; the code under test is the shipped code. The
clinical stage must not dead-letter the results it cannot judge, nor commit past them; it reports
itself down on /metrics while the normaliser and the store go on. Restarted without the bug, the
worker judges every one of those results.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from clinhub.infra.process import free_port
from sinks.models import Alert
from streams.runtime.stalls import group_positions
from tests.integration.conftest import HubEnv
from tests.integration.test_faults import assert_exactly_once, publish, stored_counts, traffic
from tests.integration.test_lab_path import wait_for

INJECTED_BUG = '''
"""Loaded by the worker at start-up (site imports sitecustomize): the rules engine gets a bug."""
import streams.domain.rules as rules


def evaluate(*_args, **_kwargs):
    raise AttributeError("'LabFacts' object has no attribute 'valeu' (a bug injected by the test)")


rules.evaluate = evaluate
'''


def metric(port: int, name: str, labels: dict[str, str]) -> float | None:
    """One sample of the worker's /metrics; None while the worker is not serving them yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def committed_total(hub: HubEnv, group: str, topic: str) -> tuple[int, int]:
    """(sum of `group`'s committed offsets, sum of the ends) over the partitions of `topic`."""
    partitions = [(topic, p) for p in range(hub.settings.kafka.topic_partitions)]
    committed, ends = group_positions(hub.settings.kafka.client_config(), group, partitions)
    return sum(committed.values()), sum(ends.values())


def messages_on(hub: HubEnv, topic: str) -> int:
    return committed_total(hub, f"nobody-{topic}", topic)[1]


def test_a_bug_in_the_rules_stops_the_clinical_stage_and_loses_nothing(hub: HubEnv, tmp_path: Path) -> None:
    bug = tmp_path / "bug"
    bug.mkdir()
    (bug / "sitecustomize.py").write_text(INJECTED_BUG)
    port = free_port()
    acknowledged = publish(hub, traffic(seed=31, count=60))
    norm_lab, clinical_group = hub.topics.norm("lab"), hub.settings.stream.app_id

    worker = hub.start_worker(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(bug), os.environ.get("PYTHONPATH")])),
            "CLINHUB_INFRA_METRICS_PORT": str(port),
        }
    )
    up = {"stage": "clinical"}
    wait_for(lambda: metric(port, "clinhub_stage_up", up) == 0.0, hub, 120, what="the clinical stage down")
    # The other stages go on: every result is normalised and stored, just not judged.
    wait_for(lambda: stored_counts(hub, acknowledged)[1] == len(acknowledged), hub, 120, what="all stored")

    assert worker.poll() is None, "the worker stays up, reporting the stage down"
    assert metric(port, "clinhub_stage_up", {"stage": "normaliser"}) == 1.0
    assert metric(port, "clinhub_stage_up", {"stage": "store"}) == 1.0
    errors = metric(port, "clinhub_stage_errors_total", {"stage": "clinical", "error": "AttributeError"})
    assert errors == hub.settings.stream.bug_attempts, "each attempt counted, then the stage stopped"
    committed, end = committed_total(hub, clinical_group, norm_lab)
    assert end >= len(acknowledged) and committed == 0, "no result the clinical stage failed on is acked"
    assert messages_on(hub, hub.topics.deadletter_topic) == 0, "a bug is not bad input: no dead letter"
    assert messages_on(hub, hub.topics.alerts_topic) == 0
    log = hub.worker_log()
    assert "stage clinical stopped" in log and "AttributeError" in log
    assert f"{norm_lab}[" in log, "the failing batch's topic, partitions and offsets are logged"

    hub.stop_worker(worker)
    hub.start_worker({"CLINHUB_INFRA_METRICS_PORT": str(port)})  # the fix deployed
    wait_for(lambda: hub.caught_up(clinical_group, norm_lab), hub, 180, what="every result judged")
    wait_for(lambda: metric(port, "clinhub_stage_up", up) == 1.0, hub, 30, what="the stage up again")
    with hub.engine.connect() as conn:
        wait_for(
            lambda: conn.execute(select(func.count()).select_from(Alert)).scalar_one() > 0,
            hub,
            60,
            what="the critical results alerted and stored",
        )
        alerted = set(conn.execute(select(Alert.source_event_id)).scalars())
    assert alerted <= acknowledged
    assert messages_on(hub, hub.topics.deadletter_topic) == 0
    assert_exactly_once(hub, acknowledged)

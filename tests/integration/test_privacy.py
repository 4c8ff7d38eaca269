"""Raw national identifiers never leave the normaliser, and no credential appears anywhere: not on
the topics, not in the store, not in the worker's log (at DEBUG). The dead-letter topic is the one
place that keeps an event's original bytes (an operator must be able to replay what was refused), so
only its readable fields are checked there for national ids.
"""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import text

from core.contract import KINDS
from producers.publisher import make_publisher
from producers.simulator import national_id
from sinks.models import Base
from tests.factories import lab_record
from tests.integration.conftest import HubEnv
from tests.integration.test_lab_path import rows_for, wait_for


def test_no_raw_national_id_leaves_the_normaliser(hub: HubEnv) -> None:
    rng = random.Random(11643)
    normal_nid, critical_nid, refused_nid = (national_id(rng) for _ in range(3))
    normal = lab_record("H001", "K", 4.2, "mmol/L", mrn="MRN-P1", patient_national_id=normal_nid)
    critical = lab_record(
        "H002", "LAB0101", 6.9, "mmol/L", mrn="0000012345", patient_national_id=critical_nid
    )
    refused = lab_record("H001", "K", 40.0, "mmol/L", mrn="MRN-P3", patient_national_id=refused_nid)
    for institution, record in (("H001", normal), ("H002", critical), ("H001", refused)):
        publisher = make_publisher(hub.settings, institution)
        publisher.publish_lab(record)
        publisher.close()

    hub.start_worker({"CLINHUB_LOG_LEVEL": "DEBUG"})
    wait_for(lambda: rows_for(hub, normal["envelope"]["event_id"]) == 1, hub, what="normal result stored")
    wait_for(lambda: rows_for(hub, critical["envelope"]["event_id"]) == 1, hub, what="critical result stored")
    with hub.engine.connect() as conn:
        wait_for(
            lambda: conn.execute(text("select count(*) from alerts")).scalar_one() >= 1,
            hub,
            what="the alert stored",
        )
    dead = hub.consume_all(hub.topics.deadletter_topic, 60, lambda m: len(m) >= 1)
    assert len(dead) == 1, "the impossible potassium is refused"
    identifiers = [nid.encode() for nid in (normal_nid, critical_nid, refused_nid)]
    secrets_dirs = [
        hub.settings.kafka.principal_secrets_dir,
        hub.settings.registry.principal_secrets_dir,
        hub.settings.database.role_secrets_dir,
    ]
    assert None not in secrets_dirs
    credentials = [
        path.read_bytes().strip() for folder in secrets_dirs if folder for path in folder.glob("*.password")
    ]
    assert len(credentials) >= 9 + 9 + 3, "Kafka's and the registry's principals, the database's roles"

    written = [hub.topics.norm(kind) for kind in KINDS]
    written += [hub.topics.identity_topic, hub.topics.alerts_topic, hub.topics.escalations_topic]
    written += [hub.topics.alert_states_topic]
    for topic in written:
        for message in hub.consume_all(topic, 3, lambda m: False):
            blob = (message.key() or b"") + message.value() + repr(message.headers()).encode()
            assert not any(nid in blob for nid in identifiers), f"a national id on {topic}"
    raw_topics = [hub.topics.raw(institution, "lab") for institution in ("H001", "H002")]
    for topic in [*written, *raw_topics, hub.topics.deadletter_topic]:
        for message in hub.consume_all(topic, 3, lambda m: False):
            blob = (message.key() or b"") + message.value() + repr(message.headers()).encode()
            assert not any(secret in blob for secret in credentials), f"a credential on {topic}"

    letter: dict[str, Any] = hub.decoder()(dead[0].value())
    readable = repr({k: v for k, v in letter.items() if k != "original_value"}).encode()
    assert refused_nid.encode() in letter["original_value"], "the original bytes are kept for replay"
    assert not any(nid in readable for nid in identifiers), "the reason and metadata do not echo it"

    with hub.engine.connect() as conn:
        for table in Base.metadata.sorted_tables:
            rows = conn.execute(text(f'select t::text from "{table.name}" t')).scalars().all()  # noqa: S608
            dump = "\n".join(rows).encode()
            assert not any(nid in dump for nid in identifiers), f"a national id in table {table.name}"
            assert not any(secret in dump for secret in credentials), f"a credential in table {table.name}"

    log = "\n".join(p.read_text(errors="replace") for p in sorted(hub.workdir.glob("worker-*.log")))
    assert "DEBUG" in log, "the worker logged at DEBUG, the most talkative level"
    assert not any(nid.decode() in log for nid in identifiers), "a national id in the worker's log"
    assert not any(secret.decode() in log for secret in credentials), "a credential in the worker's log"

"""One batch of raw messages of every kind: normalised events, links and dead letters."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

from core.contract import TopicNames, patient_key
from producers.simulator import simulate_events
from schemas import standard
from schemas.wire import ConfluentRegistry, make_encoder
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import load_reference
from streams.runtime.messages import RawMessage
from streams.runtime.normaliser import normalise_batch
from streams.runtime.stage import Codecs

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
IDENTITY = RegionalIdentity(b"q" * 32)
NID = "11010519491231002X"


def setup() -> tuple[dict[str, Any], Codecs]:
    registry = ConfluentRegistry({"url": "mock://normalise-batch"})
    encoders = {
        kind: make_encoder(registry, standard.load(name)) for kind, name in standard.KIND_SCHEMAS.items()
    }
    return encoders, Codecs(registry)


def raw(kind: str, record: dict[str, Any], offset: int, encoders: dict[str, Any]) -> RawMessage:
    topic = f"raw.{record['envelope']['institution_id']}.{kind}"
    return RawMessage(topic, 0, offset, b"k", encoders[kind](record))


def test_a_mixed_batch_is_normalised_and_bad_messages_rejected() -> None:
    encoders, codecs = setup()
    events = simulate_events(seed=5, count=60, now=NOW)
    messages = [raw(kind, record, i, encoders) for i, (kind, record) in enumerate(events)]
    messages.insert(10, RawMessage("raw.H001.lab", 0, 999, b"k", b"\x01garbage"))
    messages.insert(20, RawMessage("raw.H001.xray", 0, 1000, b"k", messages[0].value))

    outcome = normalise_batch(
        messages, codecs, TopicNames(), load_reference(), load_codes(), IDENTITY, lambda _k: None, NOW
    )

    assert len(outcome.events) == len(events)
    assert [r.message.offset for r in outcome.rejections] == [999, 1000]
    assert [r.field for r in outcome.rejections] == ["header", "topic"]
    assert {e.kind for _, e in outcome.events} == set(standard.KIND_SCHEMAS)
    assert all(e.record["patient_national_id"] is None for _, e in outcome.events)


def test_a_link_learnt_early_in_a_batch_applies_to_later_messages() -> None:
    encoders, codecs = setup()
    labs = [copy.deepcopy(r) for k, r in simulate_events(seed=8, count=40, now=NOW) if k == "lab"][:3]
    for record in labs:
        record["envelope"]["institution_id"] = "H001"
        record["patient_mrn"] = "MRN-LINK"
        record["local_code"] = "K"
        record["unit"] = "mmol/L"
        record["value_numeric"] = 4.1
        record["patient_national_id"] = None
    labs[1]["patient_national_id"] = NID  # the second result carries the national id
    messages = [raw("lab", r, i, encoders) for i, r in enumerate(labs)]

    outcome = normalise_batch(
        messages, codecs, TopicNames(), load_reference(), load_codes(), IDENTITY, lambda _k: None, NOW
    )

    ids = [e.regional_patient_id for _, e in outcome.events]
    mrn_id, nid_id = IDENTITY.from_local("H001", "MRN-LINK"), IDENTITY.from_national_id(NID)
    assert ids == [mrn_id, nid_id, nid_id]
    assert outcome.links == {patient_key("H001", "MRN-LINK"): nid_id}
    link = outcome.events[1][1].identity.link
    assert link is not None and link["alias_of"] == mrn_id

"""The Faust agents as thin wiring, driven with `agent.test_context()`: no broker, no database."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

import pytest
from faust.types import Message
from prometheus_client import CollectorRegistry

from core.contract import TopicNames
from core.exceptions import KafkaAuthorizationError
from core.settings import KafkaSettings, StreamSettings
from producers.simulator import simulate_labs
from schemas import standard
from schemas.exceptions import RegistryUnavailableError
from schemas.wire import ConfluentRegistry, make_encoder
from sinks.base import Sink, StoreRecord, StoreWriteResult
from streams.domain.codes import load_codes
from streams.domain.identity import RegionalIdentity
from streams.domain.reference import load_reference
from streams.metrics import make_stream_metrics
from streams.runtime.app import create_app, exit_deadline
from streams.runtime.messages import RawMessage
from streams.runtime.normaliser import NormaliserHandler
from streams.runtime.outputs import Output, Publish
from streams.runtime.stage import Components, RetryPolicy, Stage, StageHealth
from streams.runtime.startup import EarlyJob, PromptTableManager
from streams.runtime.store import StoreHandler

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


class MemorySink(Sink):
    def __init__(self) -> None:
        self.records: list[StoreRecord] = []

    def write_records(self, batch: Sequence[StoreRecord]) -> StoreWriteResult:
        self.records.extend(batch)
        return StoreWriteResult(written={"lab": len(batch)}, unchanged={})


def stream_settings(tmp_path: Any) -> StreamSettings:
    return StreamSettings(
        app_id="agents-test", data_dir=tmp_path, batch_linger_seconds=0.005, table_store="memory://"
    )


def app_for(tmp_path: Any, components: Components, **kwargs: Any) -> Any:
    kafka = KafkaSettings(security_protocol="PLAINTEXT")  # nothing connects in these tests
    return create_app(kafka, stream_settings(tmp_path), components, **kwargs)


def stage_of(name: str, components: Components, publish: Publish) -> Stage:
    return Stage(name, components, TopicNames(), publish, StageHealth(components.metrics))


def make_components(registry: Any, retry_max_seconds: float = 30.0) -> Components:
    """The real processing components over the given registry, an in-memory sink and a fixed clock."""
    return Components(
        registry=registry,
        reference=load_reference(),
        codes=load_codes(),
        identity=RegionalIdentity(b"t" * 32),
        sink=MemorySink(),
        metrics=make_stream_metrics(CollectorRegistry()),
        clock=lambda: NOW,
        retry=RetryPolicy(max_delay=retry_max_seconds),
    )


@pytest.fixture()
def wiring(tmp_path: Any) -> tuple[Any, list[tuple[str, bytes | None, bytes]], Components]:
    registry = ConfluentRegistry({"url": "mock://agents"})
    components = make_components(registry)
    sent: list[tuple[str, bytes | None, bytes]] = []

    async def capture(outputs: Sequence[Output]) -> None:
        sent.extend((output.topic, output.key, output.value) for output in outputs)

    app = app_for(tmp_path, components, publish_override=capture)
    return app, sent, components


def agent_named(app: Any, suffix: str) -> Any:
    return next(agent for name, agent in app.agents.items() if name.endswith(suffix))


async def put_on(context: Any, topic: str, key: bytes, value: bytes, offset: int) -> None:
    """test_context names multi-topic agents' messages '<internal>'; give each its real topic."""

    def to_message(key: Any, value: Any, **_kwargs: Any) -> Message:
        return Message(
            topic,
            0,
            offset,
            NOW.timestamp(),
            0,
            None,
            key,
            value,
            b"",
            generation_id=context.app.consumer_generation_id,  # else the stream skips it as stale
        )

    context.to_message = to_message
    await context.put(key=key, value=value, wait=False)  # the agent batches; it acks after confirming


async def wait_until(condition: Any, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met")


def test_normaliser_agent_publishes_normalised_events_and_dead_letters(wiring: Any) -> None:
    asyncio.run(_normaliser_scenario(*wiring))


async def _normaliser_scenario(app: Any, sent: list[Any], components: Components) -> None:
    records = [
        r for r in simulate_labs(seed=4, count=20, now=NOW) if r["envelope"]["institution_id"] == "H001"
    ][:3]
    encode = make_encoder(components.registry, standard.load(standard.LAB_RESULT))
    agent = agent_named(app, "normaliser")
    async with agent.test_context() as context:
        for offset, record in enumerate(records):
            await put_on(context, "raw.H001.lab", b"H001|x", encode(record), offset)
        await put_on(context, "raw.H001.lab", b"H001|x", b"\x01junk", 99)
        await wait_until(lambda: len(sent) >= len(records) + 2)
    topics = [topic for topic, _, _ in sent]
    assert topics.count("norm.lab") == len(records)
    assert topics.count("deadletter") == 1
    decode = components.codecs.decoders["lab"]
    normalised = [decode(value) for topic, _, value in sent if topic == "norm.lab"]
    assert all(r["loinc_code"] and r["patient_national_id"] is None for r in normalised)
    keys = {key for topic, key, _ in sent if topic == "norm.lab"}
    assert keys == {r["regional_patient_id"].encode() for r in normalised}, "keyed by regional patient id"


def test_store_stage_writes_decoded_standard_records(wiring: Any) -> None:
    asyncio.run(_store_scenario(*wiring))


async def _store_scenario(_app: Any, sent: list[Any], components: Components) -> None:
    alert_encoder = make_encoder(components.registry, standard.load(standard.CRITICAL_VALUE_ALERT))
    from streams.domain.rules import AlertDraft, alert_record

    draft = AlertDraft(
        alert_id="0b0e58f2-5a8e-5c0f-9a47-0d9c2b7e2f11",
        source_event_id="6f1c2d9e-58a3-4c1b-9a57-0c6f5e2b7d10",
        regional_patient_id="rp-1",
        institution_id="H001",
        loinc_code="2823-3",
        analyte="Potassium",
        value=6.8,
        unit="mmol/L",
        limit_kind="HIGH",
        limit_value=6.1,
        severity="CRITICAL",
        message="Critical potassium",
        rule_source="ARUP",
        result_time=NOW,
        raised_time=NOW,
        deadline_time=NOW + dt.timedelta(minutes=15),
        correlation_id="c-1",
    )

    async def publish(outputs: Sequence[Output]) -> None:
        sent.extend((o.topic, o.key, o.value) for o in outputs)

    handler = StoreHandler(stage_of("store", components, publish))
    value = alert_encoder(alert_record(draft))
    await handler.handle(
        [RawMessage("alerts.critical", 0, 7, b"rp-1", value), RawMessage("norm.lab", 1, 3, b"rp-1", b"\x00")]
    )
    assert [topic for topic, _, _ in sent] == ["deadletter"], "the undecodable one is dead-lettered"
    (stored,) = components.sink.records
    assert stored.kind == "alert"
    assert str(stored.record["alert_id"]) == draft.alert_id


def test_clinical_agent_alerts_once_per_critical_result(wiring: Any) -> None:
    asyncio.run(_clinical_scenario(*wiring))


async def _clinical_scenario(app: Any, sent: list[Any], components: Components) -> None:
    from streams.domain.normalise import normalise_event

    raw = next(
        r for r in simulate_labs(seed=6, count=40, now=NOW) if r["envelope"]["institution_id"] == "H001"
    )
    raw.update({"local_code": "K", "unit": "mmol/L", "value_numeric": 6.9})
    no_links: dict[str, str] = {}
    event = normalise_event(
        "lab", raw, components.reference, components.codes, components.identity, no_links.get, "H001", NOW
    )
    value = components.codecs.encode("lab", event.record)
    key = event.regional_patient_id.encode()
    agent = agent_named(app, "clinical")
    async with agent.test_context() as context:
        await put_on(context, "norm.lab", key, value, 0)
        await put_on(context, "norm.lab", key, value, 1)  # redelivered: no second alert
        await wait_until(lambda: any(topic == "alerts.critical" for topic, _, _ in sent))
        await asyncio.sleep(0.3)
    alerts = [components.codecs.decoders["alert"](v) for topic, _, v in sent if topic == "alerts.critical"]
    assert len(alerts) == 1
    (alert,) = alerts
    assert (alert["loinc_code"], alert["limit_kind"], alert["value"]) == ("2823-3", "HIGH", 6.9)
    assert alert["regional_patient_id"] == event.regional_patient_id
    assert [k for topic, k, _ in sent if topic == "alerts.critical"] == [key]


@pytest.mark.parametrize(
    ("roles", "agents", "app_id"),
    [
        (("normaliser", "clinical", "store"), {"normaliser", "clinical"}, "agents-test"),
        (("store",), set(), "agents-test-store"),
        (("normaliser", "clinical"), {"normaliser", "clinical"}, "agents-test-clinical-normaliser"),
    ],
)
def test_a_worker_runs_the_stages_it_is_given_as_its_own_app(
    tmp_path: Any, roles: tuple[str, ...], agents: set[str], app_id: str
) -> None:
    components = make_components(ConfluentRegistry({"url": "mock://roles"}))
    app = app_for(tmp_path, components, roles=roles)
    assert {name.rsplit(".", 1)[-1].removesuffix("_agent") for name in app.agents} == agents
    assert app.conf.id == app_id  # one consumer group (and table namespace) per stage set
    assert isinstance(app.tables, PromptTableManager)  # no 1 s wait before the consumer subscribes
    assert app.conf.broker_heartbeat_interval == 1.0  # a rebalance seen within a second
    # the store stage is neither an agent nor an @app.task (started after Faust's recovery): a job started
    # with the app, its first child service
    early = [child.name for child in app._children if isinstance(child, EarlyJob)]
    assert early == ["registry", *(["store"] if "store" in roles else [])]  # the registry warmed up
    assert "store_stage" not in {task.__name__ for task in app._app_tasks}


def test_unknown_roles_are_refused(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="roles"):
        app_for(tmp_path, make_components(ConfluentRegistry({"url": "mock://roles"})), roles=("reporting",))


class RegistryDownForFirstRegistrations:
    """The real mock registry, refusing the first `failures` registrations as an unreachable one would."""

    def __init__(self, inner: ConfluentRegistry, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def register(self, subject: str, schema_text: str) -> int:
        if self.failures > 0:
            self.failures -= 1
            raise RegistryUnavailableError("registry unreachable", retry_after=0.0)
        return self.inner.register(subject, schema_text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_registry_outage_when_registering_an_output_schema_is_retried_not_escaped() -> None:
    """An exception escaping the handler would ack the batch unpublished; it must be retried instead."""
    registry = ConfluentRegistry({"url": "mock://agents-flaky"})
    components = make_components(
        RegistryDownForFirstRegistrations(registry, failures=2), retry_max_seconds=0.05
    )
    published: list[Output] = []

    async def publish(outputs: Sequence[Output]) -> None:
        published.extend(outputs)

    encode = make_encoder(registry, standard.load(standard.LAB_RESULT))
    record = simulate_labs(seed=9, count=1, now=NOW)[0]
    message = RawMessage(f"raw.{record['envelope']['institution_id']}.lab", 0, 0, b"k", encode(record), {})
    handler = NormaliserHandler(stage_of("normaliser", components, publish), {})

    asyncio.run(handler.handle([message]))

    assert [output.topic for output in published if output.topic == "norm.lab"] == ["norm.lab"]
    assert components.metrics.sink_retries.labels(reason="RegistryUnavailableError")._value.get() == 2


def test_handlers_refuse_components_without_what_their_stage_needs() -> None:
    bare = make_components(ConfluentRegistry({"url": "mock://bare"}))
    bare.identity, bare.sink = None, None
    with pytest.raises(ValueError, match="pseudonymisation key"):
        NormaliserHandler(stage_of("normaliser", bare, nowhere), links={})
    with pytest.raises(ValueError, match="database"):
        StoreHandler(stage_of("store", bare, nowhere))


async def nowhere(_outputs: Sequence[Output]) -> None:
    raise AssertionError("nothing is published")


def test_a_refused_workers_exit_deadline_fires_while_the_event_loop_is_blocked() -> None:
    """Faust's stop can block the loop on a thread join: the deadline must not need the loop."""
    exited: list[BaseException] = []
    refused = KafkaAuthorizationError("normaliser", "TOPIC_AUTHORIZATION_FAILED", topic="raw.H001.lab")

    async def blocked_stop() -> list[BaseException]:
        exit_deadline(refused, seconds=0.05, exit_now=exited.append)
        time.sleep(0.5)  # the loop's thread blocked, as in mode's ServiceThread.stop
        return list(exited)  # before the loop runs anything again

    assert asyncio.run(blocked_stop()) == [refused]

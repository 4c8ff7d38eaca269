"""Start-up without Faust's waits (streams/runtime/startup.py): the store stage runs from the app's start,
Faust's tables are registered without its 1 s wait, and a clean stop stops the early jobs first."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import faust
import pytest
from mode import Service

from streams.runtime.startup import (
    WORKER_GC_THRESHOLDS,
    EarlyJob,
    PromptTableManager,
    prompt_app,
    settle_worker_heap,
    start_early,
)


def memory_app(tmp_path: Any, app_class: Any = faust.App) -> Any:
    return app_class(
        "startup-test",
        store="memory://",
        TableManager=PromptTableManager,
        datadir=str(tmp_path),
        web_enabled=False,
        autodiscover=False,
    )


def test_the_table_manager_registers_the_tables_without_waiting(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tables = memory_app(tmp_path).tables
    assert isinstance(tables, PromptTableManager)
    done: list[str] = []

    async def never(_seconds: float) -> None:
        raise AssertionError("Faust's 1 s wait before registering the tables")

    async def update_channels() -> None:
        done.append("tables registered")

    async def recovery_start() -> None:
        done.append("recovery started")

    monkeypatch.setattr(tables, "sleep", never)
    monkeypatch.setattr(tables, "_update_channels", update_channels)
    monkeypatch.setattr(tables.recovery, "start", recovery_start)
    asyncio.run(tables.on_start())
    assert done == ["tables registered", "recovery started"]


def test_an_early_job_starts_with_its_app_before_the_apps_own_services_and_stops_with_it() -> None:
    events: list[str] = []

    class Later(Service):  # stands for Faust's boot services, added as the app starts
        async def on_start(self) -> None:
            events.append("app service started")

    class App(Service):
        def on_init_dependencies(self) -> list[Service]:
            return [Later()]

    async def job() -> None:
        events.append("job running")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("job cancelled")
            raise

    async def scenario() -> None:
        app = App()
        early = start_early(app, "store", job)
        assert isinstance(early, EarlyJob)
        assert early.shortlabel == "EarlyJob: store"
        await app.start()
        await asyncio.sleep(0.05)
        assert app._children[0] is early, "the first child: started before the app's own services"
        assert sorted(events) == ["app service started", "job running"]
        await app.stop()

    asyncio.run(scenario())
    assert events[-1] == "job cancelled"


def test_a_clean_stop_stops_the_early_jobs_while_faust_stops_not_after() -> None:
    events: list[str] = []

    class FaustLike(Service):
        async def on_stop(self) -> None:
            events.append("faust stop begins")
            await self.released.wait()  # Faust's stop takes seconds: tables closed, producer flushed
            events.append("faust stop ends")

    App = prompt_app(FaustLike)

    async def job() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            events.append("store left its group")
            app.released.set()  # only the early job's stop lets Faust's finish here
            raise

    async def scenario() -> None:
        nonlocal app
        app = App()
        app.released = asyncio.Event()
        start_early(app, "store", job)
        await app.start()
        await asyncio.sleep(0.01)
        await asyncio.wait_for(app.stop(), 5)

    app: Any = None
    asyncio.run(scenario())
    assert events == ["faust stop begins", "store left its group", "faust stop ends"]


def test_with_every_partition_paused_the_fetcher_looks_again_at_once_not_after_a_second() -> None:
    from streams.runtime.startup import PAUSED_POLL_SECONDS, _prompt_consumer

    slept: list[float] = []

    class FaustConsumer:  # the parts of faust.transport.consumer.Consumer the override uses
        flow_active = True
        active: set[str] = set()

        def __init__(self) -> None:
            self.app = type("App", (), {"client_only": False})()
            self.not_waiting_next_records = asyncio.Event()

        def _get_active_partitions(self) -> set[str]:
            return self.active

        async def sleep(self, seconds: float) -> None:
            slept.append(seconds)

        async def _wait_next_records(self, timeout: float) -> Any:
            return {"records": True}, self.active

    consumer = _prompt_consumer(FaustConsumer)()
    assert asyncio.run(consumer._wait_next_records(1.0)) == ({}, set())
    assert slept == [PAUSED_POLL_SECONDS] and PAUSED_POLL_SECONDS < 0.1
    consumer.active = {"norm.lab[0]"}
    assert asyncio.run(consumer._wait_next_records(1.0)) == ({"records": True}, {"norm.lab[0]"})
    assert slept == [PAUSED_POLL_SECONDS], "with partitions to fetch, Faust's own path"


def test_the_registry_is_asked_for_every_schema_while_faust_starts_and_a_refusal_ends_it() -> None:
    from core.contract import RECORD_SCHEMAS
    from schemas.wire import ConfluentRegistry
    from streams.runtime.startup import warm_registry

    registry = ConfluentRegistry({"url": "mock://warm-up"})
    names = list(RECORD_SCHEMAS.values())
    assert warm_registry(registry, names) == len(names)

    class Down:
        asked = 0

        def register(self, subject: str, text: str) -> int:
            self.asked += 1
            raise ConnectionError("registry not up yet")

        def schema_text(self, schema_id: int) -> str:
            raise AssertionError("not reached")

    down = Down()
    assert warm_registry(down, names) == 0
    assert down.asked == 1, "a registry that does not answer is asked again on first use, not now"


def test_both_consumers_heartbeat_every_second_so_a_worker_leaving_is_seen_soon(tmp_path: Any) -> None:
    from streams.runtime.startup import HEARTBEAT_SECONDS, heartbeat_seconds
    from streams.runtime.store_consumer import consumer_config

    assert heartbeat_seconds(45.0) == HEARTBEAT_SECONDS == 1.0
    assert heartbeat_seconds(1.5) == 0.5, "at most a third of the session"
    assert consumer_config({}, "g-sink", 1.0, 10.0)["heartbeat.interval.ms"] == 1000


def test_the_worker_heap_is_frozen_and_collected_at_the_workers_thresholds() -> None:
    before = gc.get_threshold()
    try:
        settle_worker_heap()
        assert gc.get_threshold() == WORKER_GC_THRESHOLDS
        assert WORKER_GC_THRESHOLDS[0] > before[0]  # the young generation collected less often
        assert gc.get_freeze_count() > 0  # what was made before is out of the scans
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)

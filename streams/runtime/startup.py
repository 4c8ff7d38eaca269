"""A worker that starts and stops without Faust's waits: a restarted worker processes again within
seconds of its start, and one stopped cleanly hands its partitions over at once. Static group
membership (membership.py) is the other half: the restarted worker takes its partitions back without
waiting for the dead one's session.

Where a restart's seconds went (tests/integration/test_kill_points.py prints them, run with -s):

- The store stage needs no table, but it waited for all of Faust's start-up: an `@app.task` starts
  only once Faust has joined its group, opened every table partition and finished its recovery
  (`App.on_started`), and only then did the store consumer begin to join its own group. `EarlyJob`
  runs a job from the app's start on (the app's first child service), beside Faust's start-up.
- Faust's TableManager sleeps 1 s at its start, before the consumer may subscribe, so that agents
  starting meanwhile can still declare tables. This app declares every table in `create_app`, before
  the worker starts: `PromptTableManager` registers them at once.
- Faust's RocksDB store runs a full `gc.collect()` for each table at every rebalance (and again at
  stop), ~0.2 s each over the worker's heap: 1 s of a restart. The command freezes what it built
  before the worker starts (`gc.freeze`: modules, the app, reference data, all kept for the worker's
  life), so those collections scan only what came after. Opening the table partitions' databases on
  threads instead did not help: 15 opens took 0.3-0.45 s in turn and no less on threads (the GIL).
- Faust's aiokafka consumer long-polls with `fetch_max_wait_ms=1500` (hard-coded), and aiokafka sends
  a node no new fetch while one is in flight: partitions resumed after the recovery (or a rebalance)
  waited up to 1.5 s for the long-poll of the changelog partitions to end. `FETCH_MAX_WAIT_MS` (25 ms).

- With every partition paused (the recovery, a rebalance), Faust's fetcher sleeps 1 s before it looks
  again: the streams' first events after the recovery waited up to 1 s more (`prompt_app`'s consumer).

- The registry: each stage asked for its schemas' ids at its first batch. `warm_registry` asks for
  them while Faust starts.

On a clean stop, `prompt_app` stops the early jobs alongside Faust's own stop, not after it: the
store consumer leaves its group (membership.leave_and_close) at once instead of after the seconds
Faust's stop takes (its tables closed, its producer flushed). A job stopped mid-batch has marked
nothing of that batch, which the partitions' next owner reads again and stores once.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from faust.tables import TableManager
from mode import Service

from schemas import standard
from schemas.wire import SchemaRegistry

log = logging.getLogger("clinhub.streams.startup")

# Fetches of the worker's consumers (Faust's and the store's): the broker answers once it has
# FETCH_MIN_BYTES for the fetch or after FETCH_MAX_WAIT_MS, so a consumer fetches at most ~40 times a
# second whatever the load, and an event waits at most 25 ms in the broker per stage (also a partition
# resumed while a fetch is in flight). With the default of 1 byte every arriving event ended a fetch at
# once: at 100 events/s the consumers sent the broker hundreds of fetches a second, each listing all
# their partitions, and broker and workers spent most of their CPU on them.
FETCH_MAX_WAIT_MS = 25
FETCH_MIN_BYTES = 1 << 20
# How often the fetcher looks again while every partition is paused (Faust: every second)
PAUSED_POLL_SECONDS = 0.02
# How often both consumers of a worker heartbeat (at most a third of the session): a member learns of a
# rebalance (another worker leaving or joining) only with its next heartbeat, so a cleanly stopped
# worker's partitions waited up to 3 s (the previous interval) for the others to rejoin.
HEARTBEAT_SECONDS = 1.0


# The worker's collector thresholds (Python's: 700, 10, 10), set once the start-up is frozen: a worker
# allocates and frees a few thousand objects per event, nearly all freed by their reference counts, and
# at the default the collector ran ~40 times a second, ~10% of the wall time of a one-process worker at
# 700 events/s (gc.callbacks); at these, 0.25%. Cycles still go, only later.
WORKER_GC_THRESHOLDS = (50_000, 20, 10)


def settle_worker_heap() -> None:
    """Everything made so far lives as long as the worker: out of the collector's scans (`gc.freeze`),
    so the full collections Faust's RocksDB store runs per table at each rebalance and at stop take
    milliseconds; and the collector runs at the worker's thresholds from now on."""
    gc.freeze()
    gc.set_threshold(*WORKER_GC_THRESHOLDS)


def heartbeat_seconds(session_timeout_seconds: float) -> float:
    return min(HEARTBEAT_SECONDS, session_timeout_seconds / 3)


class PromptTableManager(TableManager):
    """Faust's TableManager without the 1 s wait at its start (faust/tables/manager.py, pinned 0.15.3):
    the tables are all declared before the worker starts, so they are registered, and the consumer
    subscribes, at once."""

    async def on_start(self) -> None:
        if not self.should_stop:
            await self._update_channels()
            await self.recovery.start()


class EarlyJob(Service):
    """Runs `job` from the moment its app starts, not once Faust's recovery is done as an `@app.task`;
    stopped with the app (or first, by `prompt_app`)."""

    def __init__(self, name: str, job: Callable[[], Awaitable[None]]) -> None:
        super().__init__()
        self.name = name
        self._job = job

    @property
    def shortlabel(self) -> str:
        return f"EarlyJob: {self.name}"

    async def on_start(self) -> None:
        self.add_future(self._job())


def warm_registry(registry: SchemaRegistry, schema_names: Iterable[str]) -> int:
    """Look up each standard schema's id and its text by id, so that the stages' first batch finds
    them in the registry client's cache instead of asking the registry then, one schema at a time
    (0.1-0.4 s of a restarted worker's first alert). Run on a thread while Faust starts; returns how
    many were found. A registry that does not answer now is asked again on first use, as before."""
    found = 0
    for name in schema_names:
        schema = standard.load(name)
        try:
            registry.schema_text(registry.register(schema.subject, schema.text))
        except Exception as exc:  # noqa: BLE001 - an optimisation only: the first use asks again
            log.info("schema registry not warmed up (%s): %r", schema.subject, exc)
            break
        found += 1
    return found


def start_early(app: Any, name: str, job: Callable[[], Awaitable[None]]) -> EarlyJob:
    """Run `job` from the app's start on: the app's first child service (mode starts its children in
    the order they were added, before those of Faust's boot strategy, which the app adds as it starts)."""
    early = EarlyJob(name, job)
    app.add_dependency(early)
    return early


def prompt_app(app_class: Any) -> Any:
    """A Faust App class that stops its early jobs as its own stop begins, alongside Faust's stop, and
    whose consumer does not sleep a second when it finds every partition paused (`_prompt_consumer`)."""

    class PromptApp(app_class):
        def _new_transport(self) -> Any:
            transport = super()._new_transport()
            transport.Consumer = _prompt_consumer(transport.Consumer)
            return transport

        async def on_stop(self) -> None:
            early = [child for child in self._children if isinstance(child, EarlyJob)]
            leaving = asyncio.gather(*(job.stop() for job in early), return_exceptions=True)  # begins now
            try:
                await super().on_stop()
            finally:
                for job, result in zip(early, await leaving, strict=True):
                    if isinstance(result, Exception):
                        log.warning("stopping %s failed: %r", job.shortlabel, result)

    return PromptApp


def _prompt_consumer(consumer_class: Any) -> Any:
    class PromptConsumer(consumer_class):
        async def _wait_next_records(self, timeout: float) -> Any:
            """Faust's fetcher asks for records here (faust/transport/consumer.py, pinned 0.15.3); with
            every partition paused (the table recovery, a rebalance) it sleeps 1 s, which partitions
            resumed meanwhile wait out: the streams' first events after each recovery waited up to 1 s.
            Here it looks again after `PAUSED_POLL_SECONDS`."""
            if self.flow_active and not self.app.client_only:
                active = self._get_active_partitions()
                if not active:
                    self.not_waiting_next_records.set()
                    await self.sleep(PAUSED_POLL_SECONDS)
                    return {}, active
            return await super()._wait_next_records(timeout)

    return PromptConsumer

"""The worker's periodic jobs, each a named unit with one `tick()`, testable without Faust.

`streams/runtime/app.py` runs each on its interval. A look-up the broker cannot answer now
(`KafkaException`) is tried again at the next tick; a refusal of the principal (`KafkaAccessError`)
and any other error propagate.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any

from core.contract import TopicNames
from core.kafka_errors import ClientErrors
from streams.metrics import StreamMetrics
from streams.runtime.lag import LagReport, lag_by_topic
from streams.runtime.stalls import GroupPositions, StallDetector, TopicPartition, reread_from_committed
from streams.runtime.tables import murmur2_partition
from streams.runtime.topics import authenticates, discover_raw_topics, subscribe_more

log = logging.getLogger("clinhub.streams.timers")


def _unavailable() -> tuple[type[BaseException], ...]:
    from confluent_kafka import KafkaException

    return (KafkaException,)


class RawTopicWatch:
    """Raw topics created after start-up (a new institution, a new kind) join the normaliser's
    subscription; `raw_names` is the live list of the topics it reads."""

    def __init__(
        self,
        app: Any,
        client_config: Mapping[str, Any],
        topics: TopicNames,
        raw_names: list[str],
        settle_seconds: float,
    ) -> None:
        self.app = app
        self.client_config = client_config
        self.topics = topics
        self.raw_names = raw_names
        self.settle_seconds = settle_seconds

    async def tick(self) -> None:
        try:
            found = await asyncio.to_thread(discover_raw_topics, self.client_config, self.topics)
        except _unavailable() as exc:
            log.warning("could not list raw topics: %s", exc)
            return
        new = sorted(set(found) - set(self.raw_names))
        if new and subscribe_more(self.app, self.raw_names[0], new, settle_seconds=self.settle_seconds):
            log.warning("raw topics %s appeared after start-up; subscribing to them", ", ".join(new))
            self.raw_names.extend(new)


class AccessWatch:
    """The worker's principal still gets in: a new connection each tick, since Kafka never asks an open
    one again, so deleted or changed credentials would show only whenever a client reconnects.

    `errors` is the worker's one record of refusals, which its other clients report to as well; once a
    refusal counts (authentication refused for its patience, or an authorisation refusal), the tick
    raises it and the worker stops (streams/runtime/app.py).
    """

    def __init__(
        self,
        client_config: Mapping[str, Any],
        errors: ClientErrors,
        probe: Callable[[Mapping[str, Any], ClientErrors], bool] = authenticates,
    ) -> None:
        self.client_config = client_config
        self.errors = errors
        self.probe = probe

    async def tick(self) -> None:
        # False: no answer this time (an outage, or refusals that do not count yet), asked again next tick
        await asyncio.to_thread(self.probe, self.client_config, self.errors)
        self.errors.raise_if_refused()


class StoreLagWatch:
    """The store stage's lag per topic, from its own group's committed offsets."""

    def __init__(
        self,
        assignment: Callable[[], Awaitable[list[TopicPartition]]],
        positions: GroupPositions,
        report: LagReport,
    ) -> None:
        self.assignment = assignment
        self.positions = positions
        self.report = report

    async def tick(self) -> None:
        try:
            owned = await self.assignment()
            committed, ends = await asyncio.to_thread(self.positions.read, owned) if owned else ({}, {})
        except _unavailable() as exc:
            log.warning("could not read the store group's positions: %s", exc)
            return
        self.report.update(lag_by_topic(committed, ends))


class StallWatch:
    """Faust can stop delivering a partition after a rebalance; read it again (streams/runtime/stalls.py).
    The same reading gives the Faust stages' lag.

    `stage_topics` gives, per Faust stage, the topics it reads now (the normaliser's grow with new raw
    topics); `in_flight` when each stage's current batch started.
    """

    def __init__(
        self,
        app: Any,
        positions: GroupPositions,
        stage_topics: Callable[[], Mapping[str, Collection[str]]],
        in_flight: Mapping[str, float],
        metrics: StreamMetrics,
        patience: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.app = app
        self.clock = clock
        self.positions = positions
        self.stage_topics = stage_topics
        self.in_flight = in_flight
        self.metrics = metrics
        self.detector = StallDetector(patience=patience)
        self.reports: dict[str, LagReport] = {}
        self._previous: dict[TopicPartition, int] = {}  # committed offsets at the last tick
        self._event_ends: dict[tuple[TopicPartition, int, int], int] = {}  # (tp, committed, end) -> end

    async def _event_end(self, tp: TopicPartition, committed: int, end: int) -> int:
        """Where the partition's events end, for a partition whose commit has not moved since the last
        tick: `committed` when only transaction markers or aborted records follow it (nothing waits,
        and the commit can never reach the end), else `end`. Read once per position."""
        key = (tp, committed, end)
        if key not in self._event_ends:
            first = await asyncio.to_thread(self.positions.first_record_offset, tp[0], tp[1], committed)
            if len(self._event_ends) > 10_000:
                self._event_ends.clear()
            self._event_ends[key] = committed if first is None or first >= end else end
        return self._event_ends[key]

    async def tick(self) -> None:
        app = self.app
        if app.rebalancing or app.in_recovery:
            return
        stage_topics = self.stage_topics()
        sources = set().union(*stage_topics.values()) if stage_topics else set()
        assigned = sorted((tp.topic, tp.partition) for tp in app.consumer.assignment() if tp.topic in sources)
        try:
            committed, ends = await asyncio.to_thread(self.positions.read, assigned) if assigned else ({}, {})
        except _unavailable() as exc:
            log.warning("could not read the group's positions: %s", exc)
            return
        previous, self._previous = self._previous, dict(committed)
        try:
            for tp, end in ends.items():
                if committed.get(tp, 0) < end and previous.get(tp) == committed.get(tp):
                    ends[tp] = await self._event_end(tp, committed[tp], end)
        except _unavailable() as exc:
            log.warning("could not read past the group's committed offsets: %s", exc)
            return
        lag = lag_by_topic(committed, ends)
        for stage, topics in stage_topics.items():
            if stage not in self.reports:
                self.reports[stage] = LagReport(self.metrics.consumer_lag, stage)
            self.reports[stage].update(lag, topics)
        busy_since = min(self.in_flight.values(), default=None)
        for topic, partition in self.detector.observe(self.clock(), committed, ends, busy_since):
            await self._reread(topic, partition, committed[(topic, partition)], ends[(topic, partition)])

    async def _reread(self, topic: str, partition: int, offset: int, end: int) -> None:
        log.warning(
            "%s[%d] committed %d of %d and has not moved for %.0fs with nothing in flight: "
            "reading it again from %d (faust-streaming #596)",
            topic,
            partition,
            offset,
            end,
            self.detector.patience,
            offset,
        )
        self.metrics.stalls_reread.labels(topic=topic).inc()
        await reread_from_committed(self.app.consumer, topic, partition, offset)


def stage_topic_sets(
    roles: Collection[str], raw_names: Sequence[str], clinical_topics: Sequence[str]
) -> Callable[[], dict[str, set[str]]]:
    """The Faust stages' topics as the stall watch asks for them, now (raw topics grow)."""

    def current() -> dict[str, set[str]]:
        return {
            "normaliser": set(raw_names) if "normaliser" in roles else set(),
            "clinical": set(clinical_topics) if "clinical" in roles else set(),
        }

    return current


class KeyCursor:
    """A table's keys in bounded slices, resuming after the last key handed out; a slice shorter than
    asked ends a pass over the table, and the next slice starts a new one.

    Only keys of the changelog partitions this worker owns now: a key of another worker's partition is
    never handed out (its delete would tombstone that worker's state). On Faust's RocksDB store, one
    seek per partition and slice (key order within a partition, partitions in order); on other tables
    (the memory store, plain dicts in tests) a sorted list of the keys at each slice.
    """

    def __init__(self, table: Any) -> None:
        self.table = table
        self.partition: int | None = None  # RocksDB: the partition and last key handed out
        self.after: Any = None  # bytes on RocksDB, str elsewhere

    def _active_partitions(self) -> set[int] | None:
        """The changelog partitions this worker owns, or None for a table that is not Faust's."""
        app = getattr(self.table, "app", None)
        topic = getattr(self.table, "changelog_topic_name", None)
        if app is None or topic is None:
            return None
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}

    def _partition_of(self, key: str) -> int:
        raw = key.encode()
        own = getattr(self.table, "changelog_partition", None)
        partition = own(raw) if own is not None else None
        if partition is None:
            partition = murmur2_partition(raw, self.table.partitions or self.table.app.conf.topic_partitions)
        return int(partition)

    def next_slice(self, limit: int) -> list[str]:
        store = getattr(self.table, "data", None)
        if getattr(store, "_dbs", None) is not None and getattr(store, "use_rocksdict", False):
            return self._rocksdb_slice(store, limit)
        return self._sorted_slice(limit)

    def _sorted_slice(self, limit: int) -> list[str]:
        active = self._active_partitions()
        keys = sorted(
            str(key)
            for key in list(self.table.keys())
            if active is None or self._partition_of(str(key)) in active
        )
        start = 0 if self.after is None else bisect.bisect_right(keys, self.after)
        chunk = keys[start : start + limit]
        self.after = chunk[-1] if len(chunk) == limit else None
        return chunk

    def _rocksdb_slice(self, store: Any, limit: int) -> list[str]:
        active = self._active_partitions() or set()
        dbs = {partition: db for partition, db in list(store._dbs.items()) if partition in active}
        keys: list[bytes] = []
        for partition in sorted(dbs):
            if self.partition is not None and partition < self.partition:
                continue
            after = self.after if partition == self.partition else None
            found = _keys_after(dbs[partition], after, limit - len(keys), store.offset_key)
            keys += found
            if len(keys) >= limit:
                self.partition, self.after = partition, found[-1]
                return [key.decode() for key in keys]
        self.partition, self.after = None, None  # a pass ends
        return [key.decode() for key in keys]


def _keys_after(db: Any, after: bytes | None, limit: int, skip: bytes) -> list[bytes]:
    """Up to `limit` keys of one rocksdict database after `after` (from the first when None)."""
    found: list[bytes] = []
    iterator = db.iter()
    try:
        if after is None:
            iterator.seek_to_first()
        else:
            iterator.seek(after)
        while iterator.valid() and len(found) < limit:
            key = iterator.key()
            if key != after and key != skip:
                found.append(key)
            iterator.next()
    finally:
        del iterator
    return found


class StateExpiryWatch:
    """Per tick, at most `keys_per_tick` keys of each table judged by `expire(table, keys)` (which
    deletes those that can no longer matter and returns how many), resuming where the last tick left
    off, so a tick never holds the event loop for long. Counted in clinhub_state_expired_total{table}.
    Not while the worker rebalances or recovers its tables (keys move between workers then)."""

    def __init__(
        self,
        app: Any,
        tables: Mapping[str, Any],
        expire: Callable[[str, Sequence[str]], int],
        metrics: StreamMetrics,
        keys_per_tick: int,
    ) -> None:
        self.app = app
        self.cursors = {name: KeyCursor(table) for name, table in tables.items() if table is not None}
        self.expire = expire
        self.metrics = metrics
        self.keys_per_tick = keys_per_tick

    async def tick(self) -> None:
        self.sweep()

    def sweep(self) -> int:
        """One tick's work, synchronous (no await: each key is judged and deleted in one go); how many
        entries it deleted."""
        app = self.app
        if app.rebalancing or app.in_recovery:
            return 0
        total = 0
        for name, cursor in self.cursors.items():
            keys = cursor.next_slice(self.keys_per_tick)
            expired = self.expire(name, keys) if keys else 0
            if expired:
                self.metrics.state_expired.labels(table=name).inc(expired)
                total += expired
        if total:
            log.info("expired %d state entries no longer needed", total)
        return total

"""A watchdog for partitions Faust stops processing after a rebalance.

faust-streaming 0.15.3 can leave a partition behind after a rebalance (issues #596, #175/#640 and
our own rebalance fault test): Faust resumes fetching stream partitions before it seeks them to the
committed offset and clears the agents' queues afterwards, so some fetched events are never
delivered in that generation; or the seek moves its record of the committed offset backwards, after
which its gap check refuses every later commit. Either way the group's committed offset stops while
events wait behind it, and nothing is logged.

The watchdog compares, per assigned partition, the group's committed offset with the end of the
partition. A partition whose commit has not moved for `patience` seconds while events wait, and
while no batch has been in flight for that long (a slow or unavailable store is not a stall), is
read again from its committed offset. Re-reading is safe: every output and the store are
idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.kafka_errors import refusal_in
from streams.runtime.membership import claim_instance_id, leave_on_close
from streams.runtime.startup import FETCH_MAX_WAIT_MS, FETCH_MIN_BYTES

log = logging.getLogger("clinhub.streams.runtime.stalls")

TopicPartition = tuple[str, int]
# (topic, partition, start) -> offset of the first record a read-committed reader gets at or after
# start, None when the partition ends first (GroupPositions.first_record_offset)
FirstRecordOffset = Callable[[str, int, int], "int | None"]


@dataclass
class StallDetector:
    """Decides which partitions are stalled; no I/O, so it is tested with plain numbers."""

    patience: float
    _since: dict[TopicPartition, tuple[int, float]] = field(default_factory=dict)  # committed, since when

    def observe(
        self,
        now: float,
        committed: Mapping[TopicPartition, int],
        ends: Mapping[TopicPartition, int],
        busy_since: float | None,
    ) -> list[TopicPartition]:
        """Partitions to read again. `busy_since`: start of the oldest batch in flight, None when idle."""
        stalled = []
        for tp, end in ends.items():
            offset = committed.get(tp, 0)
            previous = self._since.get(tp)
            if offset >= end:
                self._since.pop(tp, None)
                continue
            if previous is None or previous[0] != offset:
                self._since[tp] = (offset, now)
                continue
            waited = now - previous[1]
            long_batch = busy_since is not None and now - busy_since >= self.patience
            if waited >= self.patience and not long_batch:
                stalled.append(tp)
                self._since[tp] = (offset, now)  # give the re-read a full patience to show progress
        for tp in set(self._since) - set(ends):
            del self._since[tp]  # no longer assigned here
        return stalled


class GroupPositions:
    """Reads a group's committed offsets and the partitions' ends, as the broker sees them (blocking).

    One probe consumer in the watched group for the worker's life. It never subscribes, so it never
    joins the group; it only fetches the group's committed offsets and the partitions' watermarks.
    Not the admin client: its offset listing hit a librdkafka assertion
    (`rd_kafka_enq_once_del_source_return`; the process aborted) when the broker came back from a
    restart while a request waited.
    """

    def __init__(self, client_config: Mapping[str, Any], group: str) -> None:
        self.client_config = dict(client_config)
        self.group = group
        self._probe: Any = None
        self._lock = threading.Lock()  # close() never runs under a read in another thread

    def _consumer(self) -> Any:
        from confluent_kafka import Consumer

        if self._probe is None:
            self._probe = Consumer(
                {
                    **self.client_config,
                    "group.id": self.group,
                    "enable.auto.commit": False,
                    "isolation.level": "read_committed",
                    "enable.partition.eof": True,
                }
            )
        return self._probe

    def first_record_offset(
        self, topic: str, partition: int, start: int, timeout: float = 10.0
    ) -> int | None:
        """The offset of the first record at or after `start` that a read-committed reader gets; None
        when the partition ends first. Offsets it skips hold no event: transaction markers and the
        records of aborted transactions. Raises KafkaException when the broker does not answer."""
        from confluent_kafka import KafkaError, KafkaException
        from confluent_kafka import TopicPartition as KafkaTopicPartition

        with self._lock:
            probe = self._consumer()
            probe.assign([KafkaTopicPartition(topic, partition, start)])
            try:
                deadline = time.monotonic() + timeout
                while (left := deadline - time.monotonic()) > 0:
                    message = probe.poll(min(1.0, left))
                    if message is None:
                        continue
                    error = message.error()
                    if error is None:
                        return int(message.offset())
                    if error.code() == KafkaError._PARTITION_EOF:
                        return None
                    raise KafkaException(error)
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"reading {topic}[{partition}]"))
            finally:
                probe.unassign()

    def read(
        self, partitions: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        """Committed offsets and ends; KafkaException when the broker does not answer, the typed
        refusal (KafkaAccessError) when it refuses the principal the group or a topic."""
        from confluent_kafka import KafkaException

        try:
            return self._read(partitions)
        except KafkaException as exc:
            refused = refusal_in(exc, self.client_config.get("sasl.username"), group=self.group)
            if refused is not None:
                raise refused from exc
            raise

    def _read(
        self, partitions: list[TopicPartition]
    ) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
        from confluent_kafka import TopicPartition as KafkaTopicPartition

        with self._lock:
            self._consumer()
            wanted = [KafkaTopicPartition(topic, partition) for topic, partition in partitions]
            committed = {
                (tp.topic, tp.partition): tp.offset for tp in self._probe.committed(wanted, timeout=15)
            }
            ends = {}
            for topic, partition in partitions:
                low, high = self._probe.get_watermark_offsets(
                    KafkaTopicPartition(topic, partition), timeout=15
                )
                ends[(topic, partition)] = high
                # never committed: the group starts at the earliest offset still there
                if committed.get((topic, partition), -1) < 0:
                    committed[(topic, partition)] = low
            return committed, ends

    def close(self) -> None:
        with self._lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None


def group_positions(
    client_config: Mapping[str, Any], group: str, partitions: list[TopicPartition]
) -> tuple[dict[TopicPartition, int], dict[TopicPartition, int]]:
    """One reading of `GroupPositions`, for callers that look once."""
    positions = GroupPositions(client_config, group)
    try:
        return positions.read(partitions)
    finally:
        positions.close()


async def reread_from_committed(consumer: Any, topic: str, partition: int, committed: int) -> None:
    """Forget Faust's acks and gaps of one partition and fetch it again from `committed`.

    Faust keeps this bookkeeping privately (faust/transport/consumer.py, pinned 0.15.3): acked
    offsets and gaps above the commit, and its own record of the committed offset, which its gap
    check compares with every later ack. `Consumer.seek` then resets the fetch and read positions.
    """
    from faust.types import TP

    tp = TP(topic, partition)
    kept = [offset for offset in consumer._acked.get(tp, []) if offset >= committed]
    consumer._acked[tp] = kept
    consumer._acked_index[tp] = set(kept)
    consumer._gap.pop(tp, None)
    consumer._committed_offset[tp] = committed
    await consumer.seek(tp, committed)


def skips_the_committed_offset(acked: list[int], committed: int | None) -> bool:
    """Would committing the acked offsets pass a message that was never acked?

    `committed` is the next offset to read (None: the group never committed, so the partition starts
    at 0 on the hub's topics). Faust's own check (`min(acked) - committed > 1`, skipped when committed
    is 0 or None) lets exactly one missing message through: the message at the committed offset
    itself, dropped after a rebalance, was committed past (seen as 2090 of 2091 events stored).
    """
    return bool(acked) and min(acked) > (committed or 0)


class SkippedOffsets:
    """Verdicts on offsets below the first acknowledged one: events Faust dropped (never commit past
    them), or offsets that hold no event, transaction markers and aborted records (commit past them).

    The raw topics carry transactions (a FHIR transaction Bundle is one), so a commit marker follows each;
    after a restart or a rebalance the committed offset can even point at one. Faust's fetch loop cannot
    tell the two apart, so each is checked once by reading committed from the first unacknowledged
    offset: in a thread, as commits are synchronous; until the verdict arrives the commit waits.
    """

    def __init__(self, first_record_offset: FirstRecordOffset | None) -> None:
        self._first_record_offset = first_record_offset
        self._verdicts: dict[tuple[str, int, int, int], bool] = {}
        self._checking: set[tuple[str, int, int, int]] = set()

    def hold_no_event(self, topic: str, partition: int, start: int, end: int) -> bool | None:
        """True when offsets start..end-1 hold no event, False when they hold some (dropped), None
        while unknown (a check is started)."""
        key = (topic, partition, start, end)
        if key in self._verdicts:
            return self._verdicts[key]
        if self._first_record_offset is None:
            return False
        if key not in self._checking:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return None
            self._checking.add(key)
            future = loop.run_in_executor(None, self._first_record_offset, topic, partition, start)
            future.add_done_callback(lambda done: self._checked(key, done))
        return None

    def _checked(self, key: tuple[str, int, int, int], done: asyncio.Future[int | None]) -> None:
        from confluent_kafka import KafkaException

        self._checking.discard(key)
        try:
            first = done.result()
        except KafkaException as exc:  # the broker did not answer: asked again at the next commit
            log.warning("%s[%d]: could not read offsets %d..%d: %s", key[0], key[1], key[2], key[3], exc)
            return
        if len(self._verdicts) > 10_000:
            self._verdicts.clear()
        self._verdicts[key] = first is not None and first >= key[3]


def contiguous_offsets_app(app_class: Any, first_record_offset: FirstRecordOffset | None = None) -> Any:
    """A Faust App class whose consumer never counts skipped offsets as processed unless they hold no
    event, and reads committed.

    Faust treats offsets its fetch loop jumped over as a "gap" and commits past them. A jump can be a
    transaction marker or an aborted transaction (the raw topics carry transactions), but it can also be
    events Faust dropped after a rebalance: committing past those would lose them for good (seen as an
    acknowledged event never stored). So Faust's gaps are ignored, and the commit never passes an
    unacknowledged offset at the committed position unless `first_record_offset` (a read-committed
    reader) shows that the offsets up to the first acknowledged one hold no event (`SkippedOffsets`).
    A real drop holds the commit there, and the stall watchdog reads the partition again.

    Read committed: aiokafka's isolation level, which Faust sets only for its exactly-once mode, is
    set on the worker's consumer before it starts (`_isolation_level`, aiokafka 0.14 pinned).

    A static member (the app's `consumer_group_instance_id`) claims its instance id on this host when
    its consumer is made, and leaves its group when it stops cleanly (streams/runtime/membership.py).
    """
    from faust.transport.drivers import aiokafka as faust_aiokafka

    class ReadCommittedThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            consumer._isolation_level = "read_committed"
            consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # not Faust's 1.5 s (startup.py)
            consumer._fetch_min_bytes = FETCH_MIN_BYTES
            if consumer._group_instance_id is not None:  # static member (`consumer_group_instance_id`)
                claim_instance_id(consumer._group_instance_id)  # refused if another live worker has it
            return consumer

        async def on_thread_stop(self) -> None:
            # Faust has committed; a static member then leaves explicitly, as aiokafka does not
            consumer = self._consumer
            if consumer is not None and consumer._coordinator is not None:
                leave_on_close(consumer._coordinator)
            await super().on_thread_stop()

    class ContiguousOffsetsConsumer(faust_aiokafka.Consumer):
        async def _add_gap(self, tp: Any, offset_from: int, offset_to: int) -> None:
            """Not recorded: `_new_offset` decides what the jump was."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._held: set[tuple[Any, int]] = set()  # holds already logged: once each, not every commit
            self._skipped = SkippedOffsets(first_record_offset)

        def _new_consumer_thread(self) -> Any:
            return ReadCommittedThread(self, loop=self.loop, beacon=self.beacon)

        def _new_offset(self, tp: Any) -> int | None:
            committed = self._committed_offset[tp] or 0
            acked = self._acked[tp]
            if skips_the_committed_offset(acked, committed):
                lowest = min(acked)
                verdict = self._skipped.hold_no_event(tp.topic, tp.partition, committed, lowest)
                if not verdict:
                    if verdict is False and (tp, committed) not in self._held:
                        self._held.add((tp, committed))
                        log.warning(
                            "%s[%d]: offsets %d..%d were never delivered; not committing past them",
                            tp.topic,
                            tp.partition,
                            committed,
                            lowest - 1,
                        )
                    return None
                no_event = [
                    offset for offset in range(committed, lowest) if offset not in self._acked_index[tp]
                ]
                acked.extend(no_event)  # markers and aborted records: nothing to process
                self._acked_index[tp].update(no_event)
                acked.sort()
            return super()._new_offset(tp)

    class HubApp(app_class):
        def _new_transport(self) -> Any:
            transport = super()._new_transport()
            transport.Consumer = ContiguousOffsetsConsumer
            return transport

    return HubApp

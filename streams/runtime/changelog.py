"""Table changelogs on the worker's librdkafka producer, confirmed before a batch is acked.

Faust sends each table write as a message of its own: a FutureMessage into its ProducerBuffer, a task
step to hand it to aiokafka, aiokafka's batching and future in Python, pure-Python murmur2 for its
partition, and a RocksDB write of the changelog offset when the broker has it; and the value is
serialised twice, for the local store and for the changelog. A clinical batch writes about three keys
per result, so under load the buffer (100 messages, Faust's `ProducerBuffer.max_messages`) held
hundreds of writes, and Faust's conductor logged "producer buffer full" and waited for it to drain
before it passed on the next message.

With a `ChangelogWriter` attached to the app (`attach_changelogs`), a `RawKeyTable` write serialises
key and value once, writes the local store and hands the record to librdkafka (`send`): one produce
call, in the partition Faust's producer would have chosen (`RawKeyTable.key_partition`). The changelog
means what it meant: same topic, keys, values and tombstones, so Faust's recovery, and the persisted
offsets RocksDB keeps per changelog partition (where recovery resumes), are unchanged. Those offsets are
written once per partition and confirmation, not once per record.

`confirm()` returns once the broker has every changelog record handed over before the call. The stage
runtime awaits it after a batch's handler and before it acks the batch (`stage.run_batches`), so no
offset is committed past a state change the changelog lacks (Faust guarantees the same by flushing its
producer before it commits). A record the broker did not take is sent again with its key's current
local value (or a tombstone), never the value that failed: a later write of the key may have been
confirmed meanwhile, and the older value sent after it would become the changelog's latest. The failure
is raised as a `ChangelogDeliveryError`, an unavailable service: the stage retries with back-off, its
batch unacknowledged; a refusal of the principal as the typed refusal (`KafkaAccessError`: the worker
stops). When partitions are revoked in a rebalance, the records in flight are waited for
(`drain`), as Faust flushes its producer there, so that the partitions' next owner recovers them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from faust.types import TP

from core.exceptions import KafkaAccessError
from core.kafka_errors import refusal
from streams.exceptions import ChangelogDeliveryError

log = logging.getLogger("clinhub.streams.runtime.changelog")

CHANGELOG_WRITER = "clinhub_changelog_writer"  # the app attribute a RawKeyTable finds its writer under
DRAIN_SECONDS = 10.0  # how long a revocation waits for the records in flight


class Produce(Protocol):
    """Hand one message to librdkafka (`KafkaOutputs.produce_nowait`); its report comes to `on_delivery`."""

    def __call__(
        self,
        topic: str,
        partition: int,
        key: bytes,
        value: bytes | None,
        on_delivery: Callable[[Any, Any], None],
    ) -> None: ...


class ChangelogTable(Protocol):
    """What the writer needs of a table (a RawKeyTable)."""

    @property
    def changelog_topic_name(self) -> str: ...

    @property
    def data(self) -> Any: ...  # the store: set_persisted_offset

    def changelog_value_now(self, key: bytes) -> bytes | None: ...


class _Round:
    """The records handed over between two confirmations, and a future for when the broker has them."""

    __slots__ = ("done", "loop", "pending", "writer")

    def __init__(self, writer: ChangelogWriter) -> None:
        self.writer = writer
        self.pending = 0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done: asyncio.Future[None] | None = None  # made when the round is closed with records pending

    def report(self, error: Any, message: Any) -> None:
        """librdkafka's delivery report, on the producer's poll thread."""
        writer = self.writer
        with writer.lock:
            where = (message.topic(), message.partition())
            if error is None:
                offset = message.offset()
                if offset > writer.delivered.get(where, -1):
                    writer.delivered[where] = offset
            else:
                writer.failed[(where[0], message.key())] = (where[1], str(error))
                writer.refused = writer.refused or refusal(error, writer.principal, where[0])
            self.pending -= 1
            finished = self.pending == 0 and self.done is not None
        if finished and self.loop is not None and self.done is not None:
            self.loop.call_soon_threadsafe(_resolve, self.done)


def _resolve(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


class ChangelogWriter:
    """Changelog records of the app's tables, through one librdkafka producer (see the module)."""

    def __init__(self, produce: Produce, principal: str | None = None) -> None:
        self._produce = produce
        self.principal = principal
        self.refused: KafkaAccessError | None = None  # the first refusal of the principal reported
        self.lock = threading.Lock()
        self.delivered: dict[tuple[str, int], int] = {}  # highest confirmed offset per changelog partition
        self.failed: dict[tuple[str, bytes], tuple[int, str]] = {}  # (topic, key) -> (partition, reason)
        self._tables: dict[str, ChangelogTable] = {}  # by changelog topic
        self._round = _Round(self)
        self._closed: list[_Round] = []  # rounds confirmed with records still pending

    def send(
        self, table: ChangelogTable, topic: str, partition: int, key: bytes, value: bytes | None
    ) -> None:
        """Hand one changelog record (`value` None: a tombstone) to the producer; `confirm` waits for it."""
        if topic not in self._tables:
            self._tables[topic] = table
        current = self._round
        with self.lock:
            current.pending += 1
        try:
            self._produce(topic, partition, key, value, current.report)
        except BaseException:
            with self.lock:
                current.pending -= 1
            raise

    async def confirm(self) -> None:
        """Return once the broker has every record sent before this call, their offsets persisted; raise
        `ChangelogDeliveryError` (after sending them again) when it refused or timed out some, or the
        typed refusal when it refused the principal."""
        await self._settled()
        with self.lock:
            delivered, self.delivered = self.delivered, {}
            failed, self.failed = self.failed, {}
            refused, self.refused = self.refused, None
        for (topic, partition), offset in delivered.items():
            self._tables[topic].data.set_persisted_offset(TP(topic, partition), offset)
        if not failed:
            return
        for (topic, key), (partition, _reason) in failed.items():
            table = self._tables[topic]
            self.send(table, topic, partition, key, table.changelog_value_now(key))
        if refused is not None:
            raise refused
        (topic, _key), (_partition, reason) = next(iter(failed.items()))
        raise ChangelogDeliveryError(topic, reason, len(failed))

    async def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait (at most `timeout`) for the records in flight; a failure is left for the next `confirm`."""
        try:
            async with asyncio.timeout(timeout):
                await self._settled()
        except TimeoutError:
            log.warning("changelog records still in flight after %.0fs at a rebalance", timeout)

    async def _settled(self) -> None:
        """Every round closed so far, and the one open now (closed here), fully reported."""
        loop = asyncio.get_running_loop()
        closing, self._round = self._round, _Round(self)
        with self.lock:
            if closing.pending:
                closing.loop = loop
                closing.done = loop.create_future()
                self._closed.append(closing)
        waiting = [round_.done for round_ in self._closed if round_.done is not None]
        if waiting:
            await asyncio.wait(waiting)  # never cancels them: another waiter may share a round
        self._closed = [
            round_ for round_ in self._closed if round_.done is not None and not round_.done.done()
        ]


def attach_changelogs(app: Any, produce: Produce, principal: str | None = None) -> ChangelogWriter:
    """Send the changelogs of the app's RawKeyTables through `produce` (see the module): the writer
    tables find on the app, and a wait for its records in flight when partitions are revoked."""
    writer = ChangelogWriter(produce, principal)
    setattr(app, CHANGELOG_WRITER, writer)

    async def drain(_app: Any, *_args: Any, **_kwargs: Any) -> None:
        await writer.drain()

    app.on_partitions_revoked.connect(drain)
    return writer


def changelog_writer(app: Any) -> ChangelogWriter | None:
    """The writer attached to the app, if any (without one, tables send through Faust's producer)."""
    writer = getattr(app, CHANGELOG_WRITER, None)
    return writer if isinstance(writer, ChangelogWriter) else None

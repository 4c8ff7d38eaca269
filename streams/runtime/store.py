"""The store stage's handler: decoded standard records in, one idempotent transaction per batch.

A record the database itself refuses is found by bisection and dead-lettered, its neighbours stored
(`sinks.base.write_records_isolating`); an unavailable database is waited for.

The store also reads the dead-letter topic (it keeps each dead letter, without its bytes). A dead letter
it cannot decode or store is never dead-lettered again: that would put it back on the topic the store
reads, for ever. It is logged, counted (`clinhub_stream_events{kind="deadletter",outcome="unstorable"}`)
and acknowledged with its batch; it stays on the dead-letter topic, where its position is in the log line.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from core.contract import DEADLETTER
from sinks.base import Sink, StoreRecord, StoreWriteResult, write_records_isolating
from streams.runtime.messages import RawMessage, Rejection, seconds_since_raw_event
from streams.runtime.stage import Stage, judge_each

log = logging.getLogger("clinhub.streams.store")

UNSTORABLE = "unstorable"


def store_topics(stage: Stage) -> list[str]:
    """Every topic whose records the store keeps."""
    return sorted(stage.topics.stored())


def end_to_end(
    stored: Sequence[RawMessage], records_of: Mapping[str, str], committed: dt.datetime
) -> list[tuple[str, float]]:
    """(kind, seconds) from the raw event's broker timestamp to `committed` for each stored message
    that carries it (what the hub derived from a raw event); others (acknowledgements, escalations,
    dead letters) have no raw event to measure from. A message read again after a crash counts again,
    from its raw event: the replay did keep its record from the store that long."""
    measured = []
    for message in stored:
        seconds = seconds_since_raw_event(message.headers, committed)
        if seconds is not None:
            measured.append((records_of[message.topic], seconds))
    return measured


class StoreHandler:
    def __init__(self, stage: Stage) -> None:
        if stage.components.sink is None:
            raise ValueError("the store stage needs a sink (the database)")
        self.stage = stage
        self.sink: Sink = stage.components.sink
        self.records_of = stage.topics.stored()
        self.deadletter_topic = stage.topics.deadletter_topic

    def _store(
        self, messages: list[RawMessage]
    ) -> tuple[list[RawMessage], StoreWriteResult, list[Rejection]]:
        """Write the batch; returns the messages whose records were stored, the result and the rejections."""

        def decode(message: RawMessage) -> dict[str, Any]:
            return self.stage.codecs.decode(self.records_of[message.topic], message.value)

        def process(message: RawMessage, record: dict[str, Any]) -> StoreRecord:
            return StoreRecord(self.records_of[message.topic], record)

        judged = judge_each(messages, decode, process)
        records = [record for _message, record in judged.results]
        result, refused = write_records_isolating(self.sink, records)
        rejections = judged.rejections
        refused_at = {index for index, _error in refused}
        stored = [message for index, (message, _) in enumerate(judged.results) if index not in refused_at]
        for index, error in refused:
            message, item = judged.results[index]
            envelope = item.record.get("envelope") or item.record
            rejections.append(
                Rejection(
                    message,
                    type(error).__name__,
                    None,
                    error.reason,
                    envelope.get("institution_id"),
                    envelope.get("correlation_id"),
                )
            )
        return stored, result, rejections

    async def handle(self, messages: list[RawMessage]) -> None:
        stage = self.stage

        async def store() -> tuple[list[RawMessage], StoreWriteResult, list[Rejection]]:
            return await asyncio.to_thread(self._store, messages)

        stored, result, rejections = await stage.attempt("store batch", store, messages)
        # Never a dead letter of a dead letter: it would come back to this stage on the topic it reads.
        unstorable = [r for r in rejections if r.message.topic == self.deadletter_topic]
        await stage.dead_letter([r for r in rejections if r.message.topic != self.deadletter_topic], "norm")
        self._unstorable(unstorable)
        for kind, seconds in end_to_end(stored, self.records_of, stage.clock()):
            stage.metrics.store_end_to_end_seconds.labels(kind=kind).observe(seconds)
        for kind, count in result.written.items():
            stage.metrics.events.labels(institution="*", kind=kind, outcome="stored").inc(count)
        for kind, count in result.unchanged.items():
            stage.metrics.events.labels(institution="*", kind=kind, outcome="unchanged").inc(count)

    def _unstorable(self, rejections: Sequence[Rejection]) -> None:
        """Dead letters the store cannot take: logged and counted, then acknowledged with their batch."""
        for rejection in rejections:
            message = rejection.message
            self.stage.metrics.events.labels(
                institution=rejection.institution_id or "?", kind=DEADLETTER.name, outcome=UNSTORABLE
            ).inc()
            log.error(
                "dead letter %s[%d]@%d not stored, and not dead-lettered again: %s: %s (%s); "
                "it stays on the dead-letter topic",
                message.topic,
                message.partition,
                message.offset,
                rejection.error_class,
                rejection.reason,
                rejection.field,
            )

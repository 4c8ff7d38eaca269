"""The store stage's handler: decoded standard records in, one idempotent transaction per batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from schemas.exceptions import RegistryUnavailableError, SchemaError
from sinks.base import StoreRecord, write_records_isolating
from streams.outputs import Publish
from streams.pipeline import RawMessage, Rejection
from streams.topics import KINDS, TopicNames

if TYPE_CHECKING:
    from streams.app import Components

log = logging.getLogger("clinhub.streams.store")


def kinds_by_topic(topics: TopicNames) -> dict[str, str]:
    mapping = {topics.norm(kind): kind for kind in KINDS}
    mapping.update(
        {
            topics.identity_topic: "identity",
            topics.alerts_topic: "alert",
            topics.escalations_topic: "escalation",
            topics.acks_topic: "ack",
        }
    )
    return mapping


def store_topics(topics: TopicNames) -> list[str]:
    """Every topic whose records the store keeps."""
    return sorted(kinds_by_topic(topics))


class StoreHandler:
    def __init__(self, components: Components, topics: TopicNames, publish: Publish) -> None:
        if components.sink is None:
            raise ValueError("the store stage needs a sink (the database)")
        self.c = components
        self.topics = topics
        self.publish = publish
        self.kinds = kinds_by_topic(topics)

    def _decode(
        self, messages: Sequence[RawMessage]
    ) -> tuple[list[StoreRecord], list[RawMessage], list[Rejection]]:
        records, sources, rejections = [], [], []
        for message in messages:
            kind = self.kinds[message.topic]
            try:
                records.append(StoreRecord(kind, self.c.decoders[kind](message.value)))
                sources.append(message)
            except RegistryUnavailableError:
                raise
            except SchemaError as exc:
                rejections.append(Rejection(message, type(exc).__name__, exc.field, exc.reason))
        return records, sources, rejections

    async def handle(self, messages: Sequence[RawMessage]) -> None:
        from streams.app import retrying, send_dead_letters

        c = self.c

        async def decode_and_store() -> Any:
            records, sources, rejections = await asyncio.to_thread(self._decode, messages)
            result, refused = await asyncio.to_thread(write_records_isolating, c.sink, records)
            for index, error in refused:
                record = records[index].record
                envelope = record.get("envelope") or {}
                rejections.append(
                    Rejection(
                        sources[index],
                        type(error).__name__,
                        None,
                        error.reason,
                        envelope.get("institution_id") or record.get("institution_id"),
                        envelope.get("correlation_id") or record.get("correlation_id"),
                    )
                )
            return records, result, rejections

        records, result, rejections = await retrying(
            "store batch", decode_and_store, c.metrics, c.retry_max_seconds
        )
        await retrying(
            "dead-letter refused records",
            lambda: send_dead_letters(rejections, c, self.topics, self.publish, "store", "norm"),
            c.metrics,
            c.retry_max_seconds,
        )
        committed = c.clock()
        for item in records:
            envelope = item.record.get("envelope")
            if envelope is not None:
                c.metrics.end_to_end_seconds.observe(
                    max(0.0, (committed - envelope["produced_time"]).total_seconds())
                )
        for kind, count in result.written.items():
            c.metrics.events.labels(institution="*", kind=kind, outcome="stored").inc(count)
        for kind, count in result.unchanged.items():
            c.metrics.events.labels(institution="*", kind=kind, outcome="unchanged").inc(count)

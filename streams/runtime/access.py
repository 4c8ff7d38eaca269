"""A worker that Kafka refuses while it runs stops with the typed refusal: the Faust side of it.

Once the principal's ACLs are gone, Faust's aiokafka consumer raises aiokafka's
`TopicAuthorizationFailedError` or `GroupAuthorizationFailedError` from its fetch, and Faust crashes
the worker with it, naming no principal. Here the fetch's error becomes the typed refusal
(`core.kafka_errors.refusal_in`), reported by `StageHealth.access_lost` (every stage down, one ERROR
line) before Faust crashes the worker with it. The librdkafka clients (outputs, the store consumer,
the group probes, the access watch) raise the typed refusal themselves; `reporting` reports it for a
timer, whose error Faust turns into a crash of the worker as well.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any

from core.exceptions import KafkaAccessError
from core.kafka_errors import refusal_in
from streams.runtime.stage import StageHealth


def refusals_reported_app(app_class: Any, principal: str | None, health: StageHealth) -> Any:
    """A Faust App class whose consumer's fetch raises the typed refusal instead of aiokafka's error."""

    class RefusalsReportedApp(app_class):
        def _new_transport(self) -> Any:
            transport = super()._new_transport()
            transport.Consumer = _refusals_reported_consumer(transport.Consumer, principal, health)
            return transport

    return RefusalsReportedApp


def _refusals_reported_consumer(consumer_class: Any, principal: str | None, health: StageHealth) -> Any:
    class RefusalsReportedConsumer(consumer_class):
        async def _getmany(self, active_partitions: Any, timeout: float) -> Any:
            """Faust's one call into aiokafka's fetch (faust/transport/consumer.py, pinned 0.15.3); the
            group coordinator's refusals reach it too."""
            try:
                return await super()._getmany(active_partitions, timeout)
            except Exception as exc:
                refused = refusal_in(exc, principal)
                if refused is None:
                    raise
                raise health.access_lost(refused) from exc

    return RefusalsReportedConsumer


def reporting(health: StageHealth, tick: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
    """`tick`, with a refusal it raises reported (`StageHealth.access_lost`) before it crashes the worker."""

    @functools.wraps(tick)
    async def run() -> None:
        try:
            await tick()
        except KafkaAccessError as exc:
            health.access_lost(exc)
            raise

    return run

"""Offered load for the benchmarks: simulated lab results, each institution's published as itself, sent on a
schedule (event i due at start + i/rate, `producers.pacing`) without waiting for each confirmation, all
confirmed at the end. A rate of 0 sends as fast as the client takes them."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from benchmarks.figures import retimed
from core.settings import HubSettings
from producers.publisher import Publisher, Receipt, make_publisher
from producers.simulator import simulate_labs

try:
    from producers.pacing import paced
except ImportError:  # until the SDK's pacing module is in every checkout: the same schedule

    def paced(  # type: ignore[misc]
        items: Iterable[Any],
        rate: float,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> Iterator[tuple[int, Any]]:
        start: float | None = None
        for index, item in enumerate(items):
            now = clock()
            start = now if start is None else start
            due = start + index / rate if rate else start
            if due > now:
                sleep(due - now)
            yield index, item


CHUNK = 500  # records simulated at a time: a long run is never all in memory


def lab_stream(seed: int, count: int, critical_share: float, patients: int) -> Iterator[dict[str, Any]]:
    """`count` simulated lab results, made `CHUNK` at a time, each chunk of its own seed (so its own
    event ids) and `patients` patients."""
    for start in range(0, count, CHUNK):
        yield from simulate_labs(
            seed * 1_000_003 + start, min(CHUNK, count - start), critical_share, patients=patients
        )


class Sender(Protocol):
    def send(self, record: Mapping[str, Any]) -> None: ...


@dataclass
class PublishRun:
    event_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0  # first send to last send


def publish_paced(
    sender: Sender,
    records: Iterable[Mapping[str, Any]],
    rate: float,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> PublishRun:
    """Each record sent when due, stamped with the time it is sent (event, produced and result time):
    a benchmark's events are recent, as live traffic is."""
    run = PublishRun()
    started = 0.0
    for index, record in paced(records, rate, clock=clock, sleep=sleep):
        if index == 0:
            started = clock()
        event = retimed(record, now())
        sender.send(event)
        run.event_ids.append(str(event["envelope"]["event_id"]))
    run.seconds = clock() - started if run.event_ids else 0.0
    return run


class LabSender:
    """Sends lab results as their institutions, waiting for no confirmation until `close` (which raises
    if any was not delivered): through the SDK's `Publisher.stream` where it has one, otherwise through
    the publisher's produce path (the same encoding, key, headers and delivery reports)."""

    def __init__(self, settings: HubSettings, delivery_timeout: float = 120.0) -> None:
        self._publishers: dict[str, Publisher] = {
            institution: make_publisher(settings, institution, delivery_timeout, kinds=("lab",))
            for institution in settings.stream.institutions
        }
        self._streams: dict[str, Any] = {
            institution: publisher.stream(max_in_flight=50_000)
            for institution, publisher in self._publishers.items()
            if hasattr(publisher, "stream")
        }
        self._results: dict[int, Any] = {}
        self._sent = 0

    def send(self, record: Mapping[str, Any]) -> None:
        institution = record["envelope"]["institution_id"]
        self._sent += 1
        if self._streams:
            self._streams[institution].send("lab", record)
            return
        publisher = self._publishers[institution]
        publisher._produce("lab", record, self._results, self._sent)  # type: ignore[arg-type]
        publisher._producer.poll(0)  # serve delivery reports as we go

    def close(self) -> None:
        failed: list[Any] = []
        confirmed = 0
        for stream in self._streams.values():
            outcome = stream.close()
            failed += outcome.failures
            confirmed += outcome.confirmed
        for publisher in self._publishers.values():
            publisher.close()
        if not self._streams:
            failed = [r for r in self._results.values() if not isinstance(r, Receipt)]
            confirmed = len(self._results) - len(failed)
        if failed or confirmed < self._sent:
            raise SystemExit(f"{self._sent - confirmed} of {self._sent} events undelivered: {failed[:1]}")

    def __enter__(self) -> LabSender:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

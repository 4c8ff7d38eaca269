"""Offered load for the benchmarks: simulated lab results, each institution's published as itself, sent on a
schedule (event i due at start + i/rate, `producers.pacing`) through the SDK's stream (no wait for each
confirmation), all confirmed at the end. A rate of 0 sends as fast as the client takes them."""

from __future__ import annotations

import datetime as dt
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from benchmarks.figures import retimed
from core.settings import HubSettings
from producers.pacing import paced
from producers.publisher import PublishStream, make_publisher
from producers.simulator import simulate_labs

CHUNK = 500  # records simulated at a time (each chunk of its own seed, so its own event ids)
POOL = 10_000  # records simulated before a run; a longer run sends variants of them


def variant(record: Mapping[str, Any], cycle: int, rng: random.Random) -> dict[str, Any]:
    """The record as another event of another patient (new event, correlation and result ids, the MRN
    of cycle `cycle`, no national id): simulating costs far more than sending, so a long run at a high
    rate reuses what was simulated beforehand, and its repeats are new results, never replays."""
    envelope = record["envelope"]
    copy = dict(record)
    copy["envelope"] = {
        **envelope,
        "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
        "correlation_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
    }
    copy["result_id"] = f"{record['result_id']}-{cycle}"
    copy["patient_mrn"] = f"{record['patient_mrn']}-{cycle}"
    copy["patient_national_id"] = None  # the regional patient is then the institution's MRN: new
    return copy


def lab_stream(seed: int, count: int, critical_share: float, patients: int) -> Iterator[dict[str, Any]]:
    """`count` simulated lab results. Up to `POOL` are simulated before the first is yielded (`patients`
    patients per `CHUNK`), so a paced run's schedule starts after that; later ones are variants."""
    pool: list[dict[str, Any]] = []
    simulated = min(count, POOL)
    for start in range(0, simulated, CHUNK):
        pool += simulate_labs(
            seed * 1_000_003 + start, min(CHUNK, simulated - start), critical_share, patients=patients
        )
    rng = random.Random(seed)
    for index in range(count):
        cycle, position = divmod(index, len(pool))
        yield pool[position] if cycle == 0 else variant(pool[position], cycle, rng)


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
    """Sends lab results as their institutions through the SDK's `Publisher.stream` (validated, encoded
    and queued; no wait per confirmation); `close` waits for every report and raises if any event was
    not delivered. Its publishers are connected when it is made: a publisher's first connection took
    a few hundred ms, and the events due meanwhile then went out in one burst (before, the first two
    seconds of a paced run at 1,000/s had p99 event->store 396 ms against 100-190 ms later)."""

    def __init__(self, settings: HubSettings, delivery_timeout: float = 120.0) -> None:
        self._publishers = {
            institution: make_publisher(settings, institution, delivery_timeout, kinds=("lab",))
            for institution in settings.stream.institutions
        }
        for publisher in self._publishers.values():  # before any schedule starts: no first-second burst
            publisher.connect()
        self._streams: dict[str, PublishStream] = {
            institution: publisher.stream(max_in_flight=50_000)
            for institution, publisher in self._publishers.items()
        }

    def send(self, record: Mapping[str, Any]) -> None:
        self._streams[record["envelope"]["institution_id"]].send("lab", record)

    def close(self) -> None:
        outcomes = [stream.close() for stream in self._streams.values()]
        for publisher in self._publishers.values():
            publisher.close()
        sent = sum(outcome.sent for outcome in outcomes)
        failed = [failure for outcome in outcomes for failure in outcome.failures]
        if not all(outcome.ok for outcome in outcomes):
            raise SystemExit(f"{len(failed)} of {sent} events undelivered: {failed[:1]}")

    def __enter__(self) -> LabSender:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

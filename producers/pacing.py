"""Pacing traffic at an offered rate: event i is due at start + i/rate, whatever happened before it.

Each wait is computed from the schedule, never from the previous event, so slow sends, short sleeps and
oversleeping do not accumulate: a sender that falls behind sends at once until it is due again, and the
achieved rate over a run is the offered one as long as the sender can keep up at all.

    for index, event in paced(events, rate=1000):
        stream.send(...)

or, for (kind, record) events, `publish_paced(events, send, rate)`, which also stamps each envelope's
`produced_time` as it publishes. The simulator (`clinhub simulate --rate`) and the benchmarks pace
with it.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Schedule:
    """When each event of a paced run is due. `rate` in events per second; 0 means as fast as possible."""

    start: float
    rate: float

    def __post_init__(self) -> None:
        if self.rate < 0:
            raise ValueError(f"rate must be 0 (unpaced) or positive, not {self.rate}")

    def due(self, index: int) -> float:
        """The clock reading at which event `index` (from 0) is due."""
        return self.start if self.rate == 0 else self.start + index / self.rate

    def wait(self, index: int, now: float) -> float:
        """Seconds to wait before sending event `index` at clock reading `now`; 0 when due or late."""
        return max(0.0, self.due(index) - now)


def paced(
    items: Iterable[T],
    rate: float,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[tuple[int, T]]:
    """Yield (index, item), each no earlier than its due time on a schedule starting at the first."""
    schedule: Schedule | None = None
    for index, item in enumerate(items):
        now = clock()
        if schedule is None:
            schedule = Schedule(now, rate)
        delay = schedule.wait(index, now)
        if delay > 0:
            sleep(delay)
        yield index, item


def achieved_rate(count: int, first: float, last: float) -> float:
    """Events per second of a run whose first of `count` sends was at clock reading `first` and last at
    `last`: `count - 1` intervals, so a run that kept to its schedule gives exactly its rate. 0 when
    there is no interval to measure (fewer than two events, or all at one instant)."""
    return (count - 1) / (last - first) if count > 1 and last > first else 0.0


@dataclass(frozen=True)
class PacedRun:
    """A paced run's sends: how many, and the clock readings of the first and the last."""

    sent: int
    first: float
    last: float

    @property
    def rate(self) -> float:
        return achieved_rate(self.sent, self.first, self.last)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def publish_paced(
    events: Iterable[tuple[str, dict[str, Any]]],
    send: Callable[[str, dict[str, Any]], None],
    rate: float,
    clock: Callable[[], float] = time.perf_counter,
    sleep: Callable[[float], None] = time.sleep,
    wall: Callable[[], dt.datetime] = _utc_now,
) -> PacedRun:
    """`send(kind, record)` each event on its schedule, its envelope's `produced_time` set to the moment
    it is sent (`wall`, an aware datetime): when the producer published it, as the standard says, not
    when the event happened."""
    first = last = 0.0
    sent = 0
    for index, (kind, record) in paced(events, rate, clock, sleep):
        record["envelope"]["produced_time"] = wall()
        send(kind, record)
        last = clock()
        if index == 0:
            first = last
        sent += 1
    return PacedRun(sent, first, last)

"""The console's closed-loop figures on /metrics, read from the regional store at scrape time, so every
console process reports the same numbers and a restart loses none. Labels: institution, severity, age
bucket; never a patient or an alert id."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from console.domain import queue as q
from console.runtime.store import ConsoleReads
from streams.domain.reference import EscalationPolicy

ACK_BUCKETS_SECONDS = (60.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 86400.0)
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
WEEK = dt.timedelta(days=7)


class ClosedLoopCollector(Collector):
    """Time to acknowledge (cumulative over every acknowledged alert, so a valid histogram), the share
    acknowledged within the policy's deadline this week, and open alerts by age."""

    def __init__(
        self,
        reads: ConsoleReads,
        policy: EscalationPolicy,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        cache_seconds: float = 15.0,
    ) -> None:
        self._reads = reads
        self._policy = policy
        self._clock = clock
        self._cache_seconds = cache_seconds
        self._lock = threading.Lock()
        self._cached: tuple[float, list[Any]] | None = None

    def describe(self) -> list[Any]:
        return []  # collected lazily; describing would query the database at registration

    def collect(self) -> Iterator[Any]:
        with self._lock:
            if self._cached is None or time.monotonic() - self._cached[0] > self._cache_seconds:
                self._cached = (time.monotonic(), self._families())
            yield from self._cached[1]

    def _families(self) -> list[Any]:
        now = self._clock()
        acknowledged = self._reads.acknowledged_since(EPOCH)
        histogram = HistogramMetricFamily(
            "clinhub_alert_time_to_acknowledge_seconds",
            "Time from a critical result to its acknowledgement",
            labels=["institution", "severity"],
        )
        groups: dict[tuple[str, str], list[float]] = {}
        for institution, severity, minutes in acknowledged:
            groups.setdefault((institution, severity), []).append(minutes * 60.0)
        for labels, seconds in sorted(groups.items()):
            buckets = [
                (str(bound), float(sum(1 for s in seconds if s <= bound))) for bound in ACK_BUCKETS_SECONDS
            ]
            buckets.append(("+Inf", float(len(seconds))))
            histogram.add_metric(list(labels), buckets, sum(seconds))
        share = GaugeMetricFamily(
            "clinhub_alert_acknowledged_within_target_ratio",
            "Share of the alerts acknowledged in the last 7 days that were acknowledged within the "
            "escalation policy's deadline for their severity",
            labels=["institution"],
        )
        week: dict[str, list[bool]] = {}
        for institution, severity, minutes in self._reads.acknowledged_since(now - WEEK):
            target = self._policy.deadline_for(severity).total_seconds() / 60.0
            week.setdefault(institution, []).append(minutes <= target)
        for institution, within in sorted(week.items()):
            share.add_metric([institution], sum(within) / len(within))
        open_gauge = GaugeMetricFamily(
            "clinhub_open_alerts",
            "Unacknowledged alerts by time since the result",
            labels=["institution", "age"],
        )
        counts: dict[tuple[str, str], int] = {}
        for institution, _, result_time in self._reads.open_alerts():
            key = (institution, q.age_bucket(q.minutes_between(result_time, now)))
            counts[key] = counts.get(key, 0) + 1
        for institution in sorted({i for i, _ in counts}):
            for bucket in q.AGE_BUCKETS:
                open_gauge.add_metric([institution, bucket], counts.get((institution, bucket), 0))
        return [histogram, share, open_gauge]


def register_closed_loop_metrics(
    registry: CollectorRegistry, reads: ConsoleReads, policy: EscalationPolicy
) -> ClosedLoopCollector:
    collector = ClosedLoopCollector(reads, policy)
    registry.register(collector)
    return collector

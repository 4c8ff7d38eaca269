"""Consumer lag per stage and topic, for the operators' dashboards: the one number that shows a stage
falling behind (a slow or unavailable store, a stuck partition) before anyone misses an alert."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from prometheus_client import Gauge

TopicPartition = tuple[str, int]


def lag_by_topic(
    committed: Mapping[TopicPartition, int], ends: Mapping[TopicPartition, int]
) -> dict[str, int]:
    """Messages between the committed offset and the end, summed over each topic's partitions."""
    lag: dict[str, int] = {}
    for (topic, partition), end in ends.items():
        behind = max(0, end - committed.get((topic, partition), 0))
        lag[topic] = lag.get(topic, 0) + behind
    return lag


class LagReport:
    """Sets one stage's lag gauge; topics this worker no longer reads are removed, not left stale."""

    def __init__(self, gauge: Gauge, stage: str) -> None:
        self.gauge = gauge
        self.stage = stage
        self._reported: set[str] = set()

    def update(self, lag: Mapping[str, int], topics: Iterable[str] | None = None) -> None:
        """Report `lag` for the given topics (all of `lag` when None)."""
        wanted = set(lag) if topics is None else set(topics)
        current = {topic: behind for topic, behind in lag.items() if topic in wanted}
        for topic in self._reported - set(current):
            self.gauge.remove(self.stage, topic)
        for topic, behind in current.items():
            self.gauge.labels(stage=self.stage, topic=topic).set(behind)
        self._reported = set(current)

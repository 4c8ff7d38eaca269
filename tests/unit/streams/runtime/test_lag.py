import pytest
from prometheus_client import CollectorRegistry

from streams.metrics import make_stream_metrics
from streams.runtime.lag import LagReport, lag_by_topic


@pytest.mark.parametrize(
    ("committed", "ends", "expected"),
    [
        ({}, {}, {}),
        ({("norm.lab", 0): 5}, {("norm.lab", 0): 5}, {"norm.lab": 0}),
        ({("norm.lab", 0): 5, ("norm.lab", 1): 0}, {("norm.lab", 0): 9, ("norm.lab", 1): 3}, {"norm.lab": 7}),
        ({}, {("alerts.critical", 2): 4}, {"alerts.critical": 4}),  # never committed: all of it waits
        ({("norm.lab", 0): 12}, {("norm.lab", 0): 10}, {"norm.lab": 0}),  # a stale end is never negative
    ],
)
def test_lag_is_summed_per_topic(
    committed: dict[tuple[str, int], int], ends: dict[tuple[str, int], int], expected: dict[str, int]
) -> None:
    assert lag_by_topic(committed, ends) == expected


def test_lag_report_drops_topics_the_worker_no_longer_reads() -> None:
    registry = CollectorRegistry()
    gauge = make_stream_metrics(registry).consumer_lag
    report = LagReport(gauge, "store")

    def sample(topic: str) -> float | None:
        return registry.get_sample_value("clinhub_consumer_lag_messages", {"stage": "store", "topic": topic})

    report.update({"norm.lab": 40, "alerts.critical": 2})
    assert (sample("norm.lab"), sample("alerts.critical")) == (40, 2)
    report.update({"norm.lab": 0})  # alerts.critical's partitions moved to another worker
    assert (sample("norm.lab"), sample("alerts.critical")) == (0, None)
    report.update({"norm.lab": 3, "raw.H001.lab": 9}, topics={"norm.lab"})
    assert (sample("norm.lab"), sample("raw.H001.lab")) == (3, None), "only the stage's own topics"

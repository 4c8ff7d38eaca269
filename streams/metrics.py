"""Prometheus metrics of the stream processor, built on a registry the caller passes in."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class StreamMetrics:
    events: Counter
    rejects: Counter
    alerts: Counter
    unmapped_codes: Counter
    sink_retries: Counter
    batch_seconds: Histogram
    end_to_end_seconds: Histogram
    stalls_reread: Counter
    consumer_lag: Gauge
    stage_up: Gauge
    stage_errors: Counter
    unjudged_results: Counter
    results_not_judged: Counter


def make_stream_metrics(registry: CollectorRegistry) -> StreamMetrics:
    return StreamMetrics(
        events=Counter(
            "clinhub_stream_events",
            "Events processed, by outcome.",
            ["institution", "kind", "outcome"],
            registry=registry,
        ),
        rejects=Counter(
            "clinhub_stream_rejects",
            "Events sent to the dead-letter topic, by reason.",
            ["kind", "reason"],
            registry=registry,
        ),
        alerts=Counter(
            "clinhub_alerts_raised",
            "Critical-value alerts raised.",
            ["analyte", "severity"],
            registry=registry,
        ),
        unmapped_codes=Counter(
            "clinhub_unmapped_codes",
            "Events stored with a local code that has no LOINC map.",
            ["institution", "code"],
            registry=registry,
        ),
        sink_retries=Counter(
            "clinhub_sink_retries",
            "Store writes retried after a transient failure.",
            ["reason"],
            registry=registry,
        ),
        batch_seconds=Histogram(
            "clinhub_stream_batch_seconds", "Time to process and store one batch.", registry=registry
        ),
        end_to_end_seconds=Histogram(
            "clinhub_end_to_end_seconds",
            "From the event's produced time to its commit in the store.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=registry,
        ),
        stalls_reread=Counter(
            "clinhub_stalled_partitions_reread",
            "Partitions whose commit had stopped with events waiting, read again from the commit.",
            ["topic"],
            registry=registry,
        ),
        consumer_lag=Gauge(
            "clinhub_consumer_lag_messages",
            "Messages not yet committed by a stage, on the partitions this worker owns (sum the workers).",
            ["stage", "topic"],
            registry=registry,
        ),
        stage_up=Gauge(
            "clinhub_stage_up",
            "1 while a stage of this worker runs; 0 once it stopped on an error of the hub's own code.",
            ["stage"],
            registry=registry,
        ),
        stage_errors=Counter(
            "clinhub_stage_errors",
            "Batches that failed with an error of the hub's own code (a bug, not bad input), by class.",
            ["stage", "error"],
            registry=registry,
        ),
        unjudged_results=Counter(
            "clinhub_unjudged_results",
            "Lab results for analytes with critical limits that could not be judged (dead-lettered): "
            "possibly critical, unreadable.",
            ["institution"],
            registry=registry,
        ),
        results_not_judged=Counter(
            "clinhub_results_not_judged",
            "Lab results stored with a value the rules cannot judge (text that carries no unambiguous "
            "number), flagged not_judged.",
            ["institution", "analyte"],
            registry=registry,
        ),
    )

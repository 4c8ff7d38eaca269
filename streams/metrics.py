"""Prometheus metrics of the stream processor, built on a registry the caller passes in.

End-to-end latencies are measured from the broker timestamp of the raw event (the Kafka timestamp of
the institution's message, carried on every record derived from it as the `RAW_TIMESTAMP_HEADER` of
core/contract.py), never from the envelope's times: those are the sender's clock, and a feed that sends
old results (or a simulator) would read as hours late. How old the result was clinically (its event
time to its commit) is the store's `clinhub_store_clinical_age_seconds`.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a few milliseconds to a minute, fine around the targets (p99 alert 250 ms, store 500 ms, 1 s)
END_TO_END_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1, 1.5, 2, 2.5, 5, 10, 30, 60,
)  # fmt: skip


@dataclass(frozen=True)
class StreamMetrics:
    events: Counter
    rejects: Counter
    alerts: Counter
    unmapped_codes: Counter
    sink_retries: Counter
    batch_seconds: Histogram
    store_end_to_end_seconds: Histogram  # raw event's broker timestamp -> its record committed, by kind
    alert_latency_seconds: Histogram  # raw event's broker timestamp -> its alert confirmed on alerts.critical
    stalls_reread: Counter
    consumer_lag: Gauge
    stage_up: Gauge
    stage_errors: Counter
    unjudged_results: Counter
    results_not_judged: Counter
    state_expired: Counter  # entries the state expiry timer deleted, by table


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
        store_end_to_end_seconds=Histogram(
            "clinhub_store_end_to_end_seconds",
            "From the raw event's broker timestamp to the commit in the store of a record derived from it "
            "(its normalised record, identity link, alert, alert state), by kind.",
            ["kind"],
            buckets=END_TO_END_BUCKETS,
            registry=registry,
        ),
        alert_latency_seconds=Histogram(
            "clinhub_alert_latency_seconds",
            "From the raw event's broker timestamp to its alert published and confirmed on alerts.critical.",
            buckets=END_TO_END_BUCKETS,
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
        state_expired=Counter(
            "clinhub_state_expired",
            "Table entries deleted by the state expiry timer as no longer able to change a decision "
            "(a tombstone on the changelog each), by table.",
            ["table"],
            registry=registry,
        ),
    )

"""Prometheus metrics of the store writer, built on a registry the caller passes in.

Labels are bounded: table names, record kinds, error class names. Never a patient or event id.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

BATCH_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# How old a record is clinically when it is stored: from seconds (a live feed) to a day (a back-load)
CLINICAL_AGE_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 21600, 86400,
)  # fmt: skip


@dataclass(frozen=True)
class SinkMetrics:
    rows_written: Counter  # rows inserted or updated, by table
    records_unchanged: Counter  # records that changed nothing (redelivered, older version), by kind
    batch_records: Histogram  # records per write
    batch_seconds: Histogram  # time of one write, conversion to commit
    retries: Counter  # writes refused for a transient reason (the caller retries each one), by error class
    clinical_age_seconds: Histogram  # the record's own time (event time, raised, ...) to commit, by kind


def make_sink_metrics(registry: CollectorRegistry) -> SinkMetrics:
    return SinkMetrics(
        rows_written=Counter(
            "clinhub_store_written_rows",
            "Rows inserted or updated in the regional store, by table.",
            ["table"],
            registry=registry,
        ),
        records_unchanged=Counter(
            "clinhub_store_unchanged_records",
            "Records that changed nothing: redeliveries and older versions, by kind.",
            ["kind"],
            registry=registry,
        ),
        batch_records=Histogram(
            "clinhub_store_batch_records",
            "Records in one store write.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        ),
        batch_seconds=Histogram(
            "clinhub_store_batch_seconds",
            "Time of one store write, from conversion to commit.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        ),
        retries=Counter(
            "clinhub_store_retries",
            "Store writes that failed for a transient reason and are to be retried, by error class.",
            ["reason"],
            registry=registry,
        ),
        clinical_age_seconds=Histogram(
            "clinhub_store_clinical_age_seconds",
            "How old a record is clinically when stored: from its own time (a result's event time; an "
            "alert raised, escalated, acknowledged; a link made) to its commit, by kind. Not the hub's "
            "latency (clinhub_store_end_to_end_seconds): a result sent late is old, not slow.",
            ["kind"],
            buckets=CLINICAL_AGE_BUCKETS,
            registry=registry,
        ),
    )

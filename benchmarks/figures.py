"""The benchmark suite's figures: plain dataclasses, the arithmetic over them and their rendering.

Nothing here touches a service: percentiles of latencies matched by event id, the ratio of every figure
to the same run's ceilings, and the text, Markdown and JSON the suite prints and writes
(`benchmarks/suite.py` measures; `benchmarks/plot.py` draws).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TIME_FIELDS = ("specimen_collected_time", "result_time")


@dataclass(frozen=True)
class Percentiles:
    """Milliseconds; nearest-rank percentiles (a value that was measured, never interpolated)."""

    count: int
    p50: float
    p95: float
    p99: float
    max: float


def percentile(ordered: Sequence[float], share: float) -> float:
    """Nearest rank: the smallest value with at least `share` of the values at or below it."""
    if not ordered:
        raise ValueError("no values")
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]


def percentiles(values: Sequence[float]) -> Percentiles | None:
    if not values:
        return None
    ordered = sorted(values)
    return Percentiles(
        len(ordered),
        percentile(ordered, 0.50),
        percentile(ordered, 0.95),
        percentile(ordered, 0.99),
        ordered[-1],
    )


def latencies(started: Mapping[str, float], ended: Mapping[str, float]) -> list[float]:
    """End minus start of every id in both (ms). An id only started (no alert for it, say) is skipped."""
    return [ended[key] - started[key] for key in ended if key in started]


def retimed(record: Mapping[str, Any], when: dt.datetime) -> dict[str, Any]:
    """The record as if it happened at `when`: its event time, produced time and result time `when`,
    its specimen collection as long before as it was. Simulated traffic is spread over the past; paced
    traffic must be recent, or results older than the alert memory would raise no alert."""
    envelope = record["envelope"]
    shift = when - envelope["event_time"]
    copy = dict(record)
    copy["envelope"] = {**envelope, "event_time": when, "produced_time": when}
    for name in TIME_FIELDS:
        if copy.get(name) is not None:
            copy[name] = copy[name] + shift
    return copy


@dataclass(frozen=True)
class ConsumeCeiling:
    """A plain confluent-kafka consume + Avro decode loop over the raw topics."""

    events: int
    rate: float  # events/s
    cpu_us_per_event: float


@dataclass(frozen=True)
class InsertCeiling:
    """A plain bulk insert of the same rows (COPY on PostgreSQL, executemany on SQLite), beside the
    store writer on the same records."""

    backend: str
    rows: int
    method: str
    rate: float  # rows/s
    store_writer_rate: float  # rows/s of SqlStoreSink.write_records on the same records


@dataclass(frozen=True)
class LatencyRun:
    offered_rate: float
    achieved_rate: float  # from the raw messages' broker timestamps, first to last
    events: int
    alerts: int
    event_to_alert: Percentiles | None
    event_to_store: Percentiles | None
    label: str = ""  # "highest sustained", say
    layout: str = "one process"  # or "one per stage"


@dataclass(frozen=True)
class ProcessCost:
    stage: str  # "all", "normaliser", "clinical", "store"
    cpu_us_per_event: float  # steady state: from the first normalised event to the last store commit
    peak_memory_mb: float  # VmHWM


@dataclass(frozen=True)
class ThroughputRun:
    backend: str
    layout: str  # "one process" or "one per stage"
    events: int
    rate: float  # events/s, first publish to last store commit
    processes: tuple[ProcessCost, ...]

    @property
    def cpu_us_per_event(self) -> float:
        return sum(process.cpu_us_per_event for process in self.processes)


@dataclass
class SuiteResults:
    started: str
    quick: bool
    consume: ConsumeCeiling | None = None
    inserts: list[InsertCeiling] = field(default_factory=list)
    latency: list[LatencyRun] = field(default_factory=list)
    throughput: list[ThroughputRun] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class Row:
    """One line of the table: a figure, its unit, and its ratio to the ceiling it is compared with."""

    part: str
    what: str
    value: str
    ratio: str  # "" when no ceiling of this run applies


def _ratio(value: float, ceiling: float | None) -> str:
    if not ceiling:
        return ""
    ratio = value / ceiling
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.3f}x"  # 0.04x and 0.004x are not both 0.00x


def _ms(p: Percentiles | None) -> str:
    if p is None:
        return "none"
    return f"{p.p50:.0f} / {p.p95:.0f} / {p.p99:.0f} / {p.max:.0f} ms"


def rows(results: SuiteResults) -> list[Row]:
    """Every figure, with its ratio to the same run's ceilings where one applies: rates to the
    consume + decode loop, CPU per event to that loop's, the store writer to the bulk insert."""
    consume = results.consume
    consume_rate = consume.rate if consume else None
    consume_cpu = consume.cpu_us_per_event if consume else None
    out: list[Row] = []
    if consume:
        out.append(Row("ceiling", "consume + decode", f"{consume.rate:,.0f} events/s", "1.00x"))
        out.append(
            Row("ceiling", "consume + decode CPU", f"{consume.cpu_us_per_event:.0f} us/event", "1.00x")
        )
    insert_rate: dict[str, float] = {}
    for insert in results.inserts:
        insert_rate[insert.backend] = insert.rate
        out.append(Row("ceiling", f"{insert.backend} {insert.method}", f"{insert.rate:,.0f} rows/s", "1.00x"))
        out.append(
            Row(
                "store writer",
                f"{insert.backend} write_records",
                f"{insert.store_writer_rate:,.0f} rows/s",
                _ratio(insert.store_writer_rate, insert.rate),
            )
        )
    for run in results.latency:
        name = f"{run.layout}, {run.offered_rate:,.0f}/s offered" + (f" ({run.label})" if run.label else "")
        out.append(
            Row(
                "latency",
                f"{name}: achieved",
                f"{run.achieved_rate:,.0f} events/s ({run.achieved_rate / run.offered_rate:.0%} of offered)",
                _ratio(run.achieved_rate, consume_rate),
            )
        )
        alerts = f"{name}: event->alert p50/p95/p99/max ({run.alerts} alerts)"
        out.append(Row("latency", alerts, _ms(run.event_to_alert), ""))
        out.append(Row("latency", f"{name}: event->store p50/p95/p99/max", _ms(run.event_to_store), ""))
    for tp in results.throughput:
        name = f"{tp.backend}, {tp.layout}"
        out.append(Row("throughput", name, f"{tp.rate:,.0f} events/s", _ratio(tp.rate, consume_rate)))
        if tp.backend in insert_rate:
            out.append(
                Row(
                    "throughput",
                    f"{name}: of the {tp.backend} bulk insert",
                    f"{tp.rate:,.0f} events/s",
                    _ratio(tp.rate, insert_rate[tp.backend]),
                )
            )
        out.append(
            Row(
                "throughput",
                f"{name}: CPU",
                f"{tp.cpu_us_per_event:.0f} us/event",
                _ratio(tp.cpu_us_per_event, consume_cpu),
            )
        )
        for process in tp.processes:
            out.append(
                Row(
                    "throughput",
                    f"{name}: {process.stage}",
                    f"{process.cpu_us_per_event:.0f} us/event, peak {process.peak_memory_mb:.0f} MB",
                    _ratio(process.cpu_us_per_event, consume_cpu),
                )
            )
    return out


def render_text(table: Sequence[Row]) -> str:
    width = max((len(row.what) for row in table), default=0)
    return "\n".join(
        f"{row.part:<12} {row.what:<{width}}  {row.value:>34}  {row.ratio:>7}".rstrip() for row in table
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(results: SuiteResults, table: Sequence[Row]) -> str:
    lines = [
        f"Benchmark suite, {results.started}{' (--quick)' if results.quick else ''}. Ratios are to the same "
        "run's ceilings: rates and CPU to the consume + decode loop, the store writer to the bulk insert.",
        "",
        "| part | figure | value | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {row.part} | {_cell(row.what)} | {row.value} | {row.ratio} |" for row in table]
    if results.notes:
        lines += ["", *(f"- {note}" for note in results.notes)]
    return "\n".join(lines) + "\n"

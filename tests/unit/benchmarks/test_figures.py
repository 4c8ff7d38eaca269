"""The suite's pure parts: percentiles, latencies by event id, retiming, the ratio table, its rendering."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from benchmarks.figures import (
    ConsumeCeiling,
    InsertCeiling,
    LatencyRun,
    Percentiles,
    ProcessCost,
    SuiteResults,
    ThroughputRun,
    latencies,
    percentile,
    percentiles,
    render_markdown,
    render_text,
    retimed,
    rows,
)


def test_nearest_rank_percentiles_are_measured_values() -> None:
    values = [float(v) for v in range(100, 0, -1)]  # 1..100, unordered
    assert percentile(sorted(values), 0.50) == 50
    assert percentile(sorted(values), 0.99) == 99
    assert percentiles(values) == Percentiles(100, 50, 95, 99, 100)
    assert percentiles([7.0]) == Percentiles(1, 7, 7, 7, 7)
    assert percentiles([]) is None
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_latencies_match_by_id_and_skip_the_unmatched() -> None:
    raw = {"a": 1000.0, "b": 2000.0, "c": 3000.0}
    alerts = {"b": 2150.0, "x": 9999.0}  # only b alerted; x is no event of this run
    assert latencies(raw, alerts) == [150.0]
    assert sorted(latencies(raw, {"a": 1010.0, "c": 3400.0})) == [10.0, 400.0]


def test_retimed_moves_every_time_of_the_event_together() -> None:
    then = dt.datetime(2026, 1, 1, 8, 0, tzinfo=dt.UTC)
    record = {
        "envelope": {"event_id": "e1", "event_time": then, "produced_time": then},
        "specimen_collected_time": then - dt.timedelta(minutes=30),
        "result_time": then,
        "value_numeric": 5.0,
    }
    now = dt.datetime(2026, 12, 2, 1, 0, tzinfo=dt.UTC)
    moved = retimed(record, now)
    assert moved["envelope"] == {"event_id": "e1", "event_time": now, "produced_time": now}
    assert moved["result_time"] == now
    assert moved["specimen_collected_time"] == now - dt.timedelta(minutes=30)
    assert moved["value_numeric"] == 5.0
    assert record["result_time"] == then  # the original is untouched


def results() -> SuiteResults:
    found = SuiteResults(started="2026-12-02 01:00 UTC", quick=True)
    found.consume = ConsumeCeiling(events=20000, rate=50000.0, cpu_us_per_event=20.0)
    found.inserts = [InsertCeiling("postgresql", 20000, "COPY", 40000.0, 10000.0)]
    found.throughput = [
        ThroughputRun(
            "postgresql",
            "one per stage",
            20000,
            7500.0,
            (ProcessCost("normaliser", 60.0, 120.0), ProcessCost("store", 40.0, 90.0)),
        )
    ]
    found.latency = [
        LatencyRun(1000, 998.0, 10000, 200, Percentiles(200, 40, 90, 120, 300), None, "highest | sustained")
    ]
    found.notes = ["a note"]
    return found


def test_every_figure_is_a_ratio_of_its_ceiling() -> None:
    table = {(row.part, row.what): (row.value, row.ratio) for row in rows(results())}
    assert table[("ceiling", "consume + decode")] == ("50,000 events/s", "1.00x")
    assert table[("ceiling", "postgresql COPY")] == ("40,000 rows/s", "1.00x")
    assert table[("store writer", "postgresql write_records")] == ("10,000 rows/s", "0.25x")
    assert table[("throughput", "postgresql, one per stage")] == ("7,500 events/s", "0.15x")
    assert table[("throughput", "postgresql, one per stage: of the postgresql bulk insert")][1] == "0.19x"
    assert table[("throughput", "postgresql, one per stage: CPU")] == ("100 us/event", "5.00x")
    assert table[("throughput", "postgresql, one per stage: store")] == ("40 us/event, peak 90 MB", "2.00x")
    name = "one process, 1,000/s offered (highest | sustained)"
    assert table[("latency", f"{name}: achieved")] == ("998 events/s (100% of offered)", "0.020x")
    assert table[("latency", f"{name}: event->alert p50/p95/p99/max (200 alerts)")] == (
        "40 / 90 / 120 / 300 ms",
        "",
    )
    assert table[("latency", f"{name}: event->store p50/p95/p99/max")] == ("none", "")


def test_no_ceiling_no_ratio() -> None:
    found = results()
    found.consume = None
    table = {(row.part, row.what): row.ratio for row in rows(found)}
    assert table[("throughput", "postgresql, one per stage")] == ""


def test_markdown_table_escapes_pipes_and_lists_notes() -> None:
    found = results()
    markdown = render_markdown(found, rows(found))
    lines = markdown.splitlines()
    assert "(--quick)" in lines[0]
    assert lines[2] == "| part | figure | value | ratio |"
    assert "| ceiling | consume + decode | 50,000 events/s | 1.00x |" in lines
    assert any("highest \\| sustained" in line for line in lines)
    assert lines[-1] == "- a note"
    assert all(line.count(" | ") == 3 for line in lines[4:] if line.startswith("| "))


def test_text_and_json_carry_the_same_figures() -> None:
    found = results()
    text = render_text(rows(found))
    assert "50,000 events/s" in text and "0.15x" in text
    data = json.loads(found.to_json())
    assert data["consume"]["rate"] == 50000.0
    assert data["latency"][0]["event_to_alert"]["p99"] == 120
    assert data["throughput"][0]["processes"][1]["stage"] == "store"

"""The suite's latency plot: one line per percentile and layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.figures import LatencyRun, Percentiles
from benchmarks.plot import plot_latency


def run(rate: float, layout: str, p99: float) -> LatencyRun:
    percentiles = Percentiles(100, p99 / 4, p99 / 2, p99, p99 * 2)
    return LatencyRun(rate, rate, 100, 10, percentiles, percentiles, layout=layout)


def test_each_layout_gets_its_lines_in_both_panels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    plotted: list[str] = []
    original = matplotlib.axes.Axes.plot

    def recording(self: matplotlib.axes.Axes, *args: object, **kwargs: object) -> object:
        plotted.append(str(kwargs.get("label")))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording)
    runs = [run(1000, "one process", 900), run(100, "one process", 60), run(1000, "one per stage", 300)]
    path = plot_latency(runs, tmp_path / "latency.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = [
        f"{layout} {name}"
        for layout in ("one process", "one per stage")
        for name in ("p50", "p95", "p99", "max")
    ]
    assert plotted == expected * 2  # alert panel, then store panel

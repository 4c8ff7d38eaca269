"""The suite's PNG: event->alert and event->store percentiles (ms, log scale) against the offered rate."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.figures import LatencyRun, Percentiles


def plot_latency(runs: Sequence[LatencyRun], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys(run.layout for run in runs))
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, title, pick in (
        (axes[0], "event -> alert published", lambda run: run.event_to_alert),
        (axes[1], "event -> store committed", lambda run: run.event_to_store),
    ):
        for layout, colour in zip(layouts, ("tab:blue", "tab:orange", "tab:green"), strict=False):
            ordered = sorted((run for run in runs if run.layout == layout), key=lambda run: run.offered_rate)
            found: list[tuple[float, Percentiles]] = [
                (run.offered_rate, p) for run, p in ((run, pick(run)) for run in ordered) if p
            ]
            for name, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-"), ("max", "x--")):
                label = f"{layout} {name}" if len(layouts) > 1 else name
                values = [getattr(p, name) for _, p in found]
                ax.plot([r for r, _ in found], values, style, color=colour, label=label)
        ax.set_title(title)
        ax.set_xlabel("offered rate (events/s)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency from the raw event's broker timestamp (ms)")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path

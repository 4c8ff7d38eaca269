"""A small trend plot per analyte: points scaled into an SVG box (the template draws them). Pure."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Plot:
    width: int
    height: int
    points: list[tuple[float, float]]  # SVG coordinates, oldest first
    low: float
    high: float

    @property
    def path(self) -> str:
        return " ".join(f"{x:.1f},{y:.1f}" for x, y in self.points)


def plot(
    series: Sequence[tuple[dt.datetime, float]], width: int = 160, height: int = 40, pad: int = 4
) -> Plot:
    """Time on x (evenly by time, not by index), value on y; a flat series sits mid-height."""
    if not series:
        return Plot(width, height, [], 0.0, 0.0)
    times = [t.timestamp() for t, _ in series]
    values = [v for _, v in series]
    t0, t1 = min(times), max(times)
    low, high = min(values), max(values)
    span_t = (t1 - t0) or 1.0
    span_v = high - low
    points = []
    for t, v in zip(times, values, strict=True):
        x = pad + (t - t0) / span_t * (width - 2 * pad) if t1 > t0 else width / 2
        y = height / 2 if span_v == 0 else pad + (high - v) / span_v * (height - 2 * pad)
        points.append((x, y))
    return Plot(width, height, points, low, high)

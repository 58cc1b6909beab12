"""Sends and failures per second over time, as SVG geometry computed here.

The page's template draws it (``<polyline>`` per series, ``<circle class="point">`` per
non-empty bucket) and ``dashboard.js`` redraws it from the same geometry in the JSON
endpoint: no chart library, and nothing but numbers reaches the SVG.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ses_tasks.store.timeline import BUCKET_S, TimelinePoint

__all__ = ["HEIGHT", "WIDTH", "Chart", "ChartPoint", "build_chart"]

WIDTH = 640
HEIGHT = 200
#: Room for the axis labels inside the view box.
PAD_LEFT = 44
PAD_RIGHT = 8
PAD_TOP = 8
PAD_BOTTOM = 22


@dataclass(frozen=True, slots=True)
class ChartPoint:
    cx: float
    cy: float
    #: ``sent`` or ``failed``.
    series: str
    #: Messages per second in this bucket.
    value: float
    #: The bucket's start, ``HH:MM:SS`` UTC.
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    sent_line: str
    failed_line: str
    points: tuple[ChartPoint, ...]
    #: The y axis top, messages per second.
    y_max: float
    start_label: str
    end_label: str

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "sent_line": self.sent_line,
            "failed_line": self.failed_line,
            "points": [
                {"cx": p.cx, "cy": p.cy, "series": p.series, "value": p.value, "label": p.label}
                for p in self.points
            ],
            "y_max": self.y_max,
            "start_label": self.start_label,
            "end_label": self.end_label,
            "plot": {
                "left": PAD_LEFT,
                "right": self.width - PAD_RIGHT,
                "top": PAD_TOP,
                "bottom": self.height - PAD_BOTTOM,
            },
        }


def _nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1.0
    scale = 1.0
    while True:
        for step in (1.0, 2.0, 5.0):
            if step * scale >= value:
                return step * scale
        scale *= 10


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def build_chart(
    points: Sequence[TimelinePoint], *, width: int = WIDTH, height: int = HEIGHT
) -> Chart:
    """Geometry for ``points`` (oldest first, evenly spaced buckets)."""
    left, right = PAD_LEFT, width - PAD_RIGHT
    top, bottom = PAD_TOP, height - PAD_BOTTOM
    rates = [(p.t, p.sent / BUCKET_S, p.failed / BUCKET_S) for p in points]
    y_max = _nice_max(max((max(s, f) for _, s, f in rates), default=0.0))
    n = len(rates)

    def x(i: int) -> float:
        return round(left + (right - left) * (i / (n - 1) if n > 1 else 0.5), 1)

    def y(v: float) -> float:
        return round(bottom - (bottom - top) * (v / y_max), 1)

    sent_line = " ".join(f"{x(i)},{y(s)}" for i, (_, s, _) in enumerate(rates))
    failed_line = " ".join(f"{x(i)},{y(f)}" for i, (_, _, f) in enumerate(rates))
    dots: list[ChartPoint] = []
    for i, (t, s, f) in enumerate(rates):
        if s > 0:
            dots.append(ChartPoint(x(i), y(s), "sent", round(s, 2), _clock(t)))
        if f > 0:
            dots.append(ChartPoint(x(i), y(f), "failed", round(f, 2), _clock(t)))
    return Chart(
        width,
        height,
        sent_line,
        failed_line,
        tuple(dots),
        y_max,
        _clock(points[0].t) if points else "",
        _clock(points[-1].t) if points else "",
    )

"""Line charts as plain SVG, for docs/: no plotting library, no fonts to ship.

    line_chart_svg(title, subtitle, x_label, y_label, [Series(...), ...]) -> str

The x axis is logarithmic (base 2) because a load sweep doubles its connections; the y
axis is linear from 0 to a rounded-up maximum. Every label is XML-escaped. Pure: the
tests parse the output and check each point's position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

__all__ = ["Series", "line_chart_svg", "nice_ceiling", "plot_position"]

WIDTH = 760
HEIGHT = 420
MARGIN_LEFT = 78
MARGIN_RIGHT = 170  # the legend sits right of the plot
MARGIN_TOP = 58
MARGIN_BOTTOM = 56
Y_TICKS = 5
_APOSTROPHE = {"'": "&apos;"}  # attribute values here are in single quotes
FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"


@dataclass(frozen=True, slots=True)
class Series:
    name: str
    points: Sequence[tuple[float, float]]  # (x > 0, y >= 0)
    color: str
    dashed: bool = False


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 x 10^k that is >= value (1 for nothing to show)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    exponent = math.floor(math.log10(value))
    for step in (1.0, 2.0, 2.5, 5.0, 10.0):
        candidate = step * 10.0**exponent
        if candidate >= value * (1 - 1e-12):
            return candidate
    return 10.0 ** (exponent + 1)


def _plot_box() -> tuple[float, float, float, float]:
    left, top = MARGIN_LEFT, MARGIN_TOP
    return left, top, WIDTH - MARGIN_RIGHT - left, HEIGHT - MARGIN_BOTTOM - top


def plot_position(
    x: float, y: float, x_range: tuple[float, float], y_max: float
) -> tuple[float, float]:
    """SVG coordinates of a data point: log2 x across the plot, linear y up from the bottom."""
    left, top, width, height = _plot_box()
    x_low, x_high = (math.log2(bound) for bound in x_range)
    span = x_high - x_low or 1.0
    px = left + (math.log2(x) - x_low) / span * width
    py = top + height - min(max(y, 0.0), y_max) / y_max * height
    return round(px, 1), round(py, 1)


def _number(value: float, axis_max: float) -> str:
    """An axis label: in thousands ("12k") on an axis reaching 10,000, else as it is."""
    if axis_max >= 10_000:
        return f"{value / 1000:,g}k" if value else "0"
    return f"{value:,g}"


def line_chart_svg(
    title: str, subtitle: str, x_label: str, y_label: str, series: Sequence[Series]
) -> str:
    """One chart; series without points are listed in the legend only."""
    xs = [x for line in series for x, _ in line.points]
    ys = [y for line in series for _, y in line.points]
    x_range = (min(xs), max(xs)) if xs else (1.0, 2.0)
    if x_range[0] == x_range[1]:
        x_range = (x_range[0] / 2, x_range[1] * 2)
    y_max = nice_ceiling(max(ys, default=0.0))
    left, top, width, height = _plot_box()
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}' "
        f"viewBox='0 0 {WIDTH} {HEIGHT}' {FONT} font-size='12'>",
        f"<rect width='{WIDTH}' height='{HEIGHT}' fill='white'/>",
        f"<text x='{left}' y='24' font-size='16' font-weight='bold'>{escape(title)}</text>",
        f"<text x='{left}' y='42' fill='#555'>{escape(subtitle)}</text>",
    ]
    for index in range(Y_TICKS + 1):
        value = y_max * index / Y_TICKS
        _, py = plot_position(x_range[0], value, x_range, y_max)
        out.append(f"<line x1='{left}' y1='{py}' x2='{left + width}' y2='{py}' stroke='#e4e4e4'/>")
        out.append(
            f"<text x='{left - 8}' y='{py + 4}' text-anchor='end'>{_number(value, y_max)}</text>"
        )
    for x in sorted(set(xs)):
        px, _ = plot_position(x, 0.0, x_range, y_max)
        out.append(f"<line x1='{px}' y1='{top}' x2='{px}' y2='{top + height}' stroke='#f0f0f0'/>")
        out.append(f"<text x='{px}' y='{top + height + 18}' text-anchor='middle'>{x:,g}</text>")
    out.append(
        f"<rect x='{left}' y='{top}' width='{width}' height='{height}' fill='none' stroke='#999'/>"
    )
    out.append(
        f"<text x='{left + width / 2}' y='{HEIGHT - 12}' text-anchor='middle'>"
        f"{escape(x_label)}</text>"
    )
    out.append(
        f"<text transform='translate(18 {top + height / 2}) rotate(-90)' "
        f"text-anchor='middle'>{escape(y_label)}</text>"
    )
    for index, line in enumerate(series):
        dash = " stroke-dasharray='6 4'" if line.dashed else ""
        positions = [plot_position(x, y, x_range, y_max) for x, y in sorted(line.points)]
        if positions:
            path = " ".join(f"{px},{py}" for px, py in positions)
            out.append(
                f"<polyline data-series='{escape(line.name, _APOSTROPHE)}' points='{path}' "
                f"fill='none' stroke='{line.color}' stroke-width='2.5'{dash}/>"
            )
            for px, py in positions:
                out.append(f"<circle cx='{px}' cy='{py}' r='3.5' fill='{line.color}'/>")
        legend_y = top + 10 + index * 22
        legend_x = left + width + 16
        out.append(
            f"<line x1='{legend_x}' y1='{legend_y}' x2='{legend_x + 24}' y2='{legend_y}' "
            f"stroke='{line.color}' stroke-width='2.5'{dash}/>"
        )
        out.append(f"<text x='{legend_x + 30}' y='{legend_y + 4}'>{escape(line.name)}</text>")
    out.append("</svg>")
    return "\n".join(out) + "\n"

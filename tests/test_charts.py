"""The SVG chart writer and the sweep's pure parts: valid SVG, points where they belong,
labels escaped, the sweep's money check and its charts from wrk results."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from loadtest.bench_report import WrkRun
from loadtest.charts import Series, line_chart_svg, nice_ceiling, plot_position
from loadtest.sweep import SweepPoint, check_money, parse_connections, write_charts

SVG = "{http://www.w3.org/2000/svg}"


def polylines(svg: str) -> dict[str, list[tuple[float, float]]]:
    root = ET.fromstring(svg)
    lines = {}
    for line in root.iter(f"{SVG}polyline"):
        points = [tuple(map(float, pair.split(","))) for pair in line.attrib["points"].split()]
        lines[line.attrib["data-series"]] = [(x, y) for x, y in points]
    return lines


def test_nice_ceiling_rounds_up_to_1_2_2_5_5() -> None:
    """The y axis ends on a round number at or above the largest value."""
    values = (0, 0.7, 1, 3, 2400, 2600, 7000, 12_345)
    assert [nice_ceiling(v) for v in values] == [1, 1, 1, 5, 2500, 5000, 10_000, 20_000]


def test_points_go_right_with_log2_x_and_up_with_y() -> None:
    """Doubling x moves by equal steps; a larger y is higher (smaller SVG y)."""
    x_range, y_max = (8.0, 1024.0), 100.0
    xs = [plot_position(x, 0, x_range, y_max)[0] for x in (8, 16, 32, 1024)]
    assert xs[1] - xs[0] == pytest.approx(xs[2] - xs[1], abs=0.2)
    low = plot_position(8, 10, x_range, y_max)[1]
    high = plot_position(8, 90, x_range, y_max)[1]
    assert high < low


def test_chart_is_valid_svg_with_one_polyline_per_series() -> None:
    """Each series with points is a polyline with its points in order inside the plot;
    labels with markup characters are escaped."""
    svg = line_chart_svg(
        "Throughput <walletd> & ceiling",
        "1 s per point",
        "connections",
        "requests/s",
        [
            Series("walletd", [(8, 1000.0), (64, 3000.0), (16, 2000.0)], "#00f"),
            Series("it's shed", [(8, 0.0), (64, 500.0)], "#f00", dashed=True),
            Series("empty", [], "#0f0"),
        ],
    )
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    texts = [element.text for element in root.iter(f"{SVG}text")]
    assert "Throughput <walletd> & ceiling" in texts
    assert "empty" in texts  # in the legend though it has no line
    lines = polylines(svg)
    assert set(lines) == {"walletd", "it's shed"}
    walletd = lines["walletd"]
    assert [x for x, _ in walletd] == sorted(x for x, _ in walletd)
    assert walletd[0][1] > walletd[1][1] > walletd[2][1]  # 1000 < 2000 < 3000: higher up
    width, height = float(root.attrib["width"]), float(root.attrib["height"])
    for x, y in walletd:
        assert 0 < x < width
        assert 0 < y < height


def test_chart_without_points_still_renders() -> None:
    """No data yet (a failed sweep): a valid, empty chart instead of an exception."""
    root = ET.fromstring(line_chart_svg("t", "s", "x", "y", [Series("a", [], "#000")]))
    assert not list(root.iter(f"{SVG}polyline"))


def _run(ok: int, shed: int = 0, sent_extra: int = 0, p99_us: int = 5000) -> WrkRun:
    statuses = {200: ok, 503: shed} if shed else {200: ok}
    return WrkRun(
        duration_us=2_000_000, requests=ok + shed, sent=ok + shed + sent_extra,
        statuses=statuses, socket_errors=0, p50_us=1000, p99_us=p99_us,
    )  # fmt: skip


def test_sweep_money_check_bounds_by_unknown_outcomes() -> None:
    """Applied deposits must lie within [2xx, 2xx + shed + unanswered] of walletd's runs."""
    points = [
        SweepPoint("walletd", 8, _run(100, sent_extra=2)),
        SweepPoint("walletd", 1024, _run(300, shed=50)),
        SweepPoint("ceiling", 8, _run(999)),
    ]
    assert check_money(points, 400).startswith("PASS")
    assert check_money(points, 452).startswith("PASS")
    assert check_money(points, 399).startswith("FAIL")
    assert check_money(points, 453).startswith("FAIL")


def test_write_charts_draws_walletd_ceiling_and_shed_lines(tmp_path: Path) -> None:
    """The two files, with walletd beside the ceiling, and the 503s walletd shed."""
    points = [
        SweepPoint("walletd", 8, _run(2000)),
        SweepPoint("ceiling", 8, _run(4000)),
        SweepPoint("walletd", 16, _run(2400, shed=600, p99_us=9000)),
        SweepPoint("ceiling", 16, _run(5000)),
    ]
    throughput, latency = write_charts(points, tmp_path, "smoke")
    lines = polylines(throughput.read_text())
    assert set(lines) == {"walletd 2xx/s", "ceiling 2xx/s", "walletd 503/s (shed)"}
    assert all(len(line) == 2 for line in lines.values())
    assert set(polylines(latency.read_text())) == {"walletd p99", "ceiling p99"}


def test_parse_connections_sorts_and_bounds() -> None:
    """The sweep's connection list: positive, bounded, sorted, without repeats."""
    assert parse_connections("64,8,8,1024") == (8, 64, 1024)
    with pytest.raises(ValueError, match="connections"):
        parse_connections("0,8")

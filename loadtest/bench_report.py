"""Pure pieces of the benchmark: parse wrk and /metrics output, aggregate, render, splice.

No I/O here except reading /proc in `machine_info`, so that every number in
docs/BENCHMARKS.md comes from functions with unit tests.
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "MARK_END",
    "MARK_START",
    "BatchOps",
    "Summary",
    "WrkRun",
    "bounded_check",
    "machine_info",
    "median",
    "ops_per_commit",
    "parse_batch_ops",
    "parse_wrk_output",
    "ratio",
    "render_section",
    "replace_section",
    "round_ratios",
    "spread",
    "summarize",
]

MARK_START = "<!-- bench:start -->"
MARK_END = "<!-- bench:end -->"
WRK_JSON_PREFIX = "WRKJSON "


@dataclass(frozen=True, slots=True)
class WrkRun:
    """One wrk run as reported by wrk_walletd.lua's done()."""

    duration_us: int
    requests: int
    sent: int
    statuses: dict[int, int]
    socket_errors: int
    p50_us: int
    p99_us: int
    quiesce_sent: int = 0

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us > 0 else 0.0

    @property
    def ok_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if 200 <= status < 300)

    @property
    def non_2xx(self) -> int:
        return self.requests - self.ok_2xx

    @property
    def server_errors(self) -> int:
        return sum(n for status, n in self.statuses.items() if status >= 500)

    @property
    def unknown_outcomes(self) -> int:
        """Requests that may or may not have been applied: unanswered, or answered 5xx.

        `sent` counts request() calls, and wrk makes about one per thread that it never
        writes, so this is an upper bound. In a quiesce run see `quiesced`.
        """
        if self.quiesce_sent:
            return self.server_errors + self.socket_errors
        return max(0, self.sent - self.requests) + self.server_errors

    def quiesced(self, connections: int) -> bool:
        """True when every connection got a quiesce answer (the only 400s): a wrk connection
        has one request in flight, so all its earlier deposits were answered."""
        return self.quiesce_sent > 0 and self.statuses.get(400, 0) >= connections


def parse_wrk_output(stdout: str) -> WrkRun:
    """Finds the WRKJSON line among wrk's human-readable output."""
    for line in stdout.splitlines():
        if line.startswith(WRK_JSON_PREFIX):
            data: dict[str, Any] = orjson.loads(line[len(WRK_JSON_PREFIX) :])
            latency, errors = data["latency_us"], data["errors"]
            return WrkRun(
                duration_us=int(data["duration_us"]),
                requests=int(data["requests"]),
                sent=int(data["sent"]),
                statuses={int(k): int(v) for k, v in data["statuses"].items()},
                socket_errors=sum(int(errors[k]) for k in ("connect", "read", "write", "timeout")),
                p50_us=int(latency["p50"]),
                p99_us=int(latency["p99"]),
                quiesce_sent=int(data.get("quiesce_sent", 0)),
            )
    raise ValueError("no WRKJSON line in wrk output (did the Lua script's done() run?)")


@dataclass(frozen=True, slots=True)
class BatchOps:
    """The walletd_batch_ops histogram's running sum and count."""

    total: float
    count: float


_METRIC_LINE = re.compile(r"^(walletd_batch_ops_(?:sum|count))(?:\{[^}]*\})?\s+(\S+)")


def parse_batch_ops(metrics_text: str) -> BatchOps | None:
    """Sums walletd_batch_ops over all label sets; None when walletd does not expose it."""
    totals = {"walletd_batch_ops_sum": 0.0, "walletd_batch_ops_count": 0.0}
    seen = False
    for line in metrics_text.splitlines():
        match = _METRIC_LINE.match(line)
        if match:
            totals[match.group(1)] += float(match.group(2))
            seen = True
    if not seen:
        return None
    return BatchOps(totals["walletd_batch_ops_sum"], totals["walletd_batch_ops_count"])


def ops_per_commit(before: BatchOps | None, after: BatchOps | None) -> float | None:
    if before is None or after is None or after.count <= before.count:
        return None
    return (after.total - before.total) / (after.count - before.count)


def round_ratios(numerators: Sequence[WrkRun], denominators: Sequence[WrkRun]) -> list[float]:
    """rps of one scenario over another's, round by round (the runs of a round are
    neighbours in time, so the machine's drift hits both alike)."""
    return [
        top.rps / bottom.rps
        for top, bottom in zip(numerators, denominators, strict=False)
        if bottom.rps > 0
    ]


def spread(values: Sequence[float], spec: str = ".2f") -> str:
    """``median (min-max)`` of the values, or n/a."""
    if not values:
        return "n/a"
    return f"{median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def median(values: Iterable[float]) -> float:
    items = list(values)
    if not items:
        raise ValueError("median of nothing")
    return float(statistics.median(items))


def ratio(value: float, reference: float) -> float | None:
    return value / reference if reference > 0 else None


@dataclass(frozen=True, slots=True)
class Summary:
    scenario: str
    target: str
    rounds: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: float
    ops_per_commit: float | None


def summarize(
    scenario: str, target: str, runs: Sequence[WrkRun], batch: Sequence[float]
) -> Summary:
    """Medians over rounds: robust to one disturbed round on a shared machine."""
    return Summary(
        scenario=scenario,
        target=target,
        rounds=len(runs),
        rps=median(r.rps for r in runs),
        p50_ms=median(r.p50_us / 1000 for r in runs),
        p99_ms=median(r.p99_us / 1000 for r in runs),
        non_2xx=median(r.non_2xx for r in runs),
        ops_per_commit=median(batch) if batch else None,
    )


def bounded_check(applied: int, acked: int, unknown: int) -> bool:
    """Money applied must cover every 2xx, plus at most the requests of unknown outcome."""
    return acked <= applied <= acked + unknown


def machine_info(
    cpuinfo: Path = Path("/proc/cpuinfo"), meminfo: Path = Path("/proc/meminfo")
) -> str:
    model = "unknown CPU"
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "unknown memory"
    if meminfo.exists():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
                break
    return f"{os.cpu_count()} CPUs (nproc), {model}, {memory}"


_DURABILITY_LINE = re.compile(r"PostgreSQL durability: (.+)$", re.MULTILINE)


def measured_durability(walletd_log: str) -> str:
    """The durability settings walletd logged at start: those of the server measured."""
    match = _DURABILITY_LINE.search(walletd_log)
    if match is None:
        return "PostgreSQL durability: unknown (walletd did not log it)."
    return f"PostgreSQL durability: {match.group(1).strip()}."


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_section(
    summaries: Sequence[Summary],
    *,
    machine: str,
    command: str,
    date: str,
    settings: str,
    verification: Sequence[str],
) -> str:
    ceiling = {s.scenario: s.rps for s in summaries if s.target == "ceiling"}
    lines = [
        MARK_START,
        f"Generated by `{command}` on {date}.",
        "",
        f"Machine: {machine}. {settings}",
        "",
        "| scenario | target | rps (median) | p50 ms | p99 ms | non-2xx | vs ceiling"
        " | ops/commit |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summaries:
        vs = ratio(s.rps, ceiling.get(s.scenario, 0.0))
        lines.append(
            f"| {s.scenario} | {s.target} | {s.rps:.0f} | {s.p50_ms:.2f} | {s.p99_ms:.2f}"
            f" | {s.non_2xx:.0f} | {_fmt(vs, '.2f')} | {_fmt(s.ops_per_commit, '.1f')} |"
        )
    lines += ["", "Balance verification:", *(f"- {v}" for v in verification), MARK_END]
    return "\n".join(lines) + "\n"


def replace_section(
    document: str, section: str, start_mark: str = MARK_START, end_mark: str = MARK_END
) -> str:
    """Replaces the marked section, or appends it; text outside the markers is kept."""
    start, end = document.find(start_mark), document.find(end_mark)
    if start != -1 and end > start:
        tail = document[end + len(end_mark) :]
        return document[:start] + section.rstrip("\n") + ("\n" if not tail else "") + tail
    if not document:
        return "# Benchmarks\n\n" + section
    return document.rstrip("\n") + "\n\n" + section

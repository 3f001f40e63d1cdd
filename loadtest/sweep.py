"""The latency-vs-load sweep of `make bench`: wrk at 8 … 1,024 connections against walletd
and the bare aiohttp ceiling, drawn as two SVG charts in docs/.

    python -m loadtest.sweep [--connections 8,64] [--duration 2] [--out DIR]

Flow: for each connection count (doubling), one wrk run on walletd and one on the ceiling,
deposits spread over many wallets. Where walletd saturates its throughput flattens and
p99 grows with the queue until the mailbox bound is reached; past it the extra load is shed
as 503 OVERLOADED (the dashed line), so p99 stays bounded instead of growing without end.
The deposits are checked against the balances afterwards (bounded by wrk's unanswered
requests, as in bench.py).

`make bench` calls ``run_sweep`` + ``write_charts`` after its rounds (bench.py); running
this module alone starts its own walletd and ceiling (a few seconds: a smoke of the charts).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench_report import WrkRun, bounded_check, machine_info
from loadtest.charts import Series, line_chart_svg
from loadtest.procs import REPO_ROOT, Server, running_ceiling, running_walletd

__all__ = [
    "SWEEP_CONNECTIONS",
    "SweepPoint",
    "check_money",
    "main",
    "parse_connections",
    "run_sweep",
    "sweep_subtitle",
    "write_charts",
]

SWEEP_CONNECTIONS = (8, 16, 32, 64, 128, 256, 512, 1024)
CONNECTIONS_MAX = 4096
SWEEP_SCENARIO = "many"
THROUGHPUT_SVG = "bench-throughput.svg"
LATENCY_SVG = "bench-p99.svg"
WALLETD_COLOR = "#1f77b4"
CEILING_COLOR = "#7f7f7f"
SHED_COLOR = "#d62728"

RunWrk = Callable[[str, str, Path, int, int], WrkRun]


@dataclass(frozen=True, slots=True)
class SweepPoint:
    target: str  # "walletd" or "ceiling"
    connections: int
    run: WrkRun

    @property
    def ok_per_s(self) -> float:
        return self.run.ok_2xx / (self.run.duration_us / 1e6) if self.run.duration_us else 0.0

    @property
    def shed_per_s(self) -> float:
        shed = self.run.statuses.get(503, 0)
        return shed / (self.run.duration_us / 1e6) if self.run.duration_us else 0.0


def parse_connections(text: str) -> tuple[int, ...]:
    values = tuple(int(part) for part in text.split(",") if part.strip())
    if not values or any(not 1 <= value <= CONNECTIONS_MAX for value in values):
        raise ValueError(f"connections must be 1..{CONNECTIONS_MAX}, comma-separated")
    return tuple(sorted(set(values)))


def run_sweep(
    walletd: Server,
    ceiling: Server,
    ids_file: Path,
    connections: Sequence[int],
    duration_s: int,
    settle_s: float,
    run_wrk: RunWrk,
) -> list[SweepPoint]:
    """One wrk run per target and connection count, with quiet in between."""
    points = []
    for count in connections:
        for target, server in (("walletd", walletd), ("ceiling", ceiling)):
            time.sleep(settle_s)
            run = run_wrk(server.url, SWEEP_SCENARIO, ids_file, count, duration_s)
            point = SweepPoint(target, count, run)
            points.append(point)
            print(
                f"sweep {count:>5} connections {target:>7}: {point.ok_per_s:9.0f} 2xx/s"
                f"  p99 {run.p99_us / 1000:8.2f} ms  503/s {point.shed_per_s:8.0f}",
                flush=True,
            )
    return points


def check_money(points: Sequence[SweepPoint], applied_deposits: int) -> str:
    """The deposits the sweep applied lie between its 2xx and its 2xx plus unknowns."""
    runs = [point.run for point in points if point.target == "walletd"]
    acked = sum(run.ok_2xx for run in runs)
    unknown = sum(run.unknown_outcomes for run in runs)
    ok = bounded_check(applied_deposits, acked, unknown)
    return (
        f"{'PASS' if ok else 'FAIL'} sweep (bounded): {applied_deposits} deposits applied;"
        f" 2xx {acked}, unknown outcome {unknown}"
    )


def _series(points: Sequence[SweepPoint], target: str) -> list[SweepPoint]:
    return sorted((p for p in points if p.target == target), key=lambda p: p.connections)


def write_charts(points: Sequence[SweepPoint], out_dir: Path, subtitle: str) -> list[Path]:
    """docs/bench-throughput.svg and docs/bench-p99.svg from the sweep's points."""
    walletd, ceiling = _series(points, "walletd"), _series(points, "ceiling")
    throughput = line_chart_svg(
        "Throughput against connections (deposits, many wallets)",
        subtitle,
        "concurrent connections (wrk)",
        "responses per second",
        [
            Series("walletd 2xx/s", [(p.connections, p.ok_per_s) for p in walletd], WALLETD_COLOR),
            Series("ceiling 2xx/s", [(p.connections, p.ok_per_s) for p in ceiling], CEILING_COLOR),
            Series(
                "walletd 503/s (shed)",
                [(p.connections, p.shed_per_s) for p in walletd],
                SHED_COLOR,
                dashed=True,
            ),
        ],
    )
    latency = line_chart_svg(
        "p99 latency against connections (deposits, many wallets)",
        subtitle,
        "concurrent connections (wrk)",
        "p99 latency (ms)",
        [
            Series("walletd p99", [(p.connections, p.run.p99_us / 1000) for p in walletd],
                   WALLETD_COLOR),
            Series("ceiling p99", [(p.connections, p.run.p99_us / 1000) for p in ceiling],
                   CEILING_COLOR),
        ],
    )  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, svg in ((THROUGHPUT_SVG, throughput), (LATENCY_SVG, latency)):
        path = out_dir / name
        path.write_text(svg)
        written.append(path)
    return written


def sweep_subtitle(duration_s: int, origin: str) -> str:
    """One short line under the title: where the figures come from (the full command is in
    docs/BENCHMARKS.md, which links the charts)."""
    return f"{origin}, {duration_s} s per point; {machine_info()}"


def main(argv: list[str] | None = None) -> int:
    # Imported here: bench.py imports this module for its hook.
    from loadtest.bench import AMOUNT_CENTS, create_wallets, read_balances_cents, run_wrk

    parser = argparse.ArgumentParser(description="walletd vs ceiling across connection counts")
    parser.add_argument("--connections", default=",".join(map(str, SWEEP_CONNECTIONS)))
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    parser.add_argument("--settle", type=float, default=1.0, help="seconds of quiet per run")
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs")
    args = parser.parse_args(argv)
    try:
        connections = parse_connections(args.connections)
    except ValueError as error:
        parser.error(str(error))
    with (
        tempfile.TemporaryDirectory(prefix="walletd-sweep-") as tmp,
        running_walletd() as walletd,
        running_ceiling() as ceiling,
    ):
        ids = asyncio.run(create_wallets(walletd.url, args.wallets))
        ids_file = Path(tmp) / "many.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        points = run_sweep(walletd, ceiling, ids_file, connections, args.duration, args.settle,
                           run_wrk)  # fmt: skip
        applied = sum(asyncio.run(read_balances_cents(walletd.url, ids))) // AMOUNT_CENTS
    verdict = check_money(points, applied)
    print(verdict)
    origin = "smoke run of loadtest.sweep (make bench redraws this)"
    for path in write_charts(points, args.out, sweep_subtitle(args.duration, origin)):
        print(f"wrote {path}")
    return 0 if verdict.startswith("PASS") else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`make bench`: walletd against the bare aiohttp ceiling, with wrk, and a money check.

    python -m loadtest.bench [--duration 10] [--rounds 3] [--connections 64]
                             [--only hot|many|get|transfer] [--no-write] [--url URL]

Flow (each step bounded in count and time):

    start walletd (embedded PostgreSQL, temp dir) and ceiling
      -> create 1 hot wallet + --wallets wallets via the API (bounded concurrency), and
         --wallets more funded with TRANSFER_FUND each for the transfer scenario
      -> for each round: for each scenario: wrk on walletd, wrk on ceiling (order alternates)
      -> read balances back: hot balance and the sum over the many wallets must cover every
         2xx deposit x amount, plus at most the deposits of unknown outcome (cut off by wrk's
         stop or answered 5xx); the transfer wallets must hold exactly what they were funded
         with (transfers move money, never create or lose it), once no transfer is PENDING
      -> medians per scenario/target into docs/BENCHMARKS.md between the bench markers
      -> the latency-vs-load sweep (loadtest/sweep.py): 8 … 1,024 connections on both
         targets, its own money check, and docs/bench-throughput.svg + docs/bench-p99.svg

Exit 0 when every balance checks out, 1 on a mismatch or a failed wrk run, 2 without wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import aiohttp

from loadtest import sweep
from loadtest.bench_report import (
    BatchOps,
    Summary,
    WrkRun,
    bounded_check,
    machine_info,
    measured_durability,
    ops_per_commit,
    parse_batch_ops,
    parse_wrk_output,
    render_section,
    replace_section,
    round_ratios,
    spread,
    summarize,
)
from loadtest.ledger import parse_cents
from loadtest.procs import REPO_ROOT, Server, running_ceiling, running_walletd
from walletd.client.api import WalletdClient

__all__ = ["main"]

T = TypeVar("T")

SCENARIOS = ("hot", "many", "get", "transfer")
DEPOSIT_SCENARIOS = ("hot", "many")
# Scenarios whose ops per commit are measured (the ones that write).
WRITE_SCENARIOS = ("hot", "many", "transfer")
# Each transfer wallet starts with this much, so that transfers of AMOUNT are rarely refused.
TRANSFER_FUND = "1000.00"
# PENDING transfers are finished by walletd's re-drive (default every 2 s): the money check
# waits this long at most for the sum to settle.
TRANSFER_SETTLE_S = 15.0
AMOUNT = "1.00"
AMOUNT_CENTS = 100
WRK_THREADS = 2
WRK_TIMEOUT_S_EXTRA = 30  # beyond --duration: wrk's own start-up and done()
WRK_REQUEST_TIMEOUT = "10s"
# The exact money check: deposits for VERIFY_DEPOSIT_S, then a quiet tail until wrk stops.
VERIFY_DURATION_S = 5
VERIFY_DEPOSIT_S = 3
HTTP_CONCURRENCY = 64
HTTP_TIMEOUT_S = 30.0
ROUNDS_MAX = 50
WALLETS_MAX = 1_000_000
LUA_SCRIPT = REPO_ROOT / "loadtest" / "wrk_walletd.lua"
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="walletd vs ceiling with wrk")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--warmup",
        type=int,
        default=20,
        help="seconds of unmeasured load per scenario and target before round 1 (0 = none)",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=5.0,
        help="seconds of quiet before each run (PostgreSQL's checkpoints and autovacuum "
        "after a write run otherwise land in the next run, whichever target it is)",
    )
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--only", choices=SCENARIOS, action="append", help="repeatable")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    parser.add_argument("--url", default="", help="bench this running walletd instead")
    parser.add_argument("--walletd-cmd", default="", help="command that accepts `serve ...`")
    parser.add_argument(
        "--sweep-connections",
        type=sweep.parse_connections,
        default=sweep.SWEEP_CONNECTIONS,
        help="connection counts of the latency-vs-load sweep (comma-separated)",
    )
    parser.add_argument("--sweep-duration", type=int, default=10, help="seconds per sweep run")
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep and its charts")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= ROUNDS_MAX and 1 <= args.wallets <= WALLETS_MAX):
        parser.error(f"--rounds must be 1..{ROUNDS_MAX}, --wallets 1..{WALLETS_MAX}")
    if not 0 <= args.settle <= 60:
        parser.error("--settle must be 0..60 seconds")
    if not 0 <= args.warmup <= 120:
        parser.error("--warmup must be 0..120 seconds")
    return args


# ---------------------------------------------------------------------------------------------
# HTTP set-up and read-back


async def _bounded(calls: Sequence[Awaitable[T]]) -> list[T]:
    semaphore = asyncio.Semaphore(HTTP_CONCURRENCY)

    async def one(call: Awaitable[T]) -> T:
        async with semaphore:
            return await call

    return await asyncio.gather(*(one(call) for call in calls))


async def create_wallets(base_url: str, count: int) -> list[str]:
    """Creates ``count`` wallets through walletd.client: each creation carries its own
    Idempotency-Key, so a 503 or a cut connection is retried without making a duplicate."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    async with WalletdClient(base_url, request_timeout_s=HTTP_TIMEOUT_S) as walletd:
        await _bounded([walletd.create_wallet(wallet_id) for wallet_id in ids])
    return ids


async def fund_wallets(base_url: str, ids: list[str], amount: str) -> None:
    """Deposits ``amount`` into each wallet through walletd.client (keyed, retried safely)."""
    async with WalletdClient(base_url, request_timeout_s=HTTP_TIMEOUT_S) as walletd:
        await _bounded([walletd.deposit(wallet_id, amount) for wallet_id in ids])


async def read_balances_cents(base_url: str, ids: list[str]) -> list[int]:
    async with WalletdClient(base_url, request_timeout_s=HTTP_TIMEOUT_S) as walletd:
        wallets = await _bounded([walletd.get_wallet(wallet_id) for wallet_id in ids])
    return [parse_cents(str(wallet.balance)) for wallet in wallets]


async def read_batch_ops(base_url: str) -> BatchOps | None:
    try:
        timeout = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{base_url}/metrics") as response,
        ):
            return parse_batch_ops(await response.text()) if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None  # metrics are a bonus; their absence must not fail the bench


# ---------------------------------------------------------------------------------------------
# wrk


def run_wrk(
    url: str,
    scenario: str,
    ids_file: Path,
    connections: int,
    duration_s: int,
    deposit_s: int | None = None,
) -> WrkRun:
    command = [
        "wrk",
        f"-t{WRK_THREADS}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        WRK_REQUEST_TIMEOUT,
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        scenario,
        str(ids_file),
        AMOUNT,
        *([] if deposit_s is None else [str(deposit_s)]),
    ]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=duration_s + WRK_TIMEOUT_S_EXTRA,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"wrk failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return parse_wrk_output(completed.stdout)


@dataclass(slots=True)
class Results:
    runs: dict[tuple[str, str], list[WrkRun]] = field(default_factory=dict)
    batch: dict[str, list[float]] = field(default_factory=dict)
    # Commits (all shards) per 2xx transfer, per measured round: below 1 when a commit
    # carries many transfers.
    commits_per_transfer: list[float] = field(default_factory=list)
    # Log rows per 2xx transfer, per measured round (2: a debit and a credit).
    rows_per_transfer: list[float] = field(default_factory=list)
    # Unmeasured warm-up runs: left out of the figures, counted in the money check.
    warmup: dict[tuple[str, str], list[WrkRun]] = field(default_factory=dict)

    def add(self, scenario: str, target: str, run: WrkRun) -> None:
        self.runs.setdefault((scenario, target), []).append(run)

    def deposits(self, scenario: str) -> list[WrkRun]:
        """Every walletd run of a scenario that sent deposits, warm-up included."""
        key = (scenario, "walletd")
        return self.warmup.get(key, []) + self.runs.get(key, [])


def _print_run(round_index: int, scenario: str, target: str, run: WrkRun) -> None:
    print(
        f"round {round_index + 1} {scenario:>4} {target:>7}: {run.rps:9.0f} rps"
        f"  p50 {run.p50_us / 1000:7.2f} ms  p99 {run.p99_us / 1000:7.2f} ms"
        f"  non-2xx {run.non_2xx}  socket errors {run.socket_errors}",
        flush=True,
    )


def bench_rounds(
    walletd: Server, ceiling: Server, files: dict[str, Path], args: argparse.Namespace
) -> Results:
    results = Results()
    scenarios = args.only or list(SCENARIOS)
    if args.warmup:
        # Unmeasured: PostgreSQL's first checkpoint and autovacuum after the wallets were
        # created, and walletd's caches, settle here instead of in round 1.
        for scenario in scenarios:
            for target, server in (("walletd", walletd), ("ceiling", ceiling)):
                run = run_wrk(server.url, scenario, files[scenario], args.connections, args.warmup)
                results.warmup.setdefault((scenario, target), []).append(run)
                print(f"warm-up {scenario:>4} {target:>7}: {run.rps:9.0f} rps", flush=True)
    for round_index in range(args.rounds):
        # Alternate which target goes first, so warm-up and drift do not favour one side.
        targets = [("walletd", walletd), ("ceiling", ceiling)]
        if round_index % 2:
            targets.reverse()
        for scenario in scenarios:
            for target, server in targets:
                time.sleep(args.settle)
                before = asyncio.run(read_batch_ops(server.url)) if target == "walletd" else None
                run = run_wrk(
                    server.url, scenario, files[scenario], args.connections, args.duration
                )
                if target == "walletd":
                    after = asyncio.run(read_batch_ops(server.url))
                    per_commit = ops_per_commit(before, after)
                    if per_commit is not None and scenario in WRITE_SCENARIOS:
                        results.batch.setdefault(scenario, []).append(per_commit)
                    if scenario == "transfer" and before and after and run.ok_2xx:
                        commits = after.count - before.count
                        results.commits_per_transfer.append(commits / run.ok_2xx)
                        rows = after.total - before.total
                        results.rows_per_transfer.append(rows / run.ok_2xx)
                results.add(scenario, target, run)
                _print_run(round_index, scenario, target, run)
    return results


# ---------------------------------------------------------------------------------------------
# Money check


def _sum_cents(walletd: Server, ids: list[str]) -> int:
    return sum(asyncio.run(read_balances_cents(walletd.url, ids)))


def verify_rounds(walletd: Server, scenario: str, ids: list[str], results: Results) -> str:
    """Over the benchmark rounds wrk cuts off up to --connections requests per run, so the
    balance is only bounded: every 2xx, plus at most the deposits of unknown outcome."""
    runs = results.deposits(scenario)
    acked = sum(r.ok_2xx for r in runs)
    unknown = sum(r.unknown_outcomes for r in runs)
    applied_cents = _sum_cents(walletd, ids)
    applied = applied_cents // AMOUNT_CENTS
    ok = applied_cents % AMOUNT_CENTS == 0 and bounded_check(applied, acked, unknown)
    return (
        f"{'PASS' if ok else 'FAIL'} {scenario} (bench rounds, bounded): {len(ids)} wallet(s)"
        f" hold {applied} deposits of {AMOUNT}; 2xx {acked}, unknown outcome {unknown}"
    )


def verify_exact(
    walletd: Server, scenario: str, ids: list[str], ids_file: Path, connections: int
) -> str:
    """A dedicated run whose deposits all get an answer: the balance delta must equal
    the 2xx count x amount, to the cent."""
    before = _sum_cents(walletd, ids)
    run = run_wrk(walletd.url, scenario, ids_file, connections, VERIFY_DURATION_S, VERIFY_DEPOSIT_S)
    delta = _sum_cents(walletd, ids) - before
    quiet = run.quiesced(connections)
    ok = quiet and run.unknown_outcomes == 0 and delta == run.ok_2xx * AMOUNT_CENTS
    return (
        f"{'PASS' if ok else 'FAIL'} {scenario} (exact run): balance delta {delta / 100:.2f},"
        f" 2xx deposits {run.ok_2xx} x {AMOUNT} = {run.ok_2xx * AMOUNT_CENTS / 100:.2f},"
        f" unknown outcome {run.unknown_outcomes}, all connections quiesced: {quiet}"
    )


def verify_transfers(walletd: Server, ids: list[str], results: Results) -> list[str]:
    """Transfers conserve money: once none is PENDING (the re-drive finishes those a run
    cut off), the transfer wallets hold exactly what they were funded with. Also the
    figures the issue asks for: the transfer/deposit throughput ratio, p99, ops per commit
    and commits per transfer."""
    funded = len(ids) * parse_cents(TRANSFER_FUND)
    deadline = time.monotonic() + TRANSFER_SETTLE_S
    total = _sum_cents(walletd, ids)
    while total != funded and time.monotonic() < deadline:
        time.sleep(0.5)
        total = _sum_cents(walletd, ids)
    runs = results.deposits("transfer")
    lines = [
        f"{'PASS' if total == funded else 'FAIL'} transfer (exact): {len(ids)} wallets hold"
        f" {total / 100:.2f}, funded with {funded / 100:.2f}; 2xx transfers"
        f" {sum(r.ok_2xx for r in runs)}, unknown outcome {sum(r.unknown_outcomes for r in runs)}"
    ]
    transfer_runs = results.runs.get(("transfer", "walletd"), [])
    many_runs = results.runs.get(("many", "walletd"), [])
    if transfer_runs and many_runs:
        transfer = summarize(
            "transfer", "walletd", transfer_runs, results.batch.get("transfer", [])
        )
        many = summarize("many", "walletd", many_runs, [])
        lines.append(
            f"INFO transfer/deposit (many) throughput {transfer.rps / many.rps:.2f}"
            f" ({transfer.rps:.0f} / {many.rps:.0f} rps; goal >= 0.5); per round"
            f" {spread(round_ratios(transfer_runs, many_runs))}; transfer p99 ms"
            f" {spread([r.p99_us / 1000 for r in transfer_runs], '.1f')} (deposits"
            f" {spread([r.p99_us / 1000 for r in many_runs], '.1f')}); ops/commit"
            f" {spread(results.batch.get('transfer', []), '.1f')}; log rows per transfer"
            f" {spread(results.rows_per_transfer)}; commits per transfer"
            f" {spread(results.commits_per_transfer, '.3f')} (median (min-max) over rounds)"
        )
    return lines


def verify(
    walletd: Server,
    wallets: dict[str, list[str]],
    files: dict[str, Path],
    results: Results,
    connections: int,
) -> list[str]:
    """One line per check; a line starting with FAIL fails the bench."""
    lines: list[str] = []
    for scenario in DEPOSIT_SCENARIOS:
        if (scenario, "walletd") not in results.runs:
            continue
        ids = wallets[scenario]
        lines.append(verify_rounds(walletd, scenario, ids, results))
        lines.append(verify_exact(walletd, scenario, ids, files[scenario], connections))
        print(lines[-2], lines[-1], sep="\n", flush=True)
    if ("transfer", "walletd") in results.runs:
        transfer_lines = verify_transfers(walletd, wallets["transfer"], results)
        print(*transfer_lines, sep="\n", flush=True)
        lines.extend(transfer_lines)
    return lines


def run_sweep(
    walletd: Server, ceiling: Server, ids: list[str], ids_file: Path, args: argparse.Namespace
) -> str:
    """The latency-vs-load sweep after the rounds: its charts, and its money-check line."""
    before = _sum_cents(walletd, ids)
    points = sweep.run_sweep(
        walletd, ceiling, ids_file, args.sweep_connections, args.sweep_duration, args.settle,
        run_wrk,
    )  # fmt: skip
    applied = (_sum_cents(walletd, ids) - before) // AMOUNT_CENTS
    verdict = sweep.check_money(points, applied)
    print(verdict, flush=True)
    if not args.no_write:
        subtitle = sweep.sweep_subtitle(args.sweep_duration, "make bench")
        for path in sweep.write_charts(points, BENCHMARKS_MD.parent, subtitle):
            print(f"wrote {path}", flush=True)
    return verdict


# ---------------------------------------------------------------------------------------------
# Report


def _summaries(results: Results) -> list[Summary]:
    return [
        summarize(
            scenario, target, runs, results.batch.get(scenario, []) if target == "walletd" else []
        )
        for (scenario, target), runs in results.runs.items()
    ]


def write_report(
    summaries: list[Summary], verification: list[str], args: argparse.Namespace, durability: str
) -> None:
    wrk_settings = (
        f"wrk {WRK_THREADS} threads, {args.connections} connections, {args.duration}s per run,"
        f" {args.warmup}s unmeasured warm-up per scenario and target, {args.rounds} rounds"
        f" alternating walletd/ceiling, {args.settle:g}s of quiet before each run,"
        f" {args.wallets} wallets for many/get, deposits of {AMOUNT};"
        f" {args.wallets} more for transfers of {AMOUNT} between random pairs. {durability}"
    )
    section = render_section(
        summaries,
        machine=machine_info(),
        command="python -m loadtest.bench " + shlex.join(sys.argv[1:]),
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        settings=wrk_settings,
        verification=verification,
    )
    print(section)
    if args.no_write:
        return
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    current = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
    BENCHMARKS_MD.write_text(replace_section(current, section))
    print(f"updated {BENCHMARKS_MD}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    with (
        tempfile.TemporaryDirectory(prefix="walletd-bench-") as tmp,
        running_walletd(args.url, args.walletd_cmd) as walletd,
        running_ceiling() as ceiling,
    ):
        hot = asyncio.run(create_wallets(walletd.url, 1))
        many = asyncio.run(create_wallets(walletd.url, args.wallets))
        files = {"hot": Path(tmp) / "hot.txt", "many": Path(tmp) / "many.txt"}
        files["hot"].write_text("\n".join(hot) + "\n")
        files["many"].write_text("\n".join(many) + "\n")
        files["get"] = files["many"]
        transfer: list[str] = []
        if "transfer" in (args.only or SCENARIOS):
            transfer = asyncio.run(create_wallets(walletd.url, args.wallets))
            asyncio.run(fund_wallets(walletd.url, transfer, TRANSFER_FUND))
        files["transfer"] = Path(tmp) / "transfer.txt"
        files["transfer"].write_text("\n".join(transfer) + "\n")
        try:
            results = bench_rounds(walletd, ceiling, files, args)
            wallets = {"hot": hot, "many": many, "transfer": transfer}
            verification = verify(walletd, wallets, files, results, args.connections)
            if not args.no_sweep:
                verification.append(run_sweep(walletd, ceiling, many, files["many"], args))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            print(f"bench failed: {error}", file=sys.stderr)
            return 1
        log_path = walletd.log_path
        durability = measured_durability(
            log_path.read_text(errors="replace") if log_path is not None else ""
        )
    write_report(_summaries(results), verification, args, durability)
    return 1 if any(line.startswith("FAIL") for line in verification) else 0


if __name__ == "__main__":
    raise SystemExit(main())

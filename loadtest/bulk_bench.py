"""Bulk benchmark: durable operations/s through POST /api/v1/operations/bulk.

    python -m loadtest.bulk_bench [--rounds 3] [--duration 10] [--clients 4] [--items 1000]

(`make bench` runs it after the single-operation scenarios; it writes its table into
docs/BENCHMARKS.md between the bulk-bench markers.)

Starts `walletd serve` (embedded PostgreSQL, fsync and synchronous commit on, as shipped),
creates 10,000 wallets plus one hot wallet, then runs two scenarios in alternating rounds:
``many`` (each request: ``--items`` deposits on random wallets of the 10,000) and ``hot``
(every item on the one wallet). Every item carries its own idempotency key and an amount
that varies; the full per-item results are read and counted. Reported per scenario, as
medians over the rounds with their spread: applied operations/s, p50/p99 per request, ops
per PostgreSQL commit (walletd_batch_ops), and CPU µs per operation of walletd and of
PostgreSQL (from /proc) and of the clients (this process's own). After the HTTP rounds,
the raw append rate of the same batch size is measured with ``loadtest.append_bench``'s
function path on a fresh embedded server: the physical ceiling of this path. At the end,
the money check: every wallet's balance equals the sum of the deposits walletd
acknowledged.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import random
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from loadtest.bench import create_wallets, read_balances_cents, read_batch_ops
from loadtest.bench_report import machine_info, ops_per_commit, replace_section
from loadtest.procs import REPO_ROOT, Server, running_walletd

BULK_PATH = "/api/v1/operations/bulk"
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
BULK_MARK_START = "<!-- bulk-bench:start -->"
BULK_MARK_END = "<!-- bulk-bench:end -->"
WALLETS = 10_000
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass
class Round:
    scenario: str
    applied: int
    seconds: float
    latencies_s: list[float]
    ops_per_commit: float | None
    walletd_cpu_us_per_op: float
    postgres_cpu_us_per_op: float
    # The clients' own CPU (this process's, which runs nothing else during a round): on a
    # two-core machine they share the cores with walletd and PostgreSQL.
    client_cpu_us_per_op: float

    @property
    def ops_per_s(self) -> float:
        return self.applied / self.seconds

    def percentile_ms(self, fraction: float) -> float:
        ordered = sorted(self.latencies_s)
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000


@dataclass
class Ledger:
    """What walletd acknowledged, per wallet, in cents: the money check's expectation."""

    cents: dict[str, int] = field(default_factory=dict)

    def add(self, wallet_id: str, amount: int) -> None:
        self.cents[wallet_id] = self.cents.get(wallet_id, 0) + amount


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def _postgres_pids(data_dir_hint: str) -> list[int]:
    """The PostgreSQL processes serving this walletd: the postmaster and its children."""
    postmasters = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "postgres" in cmdline and data_dir_hint in cmdline and " -D " in cmdline:
            postmasters.append(int(entry.name))
    pids = list(postmasters)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in postmasters:
            pids.append(int(entry.name))
    return pids


def _body(
    wallets: list[str], items: int, rng: random.Random
) -> tuple[bytes, list[tuple[str, int]]]:
    chosen = [(rng.choice(wallets), rng.randint(1, 99_999)) for _ in range(items)]
    body = orjson.dumps(
        {
            "items": [
                {
                    "wallet_id": wallet,
                    "operation_type": "DEPOSIT",
                    "amount": f"{cents // 100}.{cents % 100:02d}",
                    "idempotency_key": uuid.uuid4().hex,
                }
                for wallet, cents in chosen
            ]
        }
    )
    return body, chosen


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    wallets: list[str],
    items: int,
    deadline: float,
    ledger: Ledger,
    latencies: list[float],
    seed: int,
) -> int:
    rng = random.Random(seed)
    applied = 0
    while time.monotonic() < deadline:
        body, chosen = _body(wallets, items, rng)
        started = time.perf_counter()
        async with session.post(
            url, data=body, headers={"Content-Type": "application/json"}
        ) as response:
            raw = await response.read()
        latencies.append(time.perf_counter() - started)
        if response.status != 200:
            raise RuntimeError(f"bulk answered {response.status}: {raw[:300]!r}")
        results = orjson.loads(raw)["results"]
        for (wallet, cents), result in zip(chosen, results, strict=True):
            if result["status"] != 200:
                raise RuntimeError(f"an item failed: {result}")
            ledger.add(wallet, cents)
            applied += 1
    return applied


async def run_round(
    server: Server,
    scenario: str,
    wallets: list[str],
    args: argparse.Namespace,
    ledger: Ledger,
    walletd_pid: int,
    postgres_pids: list[int],
) -> Round:
    url = server.url + BULK_PATH
    latencies: list[float] = []
    before = await read_batch_ops(server.url)
    walletd_ticks = _cpu_ticks([walletd_pid])
    postgres_ticks = _cpu_ticks(postgres_pids)
    client_cpu_s = time.process_time()
    started = time.monotonic()
    deadline = started + args.duration
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        applied_counts = await asyncio.gather(
            *(
                _client(session, url, wallets, args.items, deadline, ledger, latencies, seed)
                for seed in range(args.clients)
            )
        )
    seconds = time.monotonic() - started
    client_us = (time.process_time() - client_cpu_s) * 1e6
    applied = sum(applied_counts)
    after = await read_batch_ops(server.url)
    walletd_us = (_cpu_ticks([walletd_pid]) - walletd_ticks) / CLOCK_TICKS_PER_S * 1e6
    postgres_us = (_cpu_ticks(postgres_pids) - postgres_ticks) / CLOCK_TICKS_PER_S * 1e6
    return Round(
        scenario,
        applied,
        seconds,
        latencies,
        ops_per_commit(before, after),
        walletd_us / max(1, applied),
        postgres_us / max(1, applied),
        client_us / max(1, applied),
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f}–{max(values):,.0f}"


def report(rounds: list[Round], append_rate: float | None, args: argparse.Namespace) -> str:
    lines = [
        BULK_MARK_START,
        f"Generated by `python -m loadtest.bulk_bench --rounds {args.rounds} --duration "
        f"{args.duration:g} --clients {args.clients} --items {args.items}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC. Machine: {machine_info()}. "
        "walletd as `walletd serve` ships it (embedded PostgreSQL, fsync and synchronous "
        "commit on, one shard actor, batches of at most 1,024 operations); every item keyed, "
        "amounts varied, every per-item result read.",
        "",
        "| scenario | ops/s median (spread) | p50 ms / request | p99 ms / request | "
        "ops per commit | walletd CPU µs/op | PostgreSQL CPU µs/op | client CPU µs/op |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in ("many", "hot"):
        runs = [r for r in rounds if r.scenario == scenario]
        if not runs:
            continue
        rates = [r.ops_per_s for r in runs]
        per_commit = [r.ops_per_commit for r in runs if r.ops_per_commit is not None]
        lines.append(
            f"| {scenario} | {statistics.median(rates):,.0f} ({_spread(rates)}) | "
            f"{statistics.median(r.percentile_ms(0.5) for r in runs):.1f} | "
            f"{statistics.median(r.percentile_ms(0.99) for r in runs):.1f} | "
            f"{statistics.median(per_commit) if per_commit else float('nan'):.0f} | "
            f"{statistics.median(r.walletd_cpu_us_per_op for r in runs):.1f} | "
            f"{statistics.median(r.postgres_cpu_us_per_op for r in runs):.1f} | "
            f"{statistics.median(r.client_cpu_us_per_op for r in runs):.1f} |"
        )
    if append_rate is not None:
        lines += ["", f"Raw append, `walletd_append_batch` alone at {args.append_batch} rows per "
                  f"commit (loadtest.append_bench, same run, fresh server): "
                  f"{append_rate:,.0f} rows/s."]  # fmt: skip
    lines.append(BULK_MARK_END)
    return "\n".join(lines) + "\n"


async def _measure(server: Server, args: argparse.Namespace) -> list[Round]:
    wallets = await create_wallets(server.url, WALLETS)
    hot = await create_wallets(server.url, 1)
    assert server.process is not None
    postgres = _postgres_pids(str(Path(server.log_path or "").parent))
    ledger = Ledger()
    rounds: list[Round] = []
    # One unmeasured warm-up round of each, so both scenarios meet resident wallets.
    for scenario, targets in (("many", wallets), ("hot", hot)):
        await run_round(
            server, scenario, targets, _short(args), ledger, server.process.pid, postgres
        )
    for index in range(args.rounds):
        for scenario, targets in (("many", wallets), ("hot", hot)):
            result = await run_round(
                server, scenario, targets, args, ledger, server.process.pid, postgres
            )
            rounds.append(result)
            print(
                f"round {index + 1} {scenario}: {result.ops_per_s:,.0f} ops/s, "
                f"p99 {result.percentile_ms(0.99):.1f} ms, "
                f"{result.ops_per_commit or 0:.0f} ops/commit, "
                f"walletd {result.walletd_cpu_us_per_op:.1f} µs/op, "
                f"PostgreSQL {result.postgres_cpu_us_per_op:.1f} µs/op, "
                f"client {result.client_cpu_us_per_op:.1f} µs/op",
                flush=True,
            )
    ids = list(ledger.cents)
    balances = await read_balances_cents(server.url, ids)
    wrong = [
        (i, b, ledger.cents[i]) for i, b in zip(ids, balances, strict=True) if b != ledger.cents[i]
    ]
    if wrong:
        raise SystemExit(f"money check FAILED on {len(wrong)} wallets, e.g. {wrong[0]}")
    print(f"money check: {len(ids)} wallets, every balance equals its acknowledged deposits")
    return rounds


def _short(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "duration": min(3.0, args.duration)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per round")
    parser.add_argument("--clients", type=int, default=4, help="concurrent bulk clients")
    parser.add_argument("--items", type=int, default=1000, help="items per request")
    parser.add_argument("--no-append", action="store_true", help="skip the raw append rate")
    parser.add_argument(
        "--append-batch", type=int, default=256, help="rows per commit of the raw append rate "
        "(walletd's batch bound, which bulk groups fill)",
    )  # fmt: skip
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    with running_walletd() as server:
        rounds = asyncio.run(_measure(server, args))
    append_rate = None if args.no_append else raw_append_rate(args.append_batch)
    section = report(rounds, append_rate, args)
    print(section)
    if not args.no_write:
        current = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
        BENCHMARKS_MD.write_text(replace_section(current, section, BULK_MARK_START, BULK_MARK_END))
        print(f"updated {BENCHMARKS_MD}")
    return 0


def raw_append_rate(batch_size: int) -> float:
    """Rows/s of the append function alone at this batch size, on a fresh server."""
    from loadtest.append_bench import function_rate

    return function_rate(batch_size)


if __name__ == "__main__":
    raise SystemExit(main())

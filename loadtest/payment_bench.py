"""Payments of two postings against single transfers, in the same run: ``make bench`` runs it.

    python -m loadtest.payment_bench [--rounds 3] [--duration 10] [--connections 32]
                                     [--wallets 1000] [--url URL] [--no-write]

One ``walletd serve`` (embedded PostgreSQL, temp dir) unless ``--url``; ``--wallets`` wallets
funded with FUND each. Then, alternating round by round (transfers first in odd rounds,
payments first in even ones), ``--connections`` closed-loop clients for ``--duration``
seconds each send, keyed like any money request:

- ``transfer``: POST /api/v1/transfers, a random sender to a random receiver, 0.01;
- ``payment``:  POST /api/v1/payments, a random sender to two random receivers, 0.01 each
  (a purchase and its fee).

Printed (and written to docs/BENCHMARKS.md between the payment-bench markers): 201s per
second per kind (medians and min-max over the rounds), the payments' rate ÷ the transfers'
per round (the issue's goal: at least 0.5), p50/p99 latency. Then the money check: once no
transfer is PENDING and no payment DEBITING, the wallets hold exactly what they were funded
with. Exit 1 on a failed check or a non-201 answer other than 503.

The load generator is this process (aiohttp, one event loop): it costs the same per request
for both kinds, so the ratio is the figure to read, not the absolute rates.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.bench_report import replace_section
from loadtest.procs import REPO_ROOT, running_walletd

__all__ = ["main"]

FUND = "1000.00"
AMOUNT = "0.01"
KINDS = ("transfer", "payment")
BENCHMARKS_MD = REPO_ROOT / "docs" / "BENCHMARKS.md"
MARK_START, MARK_END = "<!-- payment-bench:start -->", "<!-- payment-bench:end -->"
SETTLE_S = 30.0
SETUP_CONCURRENCY = 32
TIMEOUT = aiohttp.ClientTimeout(total=30)


@dataclass(slots=True)
class Run:
    kind: str
    created: int = 0
    unavailable: int = 0
    other: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.created / self.seconds if self.seconds else 0.0


def _body(kind: str, rng: random.Random, wallets: list[str]) -> tuple[str, dict[str, Any]]:
    if kind == "transfer":
        sender, receiver = rng.sample(wallets, 2)
        return "/api/v1/transfers", {
            "from_wallet_id": sender, "to_wallet_id": receiver, "amount": AMOUNT,
        }  # fmt: skip
    sender, merchant, platform = rng.sample(wallets, 3)
    return "/api/v1/payments", {
        "postings": [
            {"from_wallet_id": sender, "to_wallet_id": merchant, "amount": AMOUNT},
            {"from_wallet_id": sender, "to_wallet_id": platform, "amount": AMOUNT},
        ]
    }


async def _load(
    url: str, kind: str, wallets: list[str], connections: int, duration_s: float, seed: int
) -> Run:
    run = Run(kind)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
        stop_at = time.monotonic() + duration_s

        async def client(number: int) -> None:
            rng = random.Random(seed * 1000 + number)
            while time.monotonic() < stop_at:
                path, body = _body(kind, rng, wallets)
                headers = {"Idempotency-Key": f"bench-{uuid.uuid4().hex}"}
                started = time.monotonic()
                async with session.post(url + path, json=body, headers=headers) as response:
                    await response.read()
                    status = response.status
                run.latencies_ms.append((time.monotonic() - started) * 1000)
                if status == 201:
                    run.created += 1
                elif status == 503:
                    run.unavailable += 1
                else:
                    run.other.append(f"{status} {(await response.text())[:200]}")

        started = time.monotonic()
        await asyncio.gather(*(client(n) for n in range(connections)))
        run.seconds = time.monotonic() - started
    return run


async def _setup(url: str, count: int) -> list[str]:
    semaphore = asyncio.Semaphore(SETUP_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def one(number: int) -> str:
            async with semaphore:
                async with session.post(url + "/api/v1/wallets") as response:
                    wallet = str((await response.json())["id"])
                deposit = {"operation_type": "DEPOSIT", "amount": FUND}
                async with session.post(
                    f"{url}/api/v1/wallets/{wallet}/operation", json=deposit
                ) as response:
                    assert response.status == 200, await response.text()
                return wallet

        return list(await asyncio.gather(*(one(n) for n in range(count))))


async def _money_check(url: str, wallets: list[str]) -> str | None:
    """Once nothing is in flight (GET of each wallet: no PENDING counted in balances), the
    wallets hold exactly what they were funded with."""
    expected = len(wallets) * int(FUND.replace(".", ""))
    deadline = time.monotonic() + SETTLE_S
    semaphore = asyncio.Semaphore(SETUP_CONCURRENCY)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:

        async def balance(wallet: str) -> int:
            async with semaphore, session.get(f"{url}/api/v1/wallets/{wallet}") as response:
                return int(str((await response.json())["balance"]).replace(".", ""))

        while True:
            held = sum(await asyncio.gather(*(balance(w) for w in wallets)))
            if held == expected:
                return None
            if time.monotonic() > deadline:
                return f"wallets hold {held} cents, funded with {expected}"
            await asyncio.sleep(0.5)  # money in flight: the re-drive finishes it


def _median_range(values: list[float], digits: int = 0) -> str:
    def fmt(value: float) -> str:
        return f"{value:.{digits}f}"

    return f"{fmt(statistics.median(values))} ({fmt(min(values))}-{fmt(max(values))})"


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def render(runs: list[Run], command: str, rounds: int) -> str:
    by_kind = {kind: [r for r in runs if r.kind == kind] for kind in KINDS}
    ratios = [p.rate / t.rate for t, p in zip(by_kind["transfer"], by_kind["payment"], strict=True)
              if t.rate]  # fmt: skip
    lines = [
        MARK_START,
        f"`{command}`",
        "",
        "| kind | 201/s | postings/s | p50 ms | p99 ms | 503s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in KINDS:
        kind_runs = by_kind[kind]
        legs = 1 if kind == "transfer" else 2
        lines.append(
            f"| {kind} | {_median_range([r.rate for r in kind_runs])} "
            f"| {_median_range([r.rate * legs for r in kind_runs])} "
            f"| {_median_range([_percentile(r.latencies_ms, 0.5) for r in kind_runs], 1)} "
            f"| {_median_range([_percentile(r.latencies_ms, 0.99) for r in kind_runs], 1)} "
            f"| {sum(r.unavailable for r in kind_runs)} |"
        )
    lines += [
        "",
        f"Medians (min-max) over {rounds} alternating rounds. Payments ÷ transfers, per round: "
        f"{_median_range(ratios, 2)} (goal: at least 0.5).",
        MARK_END,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--url", default="", help="bench this running walletd instead")
    parser.add_argument("--walletd-cmd", default="", help="command that accepts `serve ...`")
    parser.add_argument("--no-write", action="store_true", help="do not touch BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 3 <= args.wallets <= 100_000):
        parser.error("--rounds must be 1..20 and --wallets 3..100000")
    if not (1 <= args.connections <= 1024 and 0 < args.duration <= 600):
        parser.error("--connections must be 1..1024 and --duration 0..600 seconds")
    command = "python -m loadtest.payment_bench " + " ".join(argv or sys.argv[1:])
    runs: list[Run] = []
    problem: str | None = None
    with running_walletd(args.url, args.walletd_cmd) as server:
        url = server.url
        wallets = asyncio.run(_setup(url, args.wallets))
        for number in range(args.rounds):
            order = KINDS if number % 2 == 0 else tuple(reversed(KINDS))
            for kind in order:
                run = asyncio.run(
                    _load(url, kind, wallets, args.connections, args.duration, number)
                )
                runs.append(run)
                print(f"round {number + 1} {kind}: {run.rate:.0f}/s, {run.unavailable} 503, "
                      f"{len(run.other)} other", flush=True)  # fmt: skip
                if run.other:
                    problem = f"{kind}: unexpected answers, e.g. {run.other[0]}"
        problem = problem or asyncio.run(_money_check(url, wallets))
    section = render(runs, command.strip(), args.rounds)
    print(section)
    if not args.no_write:
        path = Path(BENCHMARKS_MD)
        path.write_text(replace_section(path.read_text(), section, MARK_START, MARK_END))
    if problem is not None:
        print(f"payment bench: {problem}", file=sys.stderr)
        return 1
    print("payment bench: money check ok")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

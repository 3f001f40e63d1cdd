"""What a slow webhook subscriber costs the write path: ``python -m loadtest.webhook_bench``.

    python -m loadtest.webhook_bench [--rounds 3] [--seconds 5] [--connections 16]
                                     [--wallets 200] [--delay-s 0.5] [--walletd CMD]

Flow (each step bounded in count and time)::

    start walletd (embedded PostgreSQL in a temp dir, webhooks allowed to 127.0.0.1)
      -> a receiver on 127.0.0.1 that answers 200 after --delay-s (a slow endpoint)
      -> create --wallets wallets; one subscription to the receiver, every event type
      -> per round, in alternating order:
           deposits for --seconds, subscription disabled  -> CPU µs per deposit
           deposits for --seconds, subscription enabled   -> CPU µs per deposit
      -> medians over the rounds, and each round's ratio
      -> no deposits for --seconds, subscription enabled then disabled -> idle CPU ms/s:
         the sender's own cost, free of the deposit rate's noise (CPU per deposit rises
         when the rate falls, as batches shrink, so a loaded machine moves it both ways)

CPU per deposit: utime + stime of walletd and of every PostgreSQL process (from /proc,
feed_bench's sampling), over the deposits answered 200: the sender's own work (feed reads,
cursor and attempt rows, the requests) is in it. The load generator and the receiver run in
this process and are not counted. The receiver takes one event per --delay-s, far below the
deposit rate: the subscription is always behind, the case where a sender that blocked
anything on the write path would show.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from loadtest.feed_bench import Walletd, _create_wallets, _deposits, running_walletd

__all__ = ["main"]

RECEIVER_HOST = "127.0.0.1"


@dataclass(slots=True)
class Receiver:
    delay_s: float
    received: int = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.received += 1
        await asyncio.sleep(self.delay_s)
        return web.Response(status=200)


async def _phase(
    walletd: Walletd,
    http: aiohttp.ClientSession,
    wallets: list[str],
    args: argparse.Namespace,
    webhook: str,
    enabled: bool,
) -> tuple[float, float]:
    """(CPU µs per deposit, deposits/s) with the subscription enabled or not."""  # fmt: skip
    url = walletd.server.url
    async with http.patch(f"{url}/api/v1/webhooks/{webhook}", json={"enabled": enabled}) as r:
        if r.status != 200:
            raise RuntimeError(f"PATCH webhook: {r.status}")
    await asyncio.sleep(1.0)  # the sender's next lease step starts or stops it
    cpu_before = walletd.cpu_seconds()
    started = time.monotonic()
    deposits = await _deposits(http, url, wallets, args.connections, args.seconds)
    elapsed = time.monotonic() - started
    cpu_after = walletd.cpu_seconds()
    return (cpu_after - cpu_before) * 1e6 / max(1, deposits), deposits / elapsed


async def _idle_cpu_ms_s(
    walletd: Walletd, http: aiohttp.ClientSession, webhook: str, enabled: bool, seconds: float
) -> float:
    """CPU ms per second of walletd + PostgreSQL with no deposits: with the subscription
    enabled (it has a backlog, so it is sending), that is the sender's whole cost."""
    url = walletd.server.url
    async with http.patch(f"{url}/api/v1/webhooks/{webhook}", json={"enabled": enabled}) as r:
        if r.status != 200:
            raise RuntimeError(f"PATCH webhook: {r.status}")
    await asyncio.sleep(1.0)
    cpu_before = walletd.cpu_seconds()
    await asyncio.sleep(seconds)
    return (walletd.cpu_seconds() - cpu_before) * 1e3 / seconds


async def _bench(args: argparse.Namespace) -> None:
    receiver = Receiver(args.delay_s)
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, RECEIVER_HOST, 0).start()
    port = runner.addresses[0][1]
    # Read by the walletd started below (it inherits this environment).
    os.environ["WALLETD_WEBHOOK_ALLOWED_HOSTS"] = RECEIVER_HOST
    os.environ["WALLETD_WEBHOOK_LEASE_TTL"] = "1.5"
    try:
        with running_walletd(args.walletd) as walletd:
            url = walletd.server.url
            connector = aiohttp.TCPConnector(limit=args.connections + 4)
            async with aiohttp.ClientSession(connector=connector) as http:
                wallets = await _create_wallets(http, url, args.wallets)
                async with http.post(
                    f"{url}/api/v1/webhooks",
                    json={"url": f"http://{RECEIVER_HOST}:{port}/hook", "enabled": False},
                ) as response:
                    webhook = (await response.json())["id"]
                without: list[tuple[float, float]] = []
                with_: list[tuple[float, float]] = []
                for number in range(args.rounds):
                    for enabled in (False, True) if number % 2 == 0 else (True, False):
                        result = await _phase(walletd, http, wallets, args, webhook, enabled)
                        (with_ if enabled else without).append(result)
                    print(f"round {number + 1}: without {without[-1][0]:.0f} µs/deposit "
                          f"({without[-1][1]:.0f}/s), with {with_[-1][0]:.0f} µs/deposit "
                          f"({with_[-1][1]:.0f}/s) "
                          f"({100 * (with_[-1][0] / without[-1][0] - 1):+.1f}%)",
                          flush=True)  # fmt: skip
                idle = {
                    enabled: await _idle_cpu_ms_s(walletd, http, webhook, enabled, args.seconds)
                    for enabled in (True, False)
                }
    finally:
        await runner.cleanup()
    median = statistics.median
    cpu_without = median(r[0] for r in without)
    cpu_with = median(r[0] for r in with_)
    ratios = sorted(w[0] / o[0] for w, o in zip(with_, without, strict=True))
    print(f"# webhook_bench: {args.rounds} rounds of {args.seconds:g} s, {args.connections} "
          f"connections, {args.wallets} wallets, receiver {args.delay_s:g} s per answer; "
          f"medians")  # fmt: skip
    print("| measure | no subscriber | slow subscriber |")
    print("| --- | ---: | ---: |")
    print(f"| CPU µs per deposit (walletd + PostgreSQL) | {cpu_without:.0f} | {cpu_with:.0f} "
          f"({100 * (cpu_with / cpu_without - 1):+.1f}%; per-round ratios "
          f"{', '.join(f'{r:.3f}' for r in ratios)}) |")  # fmt: skip
    print(f"| deposits/s | {median(r[1] for r in without):.0f} | "
          f"{median(r[1] for r in with_):.0f} |")  # fmt: skip
    print(f"| webhook requests received | — | {receiver.received} |")
    print(f"| idle CPU ms per second (no deposits) | {idle[False]:.1f} | {idle[True]:.1f} |")
    sender_us_s = (idle[True] - idle[False]) * 1e3
    deposits_s = median(r[1] for r in without)
    print(
        f"# the sender's own cost: {sender_us_s:.0f} µs of CPU per second, "
        f"{sender_us_s / max(deposits_s, 1):.1f} µs per deposit at {deposits_s:.0f}/s "
        f"({100 * sender_us_s / max(deposits_s, 1) / cpu_without:.2f}% of a deposit)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="per phase")
    parser.add_argument("--connections", type=int, default=16, help="deposit loops")
    parser.add_argument("--wallets", type=int, default=200)
    parser.add_argument("--delay-s", type=float, default=0.5, help="the receiver's answer delay")
    parser.add_argument("--walletd", default="", help="command to run walletd")
    args = parser.parse_args(argv)
    asyncio.run(_bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

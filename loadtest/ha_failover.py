"""Failover time, measured: ``python -m loadtest.ha_failover --runs 5``.

Starts the HA stack of `walletd ha-dev` (cli/ha.py: etcd, three Patroni-managed PostgreSQL
nodes in strict synchronous mode, HAProxy's PostgreSQL frontend) and `walletd cluster
--require-sync-replica` on it (two walletd processes behind HAProxy), drives keyed deposits
from ``--clients`` clients, and ``--runs`` times kills the primary's postmaster with -9,
measuring the longest stretch without a 200 around the kill; between runs it waits for
the old primary to rejoin. Prints each run, then the median and the worst, and the count of
acknowledged deposits missing on the final primary (must be 0). Everything listens on
127.0.0.1 and stops by itself. docs/HA.md quotes its output.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import psutil

from loadtest.procs import free_port
from walletd.cli.ha import HaStack

_LISTENING = re.compile(r"walletd cluster listening on (\S+) ")
HEALTHY_WAIT_S = 120.0
OUTAGE_WAIT_S = 60.0


class Load:
    def __init__(self, url: str, clients: int) -> None:
        self.url = url
        self.clients = clients
        self.acked: set[str] = set()
        self.successes: list[float] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            wallets: list[str] = []
            while len(wallets) < self.clients:
                async with session.post(f"{self.url}/api/v1/wallets", json={}) as response:
                    if response.status == 201:
                        wallets.append((await response.json())["id"])
            await asyncio.gather(*(self._client(session, wallet) for wallet in wallets))

    async def _client(self, session: aiohttp.ClientSession, wallet: str) -> None:
        while not self.stop.is_set():
            key = str(uuid.uuid4())
            try:
                async with session.post(
                    f"{self.url}/api/v1/wallets/{wallet}/operation",
                    json={"operation_type": "DEPOSIT", "amount": f"{random.randint(1, 99)}.00"},
                    headers={"Idempotency-Key": key},
                ) as response:
                    await response.read()
                    if response.status == 200:
                        self.acked.add(key)
                        self.successes.append(time.monotonic())
                        continue
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.05)

    def outage_s(self, since: float, until: float) -> float:
        times = [since, *(t for t in self.successes if since < t < until), until]
        return max(b - a for a, b in itertools.pairwise(times))


async def _steady(load: Load, seconds: float) -> None:
    """Until 200s have kept coming for ``seconds`` without a gap of a second."""
    deadline = time.monotonic() + OUTAGE_WAIT_S
    since = time.monotonic()
    while time.monotonic() - since < seconds:
        if time.monotonic() > deadline:
            raise RuntimeError("walletd did not serve steadily again")
        await asyncio.sleep(0.1)
        if time.monotonic() - (load.successes[-1] if load.successes else 0.0) > 1.0:
            since = time.monotonic()


async def measure(stack: HaStack, url: str, runs: int, clients: int) -> list[float]:
    load = Load(url, clients)
    driver = asyncio.create_task(load.run())
    outages = []
    try:
        for run in range(runs):
            await _steady(load, 2.0)
            leader = stack.leader()
            pid = leader.postmaster_pid() if leader else None
            if pid is None:
                raise RuntimeError(f"no primary: {stack.members()}")
            started = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(1.0)
            await _steady(load, 2.0)
            outage = load.outage_s(started, time.monotonic())
            outages.append(outage)
            print(f"run {run + 1}: {outage:.1f} s without a 200 after kill -9 of the primary's "
                  "postmaster", flush=True)  # fmt: skip
            await asyncio.to_thread(stack.wait_healthy, HEALTHY_WAIT_S)
    finally:
        load.stop.set()
        await driver
    leader = stack.leader()
    assert leader is not None
    connection = await asyncpg.connect(stack.node_dsn(leader))
    try:
        stored = await connection.fetchval(
            "SELECT count(*) FROM wallet_operations WHERE idempotency_key = any($1)",
            list(load.acked),
        )
    finally:
        await connection.close()
    print(f"acknowledged: {len(load.acked)}; missing on the final primary: "
          f"{len(load.acked) - stored}", flush=True)  # fmt: skip
    return outages


def _stop(cluster: subprocess.Popen[str]) -> None:
    """SIGTERM; past a minute, SIGKILL to it and its children (walletd, HAProxy)."""
    cluster.send_signal(signal.SIGTERM)
    try:
        cluster.wait(60)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(cluster.pid).children(recursive=True):
            child.kill()
        cluster.kill()
        cluster.wait()
    if cluster.stdout is not None:
        cluster.stdout.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="walletd-ha-bench-") as folder:
        stack = HaStack(Path(folder) / "ha")
        cluster: subprocess.Popen[str] | None = None
        try:
            dsn = stack.start()
            environment = {**os.environ, "WALLETD_DATABASE_URL": dsn}
            environment.pop("DATABASE_URL", None)
            cluster = subprocess.Popen(
                [
                    sys.executable, "-m", "walletd.cli.main", "cluster", "--processes", "2",
                    "--port", str(free_port()), "--data-dir", str(Path(folder) / "walletd"),
                    "--require-sync-replica", "--member-restarts-max", "50",
                ],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment,
            )  # fmt: skip
            assert cluster.stdout is not None
            match = _LISTENING.search(cluster.stdout.readline())
            if match is None:
                raise RuntimeError("walletd cluster did not start")
            outages = asyncio.run(measure(stack, match.group(1), args.runs, args.clients))
        finally:
            try:
                if cluster is not None:
                    _stop(cluster)
            finally:
                stack.stop()
    median, worst = statistics.median(outages), max(outages)
    print(f"kill -9 of the primary's postmaster, {len(outages)} runs: median {median:.1f} s, "
          f"worst {worst:.1f} s without a 200")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The change feed's throughput and its cost to the write path: ``python -m loadtest.feed_bench``.

    python -m loadtest.feed_bench [--rounds 3] [--seconds 10] [--connections 32]
                                  [--wallets 1000] [--walletd CMD]

Flow (each step bounded in count and time)::

    start walletd (embedded PostgreSQL in a temp dir) -> create --wallets wallets
      -> per round, in alternating order:
           deposits for --seconds with no consumer      -> CPU µs per deposit
           deposits for --seconds with an SSE consumer  -> CPU µs per deposit, events/s read
      -> one consumer reads the whole feed from the start -> backlog events/s
      -> medians over the rounds

CPU per deposit: utime + stime from /proc of walletd and of every PostgreSQL process (the
postmaster and its children), before and after the phase, over the deposits answered 200.
The load generator and the consumer run in this process and are not counted. The consumer
reads ``/api/v1/events/stream`` and counts events; at the end of its phase it must have
received every event committed during it (checked: a feed that loses events fails here).

``--append`` instead measures what the feed's columns and indexes cost one append: the
``walletd_append_batch`` call of ``loadtest/append_bench.py`` at batch sizes 1, 10 and 100,
interleaved on two databases, as migrated and with the feed/as-of objects dropped: the
PostgreSQL backend's CPU per commit (from /proc; steadier than latency on a shared
machine, where fsync waits dominate) and the median latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg

from loadtest.procs import (
    REPO_ROOT,
    Server,
    children,
    free_port,
    stop,
    wait_ready,
    walletd_command,
)

__all__ = ["main"]

CLOCK_TICKS_S = os.sysconf("SC_CLK_TCK")
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
CREATE_CONCURRENCY = 16
CONSUMER_DRAIN_TIMEOUT_S = 30.0
# The objects of the feed / as-of migration, dropped on the "without" database of --append.
WITHOUT_FEED_SQL = """
DROP INDEX IF EXISTS wallet_operations_feed, wallets_feed, wallet_operations_wallet_time;
ALTER TABLE wallet_operations DROP COLUMN xid;
ALTER TABLE wallets DROP COLUMN created_xid, DROP COLUMN feed_id;
"""
EXTRA_INDEX_SQL = (
    "CREATE INDEX IF NOT EXISTS wallet_operations_wallet_time "
    "ON wallet_operations (wallet_id, created_at, seq)"
)


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0  # a process that ended: its time is lost to both samples alike
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_S


@dataclass(frozen=True, slots=True)
class Walletd:
    server: Server
    pgdata: Path

    def cpu_seconds(self) -> float:
        """walletd's CPU plus every PostgreSQL process's, now."""
        assert self.server.process is not None
        postmaster = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        pids = [self.server.process.pid, postmaster, *children(postmaster)]
        return sum(_cpu_seconds(pid) for pid in pids)


@contextlib.contextmanager
def running_walletd(command: str) -> Iterator[Walletd]:
    with tempfile.TemporaryDirectory(prefix="walletd-feed-bench-") as folder:
        data_dir = Path(folder) / "data"
        port = free_port()
        log_path = Path(folder) / "walletd.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [*walletd_command(command), "serve", "--port", str(port), "--data-dir",
                 str(data_dir), "--log-level", "WARNING"],
                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            )  # fmt: skip
            server = Server(f"http://127.0.0.1:{port}", process, log_path)
            try:
                wait_ready(server)
                yield Walletd(server, data_dir.resolve() / "pgdata")
            finally:
                stop(server)


async def _create_wallets(http: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    semaphore = asyncio.Semaphore(CREATE_CONCURRENCY)

    async def create() -> str:
        async with semaphore, http.post(f"{url}/api/v1/wallets") as response:
            if response.status != 201:
                raise RuntimeError(f"wallet creation failed: {response.status}")
            wallet_id: str = (await response.json())["id"]
            return wallet_id

    return list(await asyncio.gather(*(create() for _ in range(count))))


async def _deposits(
    http: aiohttp.ClientSession, url: str, wallets: list[str], connections: int, seconds: float
) -> int:
    """Deposits from ``connections`` loops for ``seconds``; the number answered 200."""
    deadline = time.monotonic() + seconds
    body = b'{"operation_type": "DEPOSIT", "amount": "1.00"}'
    headers = {"Content-Type": "application/json"}

    async def loop(seed: int) -> int:
        rng = random.Random(seed)
        done = 0
        while time.monotonic() < deadline:
            wallet_id = wallets[rng.randrange(len(wallets))]
            async with http.post(
                f"{url}/api/v1/wallets/{wallet_id}/operation", data=body, headers=headers
            ) as response:
                await response.read()
                done += response.status == 200
        return done

    return sum(await asyncio.gather(*(loop(n) for n in range(connections))))


class _Consumer:
    """Reads the SSE stream from a position, counting events and keeping the last id."""

    def __init__(self, http: aiohttp.ClientSession, url: str, after: str) -> None:
        self.events = 0
        self.last = after
        self._task = asyncio.create_task(self._read(http, url, after))

    async def _read(self, http: aiohttp.ClientSession, url: str, after: str) -> None:
        headers = {"Last-Event-ID": after}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=60)
        async with http.get(
            f"{url}/api/v1/events/stream", headers=headers, timeout=timeout
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"stream refused: {response.status}")
            async for line in response.content:
                if line.startswith(b"id: "):
                    self.events += 1
                    self.last = line[4:].decode().strip()

    async def wait_for(self, last: str) -> None:
        deadline = time.monotonic() + CONSUMER_DRAIN_TIMEOUT_S
        while self.last != last:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the stream ended early")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the consumer stalled at {self.last}, expected {last}")
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


async def _feed_end(http: aiohttp.ClientSession, url: str, after: str) -> tuple[str, int]:
    """The last position of the feed now (waiting for the horizon to pass), and the
    number of events after ``after``."""
    count = 0
    for _ in range(100_000):
        async with http.get(
            f"{url}/api/v1/events", params={"after": after, "limit": "1000"}
        ) as response:
            page = await response.json()
        count += len(page["events"])
        after = page["next_position"]
        if len(page["events"]) < 1000:
            return after, count
    raise RuntimeError("the feed never ran dry")


@dataclass(slots=True)
class Round:
    cpu_us_without: float
    cpu_us_with: float
    deposits_s_without: float
    deposits_s_with: float
    events_s_live: float


async def _phase(
    walletd: Walletd,
    http: aiohttp.ClientSession,
    wallets: list[str],
    args: argparse.Namespace,
    after: str,
    with_consumer: bool,
) -> tuple[float, float, float, str]:
    """(CPU µs per deposit, deposits/s, events/s read live, feed end after the phase);
    ``after`` is the feed's end before it."""
    url = walletd.server.url
    consumer = _Consumer(http, url, after) if with_consumer else None
    cpu_before = walletd.cpu_seconds()
    started = time.monotonic()
    deposits = await _deposits(http, url, wallets, args.connections, args.seconds)
    elapsed = time.monotonic() - started
    cpu_after = walletd.cpu_seconds()
    end, _count = await _feed_end(http, url, after)
    events_s = 0.0
    if consumer is not None:
        await consumer.wait_for(end)
        events_s = consumer.events / (time.monotonic() - started)
        await consumer.close()
    return (cpu_after - cpu_before) * 1e6 / max(1, deposits), deposits / elapsed, events_s, end


async def _bench(args: argparse.Namespace) -> None:
    with running_walletd(args.walletd) as walletd:
        url = walletd.server.url
        connector = aiohttp.TCPConnector(limit=args.connections + 4)
        async with aiohttp.ClientSession(connector=connector) as http:
            wallets = await _create_wallets(http, url, args.wallets)
            end, _ = await _feed_end(http, url, "0-0")
            rounds: list[Round] = []
            for number in range(args.rounds):
                results: dict[bool, tuple[float, float, float, str]] = {}
                for with_consumer in (False, True) if number % 2 == 0 else (True, False):
                    results[with_consumer] = await _phase(
                        walletd, http, wallets, args, end, with_consumer
                    )
                    end = results[with_consumer][3]
                without, with_ = results[False], results[True]
                rounds.append(Round(without[0], with_[0], without[1], with_[1], with_[2]))
                print(f"round {number + 1}: {rounds[-1]}", flush=True)
            backlog = _Consumer(http, url, "0-0")
            started = time.monotonic()
            await backlog.wait_for(end)
            backlog_s = backlog.events / (time.monotonic() - started)
            await backlog.close()
    median = statistics.median
    cpu_without = median(r.cpu_us_without for r in rounds)
    cpu_with = median(r.cpu_us_with for r in rounds)
    print(f"# feed_bench: {args.rounds} rounds of {args.seconds:g} s, {args.connections} "
          f"connections, {args.wallets} wallets; medians")  # fmt: skip
    print("| measure | without consumer | with consumer |")
    print("| --- | ---: | ---: |")
    print(f"| CPU µs per deposit (walletd + PostgreSQL) | {cpu_without:.0f} | {cpu_with:.0f} "
          f"({100 * (cpu_with / cpu_without - 1):+.1f}%) |")  # fmt: skip
    print(f"| deposits/s | {median(r.deposits_s_without for r in rounds):.0f} | "
          f"{median(r.deposits_s_with for r in rounds):.0f} |")  # fmt: skip
    print(f"| events/s read live (tailing the stream) | — | "
          f"{median(r.events_s_live for r in rounds):.0f} |")  # fmt: skip
    print(f"| events/s read from the start (backlog of {backlog.events}) | — | {backlog_s:.0f} |")


async def _append_cost(args: argparse.Namespace) -> None:
    from loadtest.append_bench import Wallets, by_function
    from walletd.persistence.embedded import EmbeddedPostgres
    from walletd.persistence.migrate import apply_migrations

    folder = Path(tempfile.mkdtemp(prefix="walletd-feed-append-"))
    embedded = EmbeddedPostgres(folder)
    try:
        dsn = await asyncio.to_thread(embedded.start)
        base = dsn.rsplit("/", 1)[0]
        admin = await asyncpg.connect(dsn)
        connections: dict[str, asyncpg.Connection] = {}
        wallets: dict[str, Wallets] = {}
        try:
            for name in ("with", "without"):
                await admin.execute(f"CREATE DATABASE feed_{name}")
                connection = await asyncpg.connect(f"{base}/feed_{name}")
                await apply_migrations(connection)
                if name == "without":
                    await connection.execute(WITHOUT_FEED_SQL)
                ids = [uuid.uuid4() for _ in range(100)]
                await connection.copy_records_to_table(
                    "wallets", records=[(i, EPOCH, EPOCH) for i in ids],
                    columns=("id", "created_at", "updated_at"),
                )  # fmt: skip
                connections[name], wallets[name] = connection, Wallets(ids)
            backends = {
                name: int(await connection.fetchval("SELECT pg_backend_pid()"))
                for name, connection in connections.items()
            }
            print("| batch size | PostgreSQL CPU µs per commit: with feed / without | change "
                  "| median ms per commit: with / without |")  # fmt: skip
            print("| ---: | ---: | ---: | ---: |")
            for size in (1, 10, 100):
                latencies: dict[str, list[float]] = {"with": [], "without": []}
                cpu_s = {"with": 0.0, "without": 0.0}
                commits = max(10, args.batches // max(1, size // 10))
                for run in range(args.runs):
                    for name in ("with", "without") if run % 2 == 0 else ("without", "with"):
                        cpu_before = _cpu_seconds(backends[name])
                        for _ in range(commits):
                            rows = wallets[name].next_batch(size)
                            started = time.perf_counter()
                            await by_function(connections[name], rows)
                            latencies[name].append(time.perf_counter() - started)
                        cpu_s[name] += _cpu_seconds(backends[name]) - cpu_before
                cpu_us = {
                    name: cpu_s[name] * 1e6 / (commits * args.runs) for name in ("with", "without")
                }
                with_ms = statistics.median(latencies["with"]) * 1000
                without_ms = statistics.median(latencies["without"]) * 1000
                print(f"| {size} | {cpu_us['with']:.0f} / {cpu_us['without']:.0f} | "
                      f"{100 * (cpu_us['with'] / max(cpu_us['without'], 1e-9) - 1):+.1f}% | "
                      f"{with_ms:.2f} / {without_ms:.2f} |", flush=True)  # fmt: skip
        finally:
            for connection in connections.values():
                await connection.close()
            await admin.close()
    finally:
        await asyncio.to_thread(embedded.stop, "immediate")
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--connections", type=int, default=32, help="deposit loops")
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--walletd", default="", help="command to run walletd")
    parser.add_argument("--append", action="store_true", help="measure the append instead")
    parser.add_argument("--runs", type=int, default=5, help="--append: runs per batch size")
    parser.add_argument(
        "--batches", type=int, default=200, help="--append: commits per run at size 1 to 10"
    )
    args = parser.parse_args(argv)
    asyncio.run(_append_cost(args) if args.append else _bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

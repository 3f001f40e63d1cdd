"""What the log reads cost the primary: ``python -m loadtest.read_share``.

    python -m loadtest.read_share [--rounds 3] [--seconds 6] [--writers 8] [--readers 4]
                                  [--kinds as_of,filtered,feed,history]
                                  [--wallets 200] [--walletd CMD]

Decides whether history, as-of and the feed are worth moving to a standby
(docs/OPERATIONS.md, "Reads on a standby"). Flow, each step bounded::

    start walletd (embedded PostgreSQL in a temp dir) -> create --wallets wallets
      -> per round, in alternating order:
           phase "writes": --writers deposit loops for --seconds
           phase "mixed":  the same writers, plus --readers loops cycling through
                           as_of, filtered history, one feed page and plain history
      -> per phase: requests/s by kind, CPU seconds of walletd and of PostgreSQL,
         PostgreSQL's split by backend: the read pool (as-of, filtered history, feed),
         the main pool (commits, loads, plain history), and the rest (WAL writer,
         checkpointer, ...)

A backend is put in the read pool when it was seen running one of the read pool's
statements (pg_stat_activity, sampled every 20 ms by a connection of this process, whose
own backend is left out). CPU: utime + stime from /proc before and after the phase. The
load generator runs in this process and is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import itertools
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import aiohttp
import asyncpg

from loadtest.feed_bench import (
    _cpu_seconds,
    _create_wallets,
    running_walletd,
)
from loadtest.procs import children
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.log_reads import AS_OF_SQL, EVENTS_SQL, FILTERED_HISTORY_SQL

__all__ = ["main"]

SAMPLE_INTERVAL_S = 0.02
# Statements are matched on their first characters (pg_stat_activity truncates them).
MATCH_CHARS = 120
READ_POOL_SQL = tuple(
    sql.strip()[:MATCH_CHARS] for sql in (AS_OF_SQL, EVENTS_SQL, FILTERED_HISTORY_SQL)
)
READ_KINDS = ("as_of", "filtered", "feed", "history")


@dataclasses.dataclass
class Phase:
    name: str
    seconds: float
    requests: Counter[str]
    walletd_cpu_s: float
    postgres_cpu_s: dict[str, float]
    generator_cpu_s: float  # this process: when near --seconds, the load is client-bound

    def report(self) -> str:
        total_pg = sum(self.postgres_cpu_s.values())
        rates = ", ".join(
            f"{kind} {count / self.seconds:.0f}/s" for kind, count in sorted(self.requests.items())
        )
        split = ", ".join(
            f"{group} {cpu:.2f} s ({cpu / total_pg:.0%})"
            for group, cpu in sorted(self.postgres_cpu_s.items())
        )
        reads = sum(self.requests[kind] for kind in READ_KINDS if kind != "history")
        per_read = (
            f"; read pool {self.postgres_cpu_s.get('read pool', 0) / reads * 1e6:.0f} µs "
            f"PostgreSQL CPU per as_of/filtered/feed read"
            if reads
            else ""
        )
        return (
            f"{self.name}: {rates}\n  CPU over {self.seconds:g} s: load generator "
            f"{self.generator_cpu_s:.2f} s, walletd "
            f"{self.walletd_cpu_s:.2f} s, PostgreSQL {total_pg:.2f} s = {split}{per_read}"
        )


async def _writer(
    http: aiohttp.ClientSession, url: str, wallets: list[str], deadline: float,
    done: Counter[str], seed: int,
) -> None:  # fmt: skip
    rng = random.Random(seed)
    body = b'{"operation_type": "DEPOSIT", "amount": "1.00"}'
    while time.monotonic() < deadline:
        wallet = wallets[rng.randrange(len(wallets))]
        async with http.post(
            f"{url}/api/v1/wallets/{wallet}/operation", data=body,
            headers={"Content-Type": "application/json", "Idempotency-Key": str(uuid.uuid4())},
        ) as response:  # fmt: skip
            await response.read()
            done["deposit" if response.status == 200 else f"deposit {response.status}"] += 1


async def _reader(
    http: aiohttp.ClientSession, url: str, wallets: list[str], deadline: float,
    done: Counter[str], seed: int, kinds: tuple[str, ...],
) -> None:  # fmt: skip
    rng = random.Random(seed)
    position = ""
    for kind in itertools.cycle(kinds):
        if time.monotonic() >= deadline:
            return
        wallet = wallets[rng.randrange(len(wallets))]
        recent = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=rng.uniform(0.5, 5))
        instant = recent.isoformat().replace("+00:00", "Z")
        path, params = {
            "as_of": (f"/api/v1/wallets/{wallet}", {"as_of": instant}),
            "filtered": (f"/api/v1/wallets/{wallet}/operations", {"since": instant}),
            "feed": (
                "/api/v1/events",
                {"after": position, "limit": "100"} if position else {"limit": "100"},
            ),
            "history": (f"/api/v1/wallets/{wallet}/operations", {"limit": "50"}),
        }[kind]
        async with http.get(url + path, params=params) as response:
            body = await response.json(content_type=None)
            done[kind if response.status == 200 else f"{kind} {response.status}"] += 1
            if kind == "feed" and response.status == 200:
                position = body["next_position"]


async def _sample_backends(
    dsn: str, stop: asyncio.Event, read_pids: set[int], seen: set[int], sampler_pid: set[int]
) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        own = connection.get_server_pid()
        sampler_pid.add(own)
        while not stop.is_set():
            for pid, query in await connection.fetch(
                "SELECT pid, query FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ):
                if pid == own:
                    continue
                seen.add(pid)
                if (query or "").strip()[:MATCH_CHARS] in READ_POOL_SQL:
                    read_pids.add(pid)
            await asyncio.sleep(SAMPLE_INTERVAL_S)
    finally:
        await connection.close()


async def _phase(
    name: str, url: str, dsn: str, pgdata: Path, walletd_pid: int, wallets: list[str],
    args: argparse.Namespace, readers: int,
) -> Phase:  # fmt: skip
    postmaster = int((pgdata / "postmaster.pid").read_text().split()[0])
    pids = [*children(postmaster), postmaster]
    before = {pid: _cpu_seconds(pid) for pid in pids}
    walletd_before = _cpu_seconds(walletd_pid)
    generator_before = time.process_time()
    done: Counter[str] = Counter()
    read_pids: set[int] = set()
    seen: set[int] = set()
    sampler_pid: set[int] = set()  # its own backend, left out
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(_sample_backends(dsn, stop, read_pids, seen, sampler_pid))
    deadline = time.monotonic() + args.seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        await asyncio.gather(
            *(_writer(http, url, wallets, deadline, done, n) for n in range(args.writers)),
            *(
                _reader(http, url, wallets, deadline, done, 100 + n, args.kinds)
                for n in range(readers)
            ),
        )
    walletd_cpu = _cpu_seconds(walletd_pid) - walletd_before
    generator_cpu = time.process_time() - generator_before
    after = {pid: _cpu_seconds(pid) for pid in [*children(postmaster), postmaster]}
    stop.set()
    await sampler
    groups: dict[str, float] = defaultdict(float)
    for pid, cpu in after.items():
        if pid in sampler_pid:
            continue
        group = "read pool" if pid in read_pids else "main pool" if pid in seen else "other"
        groups[group] += cpu - before.get(pid, 0.0)
    return Phase(name, args.seconds, done, walletd_cpu, dict(groups), generator_cpu)


async def _run(args: argparse.Namespace) -> None:
    with running_walletd(args.walletd) as walletd:
        assert walletd.server.process is not None
        dsn = EmbeddedPostgres(walletd.pgdata.parent).attach()
        assert dsn is not None
        async with aiohttp.ClientSession() as http:
            wallets = await _create_wallets(http, walletd.server.url, args.wallets)
        phases = [("writes", 0), ("mixed", args.readers)]
        for round_index in range(args.rounds):
            # Alternating order: a machine getting busier does not favour one phase.
            for name, readers in phases if round_index % 2 == 0 else phases[::-1]:
                phase = await _phase(
                    f"round {round_index + 1} {name}", walletd.server.url, dsn,
                    walletd.pgdata, walletd.server.process.pid, wallets, args, readers,
                )  # fmt: skip
                print(phase.report(), flush=True)


def _kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(kind.strip() for kind in text.split(","))
    unknown = set(kinds) - set(READ_KINDS)
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown read kinds {sorted(unknown)}")
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--readers", type=int, default=4)
    parser.add_argument("--wallets", type=int, default=200)
    parser.add_argument(
        "--kinds", type=_kinds, default=READ_KINDS,
        help=f"the reads the readers cycle through (default {','.join(READ_KINDS)})",
    )  # fmt: skip
    parser.add_argument("--walletd", default="", help="the walletd command (default: this venv's)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

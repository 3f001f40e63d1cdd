"""What asyncpg costs walletd per array element it binds, by element type; and the same
values sent as one array literal instead (PostgreSQL parses them).

    python -m loadtest.bind_cost [--elements 256] [--calls 300] [--runs 5] [--database-url URL]

The append of every batch (persistence/postgres_log.py) binds one array per column: for a
1,000-item bulk request on 10,000 wallets that is ~16 elements per operation, and the
profile of walletd under load puts asyncpg's bind (``Connection._do_execute``, Cython) at
10-19% of walletd's CPU. asyncpg checks every element against ``collections.abc.Iterable``
(a Python-level ``ABCMeta.__instancecheck__`` call) before encoding it, and encodes a
``uuid.UUID`` through its Python ``bytes`` property.

Each case is a ``SELECT`` of the arrays' cardinalities, so PostgreSQL's share is parsing the
parameters and little else. Per case: walletd-side (this process) CPU µs per call, and per
element after the cost of a call with one scalar parameter is taken off; PostgreSQL backend
CPU per call from /proc (local servers only). Medians over ``--runs``. Starts an embedded
PostgreSQL unless ``--database-url`` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import asyncpg

from walletd.persistence.embedded import EmbeddedPostgres

__all__ = ["main"]

ARRAYS = 8
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _backend_cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")  # not a local server
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _cases(elements: int) -> list[tuple[str, str, Callable[[], Sequence[object]]]]:
    """(name, SQL type of each parameter, a function making the call's arguments)."""
    rng = random.Random(25)
    ints = [[rng.randint(1, 10**12) for _ in range(elements)] for _ in range(ARRAYS)]
    ids = [[uuid.uuid4() for _ in range(elements)] for _ in range(ARRAYS)]
    texts = [[uuid.uuid4().hex for _ in range(elements)] for _ in range(ARRAYS)]
    nulls = [[None] * elements for _ in range(ARRAYS)]

    def literal(values: list[int]) -> str:
        return "{" + ",".join(map(str, values)) + "}"

    return [
        ("bigint[]", "bigint[]", lambda: ints),
        ("bigint[] as one text literal", "text::bigint[]", lambda: [literal(v) for v in ints]),
        ("uuid[] (uuid.UUID)", "uuid[]", lambda: ids),
        ("text[]", "text[]", lambda: texts),
        ("text[] of NULLs", "text[]", lambda: nulls),
    ]


async def _measure(
    connection: asyncpg.Connection, sql_type: str, make: Callable[[], Sequence[object]],
    calls: int, runs: int,
) -> tuple[float, float]:  # fmt: skip
    """Median over runs of (client CPU µs per call, PostgreSQL backend CPU µs per call)."""
    arguments = make()
    query = "SELECT " + " + ".join(
        f"coalesce(cardinality(${n + 1}::{sql_type}), 0)" if sql_type.endswith("[]")
        else f"${n + 1}::{sql_type}"
        for n in range(len(arguments))
    )  # fmt: skip
    pid = await connection.fetchval("SELECT pg_backend_pid()")
    for _ in range(calls // 10):  # prepared, warmed
        await connection.fetchval(query, *make())
    client, server = [], []
    for _ in range(runs):
        cpu0, backend0 = time.process_time(), _backend_cpu_s(pid)
        for _ in range(calls):
            await connection.fetchval(query, *make())
        client.append((time.process_time() - cpu0) / calls * 1e6)
        server.append((_backend_cpu_s(pid) - backend0) / calls * 1e6)
    return statistics.median(client), statistics.median(server)


async def run(dsn: str, elements: int, calls: int, runs: int) -> list[str]:
    connection = await asyncpg.connect(dsn)
    try:
        base_client, base_server = await _measure(
            connection, "bigint", lambda: [1], calls, runs
        )  # fmt: skip
        lines = [
            f"{ARRAYS} arrays x {elements} elements per call, {calls} calls x {runs} runs "
            f"(medians); one scalar parameter: {base_client:.0f} µs client, "
            f"{base_server:.0f} µs PostgreSQL per call",
            "",
            "| parameters | client µs/call | client ns/element | PostgreSQL µs/call |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, sql_type, make in _cases(elements):
            client, server = await _measure(connection, sql_type, make, calls, runs)
            per_element = (client - base_client) / (ARRAYS * elements) * 1000
            lines.append(f"| {name} | {client:.0f} | {per_element:.0f} | {server:.0f} |")
        return lines
    finally:
        await connection.close()


@contextlib.contextmanager
def _database(url: str | None) -> Iterator[str]:
    if url:
        yield url
        return
    folder = Path(tempfile.mkdtemp(prefix="walletd-bind-cost-"))
    embedded = EmbeddedPostgres(folder)
    try:
        yield embedded.start()
    finally:
        embedded.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--elements", type=int, default=256, help="per array (a full batch)")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--database-url", default="")
    args = parser.parse_args(argv)
    if not (1 <= args.elements <= 100_000 and 10 <= args.calls <= 100_000 and args.runs >= 1):
        parser.error("--elements 1..100,000, --calls 10..100,000, --runs >= 1")
    with _database(args.database_url or None) as dsn:
        lines = asyncio.run(run(dsn, args.elements, args.calls, args.runs))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

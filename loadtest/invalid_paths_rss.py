"""Memory under a scan of junk wallet ids: ``python -m loadtest.invalid_paths_rss``.

Starts ``walletd serve`` (embedded PostgreSQL, temp data dir; or ``--url`` and ``--pid`` of a
running one), sends ``--requests`` GETs of ``/api/v1/wallets/<random text>`` over loopback,
each text distinct and not a wallet id (1 to ``--path-bytes-max`` URL-safe characters), and
reads walletd's resident set size (VmRSS in /proc/<pid>/status) as it goes. Every answer must
be 400 INVALID_WALLET_ID. Prints RSS after a warm-up, the peak, the end, and the growth.

Requests are pipelined (``--depth`` per connection, ``--connections`` connections) and the
texts are slices of one random pool, so the client stays cheap next to the server.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

from loadtest.procs import Server, running_walletd

__all__ = ["ScanResult", "main", "rss_bytes", "scan"]

_POOL_BYTES = 8 * 1024 * 1024
_READ_TIMEOUT_S = 30.0
_MIB = 1024 * 1024


@dataclass(slots=True)
class Tally:
    sent: int = 0
    answered: int = 0
    unexpected: int = 0


def rss_bytes(pid: int) -> int:
    """The process's resident set size, from /proc (Linux)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _junk_ids(seed: int, path_bytes_max: int) -> Iterator[bytes]:
    """Endless distinct non-ids: random slices of a URL-safe random pool. An "x" in front
    keeps even a 36-character slice from being a canonical id."""
    rng = random.Random(seed)
    pool = base64.urlsafe_b64encode(rng.randbytes(_POOL_BYTES)).rstrip(b"=")
    while True:
        length = rng.randint(1, path_bytes_max - 1)
        start = rng.randrange(0, len(pool) - length)
        yield b"x" + pool[start : start + length]


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await asyncio.wait_for(reader.readexactly(length), _READ_TIMEOUT_S)
    return head[:12]


async def _connection(
    host: str, port: int, ids: Iterator[bytes], quota: int, depth: int, tally: Tally
) -> None:
    reader, writer = await asyncio.open_connection(host, port, limit=1024 * 1024)
    try:
        while quota > 0:
            batch = min(depth, quota)
            quota -= batch
            writer.write(
                b"".join(
                    b"GET /api/v1/wallets/" + next(ids) + b" HTTP/1.1\r\nHost: walletd\r\n\r\n"
                    for _ in range(batch)
                )
            )
            tally.sent += batch
            await writer.drain()
            for _ in range(batch):
                status_line = await _read_answer(reader)
                tally.answered += 1
                if status_line != b"HTTP/1.1 400":
                    tally.unexpected += 1
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


@dataclass(frozen=True, slots=True)
class ScanResult:
    requests: int
    elapsed_s: float
    baseline_rss_bytes: int  # after the warm-up
    peak_rss_bytes: int
    final_rss_bytes: int
    unexpected_answers: int  # anything but 400

    @property
    def growth_bytes(self) -> int:
        return self.peak_rss_bytes - self.baseline_rss_bytes

    def summary(self, path_bytes_max: int) -> str:
        return (
            f"{self.requests} invalid paths (1-{path_bytes_max} bytes) in {self.elapsed_s:.0f} s:"
            f" RSS {self.baseline_rss_bytes / _MIB:.1f} MiB after warm-up, peak "
            f"{self.peak_rss_bytes / _MIB:.1f} MiB, end {self.final_rss_bytes / _MIB:.1f} MiB, "
            f"growth {self.growth_bytes / _MIB:.1f} MiB (peak - warm-up); answers other than "
            f"400: {self.unexpected_answers}"
        )


async def scan(
    url: str,
    pid: int,
    requests: int,
    *,
    connections: int = 8,
    depth: int = 16,
    path_bytes_max: int = 7000,
    progress: bool = False,
) -> ScanResult:
    """Send ``requests`` junk wallet paths (after a warm-up of a tenth, at most 50,000) and
    follow the RSS of process ``pid``."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    ids = _junk_ids(seed=int.from_bytes(os.urandom(4), "big"), path_bytes_max=path_bytes_max)
    warm_up = min(requests // 10, 50_000)
    tally = Tally()
    await asyncio.gather(
        *(
            _connection(host, port, ids, warm_up // connections, depth, tally)
            for _ in range(connections)
        )
    )
    baseline = peak = rss_bytes(pid)
    warmed_up = tally.answered
    if progress:
        print(f"after {warmed_up} warm-up requests: RSS {baseline / _MIB:.1f} MiB", flush=True)
    started = time.monotonic()
    share, extra = divmod(requests, connections)
    running = asyncio.gather(
        *(
            _connection(host, port, ids, share + (index < extra), depth, tally)
            for index in range(connections)
        )
    )
    report_every = max(requests // 10, 1)
    next_report = warmed_up + report_every
    while not running.done():
        await asyncio.wait([running], timeout=0.5)
        peak = max(peak, rss_bytes(pid))
        if progress and tally.answered >= next_report:
            print(f"{tally.answered:>9} answered  RSS {rss_bytes(pid) / _MIB:.1f} MiB", flush=True)
            next_report += report_every
    await running
    final = rss_bytes(pid)
    return ScanResult(
        requests=tally.answered - warmed_up,
        elapsed_s=time.monotonic() - started,
        baseline_rss_bytes=baseline,
        peak_rss_bytes=max(peak, final),
        final_rss_bytes=final,
        unexpected_answers=tally.unexpected,
    )


def _server_pid(server: Server, pid: int) -> int:
    if pid:
        return pid
    if server.process is None:
        raise SystemExit("--url needs --pid: the walletd process whose memory to read")
    return server.process.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.invalid_paths_rss", description=__doc__
    )
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument(
        "--path-bytes-max", type=int, default=7000, help="under 8190, aiohttp's line limit"
    )
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--depth", type=int, default=16, help="pipelined requests per connection")
    parser.add_argument("--url", default="", help="a running walletd (then give --pid)")
    parser.add_argument("--pid", type=int, default=0)
    parser.add_argument("--walletd-cmd", default="", help="command that runs walletd")
    args = parser.parse_args(argv)
    with running_walletd(args.url, args.walletd_cmd) as server:
        pid = _server_pid(server, args.pid)
        result = asyncio.run(
            scan(
                server.url,
                pid,
                args.requests,
                connections=args.connections,
                depth=args.depth,
                path_bytes_max=args.path_bytes_max,
                progress=True,
            )
        )
    print(result.summary(args.path_bytes_max), flush=True)
    return 1 if result.unexpected_answers else 0


if __name__ == "__main__":
    sys.exit(main())

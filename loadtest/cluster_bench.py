"""`make bench` (cluster part): 1 vs 2 walletd processes behind HAProxy, with CPU per request.

    python -m loadtest.cluster_bench [--processes 1 2] [--duration 10] [--connections 64]
                                     [--wallets 10000] [--transfers]

For each process count: `walletd cluster --processes N` (embedded PostgreSQL in a temp dir,
HAProxy in front), then wrk on the hot wallet and on many wallets through HAProxy, and the
CPU time (utime + stime from /proc/PID/stat) each part spent during the run, divided by the
requests answered: walletd processes, HAProxy, PostgreSQL (every backend of the embedded
server). A bigger machine serves about `cores / (sum of CPU per request)` requests per
second at the same ops per commit, until one part (PostgreSQL, in one primary) saturates.

With ``--transfers``, each run also sends transfers through HAProxy between pairs of funded
wallets whose shards one process owns ("transfer-same"; with one process, the baseline) and,
with two or more processes, pairs whose shards different processes own ("transfer-cross",
a leg crosses processes over the internal route); the owners are read with `walletd shards`
on the cluster's database. HAProxy sends a transfer to any process (no wallet in its path),
which coordinates it.

Exit 0 when every run completed, 1 when a wrk run failed, 2 without wrk or HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench import AMOUNT, TRANSFER_FUND, create_wallets, fund_wallets, run_wrk
from loadtest.bench_report import WrkRun
from loadtest.procs import REPO_ROOT, free_port

__all__ = ["main"]

START_TIMEOUT_S = 120.0
SCENARIOS = ("hot", "many")
TRANSFER_SCENARIOS = ("transfer-same", "transfer-cross")
# Wallets per process funded for the transfer scenarios, and pairs per ids file.
TRANSFER_WALLETS_PER_PROCESS = 1000
_LISTENING = re.compile(r"walletd cluster listening on (http://\S+) .*processes: ([^;]+);")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Cluster:
    process: subprocess.Popen[str]
    url: str
    walletd_urls: list[str]
    data_dir: Path


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def _descendants(pid: int) -> list[int]:
    every = [pid]
    for child in _children(pid):
        every += _descendants(child)
    return every


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pids: Sequence[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLOCK_TICKS


def parts(cluster_pid: int, data_dir: Path) -> dict[str, list[int]]:
    """The processes of each part of the running cluster, by what they run. The embedded
    PostgreSQL is started through pg_ctl (so it is not a descendant): its postmaster is the
    process whose command names the cluster's data dir, and its backends are its children."""
    grouped: dict[str, list[int]] = {"walletd": [], "haproxy": [], "postgres": []}
    for pid in _descendants(cluster_pid):
        command = _name(pid)
        if "walletd.cli.main serve" in command:
            grouped["walletd"].append(pid)
        elif "haproxy" in command:
            grouped["haproxy"].append(pid)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and f"-D {data_dir}" in _name(int(entry.name)):
            grouped["postgres"] += _descendants(int(entry.name))
    return grouped


@contextmanager
def running_cluster(processes: int, folder: Path) -> Iterator[Cluster]:
    port = free_port()
    log_path = folder / f"cluster-{processes}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "walletd.cli.main", "cluster", "--processes", str(processes),
             "--port", str(port), "--data-dir", str(folder / "data")],
            stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO_ROOT,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError(f"walletd cluster exited: {log_path.read_text()[-2000:]}")
            if match := _LISTENING.search(line):
                urls = [url.strip() for url in match.group(2).split(",")]
                yield Cluster(process, match.group(1), urls, folder / "data")
                break
        else:
            raise RuntimeError("walletd cluster did not start in time")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        process.stdout.close()


def owners(data_dir: Path, shard_count: int) -> dict[int, str]:
    """Shard → owner URL, from `walletd shards` on the cluster's own (embedded) database."""
    listing = subprocess.run(
        [sys.executable, "-m", "walletd.cli.main", "shards", "--data-dir", str(data_dir),
         "--shards", str(shard_count)],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO_ROOT,
    ).stdout  # fmt: skip
    found: dict[int, str] = {}
    for line in listing.splitlines()[1 : shard_count + 1]:
        if match := re.search(r"\((http://[^)]+)\)", line):
            found[int(line.split()[0])] = match.group(1)
    return found


def shard_of_text(wallet: str, shard_count: int) -> int:
    """walletd's shard function (docs/SCALING.md): CRC-32 of the lowercase id text."""
    return zlib.crc32(wallet.lower().encode("ascii")) % shard_count


def transfer_pairs(ids: list[str], owner_of: dict[int, str], shard_count: int) -> dict[str, str]:
    """The ids files' text of the two transfer scenarios: lines "FROM TO"."""
    by_owner: dict[str, list[str]] = {}
    for wallet in ids:
        owner = owner_of.get(shard_of_text(wallet, shard_count))
        if owner is not None:
            by_owner.setdefault(owner, []).append(wallet)
    groups = list(by_owner.values())
    same = [f"{g[i]} {g[i + 1]}" for g in groups for i in range(0, len(g) - 1, 2)]
    pairs = {"transfer-same": "\n".join(same)}
    if len(groups) >= 2:  # one process: every transfer is within it (the baseline)
        cross = [f"{a} {b}" for a, b in zip(groups[0], groups[1], strict=False)]
        pairs["transfer-cross"] = "\n".join(cross)
    return pairs


def answered(run: WrkRun) -> int:
    return sum(count for status, count in run.statuses.items() if 200 <= int(status) < 300)


def measure(
    cluster: Cluster, scenario: str, ids_file: Path, connections: int, duration_s: int
) -> tuple[WrkRun, dict[str, float]]:
    groups = parts(cluster.process.pid, cluster.data_dir)
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    run = run_wrk(cluster.url, scenario, ids_file, connections, duration_s)
    after = {name: cpu_seconds(pids) for name, pids in groups.items()}
    requests = max(1, answered(run))
    return run, {name: (after[name] - before[name]) * 1e6 / requests for name in groups}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument(
        "--transfers", action="store_true", help="also transfers within one process and across two"
    )
    parser.add_argument("--shards", type=int, default=64, help="the cluster's shard count")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        print("cluster bench needs wrk and haproxy (.ci/install-haproxy)", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="walletd-cluster-bench-") as temp:
        folder = Path(temp)
        for processes in args.processes:
            run_folder = folder / f"p{processes}"
            run_folder.mkdir()
            with running_cluster(processes, run_folder) as cluster:
                ids = asyncio.run(create_wallets(cluster.url, 1 + args.wallets))
                for scenario in SCENARIOS:
                    ids_file = run_folder / f"{scenario}.ids"
                    ids_file.write_text("\n".join(ids[:1] if scenario == "hot" else ids[1:]))
                    try:
                        run, cpu = measure(
                            cluster, scenario, ids_file, args.connections, args.duration
                        )
                    except RuntimeError as error:
                        print(f"wrk failed: {error}", file=sys.stderr)
                        return 1
                    rows.append((processes, scenario, run, cpu))
                    print(_row(processes, scenario, run, cpu), flush=True)
                if args.transfers:
                    funded = asyncio.run(
                        create_wallets(cluster.url, TRANSFER_WALLETS_PER_PROCESS * processes)
                    )
                    asyncio.run(fund_wallets(cluster.url, funded, TRANSFER_FUND))
                    owner_of = owners(cluster.data_dir, args.shards)
                    for scenario, text in transfer_pairs(funded, owner_of, args.shards).items():
                        ids_file = run_folder / f"{scenario}.pairs"
                        ids_file.write_text(text)
                        try:
                            run, cpu = measure(
                                cluster, "pairs", ids_file, args.connections, args.duration
                            )
                        except RuntimeError as error:
                            print(f"wrk failed: {error}", file=sys.stderr)
                            return 1
                        rows.append((processes, scenario, run, cpu))
                        print(_row(processes, scenario, run, cpu), flush=True)
    print()
    print(f"deposits (and transfers) of {AMOUNT} through HAProxy, {args.connections} connections, "
          f"{args.duration} s per run, {os.cpu_count()} cores")  # fmt: skip
    print("| processes | scenario | rps | p99 ms | non-2xx | CPU µs/req walletd | HAProxy "
          "| PostgreSQL |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for processes, scenario, run, cpu in rows:
        print(_row(processes, scenario, run, cpu))
    return 0


def _row(processes: int, scenario: str, run: WrkRun, cpu: dict[str, float]) -> str:
    return (
        f"| {processes} | {scenario} | {run.rps:,.0f} | {run.p99_us / 1000:.1f} | {run.non_2xx} | "
        f"{cpu['walletd']:.0f} | {cpu['haproxy']:.0f} | {cpu['postgres']:.0f} |"
    )


if __name__ == "__main__":
    sys.exit(main())

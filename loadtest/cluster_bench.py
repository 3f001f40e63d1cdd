"""`make bench` (cluster part): one process direct, one behind HAProxy, two behind HAProxy,
side by side in one run, with CPU per request.

    python -m loadtest.cluster_bench [--rounds 3] [--duration 10] [--warm-up 2]
                                     [--connections 64] [--wallets 10000] [--transfers]

Two clusters run at once (`walletd cluster --processes 1` and `--processes 2`, each with its
embedded PostgreSQL in a temp dir and HAProxy in front), so the rounds alternate without a
restart: each round runs wrk on the hot wallet and on 10,000 wallets through every path —
"1 direct" (wrk at the one process's own port, the same process "1 via HAProxy" reaches),
"1 via HAProxy", "2 via HAProxy" — in an order rotated per round, after a short warm-up of
each. For each run: rps, p99, and the CPU time (utime + stime from /proc/PID/stat) each part
of the cluster under load spent, divided by the requests answered: walletd processes,
HAProxy, PostgreSQL (every backend of its embedded server); and the requests the walletd
processes forwarded to one another (walletd_forwards_total, summed; the goal is 0 once the
map settled). Printed: the medians with their spread (min–max), the ratios the scaling goals
are stated in, and a projection to 8, 16 and 32 cores from the CPU per request with the
PostgreSQL primary's share. About 4.5 minutes with the defaults.

With ``--transfers``, each cluster then also takes transfers through HAProxy between pairs
of funded wallets whose shards one process owns ("transfer-same"; with one process, the
baseline) and, with two processes, pairs whose shards different processes own
("transfer-cross", a leg crosses processes over the internal route); the owners are read
with `walletd shards` on the cluster's database. HAProxy sends a transfer to any process
(no wallet in its path), which coordinates it.

Exit 0 when every run completed, 1 when a wrk run failed, 2 without wrk or HAProxy.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from loadtest.bench import AMOUNT, TRANSFER_FUND, create_wallets, fund_wallets, run_wrk
from loadtest.bench_report import WrkRun
from loadtest.procs import REPO_ROOT, children, free_port
from walletd.cli.cluster import INFLIGHT_BATCHES_ENV

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
    folder: Path  # its log, its data dir and the bench's files for it

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"


def _descendants(pid: int) -> list[int]:
    every = [pid]
    for child in children(pid):
        every += _descendants(child)
    return every


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def cpu_seconds(pids: Sequence[int], reaper: int | None = None) -> float:
    """The CPU of ``pids`` (utime + stime), plus that of the children ``reaper`` has reaped
    (its cutime + cstime): a PostgreSQL backend or autovacuum worker that exits between two
    readings leaves its CPU with the postmaster, so a sum over re-listed processes never
    goes back."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        if pid == reaper:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime (fields 16, 17)
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
def running_cluster(processes: int, folder: Path, inflight: int | None = None) -> Iterator[Cluster]:
    """``inflight``: each member's WALLETD_INFLIGHT_BATCHES; None = the cluster's default."""
    port = free_port()
    log_path = folder / f"cluster-{processes}.log"
    environment = dict(os.environ)
    if inflight is not None:
        environment[INFLIGHT_BATCHES_ENV] = str(inflight)
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "walletd.cli.main", "cluster", "--processes", str(processes),
             "--port", str(port), "--data-dir", str(folder / "data")],  # Cluster.data_dir
            stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO_ROOT,
            env=environment,
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
                yield Cluster(process, match.group(1), urls, folder)
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
    before = cpu_by_part(cluster)
    run = run_wrk(cluster.url, scenario, ids_file, connections, duration_s)
    after = cpu_by_part(cluster)
    requests = max(1, answered(run))
    return run, {name: (after[name] - before[name]) * 1e6 / requests for name in before}


def cpu_by_part(cluster: Cluster) -> dict[str, float]:
    """CPU seconds so far of each part, its processes listed anew: PostgreSQL starts and
    ends backends and autovacuum workers during a run (the postmaster keeps the CPU of
    those that ended)."""
    groups = parts(cluster.process.pid, cluster.data_dir)
    pid_file = cluster.data_dir / "pgdata" / "postmaster.pid"
    postmaster = int(pid_file.read_text().split()[0]) if pid_file.exists() else None
    return {
        name: cpu_seconds(pids, postmaster if name == "postgres" else None)
        for name, pids in groups.items()
    }


@dataclass(frozen=True, slots=True)
class Target:
    """One way to reach walletd in the side-by-side rounds."""

    name: str
    processes: int
    through_haproxy: bool
    inflight: int | None = None  # the members' batches in flight; None = the default

    @property
    def cluster_key(self) -> tuple[int, int | None]:
        """Which of the running clusters this path goes to: (processes, in flight)."""
        return (self.processes, self.inflight)


PATHS = (
    Target("1 direct", 1, False),
    Target("1 via HAProxy", 1, True),
    Target("2 via HAProxy", 2, True),
)


def forwards(cluster: Cluster) -> int:
    """Requests the cluster's processes forwarded to another process so far (every result of
    walletd_forwards_total, summed over the processes)."""
    total = 0.0
    for url in cluster.walletd_urls:
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
            text = response.read().decode()
        total += sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("walletd_forwards_total{")
        )
    return int(total)


@dataclass(frozen=True, slots=True)
class Sample:
    path: str
    scenario: str
    run: WrkRun
    cpu: dict[str, float]
    forwarded: int
    round_number: int = 0


def measure_path(
    cluster: Cluster, path: Target, scenario: str, ids_file: Path, connections: int,
    duration_s: int, round_number: int = 0,
) -> Sample:  # fmt: skip
    target = cluster if path.through_haproxy else replace(cluster, url=cluster.walletd_urls[0])
    before = forwards(cluster)
    run, cpu = measure(target, scenario, ids_file, connections, duration_s)
    return Sample(path.name, scenario, run, cpu, forwards(cluster) - before, round_number)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (medians)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--warm-up", type=int, default=2, help="seconds of wrk per path first")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument(
        "--transfers", action="store_true", help="also transfers within one process and across two"
    )
    parser.add_argument("--shards", type=int, default=64, help="the cluster's shard count")
    parser.add_argument(
        "--member-inflight", type=int, default=None, metavar="N",
        help="also a second 2-process cluster whose members commit N batches at once "
        "(--inflight-batches), in the same rounds; printed: its per-round ratios",
    )  # fmt: skip
    args = parser.parse_args(argv)
    paths: tuple[Target, ...] = PATHS
    if args.member_inflight is not None:
        paths += (
            Target(f"2 via HAProxy, {args.member_inflight} in flight", 2, True,
                   args.member_inflight),
        )  # fmt: skip
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        print("cluster bench needs wrk and haproxy (.ci/install-haproxy)", file=sys.stderr)
        return 2
    samples: list[Sample] = []
    transfer_rows: list[tuple[str, str, WrkRun, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="walletd-cluster-bench-") as temp, ExitStack() as stack:
        folder = Path(temp)
        clusters: dict[tuple[int, int | None], Cluster] = {}
        ids_files: dict[tuple[tuple[int, int | None], str], Path] = {}
        for key in dict.fromkeys(path.cluster_key for path in paths):
            processes, inflight = key
            suffix = "" if inflight is None else f"-inflight{inflight}"
            run_folder = folder / f"p{processes}{suffix}"
            run_folder.mkdir()
            cluster = stack.enter_context(running_cluster(processes, run_folder, inflight))
            clusters[key] = cluster
            ids = asyncio.run(create_wallets(cluster.url, 1 + args.wallets))
            for scenario in SCENARIOS:
                ids_file = run_folder / f"{scenario}.ids"
                ids_file.write_text("\n".join(ids[:1] if scenario == "hot" else ids[1:]))
                ids_files[(key, scenario)] = ids_file
        try:
            # Warm-up: every wallet resident, every connection pool full, the map settled.
            for path in paths:
                for scenario in SCENARIOS:
                    measure_path(clusters[path.cluster_key], path, scenario,
                                 ids_files[(path.cluster_key, scenario)],
                                 args.connections, args.warm_up)  # fmt: skip
            for round_number in range(args.rounds):
                # Alternating: each round runs every path once, in a rotated order, so a
                # neighbour's burst on the shared machine lands on all of them alike.
                shift = round_number % len(paths)
                for path in paths[shift:] + paths[:shift]:
                    for scenario in SCENARIOS:
                        sample = measure_path(
                            clusters[path.cluster_key], path, scenario,
                            ids_files[(path.cluster_key, scenario)], args.connections,
                            args.duration, round_number,
                        )  # fmt: skip
                        samples.append(sample)
                        print(f"round {round_number + 1}: {_sample_row(sample)}", flush=True)
            if args.transfers:
                for (processes, inflight), cluster in clusters.items():
                    label = (
                        str(processes) if inflight is None else f"{processes}, {inflight} in flight"
                    )
                    transfer_rows += _transfers(cluster, processes, label, args)
        except RuntimeError as error:
            print(f"wrk failed: {error}", file=sys.stderr)
            return 1
    print()
    print(
        f"deposits of {AMOUNT}, {args.connections} connections, {args.duration} s per run, "
        f"{args.rounds} alternating rounds, {os.cpu_count()} cores; median (min–max)"
    )
    print(_table(samples, paths))
    print()
    print(_ratios(samples))
    if len(paths) > len(PATHS):
        print()
        print(_inflight_ratios(samples, paths[-1]))
    print()
    print(_projection(samples))
    if transfer_rows:
        print()
        print("| processes | scenario | rps | p99 ms | non-2xx | CPU µs/req walletd | HAProxy "
              "| PostgreSQL |")  # fmt: skip
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, scenario, run, cpu in transfer_rows:
            print(_row(label, scenario, run, cpu))
    return 0


def _transfers(
    cluster: Cluster, processes: int, label: str, args: argparse.Namespace
) -> list[tuple[str, str, WrkRun, dict[str, float]]]:
    """One run of each transfer scenario on the cluster; rows labelled ``label``."""
    rows = []
    funded = asyncio.run(create_wallets(cluster.url, TRANSFER_WALLETS_PER_PROCESS * processes))
    asyncio.run(fund_wallets(cluster.url, funded, TRANSFER_FUND))
    owner_of = owners(cluster.data_dir, args.shards)
    for scenario, text in transfer_pairs(funded, owner_of, args.shards).items():
        ids_file = cluster.folder / f"{scenario}.pairs"
        ids_file.write_text(text)
        run, cpu = measure(cluster, "pairs", ids_file, args.connections, args.duration)
        rows.append((label, scenario, run, cpu))
        print(_row(label, scenario, run, cpu), flush=True)
    return rows


def _spread(values: Sequence[float], digits: int = 0) -> str:
    middle = statistics.median(values)
    if len(values) == 1:
        return f"{middle:,.{digits}f}"
    return f"{middle:,.{digits}f} ({min(values):,.{digits}f}–{max(values):,.{digits}f})"


def _of(samples: Sequence[Sample], path: str, scenario: str) -> list[Sample]:
    return [s for s in samples if s.path == path and s.scenario == scenario]


def _median(samples: Sequence[Sample], path: str, scenario: str, part: str) -> float:
    chosen = _of(samples, path, scenario)
    if part == "rps":
        return statistics.median(s.run.rps for s in chosen)
    return statistics.median(s.cpu[part] for s in chosen)


def _table(samples: Sequence[Sample], paths: Sequence[Target] = PATHS) -> str:
    lines = [
        "| path | scenario | rps | p99 ms | CPU µs/req walletd | HAProxy | PostgreSQL "
        "| forwarded | non-2xx |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        for path in paths:
            chosen = _of(samples, path.name, scenario)
            if not chosen:
                continue
            haproxy = _spread([s.cpu["haproxy"] for s in chosen]) if path.through_haproxy else "—"
            lines.append(
                f"| {path.name} | {scenario} | {_spread([s.run.rps for s in chosen])} "
                f"| {_spread([s.run.p99_us / 1000 for s in chosen], 1)} "
                f"| {_spread([s.cpu['walletd'] for s in chosen])} | {haproxy} "
                f"| {_spread([s.cpu['postgres'] for s in chosen])} "
                f"| {sum(s.forwarded for s in chosen)} | {sum(s.run.non_2xx for s in chosen)} |"
            )
    return "\n".join(lines)


def _ratios(samples: Sequence[Sample]) -> str:
    """The issue's goals, as ratios of medians of the same run."""
    direct, one, two = (path.name for path in PATHS)
    lines = [
        "| scenario | walletd CPU/req via HAProxy ÷ direct | PostgreSQL CPU/req ÷ direct "
        "| HAProxy µs/req | rps 2 ÷ 1 via HAProxy |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        if not (_of(samples, direct, scenario) and _of(samples, two, scenario)):
            continue
        lines.append(
            f"| {scenario} "
            f"| {_median(samples, one, scenario, 'walletd') / _median(samples, direct, scenario, 'walletd'):.2f} "  # noqa: E501
            f"| {_median(samples, one, scenario, 'postgres') / _median(samples, direct, scenario, 'postgres'):.2f} "  # noqa: E501
            f"| {_median(samples, one, scenario, 'haproxy'):.0f} "
            f"| {_median(samples, two, scenario, 'rps') / _median(samples, one, scenario, 'rps'):.2f} |"  # noqa: E501
        )
    return "\n".join(lines)


def _inflight_ratios(samples: Sequence[Sample], other: Target) -> str:
    """The default 2-process cluster against ``other`` (the same with another number of
    batches in flight per member): each against one process behind HAProxy, and the two
    against each other, as per-round ratios, median (min–max); CPU per request, medians."""
    one, two = PATHS[1].name, PATHS[2].name
    lines = [
        f"| scenario | rps 2 ÷ 1 via HAProxy | {other.name} ÷ 1 via HAProxy "
        f"| 2 ÷ {other.name} | PostgreSQL µs/req 2 / other | walletd µs/req 2 / other |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        by_round: dict[int, dict[str, float]] = {}
        for sample in samples:
            if sample.scenario == scenario:
                by_round.setdefault(sample.round_number, {})[sample.path] = sample.run.rps
        rounds = [r for r in by_round.values() if {one, two, other.name} <= r.keys()]
        if not rounds:
            continue
        lines.append(
            f"| {scenario} "
            f"| {_spread([r[two] / r[one] for r in rounds], 2)} "
            f"| {_spread([r[other.name] / r[one] for r in rounds], 2)} "
            f"| {_spread([r[two] / r[other.name] for r in rounds], 2)} "
            f"| {_median(samples, two, scenario, 'postgres'):.0f} / "
            f"{_median(samples, other.name, scenario, 'postgres'):.0f} "
            f"| {_median(samples, two, scenario, 'walletd'):.0f} / "
            f"{_median(samples, other.name, scenario, 'walletd'):.0f} |"
        )
    return "\n".join(lines)


def _projection(samples: Sequence[Sample]) -> str:
    """Requests per second on one host of N cores running everything (walletd processes,
    HAProxy, PostgreSQL; no load generator) at the CPU per request measured through HAProxy
    with 2 processes: N × 10^6 / (sum of µs per request), and the PostgreSQL primary's share
    of the cores. It assumes the ops per commit seen here; the hot wallet is also capped by
    its one pipeline's core (10^6 / walletd µs per request)."""
    two = PATHS[-1].name
    lines = [
        "| scenario | µs/req walletd + HAProxy + PostgreSQL | PostgreSQL share "
        "| 8 cores | 16 cores | 32 cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for scenario in SCENARIOS:
        if not _of(samples, two, scenario):
            continue
        parts_us = {part: _median(samples, two, scenario, part) for part in PROJECTED_PARTS}
        total = sum(parts_us.values())
        share = parts_us["postgres"] / total
        projected = " | ".join(
            f"{cores * 1e6 / total:,.0f} rps (PostgreSQL {cores * share:.1f} cores)"
            for cores in PROJECTED_CORES
        )
        lines.append(f"| {scenario} | {total:.0f} | {share:.0%} | {projected} |")
    if _of(samples, two, "hot"):
        cap = 1e6 / _median(samples, two, "hot", "walletd")
        lines.append(
            f"\nOne wallet is served by one pipeline on one core: at most ~{cap:,.0f} rps on "
            "it whatever the cores; the hot row holds for many hot wallets spread over the "
            "processes."
        )
    return "\n".join(lines)


PROJECTED_PARTS = ("walletd", "haproxy", "postgres")
PROJECTED_CORES = (8, 16, 32)


def _row(label: str, scenario: str, run: WrkRun, cpu: dict[str, float]) -> str:
    return (
        f"| {label} | {scenario} | {run.rps:,.0f} | {run.p99_us / 1000:.1f} | {run.non_2xx} | "
        f"{cpu['walletd']:.0f} | {cpu['haproxy']:.0f} | {cpu['postgres']:.0f} |"
    )


def _sample_row(sample: Sample) -> str:
    cpu = sample.cpu
    return (
        f"{sample.path}, {sample.scenario}: {sample.run.rps:,.0f} rps, p99 "
        f"{sample.run.p99_us / 1000:.1f} ms, µs/req walletd {cpu['walletd']:.0f} HAProxy "
        f"{cpu['haproxy']:.0f} PostgreSQL {cpu['postgres']:.0f}, forwarded {sample.forwarded}, "
        f"non-2xx {sample.run.non_2xx}"
    )


if __name__ == "__main__":
    sys.exit(main())

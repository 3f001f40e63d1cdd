"""What two copies cost: ``python -m loadtest.ha_bench [--duration 10] [--connections 64]``.

The same walletd (`walletd cluster --processes 2` behind HAProxy) on one PostgreSQL node
(the embedded server) and on the synchronous trio of `walletd ha-dev` (cli/ha.py: three
Patroni-managed nodes, strict synchronous mode, through HAProxy's PostgreSQL frontend, with
--require-sync-replica). For each, wrk deposits on one hot wallet and on many wallets;
printed per run: rps, p50 and p99, non-2xx, the operations per commit (walletd_batch_ops
over both processes) and the CPU time per answered request of walletd, of each PostgreSQL
node (its postmaster and every backend) and of the PostgreSQL frontend. Everything on
127.0.0.1; it stops by itself. docs/BENCHMARKS.md quotes its output.
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from loadtest.bench import create_wallets, read_batch_ops, run_wrk
from loadtest.bench_report import WrkRun, ops_per_commit
from loadtest.cluster_bench import SCENARIOS, answered, cpu_seconds, parts
from loadtest.procs import REPO_ROOT, free_port
from walletd.cli.ha import HaStack

__all__ = ["main"]

_LISTENING = re.compile(r"walletd cluster listening on (http://\S+) .*processes: ([^;]+);")
START_TIMEOUT_S = 180.0


@contextmanager
def _cluster(
    folder: Path, dsn: str | None
) -> Iterator[tuple[subprocess.Popen[str], str, list[str]]]:
    environment = dict(os.environ)
    environment.pop("DATABASE_URL", None)
    extra = []
    if dsn is not None:
        environment["WALLETD_DATABASE_URL"] = dsn
        extra = ["--require-sync-replica"]
    with (folder / "cluster.log").open("w") as log_file:  # the child keeps its own descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "walletd.cli.main", "cluster", "--processes", "2",
             "--port", str(free_port()), "--data-dir", str(folder / "data"), *extra],
            stdout=subprocess.PIPE, stderr=log_file, text=True, cwd=REPO_ROOT, env=environment,
        )  # fmt: skip
    assert process.stdout is not None
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                raise RuntimeError("walletd cluster exited; see its log")
            if match := _LISTENING.search(line):
                yield process, match.group(1), [u.strip() for u in match.group(2).split(",")]
                return
        raise RuntimeError("walletd cluster did not start in time")
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            for child in psutil.Process(process.pid).children(recursive=True):
                child.kill()
            process.kill()
            process.wait()
        process.stdout.close()


def _postgres_groups(
    stack: HaStack | None, cluster_pid: int, data_dir: Path
) -> dict[str, list[int]]:
    if stack is None:
        return {"pg": parts(cluster_pid, data_dir)["postgres"]}
    groups = {f"pg {node.name}": node.postgres_pids() for node in stack.nodes}
    groups["pg frontend"] = [stack.proxy.pid] if stack.proxy is not None else []
    return groups


def _measure(
    label: str, process: subprocess.Popen[str], urls: list[str], url: str, stack: HaStack | None,
    data_dir: Path, ids_file: Path, scenario: str, args: argparse.Namespace,
) -> str:  # fmt: skip
    groups = {"walletd": parts(process.pid, data_dir)["walletd"]}
    groups |= _postgres_groups(stack, process.pid, data_dir)
    before_ops = [asyncio.run(read_batch_ops(u)) for u in urls]
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    run: WrkRun = run_wrk(url, scenario, ids_file, args.connections, args.duration)
    after = {name: cpu_seconds(pids) for name, pids in groups.items()}
    after_ops = [asyncio.run(read_batch_ops(u)) for u in urls]
    requests = max(1, answered(run))
    cpu = " ".join(f"{name} {(after[name] - before[name]) * 1e6 / requests:.0f}" for name in groups)
    per_commit = [ops_per_commit(b, a) for b, a in zip(before_ops, after_ops, strict=True)]
    ops = "/".join(f"{value:.1f}" if value else "-" for value in per_commit)
    return (
        f"| {label} | {scenario} | {run.rps:,.0f} | {run.p50_us / 1000:.1f} | "
        f"{run.p99_us / 1000:.1f} | {run.non_2xx} | {ops} | {cpu} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wallets", type=int, default=2_000)
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None or shutil.which("haproxy") is None:
        print("ha bench needs wrk and haproxy", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="walletd-ha-bench-") as temp:
        for label in ("one node", "sync trio"):
            folder = Path(temp) / label.replace(" ", "-")
            folder.mkdir()
            stack = HaStack(folder / "ha") if label == "sync trio" else None
            try:
                dsn = stack.start() if stack is not None else None
                with _cluster(folder, dsn) as (process, url, urls):
                    ids = asyncio.run(create_wallets(url, 1 + args.wallets))
                    for scenario in SCENARIOS:
                        ids_file = folder / f"{scenario}.ids"
                        ids_file.write_text("\n".join(ids[:1] if scenario == "hot" else ids[1:]))
                        row = _measure(
                            label, process, urls, url, stack, folder / "data", ids_file,
                            scenario, args,
                        )  # fmt: skip
                        rows.append(row)
                        print(row, flush=True)
            finally:
                if stack is not None:
                    stack.stop()
    print()
    print(f"deposits through HAProxy, 2 walletd processes, {args.connections} connections, "
          f"{args.duration} s per run, {os.cpu_count()} cores (shared)")  # fmt: skip
    print("| database | scenario | rps | p50 ms | p99 ms | non-2xx | ops/commit (per process) "
          "| CPU µs per request |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two walletd builds side by side: wrk runs alternated, CPU per request from /proc.

    python -m loadtest.ab_probe [--base main] [--rounds 3] [--duration 10]
                                [--scenarios hot,many,transfer,bulk] [--ceiling]
                                [--base-args "..."] [--new-args "..."]

``--base`` is a git revision, exported to a temporary directory and run with this venv's
interpreter (the editable install's finder is taken out of the way); the new build is this
checkout. ``--base .`` runs this checkout twice, to compare settings (``--base-args``,
``--new-args``: extra `walletd serve` arguments). Both servers run at once, each with its
own embedded PostgreSQL; each gets --wallets deposit wallets and --wallets funded transfer
wallets. Then, round after round, each scenario runs on both (order alternating), and for
every run: rps, p50, p99, and CPU µs per request of walletd and of its PostgreSQL (all
processes under its postmaster), read from /proc/<pid>/stat before and after. Medians and
the range over rounds, and the new/base ratio of each round's pair, are printed.

``bulk`` is `loadtest.bulk_bench`'s many-wallet round (``--bulk-clients`` clients sending
``--bulk-items`` keyed deposits per request on the --wallets wallets, every per-item result
read): its "rps" is applied operations/s, its CPU per operation. ``--ceiling`` adds the
bare aiohttp server (`loadtest.ceiling`) as a third target of the wrk scenarios in every
round, and prints each build's per-round ratio to it (issue #25's "of the bare ceiling").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from loadtest import bulk_bench
from loadtest.bench import TRANSFER_FUND, create_wallets, fund_wallets, run_wrk
from loadtest.builds import export_revision, python_command
from loadtest.procs import (
    REPO_ROOT,
    Server,
    free_port,
    running_ceiling,
    server_environment,
    stop,
    wait_ready,
)

__all__ = ["main"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    server: Server
    data_dir: Path
    ids: dict[str, Path]
    walletd: bool = True  # False: the ceiling (no PostgreSQL, no bulk route)


@dataclass(frozen=True, slots=True)
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    walletd_us: float
    postgres_us: float
    client_us: float | None = None  # bulk only: the bench clients' CPU per operation


@contextlib.contextmanager
def _walletd(
    name: str, tree: Path | None, extra: list[str], tmp: Path,
    environment: Mapping[str, str] | None = None,
) -> Iterator[Target]:  # fmt: skip
    """``environment`` is added to ours: settings an older build ignores, where an unknown
    command-line flag would stop it."""
    port = free_port()
    data_dir = tmp / f"{name}-data"
    command = python_command(tree, "walletd.cli.main", tmp)
    command += ["serve", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data_dir)]
    log_path = tmp / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *extra], stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
            env={**server_environment(os.environ), **(environment or {})},
        )  # fmt: skip
        server = Server(f"http://127.0.0.1:{port}", process, log_path)
        try:
            wait_ready(server)
            yield Target(name, server, data_dir, {})
        finally:
            stop(server)


def _cpu_s(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS  # utime..cstime


def _postgres_pids(data_dir: Path) -> list[int]:
    postmaster = int((data_dir / "pgdata" / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == postmaster:
                children.append(int(stat.parent.name))
    return [postmaster, *children]


def _run_bulk(target: Target, duration_s: float, clients: int, items: int) -> Sample:
    """One bulk_bench round on the target's many-wallet ids: operations/s, per request
    latency, CPU per applied operation."""
    process = target.server.process
    assert process is not None
    assert target.walletd
    wallets = target.ids["many"].read_text().split()
    args = argparse.Namespace(duration=duration_s, clients=clients, items=items)
    result = asyncio.run(bulk_bench.run_round(
        target.server, "many", wallets, args, bulk_bench.Ledger(), process.pid,
        _postgres_pids(target.data_dir),
    ))  # fmt: skip
    return Sample(
        result.ops_per_s, result.percentile_ms(0.5), result.percentile_ms(0.99),
        result.walletd_cpu_us_per_op, result.postgres_cpu_us_per_op,
        result.client_cpu_us_per_op,
    )  # fmt: skip


def _run(target: Target, scenario: str, connections: int, duration_s: int) -> Sample:
    process = target.server.process
    assert process is not None
    postgres = _postgres_pids(target.data_dir) if target.walletd else []
    walletd0, postgres0 = _cpu_s(process.pid), sum(_cpu_s(p) for p in postgres)
    run = run_wrk(target.server.url, scenario, target.ids[scenario], connections, duration_s)
    walletd1, postgres1 = _cpu_s(process.pid), sum(_cpu_s(p) for p in postgres)
    if run.non_2xx or run.socket_errors:
        print(f"  {target.name} {scenario}: non-2xx {run.non_2xx}, socket errors"
              f" {run.socket_errors}", flush=True)  # fmt: skip
    requests = max(run.requests, 1)
    return Sample(
        run.rps, run.p50_us / 1000, run.p99_us / 1000,
        (walletd1 - walletd0) / requests * 1e6, (postgres1 - postgres0) / requests * 1e6,
    )  # fmt: skip


def _prepare(target: Target, wallets: int, tmp: Path) -> None:
    many = asyncio.run(create_wallets(target.server.url, wallets))
    transfer = asyncio.run(create_wallets(target.server.url, wallets))
    asyncio.run(fund_wallets(target.server.url, transfer, TRANSFER_FUND))
    for scenario, ids in (("hot", many[:1]), ("many", many), ("get", many),
                          ("transfer", transfer)):  # fmt: skip
        path = tmp / f"{target.name}-{scenario}.txt"
        path.write_text("\n".join(ids) + "\n")
        target.ids[scenario] = path


def _spread(values: list[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision, or . for this checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured s per scenario")
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--scenarios", default="hot,many,transfer")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also run the bare aiohttp server on the wrk scenarios",
    )
    parser.add_argument("--bulk-clients", type=int, default=4)
    parser.add_argument("--bulk-items", type=int, default=1000)
    parser.add_argument("--base-args", default="")
    parser.add_argument("--new-args", default="")
    args = parser.parse_args(argv)
    scenarios = args.scenarios.split(",")
    if not (1 <= args.rounds <= 50 and 1 <= args.duration <= 600 and 1 <= args.wallets <= 10**6):
        parser.error("--rounds 1..50, --duration 1..600, --wallets 1..1,000,000")
    samples: dict[tuple[str, str], list[Sample]] = {}
    with tempfile.TemporaryDirectory(prefix="walletd-ab-") as name:
        tmp = Path(name)
        tree = None if args.base == "." else export_revision(args.base, tmp / "base")
        with contextlib.ExitStack() as stack:
            base = stack.enter_context(_walletd("base", tree, shlex.split(args.base_args), tmp))
            new = stack.enter_context(_walletd("new", None, shlex.split(args.new_args), tmp))
            builds = [base, new]
            for target in builds:
                _prepare(target, args.wallets, tmp)
            if args.ceiling:
                # Any ids do: the ceiling answers every wallet alike.
                server = stack.enter_context(running_ceiling())
                ceiling = Target("ceiling", server, tmp, dict(base.ids), walletd=False)
                builds.append(ceiling)

            def run(target: Target, scenario: str, duration_s: int) -> Sample:
                if scenario == "bulk":
                    return _run_bulk(target, duration_s, args.bulk_clients, args.bulk_items)
                return _run(target, scenario, args.connections, duration_s)

            for scenario in scenarios:
                for target in builds:
                    if args.warmup and not (scenario == "bulk" and not target.walletd):
                        run(target, scenario, args.warmup)
            for round_index in range(args.rounds):
                # Rotated each round: each target runs first, second and last in turn.
                shift = round_index % len(builds)
                order = builds[shift:] + builds[:shift]
                for scenario in scenarios:
                    for target in order:
                        if scenario == "bulk" and not target.walletd:
                            continue  # the ceiling has no bulk route
                        time.sleep(args.settle)
                        sample = run(target, scenario, args.duration)
                        samples.setdefault((scenario, target.name), []).append(sample)
                        print(f"round {round_index + 1} {scenario:>8} {target.name:>7}:"
                              f" {sample.rps:7.0f} rps  p50 {sample.p50_ms:6.1f} ms  p99"
                              f" {sample.p99_ms:6.1f} ms  CPU/request walletd"
                              f" {sample.walletd_us:4.0f} µs  PostgreSQL"
                              f" {sample.postgres_us:4.0f} µs", flush=True)  # fmt: skip
    print(f"\nmedian (min-max) over {args.rounds} rounds; base {args.base!r}"
          f" {args.base_args!r}, new this checkout {args.new_args!r}")  # fmt: skip
    print("(bulk: rps is applied operations/s, p50/p99 per request, CPU per operation)")
    print("| scenario | build | rps | p50 ms | p99 ms | walletd µs/req | PostgreSQL µs/req |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for scenario in scenarios:
        for build in ("base", "new", "ceiling"):
            rows = samples.get((scenario, build))
            if not rows:
                continue
            print(f"| {scenario} | {build} | {_spread([s.rps for s in rows], '.0f')}"
                  f" | {_spread([s.p50_ms for s in rows], '.1f')}"
                  f" | {_spread([s.p99_ms for s in rows], '.1f')}"
                  f" | {_spread([s.walletd_us for s in rows], '.0f')}"
                  f" | {_spread([s.postgres_us for s in rows], '.0f')} |")  # fmt: skip
    for scenario in scenarios:
        pairs = zip(samples[(scenario, "new")], samples[(scenario, "base")], strict=True)
        ratios = [(n.rps / b.rps, n.walletd_us / b.walletd_us) for n, b in pairs]
        print(f"{scenario}: new/base rps {_spread([r[0] for r in ratios], '.2f')},"
              f" walletd CPU/request {_spread([r[1] for r in ratios], '.2f')}")  # fmt: skip
    if "bulk" in scenarios:
        # Walletd, PostgreSQL and the clients share this machine's cores: each core gives
        # 10^6 CPU µs a second, so their sum per operation bounds the rate.
        cores = os.cpu_count() or 1
        for build in ("base", "new"):
            totals = [s.walletd_us + s.postgres_us + (s.client_us or 0.0)
                      for s in samples[("bulk", build)]]  # fmt: skip
            clients = [s.client_us or 0.0 for s in samples[("bulk", build)]]
            bounds = [cores * 1e6 / total for total in totals]
            print(f"bulk {build}: client CPU µs/op {_spread(clients, '.1f')}; walletd +"
                  f" PostgreSQL + client {_spread(totals, '.1f')} µs/op, at most"
                  f" {_spread(bounds, '.0f')} ops/s on {cores} busy cores")  # fmt: skip
    if "transfer" in scenarios and "many" in scenarios:
        for build in ("base", "new"):
            pairs = zip(samples[("transfer", build)], samples[("many", build)], strict=True)
            per_round = [t.rps / m.rps for t, m in pairs]
            print(f"transfer/deposit (many) {build}: {_spread(per_round, '.2f')}")
    if args.ceiling:
        for scenario in scenarios:
            if scenario == "bulk":
                continue
            for build in ("base", "new"):
                pairs = zip(samples[(scenario, build)], samples[(scenario, "ceiling")],
                            strict=True)  # fmt: skip
                per_round = [b.rps / c.rps for b, c in pairs]
                print(f"{scenario} {build}/ceiling rps: {_spread(per_round, '.2f')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine alone, two builds side by side: CPU per operation in-process, no HTTP, no storage.

    python -m loadtest.engine_bench [--base main] [--runs 5] [--ops 64000] [--wallets 10000]
                                    [--scenarios hot,many,transfer]

The pure engine (``walletd.engine.router.Engine`` over ``InMemoryLog``) driven in-process,
without the HTTP edge and PostgreSQL whose cost (and whose neighbours on a shared machine)
make `loadtest.ab_probe`'s CPU per request vary by a quarter round to round: this one
varies by 1-2%, so it sees a change of a few per cent in the engine's own cost.

``--base`` is a git revision, exported to a temporary directory (as ab_probe does); the new
build is this checkout. Each run of a scenario is a child process per build (this venv's
interpreter, walletd imported from the build's packages, this checkout's ``loadtest``), the
builds alternating: base, new, new, base, ... Each child creates its wallets (one for
``hot``, ``--wallets`` otherwise) and funds them, with the log storing what set-up writes;
from then on the log discards every append (``InMemoryLog``'s own checks grow with its rows
and would be most of what is measured). It tunes the garbage collector as `walletd serve`
does once it is ready (cli/gc_tuning.py), warms up with a quarter of ``--ops`` operations,
then times ``--ops`` operations with 64 concurrent tasks under uvloop, with
``time.process_time()``: the engine's CPU and the event loop's, nothing else in the process.
The operands (wallets, pairs) are drawn before the clock starts.

Scenarios: ``hot`` deposits 1.00 to one wallet; ``many`` deposits to random wallets of
``--wallets``; ``transfer`` moves 1.00 between random pairs of them. The money is checked
after every run: every operation applied, and the balances read back add up (deposits
add up, transfers conserve the total); a run that does not is an error, not a figure.

Printed per scenario: each build's CPU µs per operation, median (min-max) over the runs,
and the new/base ratio of each run's pair, median (min-max). Only engine calls that every
build since the saga transfers has are used (``Engine(log)``, ``start``, ``stop``,
``create_wallet``, ``apply``, ``transfer``, ``read``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Awaitable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import uvloop

from loadtest.builds import export_revision, python_command
from loadtest.procs import REPO_ROOT
from walletd.cli.config import SETTINGS
from walletd.cli.gc_tuning import tune_gc
from walletd.engine.commands import Outcome
from walletd.engine.memory_log import InMemoryLog
from walletd.engine.model import Batch, OperationKind
from walletd.engine.router import Engine

__all__ = ["SCENARIOS", "Measurement", "main", "measure"]

SCENARIOS = ("hot", "many", "transfer")
CONCURRENCY = 64
FUND = 10**9  # minor units each wallet gets at set-up
AMOUNT = 100  # minor units per deposit or transfer
SEED = 7
# Set-up requests in flight at once (creations, funding deposits).
SETUP_CHUNK = 500
RESULT_MARK = "ENGINE_BENCH "
CHILD_TIMEOUT_S = 600.0
_OK = Outcome.OK
_DEPOSIT = OperationKind.DEPOSIT


@dataclass(frozen=True, slots=True)
class Measurement:
    """One run of a scenario on one build, with what its money check needs."""

    scenario: str
    operations: int  # timed
    cpu_s: float  # process CPU over the timed operations
    wallets: int
    applied: int  # operations answered OK, warm-up and timed
    refused: int  # any other answer
    expected_total: int  # the wallets' total balance the answers imply
    total: int  # the wallets' total balance read back

    @property
    def us_per_op(self) -> float:
        return self.cpu_s / self.operations * 1e6

    def money_errors(self) -> list[str]:
        """What is wrong with the money (empty: nothing)."""
        errors = []
        if self.refused:
            errors.append(f"{self.refused} operations refused")
        if self.total != self.expected_total:
            errors.append(f"balances add up to {self.total}, expected {self.expected_total}")
        return errors


class _SetUpLog(InMemoryLog):
    """Stores what set-up writes, then nothing (``discarding``)."""

    discarding = False

    async def append_batch(self, batch: Batch) -> None:
        if not self.discarding:
            await super().append_batch(batch)


async def measure(
    scenario: str,
    operations: int,
    wallets: int,
    *,
    concurrency: int = CONCURRENCY,
    gc_gen0_threshold: int | None = None,
    seed: int = SEED,
) -> Measurement:
    """Run one scenario on the engine of the walletd imported (in a child, the build's), as
    the module's description says; ``gc_gen0_threshold`` None leaves the garbage collector
    alone (in a test process)."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if operations < 1 or wallets < (2 if scenario == "transfer" else 1) or concurrency < 1:
        raise ValueError("operations >= 1, wallets >= 1 (2 for transfers), concurrency >= 1")
    log = _SetUpLog()
    engine = Engine(log)
    await engine.start()
    try:
        count = 1 if scenario == "hot" else wallets
        ids = [uuid.UUID(int=index + 1) for index in range(count)]
        await _set_up(engine, ids)
        log.discarding = True
        rng = random.Random(seed)
        tally = [0, 0]  # applied, refused

        async def deposits(targets: Sequence[uuid.UUID]) -> None:
            for wallet_id in targets:
                reply = await engine.apply(wallet_id, _DEPOSIT, AMOUNT, None)
                tally[reply.outcome is not _OK] += 1

        async def transfers(pairs: Sequence[list[uuid.UUID]]) -> None:
            for from_id, to_id in pairs:
                _id, reply = await engine.transfer(None, None, from_id, to_id, AMOUNT, None)
                tally[reply.outcome is not _OK] += 1

        async def run(size: int) -> float:
            """``size`` operations in ``concurrency`` tasks; the CPU seconds they took."""
            tasks: list[Awaitable[None]]
            if scenario == "transfer":
                pairs = [rng.sample(ids, 2) for _ in range(size)]
                tasks = [transfers(pairs[k::concurrency]) for k in range(concurrency)]
            else:
                targets = ids * size if scenario == "hot" else rng.choices(ids, k=size)
                tasks = [deposits(targets[k::concurrency]) for k in range(concurrency)]
            started = time.process_time()
            await asyncio.gather(*tasks)
            return time.process_time() - started

        if gc_gen0_threshold is not None:
            tune_gc(gc_gen0_threshold)  # as `walletd serve` does once it is ready
        await run(max(operations // 4, 1))  # warm-up
        cpu_s = await run(operations)
        total = 0
        for wallet_id in ids:
            reply = await engine.read(wallet_id)
            if reply.wallet is None:
                raise RuntimeError(f"wallet {wallet_id} not read back: {reply.outcome}")
            total += reply.wallet.balance
    finally:
        await engine.stop()
    applied, refused = tally
    moved = 0 if scenario == "transfer" else applied * AMOUNT
    return Measurement(
        scenario, operations, cpu_s, count, applied, refused, count * FUND + moved, total
    )


async def _set_up(engine: Engine, ids: Sequence[uuid.UUID]) -> None:
    """Create the wallets and fund each with ``FUND``."""
    for start in range(0, len(ids), SETUP_CHUNK):
        chunk = ids[start : start + SETUP_CHUNK]
        created = await asyncio.gather(*(engine.create_wallet(w, None) for w in chunk))
        if any(reply.outcome is not Outcome.CREATED for _id, reply in created):
            raise RuntimeError("a wallet was not created")
        funded = await asyncio.gather(*(engine.apply(w, _DEPOSIT, FUND, None) for w in chunk))
        if any(reply.outcome is not _OK for reply in funded):
            raise RuntimeError("a wallet was not funded")


def _serve_gc_threshold() -> int:
    """`walletd serve`'s default young-generation threshold, as the build sets it."""
    return int(next(s.default for s in SETTINGS if s.name == "gc_gen0_threshold"))


def _child(scenario: str, operations: int, wallets: int) -> int:
    """One run in this process (walletd imported from the build): the result as a line."""
    result = uvloop.run(
        measure(scenario, operations, wallets, gc_gen0_threshold=_serve_gc_threshold())
    )
    print(RESULT_MARK + json.dumps(asdict(result)), flush=True)
    return 0


def _run_child(
    tree: Path | None, tmp: Path, scenario: str, operations: int, wallets: int
) -> Measurement:
    command = python_command(tree, "loadtest.engine_bench", tmp)
    command += ["--child", scenario, "--ops", str(operations), "--wallets", str(wallets)]
    done = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command)} exited with {done.returncode}:\n{done.stderr[-4000:]}"
        )
    result = Measurement(**json.loads(lines[-1].removeprefix(RESULT_MARK)))
    errors = result.money_errors()
    if errors:
        raise RuntimeError(f"{scenario} on {tree or 'this checkout'}: {'; '.join(errors)}")
    return result


def _spread(values: Sequence[float], spec: str) -> str:
    return f"{statistics.median(values):{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision, or . for this checkout")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ops", type=int, default=64_000, help="timed operations per run")
    parser.add_argument("--wallets", type=int, default=10_000)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child, args.ops, args.wallets)
    scenarios = args.scenarios.split(",")
    if not set(scenarios) <= set(SCENARIOS):
        parser.error(f"--scenarios: some of {','.join(SCENARIOS)}")
    if not (1 <= args.runs <= 50 and 1 <= args.ops <= 10**7 and 2 <= args.wallets <= 10**6):
        parser.error("--runs 1..50, --ops 1..10,000,000, --wallets 2..1,000,000")
    samples: dict[tuple[str, str], list[Measurement]] = {}
    with tempfile.TemporaryDirectory(prefix="walletd-engine-bench-") as name:
        tmp = Path(name)
        trees = {
            "base": None if args.base == "." else export_revision(args.base, tmp / "base"),
            "new": None,
        }
        for run_index in range(args.runs):
            # Alternated: base, new, then new, base, ...
            order = ("base", "new") if run_index % 2 == 0 else ("new", "base")
            for scenario in scenarios:
                for build in order:
                    result = _run_child(trees[build], tmp, scenario, args.ops, args.wallets)
                    samples.setdefault((scenario, build), []).append(result)
                    print(f"run {run_index + 1} {scenario:>8} {build:>4}:"
                          f" {result.us_per_op:6.2f} µs/operation", flush=True)  # fmt: skip
    print(f"\nengine CPU µs per operation, median (min-max) over {args.runs} runs;"
          f" {args.ops} operations per run, {args.wallets} wallets; base {args.base!r},"
          " new this checkout")  # fmt: skip
    print("| scenario | base µs/op | new µs/op | new/base per run pair |")
    print("| --- | ---: | ---: | ---: |")
    for scenario in scenarios:
        base, new = samples[(scenario, "base")], samples[(scenario, "new")]
        ratios = [n.us_per_op / b.us_per_op for n, b in zip(new, base, strict=True)]
        print(f"| {scenario} | {_spread([b.us_per_op for b in base], '.2f')}"
              f" | {_spread([n.us_per_op for n in new], '.2f')}"
              f" | {_spread(ratios, '.3f')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

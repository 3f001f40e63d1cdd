"""Unrelated depositors with and without a poison client, side by side in one run.

    python -m loadtest.poison_bench [--revision main] [--rounds 3] [--seconds 10]
                                    [--connections 64] [--wallets 1000] [--poison-loops 1]

Starts `walletd serve` (this checkout, or ``--revision``, a git revision exported and run
as ``loadtest.ab_probe`` does) with its embedded PostgreSQL, creates ``--wallets`` wallets
for ``--connections`` deposit loops (1.00 each, keyed, on random wallets), a funded sender, a
receiver, and a capped wallet whose balance a CHECK added here (through the embedded
server's DSN, as an operator would) keeps under 1000.00: a refusal the ledger cannot
foresee. Then ``--rounds`` rounds, each a clean phase and a poisoned phase of ``--seconds``
(their order alternating). In the poisoned phase ``--poison-loops`` loops cycle through
every known trigger:

- take first the transfer id a capture derives from its hold id (both derivations: the old
  uuid5 and the reserved version 8), then capture the hold into the receiver;
- forged legs past the schema's bounds (a 300-character reference; an amount of 10^15
  minor units; a 100-character actor) on the internal legs route, as a hostile or buggy
  peer would send them: to the process's internal listener, with the cluster credential
  (the bench gives walletd both through its environment, WALLETD_INTERNAL_PORT and
  WALLETD_CLUSTER_CREDENTIAL). A build from before the internal listener ignores those
  variables and served the route on its public port with the forwarded marker: the leg
  goes there instead, and the answer's key says which port took it;
- a deposit of 1000.00 into the capped wallet, and its retry with the same key.

Per phase: the depositors' deposits/s, 503s, other non-200s, p99, and CPU µs per deposit of
walletd plus every PostgreSQL process; the poison's answers by trigger and status. Medians
over rounds, as a markdown table (docs/BENCHMARKS.md, "A poison client"). At the end every
depositor's wallet balance is checked against the 200s it got.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import secrets
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg

from loadtest.ab_probe import _cpu_s, _postgres_pids, _walletd
from loadtest.builds import export_revision
from loadtest.procs import free_port

__all__ = ["main"]

# The capped wallet refuses (by the CHECK added here) any balance from 1000.00 up.
CAP_MINOR = 100_000
# The capture's transfer id: the derivation before the fix (uuid5 of the hold id) and
# after (the same with version 8, engine/holds.py); taking both first works on both builds.
CAPTURE_TRANSFER_NAMESPACE = uuid.UUID("8d2e5f14-7a3b-4c9d-b6e1-0f4a2c7d9e85")
LEGS_PATH = "/internal/v1/legs"
CLUSTER_AUTH_SCHEME = "Walletd-Cluster"
# Where a build from before the internal listener served legs: the public port, marked.
FORWARDED_HEADER = "X-Walletd-Forwarded"
CREATE_CONCURRENCY = 32


def capture_ids(hold_id: str) -> list[str]:
    old = uuid.uuid5(CAPTURE_TRANSFER_NAMESPACE, hold_id)
    new = uuid.UUID(int=(old.int & ~(0xF << 76)) | (8 << 76))
    return [str(old), str(new)]


@dataclass(frozen=True, slots=True)
class Peer:
    """How a forged leg reaches walletd: its internal listener with the cluster credential
    (a peer of the cluster), or, on a build without one, its public port."""

    internal_url: str
    credential: str
    public_url: str


@dataclass(slots=True)
class Phase:
    ok: int = 0
    unavailable: int = 0
    other: int = 0
    seconds: float = 0.0
    cpu_us: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    poison: Counter[str] = field(default_factory=Counter)

    @property
    def deposits_s(self) -> float:
        return self.ok / self.seconds

    @property
    def p99_ms(self) -> float:
        ordered = sorted(self.latencies_s)
        return 1000 * ordered[int(0.99 * (len(ordered) - 1))] if ordered else 0.0


async def _json(response: aiohttp.ClientResponse) -> dict[str, object]:
    body = await response.json(content_type=None)
    return body if isinstance(body, dict) else {}


async def _create(http: aiohttp.ClientSession, url: str, deposit: str | None = None) -> str:
    async with http.post(f"{url}/api/v1/wallets") as response:
        if response.status != 201:
            raise RuntimeError(f"wallet creation failed: {response.status}")
        wallet_id = str((await _json(response))["id"])
    if deposit is not None:
        async with http.post(
            f"{url}/api/v1/wallets/{wallet_id}/operation",
            json={"operation_type": "DEPOSIT", "amount": deposit},
        ) as response:
            if response.status != 200:
                raise RuntimeError(f"funding failed: {response.status}")
    return wallet_id


async def _depositors(
    http: aiohttp.ClientSession, url: str, wallets: list[str], args: argparse.Namespace,
    phase: Phase, tally: Counter[str], run: str,
) -> None:  # fmt: skip
    deadline = time.monotonic() + args.seconds

    async def loop(seed: int) -> None:
        rng = random.Random(seed)
        sent = 0
        while time.monotonic() < deadline:
            wallet_id = wallets[rng.randrange(len(wallets))]
            sent += 1
            started = time.monotonic()
            async with http.post(
                f"{url}/api/v1/wallets/{wallet_id}/operation",
                json={"operation_type": "DEPOSIT", "amount": "1.00"},
                headers={"Idempotency-Key": f"{run}-{seed}-{sent}"},
            ) as response:
                await response.read()
                status = response.status
            phase.latencies_s.append(time.monotonic() - started)
            if status == 200:
                phase.ok += 1
                tally[wallet_id] += 1
            elif status == 503:
                phase.unavailable += 1
            else:
                phase.other += 1

    await asyncio.gather(*(loop(n) for n in range(args.connections)))


async def _send_leg(http: aiohttp.ClientSession, peer: Peer, leg: Mapping[str, object]) -> str:
    """The forged leg's answer as ``port:status:outcome``."""
    try:
        async with http.post(
            peer.internal_url + LEGS_PATH, json={"legs": [leg]},
            headers={"Authorization": f"{CLUSTER_AUTH_SCHEME} {peer.credential}"},
        ) as response:  # fmt: skip
            body, status, port = await _json(response), response.status, "internal"
    except aiohttp.ClientConnectorError:  # no internal listener: a build from before it
        async with http.post(
            peer.public_url + LEGS_PATH, json={"legs": [leg]}, headers={FORWARDED_HEADER: "1"}
        ) as response:
            body, status, port = await _json(response), response.status, "public"
    replies = body.get("replies")
    outcome = replies[0].get("outcome") if isinstance(replies, list) and replies else ""
    return f"{port}:{status}:{outcome}"


async def _poison(
    http: aiohttp.ClientSession, url: str, peer: Peer, sender: str, receiver: str,
    capped: str, stop: asyncio.Event, phase: Phase, run: str,
) -> None:  # fmt: skip
    seen = phase.poison
    rounds = 0
    forged = {
        "id": "", "from_wallet_id": sender, "to_wallet_id": receiver, "amount": 0,
        "reference": None, "status": "PENDING", "failure_code": None, "created_at_us": 0,
        "updated_at_us": 0,
    }  # fmt: skip
    while not stop.is_set():
        rounds += 1
        async with http.post(
            f"{url}/api/v1/wallets/{sender}/holds", json={"amount": "0.01"}
        ) as response:
            hold = await _json(response)
            seen[f"hold:{response.status}"] += 1
        if response.status == 201:
            for taken in capture_ids(str(hold["id"])):
                async with http.post(
                    f"{url}/api/v1/transfers",
                    json={"id": taken, "from_wallet_id": sender, "to_wallet_id": receiver,
                          "amount": "0.01"},
                ) as response:  # fmt: skip
                    await response.read()
                    seen[f"take-capture-id:{response.status}"] += 1
            async with http.post(
                f"{url}/api/v1/holds/{hold['id']}/capture", json={"to_wallet_id": receiver}
            ) as response:
                await response.read()
                seen[f"capture:{response.status}"] += 1
        legs = [
            {"kind": "TRANSFER_OUT", "failure_code": None,
             "transfer": {**forged, "id": str(uuid.uuid4()), "amount": 100,
                          "reference": "r" * 300}},
            {"kind": "TRANSFER_IN", "failure_code": None,
             "transfer": {**forged, "id": str(uuid.uuid4()), "amount": 10**15}},
            {"kind": "TRANSFER_IN", "failure_code": None,
             "transfer": {**forged, "id": str(uuid.uuid4()), "amount": 100,
                          "actor": "a" * 100}},
        ]  # fmt: skip
        for leg in legs:
            seen[f"forged-leg:{await _send_leg(http, peer, leg)}"] += 1
        for attempt in ("capped-deposit", "capped-retry"):
            async with http.post(
                f"{url}/api/v1/wallets/{capped}/operation",
                json={"operation_type": "DEPOSIT", "amount": "1000.00"},
                headers={"Idempotency-Key": f"poison-{run}-{rounds}"},
            ) as response:
                body = await _json(response)
                seen[f"{attempt}:{response.status}:{body.get('code', '')}"] += 1


def _cpu(process_pid: int, data_dir: Path) -> float:
    return _cpu_s(process_pid) + sum(_cpu_s(pid) for pid in _postgres_pids(data_dir))


async def _bench(args: argparse.Namespace) -> None:
    from walletd.persistence.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="walletd-poison-bench-") as folder:
        tmp = Path(folder)
        tree = export_revision(args.revision, tmp / "tree") if args.revision else None
        internal_port, credential = free_port(), "bench_" + secrets.token_urlsafe(32)
        environment = {
            "WALLETD_INTERNAL_PORT": str(internal_port),
            "WALLETD_CLUSTER_CREDENTIAL": credential,
        }
        with _walletd("poison", tree, [], tmp, environment) as target:
            url = target.server.url
            peer = Peer(f"http://127.0.0.1:{internal_port}", credential, url)
            process = target.server.process
            assert process is not None
            connector = aiohttp.TCPConnector(limit=args.connections + 8)
            async with aiohttp.ClientSession(connector=connector) as http:
                semaphore = asyncio.Semaphore(CREATE_CONCURRENCY)

                async def create() -> str:
                    async with semaphore:
                        return await _create(http, url)

                wallets = list(await asyncio.gather(*(create() for _ in range(args.wallets))))
                sender = await _create(http, url, "1000000.00")
                receiver = await _create(http, url)
                capped = await _create(http, url)
                # Adopts the server walletd started (not ours to stop): its DSN, as an
                # operator with the data dir's secret would connect.
                dsn = await asyncio.to_thread(EmbeddedPostgres(target.data_dir).start)
                connection = await asyncpg.connect(dsn)
                try:
                    await connection.execute(
                        "ALTER TABLE wallets ADD CONSTRAINT bench_poison_cap "
                        f"CHECK (id <> '{capped}' OR balance < {CAP_MINOR})"
                    )
                finally:
                    await connection.close()
                tally: Counter[str] = Counter()
                results: dict[str, list[Phase]] = {"clean": [], "poisoned": []}
                for number in range(args.rounds):
                    order = ("clean", "poisoned") if number % 2 == 0 else ("poisoned", "clean")
                    for name in order:
                        phase = Phase()
                        run = f"r{number}{name[0]}"
                        stop = asyncio.Event()
                        cpu0, started = _cpu(process.pid, target.data_dir), time.monotonic()
                        targets = (sender, receiver, capped)
                        poisons = [
                            asyncio.create_task(
                                _poison(http, url, peer, *targets, stop, phase, f"{run}{n}")
                            )
                            for n in range(args.poison_loops if name == "poisoned" else 0)
                        ]
                        await _depositors(http, url, wallets, args, phase, tally, run)
                        stop.set()
                        await asyncio.gather(*poisons)
                        phase.seconds = time.monotonic() - started
                        cpu = _cpu(process.pid, target.data_dir) - cpu0
                        phase.cpu_us = cpu * 1e6 / max(1, phase.ok)
                        results[name].append(phase)
                        print(f"round {number + 1} {name}: {phase.ok} ok, {phase.unavailable} "
                              f"x 503, {phase.other} other, {phase.deposits_s:.0f}/s, p99 "
                              f"{phase.p99_ms:.1f} ms, {phase.cpu_us:.0f} µs CPU/deposit; "
                              f"poison {dict(phase.poison)}", flush=True)  # fmt: skip
                wrong = 0
                for wallet_id in wallets:
                    async with http.get(f"{url}/api/v1/wallets/{wallet_id}") as response:
                        balance = str((await _json(response))["balance"])
                    wrong += balance != f"{tally[wallet_id]}.00"
    _report(args, results, wrong)


def _report(args: argparse.Namespace, results: dict[str, list[Phase]], wrong: int) -> None:
    median = statistics.median
    clean, poisoned = results["clean"], results["poisoned"]

    def med(phases: list[Phase], attr: str) -> float:
        return float(median(getattr(p, attr) for p in phases))

    build = args.revision or "this checkout"
    print(f"\n# poison_bench ({build}): {args.rounds} rounds of {args.seconds:g} s per phase, "
          f"{args.connections} depositors on {args.wallets} wallets, {args.poison_loops} "
          "poison loop(s); medians")  # fmt: skip
    print("| measure | without poison | with poison |")
    print("| --- | ---: | ---: |")
    for label, attr, fmt in (
        ("depositors' deposits/s", "deposits_s", "{:.0f}"),
        ("depositors' 503s per phase", "unavailable", "{:.0f}"),
        ("depositors' other non-200s per phase", "other", "{:.0f}"),
        ("depositors' p99 ms", "p99_ms", "{:.1f}"),
        ("CPU µs per deposit (walletd + PostgreSQL)", "cpu_us", "{:.0f}"),
    ):
        print(f"| {label} | {fmt.format(med(clean, attr))} | {fmt.format(med(poisoned, attr))} |")
    answers: Counter[str] = Counter()
    for phase in poisoned:
        answers.update(phase.poison)
    print("\npoison answers (all rounds): " + ", ".join(
        f"{what} x{count}" for what, count in sorted(answers.items())
    ))  # fmt: skip
    print(f"depositor balances that differ from their 200s: {wrong}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", default="", help="a git revision to run instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0, help="per phase")
    parser.add_argument("--connections", type=int, default=64, help="deposit loops")
    parser.add_argument("--wallets", type=int, default=1000)
    parser.add_argument("--poison-loops", type=int, default=1)
    args = parser.parse_args(argv)
    asyncio.run(_bench(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""kill -9 in the middle of transfers, restart, recover, retry everything: in a loop.

    python -m loadtest.transfer_crash_loop [--rounds 10] [--data-dir DIR] [--load-s 1.5]
                                           [--pipelines 2]

Issue #13's crash guarantee, end to end on the embedded PostgreSQL. Round 0 starts
``walletd serve`` and funds ``--wallets`` wallets. Each round then:

1. clients send keyed transfers between random pairs (one in twenty for more than the
   sender holds: a 409) while a sampler checks, in REPEATABLE READ snapshots taken
   throughout, that ``sum(balance) + sum(PENDING amounts) = deposits - withdrawals``
   holds exactly;
2. walletd is killed with SIGKILL mid-run: alone on odd rounds (PostgreSQL keeps running),
   together with the postmaster on even rounds;
3. walletd restarts on the same data dir (timed to ``/readyz``) and, with no request,
   drives every PENDING transfer to its end (timed: from ready to none PENDING; the
   re-drive's first pass runs while it starts, so this is often 0);
4. every transfer this round sent is retried with its key until it gets a final answer:
   a 201 must replay the same transfer, a 409 the same refusal; then every transfer row
   has exactly one debit leg and one credit (COMPLETED) or refund (FAILED) leg, every
   acknowledged transfer is COMPLETED, and conservation holds exactly.

walletd runs with ``--pipelines 2`` by default: a pair whose wallets share a pipeline
commits both legs at once (never PENDING), the others run the two-commit saga, whose
PENDING transfers are what a kill leaves for recovery.

Exit 0 only if every round passed; the report gives restart and recovery times, the
transfers acknowledged and of unknown outcome, and the snapshots checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from loadtest.restart_loop import embedded_dsn, kill_walletd_and_postgres, start_walletd
from walletd.persistence.embedded import EmbeddedPostgres

__all__ = ["CrashLoopReport", "run_crash_loop"]

CLIENTS = 8
WALLETS = 20
FUNDING_CENTS = 1_000_00
TRANSFER_CENTS_MAX = 5_00
OVERDRAFT_CENTS = 100 * FUNDING_CENTS
REQUEST_TIMEOUT_S = 10.0
RECOVERY_TIMEOUT_S = 30.0  # the re-drive's first pass runs at start
RETRY_DEADLINE_S = 30.0
SAMPLE_EVERY_S = 0.02

# One snapshot: what the wallets hold plus what is in flight, against money in minus out.
CONSERVATION_SQL = """
SELECT (SELECT coalesce(sum(balance), 0) FROM wallets)
       + (SELECT coalesce(sum(amount), 0) FROM transfers WHERE status = 1)
       - (SELECT coalesce(sum(CASE kind WHEN 1 THEN amount WHEN 2 THEN -amount ELSE 0 END), 0)
            FROM wallet_operations)
"""
# Each transfer's legs, found by their unique (wallet, leg key), against its status (1
# PENDING, 2 COMPLETED, 3 FAILED); and every leg row in the log, to find one with no transfer.
LEGS_SQL = """
SELECT t.id::text, t.status,
       (SELECT count(*) FROM wallet_operations o WHERE o.wallet_id = t.from_wallet_id
           AND o.idempotency_key = chr(31) || 'TRANSFER_OUT:' || t.id) AS debits,
       (SELECT count(*) FROM wallet_operations o WHERE o.wallet_id = t.to_wallet_id
           AND o.idempotency_key = chr(31) || 'TRANSFER_IN:' || t.id) AS credits,
       (SELECT count(*) FROM wallet_operations o WHERE o.wallet_id = t.from_wallet_id
           AND o.idempotency_key = chr(31) || 'TRANSFER_REFUND:' || t.id) AS refunds
  FROM transfers t
"""
LEG_ROWS_SQL = "SELECT count(*) FROM wallet_operations WHERE kind IN (3, 4, 5)"


@dataclass(slots=True)
class CrashRound:
    index: int
    killed: str = ""
    start_s: float = 0.0
    recovery_s: float = 0.0
    pending_at_kill: int | None = None  # read only when PostgreSQL survived the kill
    acked: int = 0
    refused: int = 0
    unknown: int = 0
    snapshots: int = 0
    problem: str | None = None


@dataclass(slots=True)
class CrashLoopReport:
    rounds: list[CrashRound] = field(default_factory=list)

    @property
    def failures(self) -> list[CrashRound]:
        return [r for r in self.rounds if r.problem is not None]

    def summary(self) -> str:
        crashes = self.rounds[1:]
        acked = sum(r.acked for r in crashes)
        unknown = sum(r.unknown for r in crashes)
        snapshots = sum(r.snapshots for r in crashes)
        worst_start = max((r.start_s for r in crashes), default=0.0)
        worst_recovery = max((r.recovery_s for r in crashes), default=0.0)
        pending = sum(r.pending_at_kill or 0 for r in crashes)
        return (
            f"transfer crash loop: {len(crashes)} kill -9 rounds, {len(self.failures)} failures; "
            f"{acked} transfers acknowledged, {unknown} of unknown outcome retried to an end; "
            f"{pending} transfers PENDING at a kill of walletd alone, finished by the restart; "
            f"{snapshots} conservation snapshots exact; worst restart {worst_start:.2f} s, "
            f"worst recovery (ready to none PENDING) {worst_recovery:.2f} s"
        )


@dataclass(slots=True)
class _Sent:
    body: dict[str, Any]
    status: int | None = None  # a final answer (201 / 409), else None: unknown
    answer: dict[str, Any] | None = None


async def _post(
    session: aiohttp.ClientSession, url: str, path: str, body: dict[str, Any], key: str
) -> tuple[int, dict[str, Any]]:
    async with session.post(
        f"{url}{path}", json=body, headers={"Idempotency-Key": key}
    ) as response:
        return response.status, await response.json(content_type=None)


async def _fund(url: str, wallets: int) -> list[str]:
    async with aiohttp.ClientSession() as session:
        ids = []
        for n in range(wallets):
            status, body = await _post(session, url, "/api/v1/wallets", {}, f"crash-w-{n}")
            assert status in (200, 201), body
            wallet = str(body["id"])
            deposit = {"operation_type": "DEPOSIT", "amount": f"{FUNDING_CENTS / 100:.2f}"}
            status, body = await _post(
                session, url, f"/api/v1/wallets/{wallet}/operation", deposit, f"fund-{n}"
            )
            assert status == 200, body
            ids.append(wallet)
        return ids


async def _transfer_until_killed(
    session: aiohttp.ClientSession, url: str, wallets: list[str], sent: dict[str, _Sent],
    rng: random.Random,
) -> None:  # fmt: skip
    while True:
        sender, receiver = rng.sample(wallets, 2)
        # One in twenty asks more than any wallet holds: a 409 whose retry after the crash
        # must replay it (a recorded refusal), not apply it.
        cents = rng.randint(1, TRANSFER_CENTS_MAX) if rng.random() > 0.05 else OVERDRAFT_CENTS
        key = f"crash-t-{uuid.uuid4().hex}"
        body = {"from_wallet_id": sender, "to_wallet_id": receiver, "amount": f"{cents / 100:.2f}"}
        this = sent[key] = _Sent(body)
        try:
            status, answer = await _post(session, url, "/api/v1/transfers", body, key)
        except (aiohttp.ClientError, TimeoutError):
            return  # the server is gone: outcome unknown
        if status in (201, 409):
            this.status, this.answer = status, answer
            continue
        return  # 503 or worse: unknown, and the server is going down


async def _sample(dsn: str, stop: asyncio.Event) -> tuple[int, str | None]:
    """Conservation in REPEATABLE READ snapshots until ``stop`` or the server dies."""
    taken = 0
    try:
        connection = await asyncpg.connect(dsn)
    except (OSError, asyncpg.PostgresError) as error:
        return 0, f"sampler could not connect: {error}"
    try:
        while not stop.is_set():
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                gap = await connection.fetchval(CONSERVATION_SQL)
            if gap != 0:
                return taken, f"conservation broken in a snapshot during the run: gap {gap}"
            taken += 1
            await asyncio.sleep(SAMPLE_EVERY_S)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
            asyncpg.InternalClientError):  # fmt: skip
        pass  # PostgreSQL was killed under the sampler: its snapshots so far count
    finally:
        with contextlib.suppress(Exception):
            await connection.close(timeout=1.0)
    return taken, None


async def _load_then_kill(
    url: str, walletd: subprocess.Popen[bytes], data_dir: Path, load_s: float,
    wallets: list[str], both: bool, rng: random.Random,
) -> tuple[dict[str, _Sent], int, str | None]:  # fmt: skip
    sent: dict[str, _Sent] = {}
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(embedded_dsn(data_dir), stop))
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [
            asyncio.create_task(_transfer_until_killed(session, url, wallets, sent, rng))
            for _ in range(CLIENTS)
        ]
        await asyncio.sleep(load_s)
        if both:
            kill_walletd_and_postgres(walletd, data_dir)
        else:
            walletd.kill()
            walletd.wait(10)
        await asyncio.gather(*clients)
    stop.set()
    snapshots, problem = await sampler
    return sent, snapshots, problem


async def _pending(dsn: str) -> int:
    connection = await asyncpg.connect(dsn)
    try:
        count: int = await connection.fetchval("SELECT count(*) FROM transfers WHERE status = 1")
    finally:
        await connection.close()
    return count


async def _wait_recovered(dsn: str, timeout_s: float) -> float | None:
    """Seconds until no transfer is PENDING (None: not within ``timeout_s``)."""
    started = time.monotonic()
    connection = await asyncpg.connect(dsn)
    try:
        while time.monotonic() - started < timeout_s:
            if await connection.fetchval("SELECT count(*) FROM transfers WHERE status = 1") == 0:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return None


async def _retry_all(url: str, sent: dict[str, _Sent]) -> str | None:
    """Every transfer sent, again with its key, until a final answer; a known answer must
    come back unchanged."""
    deadline = time.monotonic() + RETRY_DEADLINE_S
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for key, this in sent.items():
            while True:
                try:
                    status, answer = await _post(session, url, "/api/v1/transfers", this.body, key)
                except (aiohttp.ClientError, TimeoutError):
                    status, answer = 0, {}
                if status in (201, 409):
                    break
                if time.monotonic() > deadline:
                    return f"transfer {key}: still {status} {answer} after the retry deadline"
                await asyncio.sleep(0.1)
            if this.status is not None and (status, answer) != (this.status, this.answer):
                return (
                    f"transfer {key}: answered {this.status} {this.answer} before the crash, "
                    f"{status} {answer} on retry"
                )
            this.status, this.answer = status, answer
    return None


async def _check_storage(dsn: str, sent: dict[str, _Sent]) -> str | None:
    connection = await asyncpg.connect(dsn)
    try:
        async with connection.transaction(isolation="repeatable_read", readonly=True):
            gap = await connection.fetchval(CONSERVATION_SQL)
            legs = await connection.fetch(LEGS_SQL)
            leg_rows = await connection.fetchval(LEG_ROWS_SQL)
    finally:
        await connection.close()
    if gap != 0:
        return f"conservation broken after recovery: gap {gap}"
    if leg_rows != sum(r["debits"] + r["credits"] + r["refunds"] for r in legs):
        return f"{leg_rows} leg rows in the log, not all belonging to a transfer"
    status_by_id: dict[str, int] = {}
    for row in legs:
        expected = (1, int(row["status"] == 2), int(row["status"] == 3))
        if (row["debits"], row["credits"], row["refunds"]) != expected or row["status"] == 1:
            return f"transfer {row['id']}: status {row['status']} with legs {tuple(row)[2:]}"
        status_by_id[row["id"]] = row["status"]
    for key, this in sent.items():
        if this.status == 201:
            assert this.answer is not None
            if status_by_id.get(str(this.answer["id"])) != 2:
                return f"acknowledged transfer {key} ({this.answer['id']}) is not COMPLETED"
    return None


def run_crash_loop(
    rounds: int,
    data_dir: Path,
    *,
    load_s: float = 1.5,
    wallets: int = WALLETS,
    seed: int = 13,
    pipelines: int = 2,
    progress: bool = True,
) -> CrashLoopReport:
    """``rounds`` kills mid-transfers on ``data_dir``; stops at the first failed round."""
    log_path = data_dir / "transfer-crash-loop.log"
    rng = random.Random(seed)
    report = CrashLoopReport()
    first = CrashRound(0)
    serve_args = ("--pipelines", str(pipelines))
    walletd, url, first.start_s = start_walletd(data_dir, log_path, 180.0, serve_args)
    report.rounds.append(first)
    ids = asyncio.run(_fund(url, wallets))
    for index in range(1, rounds + 1):
        both = index % 2 == 0
        this = CrashRound(index, killed="walletd + postgres" if both else "walletd")
        report.rounds.append(this)
        sent, this.snapshots, this.problem = asyncio.run(
            _load_then_kill(url, walletd, data_dir, load_s, ids, both, rng)
        )
        this.acked = sum(1 for s in sent.values() if s.status == 201)
        this.refused = sum(1 for s in sent.values() if s.status == 409)
        this.unknown = sum(1 for s in sent.values() if s.status is None)
        if not both and this.problem is None:
            this.pending_at_kill = asyncio.run(_pending(embedded_dsn(data_dir)))
        try:
            walletd, url, this.start_s = start_walletd(data_dir, log_path, 30.0, serve_args)
        except RuntimeError as error:
            this.problem = this.problem or f"restart failed: {error}"
        if this.problem is None:
            recovered = asyncio.run(_wait_recovered(embedded_dsn(data_dir), RECOVERY_TIMEOUT_S))
            if recovered is None:
                this.problem = f"transfers still PENDING {RECOVERY_TIMEOUT_S:.0f} s after start"
            else:
                this.recovery_s = recovered
        if this.problem is None:
            this.problem = asyncio.run(_retry_all(url, sent))
        if this.problem is None:
            this.problem = asyncio.run(_check_storage(embedded_dsn(data_dir), sent))
        if progress:
            print(
                f"round {index} (killed {this.killed}): restart {this.start_s:.2f} s, "
                f"{this.pending_at_kill if this.pending_at_kill is not None else '?'} PENDING "
                f"at the kill, recovery {this.recovery_s:.2f} s, {this.acked} acked, "
                f"{this.refused} refused, "
                f"{this.unknown} unknown, {this.snapshots} snapshots: {this.problem or 'ok'}",
                flush=True,
            )
        if this.problem is not None:
            break
    with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
        walletd.send_signal(signal.SIGTERM)
        walletd.wait(30)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, help="default: a new temporary folder")
    parser.add_argument("--load-s", type=float, default=1.5, help="seconds of load per round")
    parser.add_argument("--wallets", type=int, default=WALLETS)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--pipelines", type=int, default=2, help="walletd --pipelines")
    args = parser.parse_args(argv)
    owned = args.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="walletd-crash-")) if owned else args.data_dir
    report = run_crash_loop(
        args.rounds, data_dir, load_s=args.load_s, wallets=args.wallets, seed=args.seed,
        pipelines=args.pipelines,
    )  # fmt: skip
    print(report.summary())
    for failed in report.failures:
        print(f"round {failed.index}: {failed.problem}", file=sys.stderr)
    if report.failures:
        print(f"data dir kept: {data_dir} (transfer-crash-loop.log, pgdata/)", file=sys.stderr)
        return 1
    if owned:
        EmbeddedPostgres(data_dir).stop("immediate")
        shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Transfers and payments through a real walletd process killed with -9 mid-run: after the
restart, recovery finishes every PENDING transfer and payment by itself, retrying every
transfer and payment with its id applies each exactly once (a payment: all of its postings
or none), and money is conserved exactly."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.processes import WalletdProcess
from tests.test_faults import own_postgres
from tests.test_transfers_api import conservation_gap
from walletd.cli.config import load_config
from walletd.cli.service import migrate_database, running_services
from walletd.engine.ownership import shard_of_text
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.persistence.operator import SIGNED_BALANCE_SQL

pytestmark = pytest.mark.slow

StartWalletd = Callable[..., WalletdProcess]
Client = TestClient[web.Request, web.Application]
WALLETS = 100
WORKERS = 16
TIMEOUT = aiohttp.ClientTimeout(total=30)
RECOVERY_S = 30.0


async def start(walletd_process: StartWalletd, *args: str) -> WalletdProcess:
    return await asyncio.to_thread(walletd_process, *args)


TRANSFERS, PAYMENTS = "/api/v1/transfers", "/api/v1/payments"


def path_of(body: dict[str, Any]) -> str:
    return PAYMENTS if "postings" in body else TRANSFERS


class TransferLoad:
    """Workers sending transfers and (one in four) payments of two postings with
    client-chosen ids until stopped, and one in four times a refund (Idempotency-Key of its
    own) of a transfer answered 201; every request body sent is remembered, with the answer
    it got (None: no answer)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, wallets: list[str]) -> None:
        self.session, self.url, self.wallets = session, url, wallets
        self.sent: dict[str, dict[str, Any]] = {}
        self.answers: dict[str, int | None] = {}
        # Refunds by Idempotency-Key: (the transfer refunded, the body), and the answer.
        self.refunds: dict[str, tuple[str, dict[str, Any]]] = {}
        self.refund_answers: dict[str, int | None] = {}
        self.stop = asyncio.Event()

    async def refund(self, rng: random.Random) -> None:
        # Transfers only (a payment's id is no transfer's: 404).
        done = [
            tid
            for tid, status in self.answers.items()
            if status == 201 and "postings" not in self.sent[tid]
        ]
        if not done:
            return
        original, key = rng.choice(done), str(uuid.uuid4())
        # Often more than is left (409 REFUND_EXCEEDS_TRANSFER), sometimes all that is left.
        body = {} if rng.random() < 0.2 else {"amount": f"{rng.randint(1, 2000) / 100:.2f}"}
        self.refunds[key] = (original, body)
        self.refund_answers[key] = None
        try:
            async with self.session.post(
                f"{self.url}/api/v1/transfers/{original}/refunds", json=body,
                headers={"Idempotency-Key": key},
            ) as response:  # fmt: skip
                self.refund_answers[key] = response.status
        except (TimeoutError, aiohttp.ClientError):
            await asyncio.sleep(0.01)

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            if rng.random() < 0.25:
                await self.refund(rng)
                continue
            sender, receiver, other = rng.sample(self.wallets, 3)
            transfer_id = str(uuid.uuid4())
            body: dict[str, Any] = {
                "id": transfer_id,
                "from_wallet_id": sender,
                "to_wallet_id": receiver,
                "amount": f"{rng.randint(1, 4000) / 100:.2f}",
            }
            if rng.random() < 0.25:
                body = {
                    "id": transfer_id,
                    "postings": [
                        {"from_wallet_id": sender, "to_wallet_id": receiver,
                         "amount": f"{rng.randint(1, 2000) / 100:.2f}"},
                        {"from_wallet_id": sender, "to_wallet_id": other,
                         "amount": f"{rng.randint(1, 200) / 100:.2f}"},
                    ],
                }  # fmt: skip
            self.sent[transfer_id] = body
            self.answers[transfer_id] = None
            try:
                async with self.session.post(f"{self.url}{path_of(body)}", json=body) as response:
                    self.answers[transfer_id] = response.status
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the process is gone (kill -9)

    def created(self) -> int:
        return sum(1 for status in self.answers.values() if status == 201)

    async def until_created(self, count: int) -> None:
        for _ in range(3000):
            if self.created() >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {self.created()} transfers completed")


async def final_answer(
    session: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    path: str | None = None,
    key: str | None = None,
) -> tuple[int, dict[str, Any], bool]:
    """POST the same transfer or payment (or refund, at ``path`` with its ``key``) until the
    answer is not a 503; (status, body, replayed)."""
    deadline = asyncio.get_running_loop().time() + RECOVERY_S
    headers = None if key is None else {"Idempotency-Key": key}
    while True:
        async with session.post(
            f"{url}{path or path_of(body)}", json=body, headers=headers
        ) as response:
            answer = await response.json(content_type=None)
            replayed = response.headers.get("Idempotent-Replayed") == "true"
            if response.status != 503:
                return response.status, answer, replayed
        assert asyncio.get_running_loop().time() < deadline, answer
        await asyncio.sleep(0.1)


_LOCK_ATTEMPTS = 5


async def hold_pending(locker: asyncpg.Connection, load: TransferLoad) -> None:
    """Lock (in an open transaction of ``locker``) the rows of every wallet on the second
    pipeline (shard % 2 == 1 with 4 shards, 2 pipelines), send one transfer from a wallet of
    the first into one of them, and return once that very transfer is PENDING in the
    database. Its id is the client's and it is remembered in ``load`` like any other: the
    restart completes it, so the retry of every transfer sent must cover it too."""
    second = [w for w in load.wallets if shard_of_text(w, 4) % 2 == 1]
    first = [w for w in load.wallets if shard_of_text(w, 4) % 2 == 0]
    assert first
    assert second
    # The richest first-pipeline wallet, so that the debit is not refused for funds.
    sender = await locker.fetchval(
        "SELECT id::text FROM wallets WHERE id = ANY($1::uuid[]) ORDER BY balance DESC LIMIT 1",
        first,
    )
    # The load's commits lock their wallets in their own order while this takes many at once:
    # PostgreSQL may pick this transaction as a deadlock's victim. It is the test's tool, not
    # walletd, so it takes the locks again (a commit picked instead is walletd's 503).
    for attempt in range(1, _LOCK_ATTEMPTS + 1):
        await locker.execute("BEGIN")
        try:
            await locker.execute(
                "SELECT 1 FROM wallets WHERE id = ANY($1::uuid[]) ORDER BY id FOR UPDATE", second
            )
            break
        except asyncpg.DeadlockDetectedError:
            await locker.execute("ROLLBACK")
            if attempt == _LOCK_ATTEMPTS:
                raise
    transfer_id, payment_id = str(uuid.uuid4()), str(uuid.uuid4())
    body = {
        "id": transfer_id,
        "from_wallet_id": sender,
        "to_wallet_id": second[0],
        "amount": "0.01",
    }
    # And a payment into two of them: both postings debited, its decision waiting for the
    # lock on the receivers' rows (DEBITING at the kill).
    payment = {
        "id": payment_id,
        "postings": [
            {"from_wallet_id": sender, "to_wallet_id": second[0], "amount": "0.01"},
            {"from_wallet_id": sender, "to_wallet_id": second[1], "amount": "0.02"},
        ],
    }
    for key, sent in ((transfer_id, body), (payment_id, payment)):
        load.sent[key] = sent
        load.answers[key] = None  # its credit waits for the lock: no answer before the kill

    # And a refund PENDING: of a COMPLETED transfer from a locked wallet into an unlocked
    # one, so the refund's debit (the unlocked receiver) commits and its credit waits.
    original = await locker.fetchval(
        "SELECT id::text FROM transfers WHERE status = 2 AND refund_of IS NULL"
        " AND from_wallet_id = ANY($1::uuid[]) AND to_wallet_id = ANY($2::uuid[])"
        " AND id = ANY($3::uuid[])"
        " AND NOT EXISTS (SELECT 1 FROM transfers r WHERE r.refund_of = transfers.id) LIMIT 1",
        second, first, [tid for tid, status in load.answers.items() if status == 201],
    )  # fmt: skip
    assert original is not None
    refund_key = str(uuid.uuid4())
    refund_body = {"amount": "0.01"}
    load.refunds[refund_key] = (original, refund_body)
    load.refund_answers[refund_key] = None

    async def send(sent: dict[str, Any]) -> None:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with load.session.post(f"{load.url}{path_of(sent)}", json=sent):
                pass

    async def send_refund() -> None:
        with contextlib.suppress(TimeoutError, aiohttp.ClientError):
            async with load.session.post(
                f"{load.url}/api/v1/transfers/{original}/refunds", json=refund_body,
                headers={"Idempotency-Key": refund_key},
            ):  # fmt: skip
                pass

    sending = [
        asyncio.create_task(send(body)),
        asyncio.create_task(send(payment)),
        asyncio.create_task(send_refund()),
    ]
    pending = """SELECT count(*) FROM transfers WHERE status = 1 AND (id = $1::uuid OR id IN
                   (SELECT transfer_id FROM payment_postings WHERE payment_id = $2::uuid)
                   OR refund_of = $3::uuid)"""
    try:
        deadline = asyncio.get_running_loop().time() + RECOVERY_S
        while await locker.fetchval(pending, transfer_id, payment_id, original) != 4:
            assert asyncio.get_running_loop().time() < deadline, "not PENDING"
            await asyncio.sleep(0.01)
    finally:
        for task in sending:
            task.cancel()
        for task in sending:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_kill_9_mid_transfers_then_recovery_and_retry_all_apply_each_once(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """kill -9 while 16 workers move money among 100 wallets on 4 shards, and refund some of
    it (a refund is left PENDING by the kill too). Conservation holds in the database right
    after the kill (PENDING transfers counted); the restarted process completes every
    PENDING transfer and refund without a request; retrying every transfer and refund sent
    gets a final answer, a replay for those already answered 201; every transfer has its legs
    once; no transfer is refunded past its amount."""
    # Two pipelines: pairs on one pipeline commit both legs at once, the others are the
    # two-commit saga whose PENDING transfers the kill leaves for recovery.
    args = ("--database-url", database_url, "--shards", "4", "--pipelines", "2")
    first = await start(walletd_process, *args)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        wallets = []
        for _ in range(WALLETS):
            async with session.post(f"{first.url}/api/v1/wallets") as response:
                wallet_id = (await response.json())["id"]
            async with session.post(
                f"{first.url}/api/v1/wallets/{wallet_id}/operation",
                json={"operation_type": "DEPOSIT", "amount": "100.00"},
            ) as response:
                assert response.status == 200
            wallets.append(wallet_id)
        load = TransferLoad(session, first.url, wallets)
        loading = asyncio.gather(*(load.worker(seed) for seed in range(WORKERS)))
        await load.until_created(300)
        # Some transfers must be PENDING at the kill, whatever the timing: the rows of the
        # second pipeline's wallets are locked, so its commits (credits included) wait,
        # while a transfer from a first-pipeline wallet into one of them is debited.
        locker = await asyncpg.connect(database_url)
        try:
            await hold_pending(locker, load)
            first.process.send_signal(signal.SIGKILL)
            await asyncio.to_thread(first.process.wait, 10)
            # Its backends die with it, as with a crashed machine (one waiting for the lock
            # would otherwise carry on once it is released).
            await locker.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        finally:
            await locker.close()
        load.stop.set()
        await loading
    before_kill = Counter(load.answers.values())
    assert set(before_kill) <= {201, 409, 503, None}, before_kill

    connection = await asyncpg.connect(database_url)
    try:
        assert await conservation_gap(connection) == 0
        left_pending = await connection.fetchval("SELECT count(*) FROM transfers WHERE status = 1")
        assert left_pending > 0  # the test exercises recovery, not only retries

        left_debiting = await connection.fetchval("SELECT count(*) FROM payments WHERE phase = 1")
        assert left_debiting > 0  # a payment whose decision the kill interrupted

        second = await start(walletd_process, *args)
        deadline = asyncio.get_running_loop().time() + RECOVERY_S
        while await connection.fetchval(
            "SELECT (SELECT count(*) FROM transfers WHERE status = 1)"
            " + (SELECT count(*) FROM payments WHERE phase = 1)"
        ):
            assert asyncio.get_running_loop().time() < deadline, "recovery did not finish"
            await asyncio.sleep(0.05)
        assert await conservation_gap(connection) == 0

        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            finals = await asyncio.gather(
                *(final_answer(session, second.url, body) for body in load.sent.values())
            )
            refund_finals = await asyncio.gather(*(
                final_answer(
                    session, second.url, body, f"/api/v1/transfers/{original}/refunds", key
                )
                for key, (original, body) in load.refunds.items()
            ))  # fmt: skip
        for transfer_id, (status, answer, replayed) in zip(load.sent, finals, strict=True):
            assert status in {201, 409}, (transfer_id, status, answer)
            if load.answers[transfer_id] == 201:
                assert (status, replayed) == (201, True), (transfer_id, answer)
        for key, (status, answer, replayed) in zip(load.refunds, refund_finals, strict=True):
            # 201, or 409 (more than is left, the receiver short of money or FROZEN...).
            assert status in {201, 409}, (key, status, answer)
            if load.refund_answers[key] == 201:
                assert (status, replayed) == (201, True), (key, answer)
        # No transfer refunded past its amount (the refunds not FAILED).
        over_refunded = await connection.fetch(
            """SELECT o.id FROM transfers o JOIN transfers r ON r.refund_of = o.id
                WHERE r.status <> 3 GROUP BY o.id, o.amount HAVING sum(r.amount) > o.amount"""
        )
        refunds_stored = await connection.fetchval(
            "SELECT count(*) FROM transfers WHERE refund_of IS NOT NULL"
        )
        stored = await connection.fetch("SELECT id::text, status, failure_code FROM transfers")
        postings = await connection.fetch(
            "SELECT pp.payment_id::text, p.phase, t.status FROM payment_postings pp"
            " JOIN payments p ON p.id = pp.payment_id LEFT JOIN transfers t"
            " ON t.id = pp.transfer_id"
        )
        legs = await connection.fetch(
            "SELECT idempotency_key, count(*) AS copies FROM wallet_operations "
            "WHERE kind IN (3, 4, 5) GROUP BY idempotency_key"
        )
        mismatched = await connection.fetch(
            f"""SELECT w.id FROM wallets w JOIN wallet_operations o ON o.wallet_id = w.id
                GROUP BY w.id, w.balance, w.seq
               HAVING w.balance <> sum({SIGNED_BALANCE_SQL})
                   OR w.seq <> count(*)"""
        )
        assert await conservation_gap(connection) == 0
    finally:
        await connection.close()
    completed = {row["id"] for row in stored if row["status"] == 2}
    assert {row["status"] for row in stored} <= {2, 3}
    answered_201: set[str] = set()
    for key, (status, answer, _replayed) in zip(load.sent, finals, strict=True):
        if status == 201:  # a payment: each of its postings' transfers
            answered_201 |= (
                {p["transfer_id"] for p in answer["postings"]} if "postings" in (answer) else {key}
            )
    answered_201 |= {final[1]["id"] for final in refund_finals if final[0] == 201}
    assert completed == answered_201
    assert over_refunded == []
    assert refunds_stored > 0
    # A payment is all or nothing: every posting COMPLETED, or every one FAILED.
    by_payment: dict[str, set[int]] = {}
    for row in postings:
        assert row["phase"] != 1, row
        by_payment.setdefault(row["payment_id"], set()).add(row["status"])
    assert set(map(frozenset, by_payment.values())) <= {frozenset({2}), frozenset({3})}
    assert all(row["copies"] == 1 for row in legs)
    # COMPLETED: OUT + IN; FAILED: OUT + REFUND; a posting never debited: none.
    assert len(legs) == sum(
        0 if row["failure_code"] == "PAYMENT_NOT_DEBITED" else 2 for row in stored
    )
    assert mismatched == []
    payments = sum(1 for body in load.sent.values() if "postings" in body)
    print(f"transfers and payments sent {len(load.sent)} ({payments} payments), answered "
          f"before the kill {dict(before_kill)}, left PENDING by the kill {left_pending} "
          f"(payments DEBITING {left_debiting}), transfers completed {len(completed)}, refunds "
          f"sent {len(load.refunds)}, stored {refunds_stored}")  # fmt: skip


async def test_postgres_crash_mid_transfers_recovers_by_itself_and_conserves(
    tmp_path: Path, aiohttp_client: Callable[..., Any]
) -> None:
    """PostgreSQL stopped in immediate mode (a crash: no checkpoint) while transfers run:
    clients get 201, 409 or 503, never a 500; once it is back, walletd finishes every
    PENDING transfer by itself, money is conserved exactly, every 201 is COMPLETED, and
    retrying every transfer sent gets a final answer."""
    async with own_postgres(tmp_path / "pg") as server:
        await migrate_database(server.dsn)
        config = load_config(
            argparse.Namespace(),
            environ={
                "WALLETD_DATABASE_URL": server.dsn,
                "WALLETD_SHARDS": "4",
                "WALLETD_TRANSFER_REDRIVE_INTERVAL": "0.5",
            },
        )
        client: Client = await aiohttp_client(
            create_app(HttpSettings(), lambda: running_services(config))
        )
        wallets = []
        for _ in range(40):
            created = await client.post("/api/v1/wallets")
            wallets.append((await created.json())["id"])
            deposit = {"operation_type": "DEPOSIT", "amount": "100.00"}
            funded = await client.post(f"/api/v1/wallets/{wallets[-1]}/operation", json=deposit)
            assert funded.status == 200
        sent: dict[str, dict[str, Any]] = {}
        answers: dict[str, int] = {}
        stop = asyncio.Event()

        async def worker(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                sender, receiver = rng.sample(wallets, 2)
                transfer_id = str(uuid.uuid4())
                body = {"id": transfer_id, "from_wallet_id": sender, "to_wallet_id": receiver,
                        "amount": f"{rng.randint(1, 3000) / 100:.2f}"}  # fmt: skip
                sent[transfer_id] = body
                response = await client.post("/api/v1/transfers", json=body)
                answers[transfer_id] = response.status
                if response.status == 503:
                    await asyncio.sleep(0.05)  # paced while PostgreSQL is away

        loading = asyncio.gather(*(worker(seed) for seed in range(8)))
        deadline = asyncio.get_running_loop().time() + RECOVERY_S
        while sum(status == 201 for status in answers.values()) < 50:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.02)
        await asyncio.to_thread(server.stop, "immediate")
        await asyncio.sleep(1.0)
        await asyncio.to_thread(server.start)
        created_before = sum(status == 201 for status in answers.values())
        while sum(status == 201 for status in answers.values()) <= created_before + 20:
            assert asyncio.get_running_loop().time() < deadline + RECOVERY_S, "no recovery"
            await asyncio.sleep(0.05)
        stop.set()
        await loading
        assert set(answers.values()) <= {201, 409, 503}, Counter(answers.values())
        assert Counter(answers.values())[503] > 0  # the crash was seen by clients

        connection = await asyncpg.connect(server.dsn)
        try:
            deadline = asyncio.get_running_loop().time() + RECOVERY_S
            while await connection.fetchval("SELECT count(*) FROM transfers WHERE status = 1"):
                assert asyncio.get_running_loop().time() < deadline, "PENDING left behind"
                await asyncio.sleep(0.1)
            assert await conservation_gap(connection) == 0
            completed = {
                str(row["id"])
                for row in await connection.fetch("SELECT id FROM transfers WHERE status = 2")
            }
        finally:
            await connection.close()
        assert {tid for tid, status in answers.items() if status == 201} <= completed
        for transfer_id, body in sent.items():
            # A 503 says "retry": right after the outage the shard leases may still be
            # coming back (they lapsed while PostgreSQL was down), so a client retries.
            deadline = asyncio.get_running_loop().time() + RECOVERY_S
            while True:
                response = await client.post("/api/v1/transfers", json=body)
                if response.status != 503 or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert response.status in {201, 409}, (transfer_id, await response.text())
            if transfer_id in completed:  # stored COMPLETED: the retry replays it
                assert response.status == 201
                assert response.headers["Idempotent-Replayed"] == "true"
        await client.close()

"""One command never fails another (docs/ARCHITECTURE.md, invariant 9), on the real app,
a real socket and real PostgreSQL: 64 clients deposit while a poison client loops every
known way to make the database refuse a batch, plus a refusal the ledger cannot foresee (a
CHECK the test adds).
Unrelated clients see no 503; each poisoned command gets its own answer, the same again on
a retry with its key; every balance equals its history."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from walletd.engine.commands import TransferLeg
from walletd.engine.holds import capture_transfer_id
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus
from walletd.engine.money import AMOUNT_MINOR_MAX
from walletd.http.state import STATE_KEY
from walletd.persistence.operator import verify

Client = TestClient[web.Request, web.Application]

CLIENTS = 64
DEPOSITS_PER_CLIENT = 25
# The capped wallet refuses (by the test's CHECK) any balance from 1000.00 up.
CAP_MINOR = 100_000


async def post(
    client: Client, path: str, body: Any = None, key: str | None = None
) -> tuple[int, dict[str, Any]]:
    headers = {"Idempotency-Key": key} if key is not None else None
    response = await client.post(path, json=body, headers=headers)
    return response.status, await response.json(content_type=None)


async def new_wallet(client: Client, deposit: str | None = None) -> str:
    status, body = await post(client, "/api/v1/wallets")
    assert status == 201, body
    wallet_id: str = body["id"]
    if deposit is not None:
        status, body = await post(
            client, f"/api/v1/wallets/{wallet_id}/operation",
            {"operation_type": "DEPOSIT", "amount": deposit},
        )  # fmt: skip
        assert status == 200, body
    return wallet_id


def forged_legs(sender: str, receiver: str) -> list[TransferLeg]:
    """Legs a caller of the internal route could forge, each past what storage holds."""
    loop = asyncio.get_running_loop()

    def leg(amount: int, reference: str | None, kind: OperationKind) -> TransferLeg:
        record = TransferRecord(
            uuid.uuid4(), uuid.UUID(sender), uuid.UUID(receiver), amount, reference,
            TransferStatus.PENDING, None, 0, 0,
        )  # fmt: skip
        return TransferLeg(kind, record, loop.create_future())

    return [
        leg(100, "r" * 300, OperationKind.TRANSFER_OUT),  # the schema's CHECK is <= 255
        leg(AMOUNT_MINOR_MAX * 10, None, OperationKind.TRANSFER_IN),  # CHECK amount <= 10^14
    ]


async def poison_loop(
    client: Client, sender: str, receiver: str, capped: str, done: asyncio.Event
) -> tuple[Counter[str], int]:
    """Every known trigger, in a loop until the clients are done: what each got (as
    "what:status"), and how many rounds ran."""
    engine = client.app[STATE_KEY].services.engine
    seen: Counter[str] = Counter()
    rounds = 0
    while not done.is_set() or rounds == 0:
        rounds += 1
        # (a) Take first the transfer id a capture into a wallet derives from its hold id.
        status, hold = await post(client, f"/api/v1/wallets/{sender}/holds", {"amount": "1.00"})
        assert status == 201, hold
        taken = capture_transfer_id(uuid.UUID(hold["id"]))
        status, _ = await post(
            client, "/api/v1/transfers",
            {"id": str(taken), "from_wallet_id": sender, "to_wallet_id": receiver,
             "amount": "1.00"},
        )  # fmt: skip
        seen[f"take-capture-id:{status}"] += 1
        status, body = await post(
            client, f"/api/v1/holds/{hold['id']}/capture", {"to_wallet_id": receiver}
        )
        seen[f"capture:{status}"] += 1
        # (b) Forged legs past the schema's bounds, straight into the engine (as the
        # internal route hands them over).
        for leg in forged_legs(sender, receiver):
            reply = await engine.deliver_leg(leg)
            seen[f"forged-leg:{reply.outcome.value}"] += 1
        # (c) A deposit the database refuses by a constraint walletd does not know, then
        # its retry with the same key.
        key = f"poison-{rounds}"
        for attempt in ("deposit", "retry"):
            status, body = await post(
                client, f"/api/v1/wallets/{capped}/operation",
                {"operation_type": "DEPOSIT", "amount": "1000.00"}, key,
            )  # fmt: skip
            seen[f"capped-{attempt}:{status}:{body.get('code', '')}"] += 1
    return seen, rounds


async def depositor(client: Client, wallet_id: str, index: int) -> Counter[int]:
    statuses: Counter[int] = Counter()
    for n in range(DEPOSITS_PER_CLIENT):
        status, _ = await post(
            client, f"/api/v1/wallets/{wallet_id}/operation",
            {"operation_type": "DEPOSIT", "amount": "1.00"}, f"c{index}-{n}",
        )  # fmt: skip
        statuses[status] += 1
    return statuses


async def test_a_poison_client_never_fails_the_other_clients(
    make_app: AppFactory, aiohttp_client: Any, database_url: str
) -> None:
    """64 clients depositing while a poison client loops a capture whose derived transfer id
    it took first, forged legs past the schema's bounds, and a deposit a CHECK the test
    added refuses: the 64 get 200 every time (no 503); each poisoned request gets its own
    answer (422, NOT_STORABLE, 409 STORAGE_REFUSED; the capture 200), the same on a retry
    with its key; every balance equals its history and money is conserved."""
    limits = EngineLimits(pipelines=2, batch_ops_max=64, transfer_redrive_interval_s=0.5)
    client: Client = await aiohttp_client(make_app(limits=limits))
    sender = await new_wallet(client, "100000.00")
    receiver = await new_wallet(client)
    capped = await new_wallet(client)
    wallets = [await new_wallet(client) for _ in range(CLIENTS)]
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            f"ALTER TABLE wallets ADD CONSTRAINT test_poison_cap "
            f"CHECK (id <> '{capped}' OR balance < {CAP_MINOR})"
        )
    finally:
        await connection.close()

    done = asyncio.Event()

    async def clients() -> list[Counter[int]]:
        try:
            return list(await asyncio.gather(
                *(depositor(client, wallet_id, n) for n, wallet_id in enumerate(wallets))
            ))  # fmt: skip
        finally:
            done.set()

    per_client, (seen, rounds) = await asyncio.gather(
        clients(), poison_loop(client, sender, receiver, capped, done)
    )
    statuses = sum(per_client, Counter[int]())
    assert statuses == {200: CLIENTS * DEPOSITS_PER_CLIENT}, statuses
    assert seen == {
        "take-capture-id:422": rounds,
        "capture:200": rounds,
        "forged-leg:NOT_STORABLE": 2 * rounds,
        "capped-deposit:409:STORAGE_REFUSED": rounds,
        "capped-retry:409:STORAGE_REFUSED": rounds,
    }, seen

    for wallet_id in wallets:
        response = await client.get(f"/api/v1/wallets/{wallet_id}")
        assert (await response.json())["balance"] == f"{DEPOSITS_PER_CLIENT}.00"
    response = await client.get(f"/api/v1/wallets/{capped}")
    assert (await response.json())["balance"] == "0.00"
    await client.close()  # the engine stops: every transfer it drove has ended
    report = await verify(database_url)
    assert report.clean, report.summary()

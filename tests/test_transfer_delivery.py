"""Transfer legs delivered to whichever process serves the wallet's shard, on the engine alone.

Two engines share one in-memory log and split the shards like two walletd processes (each
with its own ``Ownership``); a ``RemoteLegs`` double hands a leg to the other engine's
``deliver_leg`` the way the internal HTTP route does (tests/test_cluster_transfers.py runs
the real thing). No PostgreSQL, no HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from uuid import UUID, uuid4

from tests.engine_doubles import WAIT_S, ControlledLog, until, wallet_ids_on_shard
from walletd.engine.commands import Outcome, Reply, TransferLeg
from walletd.engine.errors import NotOwner
from walletd.engine.limits import EngineLimits
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus
from walletd.engine.ownership import OwnerInfo, Ownership
from walletd.engine.router import Engine
from walletd.engine.transfers import SIDE_FROM, SIDE_TO, RemoteLegs

SHARDS = 2
LIMITS = EngineLimits(
    pipelines=1, batch_ops_max=64, mailbox_commands_max=256, transfer_redrive_interval_s=60.0,
    transfer_leg_tries_max=3,
)  # fmt: skip
ON_A, ON_B = wallet_ids_on_shard(0, SHARDS, 2), wallet_ids_on_shard(1, SHARDS, 2)
URL_A, URL_B = "http://a", "http://b"
# Each process's internal listener, as the ownership table publishes it beside its URL.
INTERNAL_PORT = ":9000"


class Network(RemoteLegs):
    """Legs between the engines by URL, as the internal route would carry them."""

    def __init__(self) -> None:
        self.engines: dict[str, Engine] = {}
        self.sent: list[tuple[str, OperationKind]] = []
        self.down: set[str] = set()  # URLs that refuse connections

    async def send(
        self, url: str, kind: OperationKind, transfer: TransferRecord, failure_code: str | None
    ) -> Reply:
        # Legs go to the internal listener only, never to a process's public URL.
        assert url.endswith(INTERNAL_PORT), url
        url = url.removesuffix(INTERNAL_PORT)
        self.sent.append((url, kind))
        if url in self.down:
            return Reply(Outcome.NOT_OWNER)  # not connected: nothing sent
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            return await self.engines[url].deliver_leg(
                TransferLeg(kind, transfer, future, failure_code)
            )
        except NotOwner:
            return Reply(Outcome.NOT_OWNER)

    async def read_currency(self, url: str, wallet_id: UUID) -> Reply:
        # As the internal route answers it (http/legs.py wallet_currency).
        assert url.endswith(INTERNAL_PORT), url
        url = url.removesuffix(INTERNAL_PORT)
        if url in self.down:
            return Reply(Outcome.NOT_OWNER)
        try:
            return await self.engines[url].read(wallet_id)
        except NotOwner:
            return Reply(Outcome.NOT_OWNER)


def serve(ownership: Ownership, shard: int, epoch: int = 1) -> None:
    ownership.gained(shard, epoch, math.inf)
    ownership.memory_ready([shard])


def table(owner_of: dict[int, str | None]) -> dict[int, OwnerInfo]:
    return {
        s: OwnerInfo(url, url, 1, url is not None, None if url is None else url + INTERNAL_PORT)
        for s, url in owner_of.items()
    }


@contextlib.asynccontextmanager
async def two_processes(log: ControlledLog) -> AsyncIterator[tuple[Engine, Engine, Network]]:
    network = Network()
    engines = []
    for url, shard in ((URL_A, 0), (URL_B, 1)):
        ownership = Ownership(SHARDS)
        ownership.table_stale_s = 0.4  # a lease of 0.4 s: a delivery waits ≤ 0.2 s per try
        serve(ownership, shard)
        engine = Engine(log, LIMITS, ownership=ownership, remote_legs=network, self_url=url)
        network.engines[url] = engine
        engines.append(engine)
    for engine in engines:
        engine.ownership.set_table(table({0: URL_A, 1: URL_B}))
        await engine.start()
    try:
        yield engines[0], engines[1], network
    finally:
        for engine in engines:
            await engine.stop()


async def create_funded(engine_of: dict[UUID, Engine], amount: int) -> None:
    for wallet_id, engine in engine_of.items():
        _id, reply = await engine.create_wallet(wallet_id, None)
        assert reply.outcome is Outcome.CREATED
        assert (await engine.apply(wallet_id, OperationKind.DEPOSIT, amount, None)).outcome is (
            Outcome.OK
        )
    # Every coordinator has read every wallet's currency once (it remembers them): a transfer
    # to a wallet whose owner is down then debits and stays PENDING, as these tests drive
    # it. Unread, the transfer is refused first, nothing applied
    # (test_a_receiver_whose_currency_cannot_be_read_moves_nothing).
    for engine in set(engine_of.values()):
        for wallet_id in engine_of:
            currency, _reply = await engine.transfers.currency_of(wallet_id)
            assert currency is not None


def in_flight(log: ControlledLog) -> int:
    return sum(t.amount for t in log.transfers.values() if t.status is TransferStatus.PENDING)


async def test_a_process_serving_neither_wallet_coordinates_both_legs_remotely() -> None:
    """A transfer asked of A between two wallets B serves completes: A sends the debit and
    the credit to B; so does one from B's wallet to A's, and one from A's to B's."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, network):
        await create_funded({ON_A[0]: a, ON_B[0]: b, ON_B[1]: b}, 100)
        _id, reply = await a.transfer(None, None, ON_B[0], ON_B[1], 10, None)
        assert reply.outcome is Outcome.OK, reply
        assert network.sent == [(URL_B, OperationKind.TRANSFER_OUT),
                                (URL_B, OperationKind.TRANSFER_IN)]  # fmt: skip
        for sender, receiver, coordinator in ((ON_B[0], ON_A[0], a), (ON_A[0], ON_B[1], b)):
            _id, reply = await coordinator.transfer(None, None, sender, receiver, 5, None)
            assert reply.outcome is Outcome.OK, reply
            assert reply.transfer is not None
            assert reply.transfer.status is TransferStatus.COMPLETED
    balances = {w: log.wallets[w].balance for w in (ON_A[0], ON_B[0], ON_B[1])}
    assert balances == {ON_A[0]: 100, ON_B[0]: 85, ON_B[1]: 115}
    assert in_flight(log) == 0


async def test_a_refusal_from_the_remote_owner_is_the_answer() -> None:
    """The remote debit's INSUFFICIENT_FUNDS is the transfer's 409 (side from, nothing
    written); a credit to a wallet that does not exist is refunded on the remote sender."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, _network):
        await create_funded({ON_A[0]: a, ON_B[0]: b}, 100)
        _id, reply = await a.transfer(None, None, ON_B[0], ON_A[0], 500, None)
        assert (reply.outcome, reply.side) == (Outcome.INSUFFICIENT_FUNDS, SIDE_FROM)
        missing = wallet_ids_on_shard(0, SHARDS, 5)[4]
        _id, reply = await a.transfer(None, None, ON_B[0], missing, 30, None)
        assert reply.outcome is Outcome.WALLET_NOT_FOUND
        assert reply.transfer is not None
        assert reply.transfer.status is TransferStatus.FAILED
    assert log.wallets[ON_B[0]].balance == 100
    assert in_flight(log) == 0


async def test_a_leg_for_a_shard_without_an_owner_is_retried_then_not_owner() -> None:
    """B is unreachable and nobody else serves its shard: the debit is tried
    ``transfer_leg_tries_max`` times, then answered NOT_OWNER with nothing applied; a credit
    to B's wallet leaves the transfer PENDING (visible) for the re-drive."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, network):
        await create_funded({ON_A[0]: a, ON_B[0]: b}, 100)
        network.down.add(URL_B)
        network.sent.clear()
        _id, reply = await a.transfer(None, None, ON_B[0], ON_A[0], 10, None)
        assert (reply.outcome, reply.side) == (Outcome.NOT_OWNER, SIDE_FROM)
        assert network.sent == [(URL_B, OperationKind.TRANSFER_OUT)] * LIMITS.transfer_leg_tries_max
        assert log.transfers == {}
        transfer_id, reply = await a.transfer(None, None, ON_A[0], ON_B[0], 10, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        assert log.transfers[transfer_id].status is TransferStatus.PENDING
        assert in_flight(log) == 10
        network.down.clear()
        assert await a.redrive_transfers() == 1  # A owns the sending wallet: it re-drives
    assert log.transfers[transfer_id].status is TransferStatus.COMPLETED
    assert log.wallets[ON_B[0]].balance == 110


async def test_a_leg_sent_to_a_process_that_lost_the_shard_follows_the_new_owner() -> None:
    """B lost shard 1 and A gained it while the table still names B: B answers NOT_OWNER
    (nothing applied), the delivery waits for the next table read, which names A, and the
    leg lands on A's own shard: 201 on the first request."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, network):
        await create_funded({ON_A[0]: a, ON_B[0]: b}, 100)
        b.ownership.lost([1])
        network.sent.clear()

        async def table_moves() -> None:
            await until(lambda: len(network.sent) >= 1)  # B refused the leg
            await a.forget_shards([1])
            serve(a.ownership, 1, epoch=2)
            a.ownership.set_table(table({0: URL_A, 1: URL_A}))

        mover = asyncio.create_task(table_moves())
        _id, reply = await a.transfer(None, None, ON_A[0], ON_B[0], 10, None)
        await mover
        assert reply.outcome is Outcome.OK, reply
        assert network.sent == [(URL_B, OperationKind.TRANSFER_IN)]
    assert log.wallets[ON_B[0]].balance == 110


async def test_only_the_owner_of_the_sending_wallet_redrives_and_a_gained_shard_wakes_it() -> None:
    """A PENDING transfer from B's wallet is left alone by A's re-drive and finished by B's;
    when A gains B's shard (B died), A's re-drive loop runs a pass at once, without waiting
    for its interval, and finishes the transfers B left."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, network):
        await create_funded({ON_A[0]: a, ON_B[0]: b}, 100)
        network.down.add(URL_A)
        first, reply = await b.transfer(None, None, ON_B[0], ON_A[0], 7, None)
        assert reply.outcome is Outcome.UNAVAILABLE  # credit not delivered: PENDING
        network.down.clear()
        assert await a.redrive_transfers() == 0
        assert log.transfers[first].status is TransferStatus.PENDING
        assert await b.redrive_transfers() == 1
        assert log.transfers[first].status is TransferStatus.COMPLETED

        network.down.add(URL_A)
        second, reply = await b.transfer(None, None, ON_B[0], ON_A[0], 3, None)
        assert reply.outcome is Outcome.UNAVAILABLE
        network.down.clear()
        await b.stop()  # B dies; A takes its shard over (interval: 60 s, never reached)
        b.ownership.lost([1])
        await a.forget_shards([1])
        serve(a.ownership, 1, epoch=2)
        await until(lambda: log.transfers[second].status is TransferStatus.COMPLETED, WAIT_S)
    assert log.wallets[ON_A[0]].balance == 110
    assert in_flight(log) == 0


async def test_a_redrive_pass_reads_past_pending_transfers_of_other_processes() -> None:
    """With more PENDING transfers of B than one page holds, A's pass still finds its own."""
    log = ControlledLog()
    small = EngineLimits(
        pipelines=1, batch_ops_max=64, mailbox_commands_max=256,
        transfer_redrive_interval_s=60.0, transfer_redrive_batch_max=2,
    )  # fmt: skip
    ownership = Ownership(SHARDS)
    serve(ownership, 0)
    engine = Engine(log, small, ownership=ownership)
    seen: list[int] = []
    real = log.pending_transfers

    async def counted(
        before_us: int, limit: int, after: tuple[int, UUID] | None = None
    ) -> list[TransferRecord]:
        page = await real(before_us, limit, after)
        seen.append(len(page))
        return page

    log.pending_transfers = counted  # type: ignore[method-assign, assignment]
    await engine.start()
    try:
        await until(lambda: seen == [0])  # the start's own pass, over nothing
        for wallet_id in ON_A:
            _id, reply = await engine.create_wallet(wallet_id, None)
            assert reply.outcome is Outcome.CREATED
        for number in range(5):  # B's: older, and more than a page
            transfer_id = uuid4()
            log.transfers[transfer_id] = TransferRecord(
                transfer_id, ON_B[0], ON_A[0], 1, None, TransferStatus.PENDING, None,
                number, number,
            )  # fmt: skip
        ours = uuid4()
        log.transfers[ours] = TransferRecord(
            ours, ON_A[0], ON_A[1], 1, None, TransferStatus.PENDING, None, 10, 10
        )
        seen.clear()
        assert await engine.redrive_transfers() == 1
        assert seen == [2, 2, 2, 0]
        assert log.transfers[ours].status is TransferStatus.COMPLETED
    finally:
        await engine.stop()


async def test_a_receiver_whose_currency_cannot_be_read_moves_nothing() -> None:
    """A transfer to a wallet whose owner cannot be reached, and whose currency this
    coordinator has not read before, is refused before any money moves (503 NOT_OWNER,
    nothing stored): the currency check comes first, across processes too."""
    log = ControlledLog()
    async with two_processes(log) as (a, b, network):
        for wallet_id, engine in ((ON_A[1], a), (ON_B[1], b)):
            assert (await engine.create_wallet(wallet_id, None))[1].outcome is Outcome.CREATED
            await engine.apply(wallet_id, OperationKind.DEPOSIT, 100, None)
        network.down.add(URL_B)
        _id, reply = await a.transfer(None, None, ON_A[1], ON_B[1], 10, None)
        assert (reply.outcome, reply.side) == (Outcome.NOT_OWNER, SIDE_TO)
        assert log.transfers == {}
        assert log.wallets[ON_A[1]].balance == 100
        network.down.clear()
        _id, reply = await a.transfer(None, None, ON_A[1], ON_B[1], 10, None)
        assert reply.outcome is Outcome.OK

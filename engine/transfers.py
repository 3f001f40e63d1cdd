"""Transfers between wallets: a saga of one-shard commits, with its in-flight money visible.

The process that got the request coordinates; after a crash, the re-drive of the process
that serves the sending wallet's shard does (docs/ARCHITECTURE.md, "Transfers")::

    POST /transfers ──▶ load the transfer by id (a known id replays or resumes it)
                          │
                          ▼
    owner of FROM:   commit 1  TRANSFER_OUT log row (checked against the balance)
                          │    + transfer row PENDING   ── refused: 404 / 409, nothing written
                          ▼
    owner of TO:     commit 2  TRANSFER_IN log row (keyed by the transfer id)
                          │    + transfer COMPLETED ──────────────▶ 201
                          │ refused (wallet not found, balance ceiling)
                          ▼
    owner of FROM:   commit 3  TRANSFER_REFUND log row + transfer FAILED ──▶ 404 / 409
                          │ any 503 on the way: the transfer stays PENDING (visible),
                          ▼ the client's retry or the re-drive loop finishes it
    re-drive loop:   every PENDING transfer older than one interval whose sending wallet's
                     shard this process serves is driven again, and all of them at once
                     when shards are gained (commits 2/3 are keyed by the transfer id: a
                     second copy is impossible)

Every leg goes through ``LegDelivery``, the port "deliver this leg to the owner of its
wallet". ``RoutedLegDelivery`` (the engine's) submits it to a shard of this process when
this process serves the wallet's shard, and otherwise sends it to the owner named by the
ownership table through ``RemoteLegs`` (the HTTP edge's internal route, http/legs.py)::

    deliver(leg) ──▶ served here? ──yes──▶ local shard ──────────────────▶ reply
                        │ no (NotOwner)
                        ▼
                     owner in the table ──▶ RemoteLegs.send(internal url, leg) ──▶ reply
                        │ no live owner, not connected, or the owner answers NOT_OWNER
                        ▼ (nothing applied)
                     wait for the next table read; at most ``tries_max`` tries,
                     then NOT_OWNER (a debit: 503 NOT_OWNER; a credit: PENDING, 503)

A leg is idempotent by its key (``transfer_leg_key``): sending it again after an unknown
outcome replays the first answer, never applies twice.

A transfer is driven by one task at a time in a process (``_driving``, keyed by id): a
client's retry and the re-drive loop join the drive already under way instead of racing it.
Storage closes a transfer once (``TransferNotPending``), so even two processes driving the
same transfer cannot both credit and refund it.
"""

from __future__ import annotations

import abc
import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import NamedTuple, TypeVar
from uuid import UUID

from walletd.engine.bounds import storable_amount
from walletd.engine.commands import (
    REFUND_FAILURE_CODES,
    JointTransfer,
    Outcome,
    Reply,
    TransferLeg,
    transfer_leg_key,
)
from walletd.engine.errors import EngineRefused, NotOwner
from walletd.engine.model import (
    NO_METADATA,
    Metadata,
    OperationKind,
    PaymentStatus,
    RefusalRecord,
    TransferRecord,
    TransferStatus,
)
from walletd.engine.money import Currency, to_minor
from walletd.engine.observer import DRIVER_REDRIVE, DRIVER_REQUEST, EngineObserver
from walletd.engine.ownership import Ownership
from walletd.engine.ports import StorageError, StorageUnavailable, WalletLog

__all__ = [
    "SIDE_FROM",
    "SIDE_TO",
    "LegDelivery",
    "RemoteLegs",
    "RoutedLegDelivery",
    "TransferCoordinator",
    "TransferReply",
    "run_claimed",
    "storage_wave",
]

_log = logging.getLogger("walletd.engine")

SIDE_FROM = "from"
SIDE_TO = "to"

# Refusals of the credit leg that end the transfer FAILED (the debit refunded). Any other
# answer (503) leaves it PENDING, to be driven again.
_FINAL_CREDIT_REFUSALS = frozenset(Outcome(code) for code in REFUND_FAILURE_CODES)


class TransferReply(NamedTuple):
    """The answer to a transfer request.

    ``OK`` with a COMPLETED transfer; a refusal with the side it concerns (``from`` /
    ``to``) and, for FAILED transfers, the transfer record too; ``UNAVAILABLE`` when a leg's
    outcome is unknown or storage is away (the transfer, if debited, is PENDING and visible).
    """

    outcome: Outcome
    transfer: TransferRecord | None = None
    replayed: bool = False
    side: str | None = None
    balance_seen: int | None = None
    # The transfer's currency (as the coordinator read it), for the money a refusal names.
    currency: Currency | None = None


_UNAVAILABLE = TransferReply(Outcome.UNAVAILABLE)
_FOUND = Reply(Outcome.OK)
# Replies that leave a transfer PENDING (or never opened it).
_NOT_ENDED = frozenset({Outcome.UNAVAILABLE, Outcome.NOT_OWNER})


class LegDelivery(abc.ABC):
    """Port: deliver one leg of a transfer to the owner of its wallet; return its reply.

    Contract: the reply is the leg's committed outcome (OK, possibly replayed), a business
    refusal (nothing written), NOT_OWNER (no process took it: nothing applied), or
    UNAVAILABLE (not applied, or unknown). Never raises for a refusal of the owner to take
    the leg (overload, stopping): that is UNAVAILABLE too.
    """

    @abc.abstractmethod
    async def deliver(
        self,
        kind: OperationKind,
        transfer: TransferRecord,
        failure_code: str | None = None,
        *,
        fresh: bool = False,
    ) -> Reply:
        """Apply the leg on its wallet's shard and return the reply once it committed.

        ``fresh``: the leg's key cannot be stored yet, its lookup may be skipped
        (``TransferLeg.fresh``)."""

    async def deliver_joint(
        self, transfer: TransferRecord, *, fresh_debit: bool = False
    ) -> Reply | None:
        """Both legs of a new transfer in one commit (``JointTransfer``), when one pipeline
        owns both wallets; None when it cannot (nothing submitted: then the legs go one by
        one). ``fresh_debit``: the transfer id was just drawn, so no refusal can be recorded
        under the debit's key and its lookup may be skipped."""
        return None

    async def read_currency(self, wallet_id: UUID) -> Reply:
        """The wallet's currency, read at its owner: OK with the wallet (its view holds the
        currency), WALLET_NOT_FOUND, NOT_OWNER or UNAVAILABLE (nothing read)."""
        return Reply(Outcome.UNAVAILABLE)

    async def deliver_joint_payment(self, transfers: Sequence[TransferRecord]) -> Reply | None:
        """Every posting of a new payment in one commit (``JointPayment``), when one
        pipeline of this process owns all its wallets; None when it cannot (nothing
        submitted). OK: all applied; NOT_OWNER: none; UNAVAILABLE: outcome unknown."""
        return None


class RemoteLegs(abc.ABC):
    """Port: send one leg to another walletd process (the owner of its wallet's shard).

    Contract: returns the owner's reply (OK, a business refusal, UNAVAILABLE); NOT_OWNER
    when nothing was applied for sure (not connected, the process answered that it does
    not serve the shard, or it refused the cluster credential); UNAVAILABLE when the leg
    may have been applied (sent, answer lost). Never raises for a failure of the other
    process or of the network.
    """

    @abc.abstractmethod
    async def send(
        self, url: str, kind: OperationKind, transfer: TransferRecord, failure_code: str | None
    ) -> Reply:
        """Deliver the leg to the internal listener at ``url`` and return its reply."""

    async def read_currency(self, url: str, wallet_id: UUID) -> Reply:
        """The wallet's currency from the owner at ``url`` (as ``LegDelivery``'s)."""
        return Reply(Outcome.NOT_OWNER)


_NOT_OWNER_REPLY = Reply(Outcome.NOT_OWNER)
# The longest a delivery waits for the next read of the ownership table between tries (half
# a lease, capped: with long leases a move is still seen at the keeper's next step).
_TABLE_WAIT_S_MAX = 2.0


class RoutedLegDelivery(LegDelivery):
    """Delivers a leg to whichever process serves its wallet's shard: this one (``local``,
    which raises ``NotOwner`` when it does not serve the shard) or another one (``remote``,
    at the internal URL the ownership table names). A leg that nobody takes for sure (no live
    owner, not connected, the owner lost the shard, its credential refused) is tried again
    after the next read of the table, ``tries_max`` times in all; then the answer is
    NOT_OWNER (nothing applied)."""

    def __init__(
        self,
        local: Callable[[TransferLeg], Awaitable[Reply]],
        ownership: Ownership,
        remote: RemoteLegs | None,
        *,
        self_url: str | None,
        tries_max: int,
        local_joint: Callable[[JointTransfer], Awaitable[Reply | None]] | None = None,
        local_read: Callable[[UUID], Awaitable[Reply]] | None = None,
        local_joint_payment: Callable[[Sequence[TransferRecord]], Awaitable[Reply | None]]
        | None = None,
    ) -> None:
        self._local_joint_payment = local_joint_payment
        # A read of a wallet on this process (raises NotOwner when it does not serve it).
        self._local_read = local_read
        if tries_max < 1:
            raise ValueError("tries_max must be at least 1")
        self._local = local
        self._ownership = ownership
        self._remote = remote
        self._self_url = self_url
        self._tries_max = tries_max
        # Both legs to this process's pipeline when it serves both wallets on one; None
        # when it does not (nothing submitted).
        self._local_joint = local_joint

    async def deliver(
        self,
        kind: OperationKind,
        transfer: TransferRecord,
        failure_code: str | None = None,
        *,
        fresh: bool = False,
    ) -> Reply:
        ownership = self._ownership
        for attempt in range(self._tries_max):
            if attempt:
                # Wait (at most half a lease) for the next read of the ownership table: a
                # move in progress (released, not claimed; a dead owner's lease expiring).
                await ownership.next_table(min(ownership.table_stale_s / 2, _TABLE_WAIT_S_MAX))
            loop = asyncio.get_running_loop()
            leg = TransferLeg(kind, transfer, loop.create_future(), failure_code, fresh=fresh)
            try:
                return await self._local(leg)
            except NotOwner as refused:
                shard = refused.shard
            except EngineRefused:
                return Reply(Outcome.UNAVAILABLE)
            url = ownership.owner_url(shard)
            # Legs travel to the owner's internal listener, never to its public port.
            internal_url = ownership.owner_internal_url(shard)
            if url == self._self_url or internal_url is None or self._remote is None:
                continue  # nobody serves it right now (or the table lags behind this process)
            reply = await self._remote.send(internal_url, kind, transfer, failure_code)
            if reply.outcome is not Outcome.NOT_OWNER:
                return reply
        return _NOT_OWNER_REPLY

    async def read_currency(self, wallet_id: UUID) -> Reply:
        """Read where the wallet is served, with the legs' tries and table waits."""
        ownership = self._ownership
        for attempt in range(self._tries_max):
            if attempt:
                await ownership.next_table(min(ownership.table_stale_s / 2, _TABLE_WAIT_S_MAX))
            if self._local_read is None:
                return Reply(Outcome.UNAVAILABLE)
            try:
                return await self._local_read(wallet_id)
            except NotOwner as refused:
                shard = refused.shard
            except EngineRefused:
                return Reply(Outcome.UNAVAILABLE)
            url = ownership.owner_url(shard)
            internal_url = ownership.owner_internal_url(shard)
            if url == self._self_url or internal_url is None or self._remote is None:
                continue
            reply = await self._remote.read_currency(internal_url, wallet_id)
            if reply.outcome is not Outcome.NOT_OWNER:
                return reply
        return _NOT_OWNER_REPLY

    async def deliver_joint_payment(self, transfers: Sequence[TransferRecord]) -> Reply | None:
        if self._local_joint_payment is None:
            return None
        return await self._local_joint_payment(transfers)

    async def deliver_joint(
        self, transfer: TransferRecord, *, fresh_debit: bool = False
    ) -> Reply | None:
        if self._local_joint is None:
            return None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        return await self._local_joint(JointTransfer(transfer, future, fresh_debit=fresh_debit))


_Result = TypeVar("_Result")


async def storage_wave(call: Awaitable[_Result], timeout_s: float, what: str) -> _Result:
    """One coalesced storage call on behalf of many waiters: whatever goes wrong comes out
    as a StorageError (a timeout as StorageUnavailable), so that the caller can hand every
    waiter an answer; an unexpected exception is logged and never leaves one hanging."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except TimeoutError:
        raise StorageUnavailable(f"{what} timed out") from None
    except StorageError:
        raise
    except Exception as unexpected:
        _log.error("%s raised", what, exc_info=unexpected)
        raise StorageError(f"{what} failed: {unexpected!r}") from unexpected


class _CoalescedLoads:
    """Lookups of transfers by id, coalesced: the ids asked for while one query runs are
    read together by the next one. So lookups hold at most one storage connection at a
    time (the shards' commits share the pool), and cost one query per wave, not per
    request. A wave reads at most ``ids_max`` ids; the rest wait for the next wave."""

    def __init__(self, log: WalletLog, timeout_s: float, ids_max: int) -> None:
        self._log = log
        self._timeout_s = timeout_s
        self._ids_max = ids_max
        self._waiting: dict[UUID, list[asyncio.Future[TransferRecord | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def load(self, transfer_id: UUID) -> TransferRecord | None:
        future: asyncio.Future[TransferRecord | None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(transfer_id, []).append(future)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="walletd-transfer-loads")
        return await future

    async def _run(self) -> None:
        while self._waiting:
            ids = list(itertools.islice(self._waiting, self._ids_max))
            wave = {transfer_id: self._waiting.pop(transfer_id) for transfer_id in ids}
            found: dict[UUID, TransferRecord] = {}
            error: StorageError | None = None
            try:
                found = await storage_wave(
                    self._log.load_transfers(ids), self._timeout_s, "loading transfers"
                )
            except StorageError as storage_error:
                error = storage_error
            for transfer_id, futures in wave.items():
                for future in futures:
                    if future.done():  # its caller went away
                        continue
                    if error is None:
                        future.set_result(found.get(transfer_id))
                    else:
                        future.set_exception(error)


_Reply = TypeVar("_Reply")


async def run_claimed(
    driving: dict[UUID, asyncio.Future[_Reply]],
    claim: UUID,
    work: Callable[[], Awaitable[_Reply]],
    unavailable: _Reply,
) -> _Reply:
    """Run ``work`` with ``claim`` held in ``driving``: a request for the same id meanwhile
    waits for the claim's future, which gets the reply (``unavailable`` if ``work`` raised).
    One driver per id in a process, for transfers and payments alike."""
    future: asyncio.Future[_Reply] = asyncio.get_running_loop().create_future()
    driving[claim] = future
    try:
        reply = await work()
    except BaseException:
        future.set_result(unavailable)
        raise
    finally:
        del driving[claim]
    future.set_result(reply)
    return reply


class TransferCoordinator:
    def __init__(
        self,
        log: WalletLog,
        delivery: LegDelivery,
        load_timeout_s: float,
        lookup_ids_max: int = 1024,
        observer: EngineObserver | None = None,
        currency_cache_wallets_max: int = 65_536,
    ) -> None:
        # Wallet currencies remembered (immutable, so never stale): a transfer to a wallet
        # read before needs no read of its currency (engine/limits.py).
        self._currencies_max = currency_cache_wallets_max
        self._log = log
        self._observer = observer or EngineObserver()
        self._delivery = delivery
        self._load_timeout_s = load_timeout_s
        self._loads = _CoalescedLoads(log, load_timeout_s, lookup_ids_max)
        # Transfers being driven in this process, by id; an entry lives while one request
        # or re-drive works on it, so the dict is bounded by the requests in flight plus
        # one re-drive batch.
        self._driving: dict[UUID, asyncio.Future[TransferReply]] = {}
        # Where the previous re-drive pass stopped choosing (creation instant, id): the
        # next pass goes on from there and wraps around, so PENDING transfers that stay
        # PENDING (a refund refused at the sender's balance ceiling) cannot take every
        # pass's batch and starve younger ones. None: start at the oldest.
        self._redrive_after: tuple[int, UUID] | None = None
        # Wallet id (int) -> its currency, most recent last, at most _currencies_max (the
        # least recently used is forgotten).
        self._currencies: OrderedDict[int, Currency] = OrderedDict()

    @property
    def driving(self) -> int:
        return len(self._driving)

    async def transfer(
        self,
        transfer_id: UUID,
        from_wallet_id: UUID,
        to_wallet_id: UUID,
        amount: int,
        reference: str | None,
        *,
        fresh_id: bool = False,
        actor: str | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> TransferReply:
        """Move ``amount`` between two wallets; the id is the request's idempotency key.

        ``fresh_id``: the id was just drawn at random (no client id, no key), so it cannot be
        stored yet and the lookup by id is skipped (one query less per transfer).
        ``scale``: ``amount`` is amount / 10^scale as the client wrote it (None: in minor
        units of the wallets' currency already).

        The receiving wallet's currency is read first (its owner answers; remembered after),
        and becomes the transfer's: the debit is refused (CURRENCY_MISMATCH) by the sending
        wallet's owner when its currency differs, before any money moves. A receiver that
        does not exist yet has no currency: the sender's is read instead, and the credit is
        refused as today (the debit refunded, FAILED).
        """
        currency, refused = await self._transfer_currency(from_wallet_id, to_wallet_id)
        if refused is not None:
            return refused
        if currency is None:
            # Neither wallet exists: no money can move (the debit is refused, 404), and a
            # transfer stored under the id names other wallets (422 reuse): the amount's
            # units decide nothing, it only has to be one the leg carries.
            if not storable_amount(amount):
                amount = 1
        elif scale is not None:
            minor = to_minor(amount, scale, currency.exponent)
            if minor is None or not storable_amount(minor):
                return TransferReply(Outcome.AMOUNT_NOT_IN_CURRENCY, currency=currency)
            amount = minor
        requested = TransferRecord(
            transfer_id, from_wallet_id, to_wallet_id, amount, reference,
            TransferStatus.PENDING, None, 0, 0, actor, currency, metadata,
        )  # fmt: skip
        while (running := self._driving.get(transfer_id)) is not None:
            # The same id is being worked on: wait for it, then answer from storage as a
            # replay (or as a reuse of the id with another request).
            await asyncio.wait((running,))
        return await self._claimed(
            transfer_id, lambda: self._transfer(requested, fresh_id=fresh_id)
        )

    async def refund(
        self,
        refund_id: UUID,
        original_id: UUID,
        amount: int | None,
        reason: str | None,
        *,
        actor: str | None = None,
        scale: int | None = None,
        metadata: Metadata = NO_METADATA,
    ) -> TransferReply:
        """Give back ``amount`` (None: all that is left) of a COMPLETED transfer, from its
        receiver to its sender, as a new transfer ``refund_id`` whose ``refund_of`` is the
        original (docs/ARCHITECTURE.md, "Refunds and reversals"). The same saga as any
        transfer: debited from the original's receiver (refused 409 like any debit, recorded
        under the debit leg's key and replayed), credited to its sender, re-driven after a
        crash. ``reason`` is the refund's reference.

        The bound (the refunds of a transfer that are not FAILED sum to at most its amount)
        is checked here against storage first, for a clean answer without a write; what
        guarantees it is storage, which refuses a debit that would pass it (WD010, the
        original's row locked: one decision at a time even across processes), and the
        pipeline answers that refusal alone REFUND_EXCEEDS_TRANSFER (engine/shard.py)."""
        try:
            original = await self.read(original_id)
        except StorageError:
            return _UNAVAILABLE
        if original is None:
            return TransferReply(Outcome.TRANSFER_NOT_FOUND)
        if original.refund_of is not None:
            return TransferReply(Outcome.TRANSFER_IS_REFUND, original)
        if original.status is not TransferStatus.COMPLETED:
            return TransferReply(Outcome.TRANSFER_NOT_COMPLETED, original)
        if original.payment_id is not None:
            # A payment's posting is refunded once its payment is COMPLETED: final, so this
            # read cannot be overtaken. A posting COMPLETED by a joint commit before its
            # payment's decision is refused until then (docs/API.md, "Payments").
            try:
                payments = await asyncio.wait_for(
                    self._log.load_payments([original.payment_id]), self._load_timeout_s
                )
            except (StorageError, TimeoutError):
                return _UNAVAILABLE
            payment = payments.get(original.payment_id)
            if payment is None or payment.status is not PaymentStatus.COMPLETED:
                return TransferReply(Outcome.PAYMENT_NOT_COMPLETED, original)
        currency = original.currency
        if amount is not None and scale is not None and currency is not None:
            minor = to_minor(amount, scale, currency.exponent)
            if minor is None or not storable_amount(minor):
                return TransferReply(Outcome.AMOUNT_NOT_IN_CURRENCY, currency=currency)
            amount = minor
        while (running := self._driving.get(refund_id)) is not None:
            await asyncio.wait((running,))
        return await self._claimed(
            refund_id,
            lambda: self._refund(refund_id, original, amount, reason, actor, metadata),
        )

    async def _refund(
        self,
        refund_id: UUID,
        original: TransferRecord,
        amount: int | None,
        reason: str | None,
        actor: str | None,
        metadata: Metadata,
    ) -> TransferReply:
        sender = original.to_wallet_id
        try:
            stored = await self.read(refund_id)
            if stored is not None:
                # A retry (or another request under the refund's id): the same request
                # replays the refund as it is; an omitted amount was "what was left".
                if (
                    stored.refund_of != original.transfer_id
                    or (amount is not None and stored.amount != amount)
                    or (stored.reference, stored.metadata) != (reason, metadata)
                ):
                    return TransferReply(Outcome.IDEMPOTENCY_KEY_REUSED)
                if stored.status is TransferStatus.PENDING:
                    return await self._drive(stored, replayed=True, driver=DRIVER_REQUEST)
                return _final_reply(stored, replayed=True)
            debit_key = transfer_leg_key(OperationKind.TRANSFER_OUT, refund_id)
            # Each read bounded like the coordinator's loads.
            found = await asyncio.wait_for(
                self._log.find_operations([(sender, debit_key)]), self._load_timeout_s
            )
            recorded = found.get((sender, debit_key))
            if isinstance(recorded, RefusalRecord):
                # A refused refund retried: its debit replays the recorded refusal (an
                # omitted amount is the one refused then, not what is left now).
                if amount is None:
                    amount = recorded.amount
            else:
                refunded = await asyncio.wait_for(
                    self._log.refunded_amount(original.transfer_id), self._load_timeout_s
                )
                left = original.amount - refunded
                if amount is None:
                    amount = left
                if amount <= 0 or amount > left:
                    return TransferReply(
                        Outcome.REFUND_EXCEEDS_TRANSFER, original, balance_seen=max(left, 0),
                        currency=original.currency,
                    )  # fmt: skip
        except (StorageError, TimeoutError):
            return _UNAVAILABLE
        requested = TransferRecord(
            refund_id, sender, original.from_wallet_id, amount, reason, TransferStatus.PENDING,
            None, 0, 0, actor, original.currency, metadata, original.transfer_id,
        )  # fmt: skip
        return await self._transfer(requested, fresh_id=False)

    async def _transfer_currency(
        self, from_wallet_id: UUID, to_wallet_id: UUID
    ) -> tuple[Currency | None, TransferReply | None]:
        """The currency a new transfer is in (the receiver's, else the sender's; None when
        neither exists), or the answer when a currency cannot be read (503)."""
        for wallet_id, side in ((to_wallet_id, SIDE_TO), (from_wallet_id, SIDE_FROM)):
            currency, reply = await self.currency_of(wallet_id)
            if currency is not None:
                return currency, None
            if reply.outcome is not Outcome.WALLET_NOT_FOUND:
                return None, TransferReply(reply.outcome, side=side)
        return None, None

    async def currency_of(self, wallet_id: UUID) -> tuple[Currency | None, Reply]:
        """A wallet's currency (remembered, else read at its owner), or None and the reply
        that says why not (WALLET_NOT_FOUND, NOT_OWNER, UNAVAILABLE)."""
        cache = self._currencies
        wid = wallet_id.int
        currency = cache.get(wid)
        if currency is not None:
            cache.move_to_end(wid)
            return currency, _FOUND
        reply = await self._delivery.read_currency(wallet_id)
        if reply.outcome is not Outcome.OK or reply.wallet is None:
            return None, reply
        currency = reply.wallet.currency
        cache[wid] = currency
        if len(cache) > self._currencies_max:
            cache.popitem(last=False)
        return currency, reply

    async def drive_opened(self, transfer: TransferRecord) -> TransferReply:
        """Drive a PENDING transfer another command opened (a hold captured into a wallet,
        engine/holds.py): the credit, or the refund if refused, as for any transfer. One
        already being driven is left to its driver (UNAVAILABLE: still PENDING)."""
        return await self._drive_unless_driven(transfer, replayed=False, driver=DRIVER_REQUEST)

    async def read(self, transfer_id: UUID) -> TransferRecord | None:
        """The stored transfer (raises ``StorageError`` when storage is away)."""
        return await self._loads.load(transfer_id)

    async def redrive(
        self,
        created_before_us: int,
        limit: int,
        owns: Callable[[TransferRecord], bool] = lambda _transfer: True,
    ) -> int:
        """Drive again up to ``limit`` PENDING transfers created before the instant, at
        once; returns how many ended (COMPLETED or FAILED). Only the ones ``owns`` accepts
        (in a cluster: those whose sending wallet's shard this process serves, so that one
        process re-drives a given transfer); ones driven here already are left to their
        driver. The PENDING set is read ``limit`` rows at a time, in creation order from
        where the previous pass stopped (wrapping around to the oldest), until ``limit``
        transfers are chosen or the set is read through: neither another process's
        transfers nor ones that stay PENDING pass after pass crowd out the others."""
        todo: list[TransferRecord] = []
        start = self._redrive_after
        after, wrapped = start, False
        while len(todo) < limit:
            page = await asyncio.wait_for(
                self._log.pending_transfers(created_before_us, limit, after),
                self._load_timeout_s,
            )
            if wrapped and start is not None:  # the second lap ends where the first began
                page = [t for t in page if (t.created_at_us, t.transfer_id) <= start]
            todo += [t for t in page if t.transfer_id not in self._driving and owns(t)]
            if len(page) == limit:
                after = (page[-1].created_at_us, page[-1].transfer_id)
            elif start is None or wrapped:
                break
            else:
                after, wrapped = None, True
        chosen = todo[:limit]
        # Read through to the end: the next pass starts at the oldest again.
        self._redrive_after = (
            (chosen[-1].created_at_us, chosen[-1].transfer_id) if len(todo) >= limit else None
        )
        replies = await asyncio.gather(*(
            self._drive_unless_driven(t, replayed=True, driver=DRIVER_REDRIVE)
            for t in chosen
        ))  # fmt: skip
        return sum(1 for reply in replies if reply.outcome not in _NOT_ENDED)

    # -- the saga ----------------------------------------------------------------------

    def _claimed(
        self, transfer_id: UUID, work: Callable[[], Awaitable[TransferReply]]
    ) -> Awaitable[TransferReply]:
        # run_claimed's coroutine itself, not one more around it: every await of a transfer
        # resumes through each coroutine of its chain.
        return run_claimed(self._driving, transfer_id, work, _UNAVAILABLE)

    async def _drive_unless_driven(
        self, transfer: TransferRecord, *, replayed: bool, driver: str
    ) -> TransferReply:
        """Drive a PENDING transfer, unless this process drives it already."""
        if transfer.transfer_id in self._driving:
            return _UNAVAILABLE
        return await self._claimed(
            transfer.transfer_id,
            lambda: self._drive(transfer, replayed=replayed, driver=driver),
        )

    async def _transfer(self, requested: TransferRecord, *, fresh_id: bool) -> TransferReply:
        if not fresh_id and (answer := await self._resume_stored(requested)) is not None:
            return answer
        # No transfer is stored under the id. The debit's key lookup is skipped only for an
        # id just drawn: under a client's id or key a refused debit may be recorded (and
        # must be replayed), which only the lookup finds once the key cache forgot it. (A
        # debit stored since by another process's driver is caught by the key cache at the
        # wallet's owner, else by the transfers' primary key.) Both legs in one commit
        # when one pipeline owns both wallets.
        debit = await self._delivery.deliver_joint(requested, fresh_debit=fresh_id)
        if debit is None:
            debit = await self._delivery.deliver(
                OperationKind.TRANSFER_OUT, requested, fresh=fresh_id
            )
        elif debit.outcome is Outcome.UNAVAILABLE:
            # The joint commit's outcome is unknown: it wrote both legs or nothing, and no
            # one else drives a transfer that is not stored; storage tells which.
            return await self._answer_from_storage(requested, replayed=False)
        # Storage refused the debit alone (engine/shard.py): perhaps another process's
        # driver stored this id first (the transfers' primary key); then it answers.
        if (
            debit.outcome is Outcome.STORAGE_REFUSED
            and not fresh_id
            and (answer := await self._resume_stored(requested)) is not None
        ):
            return answer
        if debit.outcome is not Outcome.OK:
            return TransferReply(
                debit.outcome, side=SIDE_FROM, balance_seen=debit.balance_seen,
                replayed=debit.replayed, currency=requested.currency,
            )  # fmt: skip
        if debit.replayed:  # another process opened it meanwhile: answer from storage
            return await self._transfer(requested, fresh_id=False)
        assert debit.wallet is not None
        opened_us = debit.wallet.updated_at_us
        if debit.items:  # credited in the same commit
            credit = debit.items[0]
            assert credit.wallet is not None
            self._observer.transfer_ended(TransferStatus.COMPLETED.name, DRIVER_REQUEST)
            completed = requested._replace(
                status=TransferStatus.COMPLETED, created_at_us=opened_us,
                updated_at_us=credit.wallet.updated_at_us,
            )  # fmt: skip
            return TransferReply(Outcome.OK, completed)
        opened = requested._replace(created_at_us=opened_us, updated_at_us=opened_us)
        return await self._drive(opened, replayed=False, driver=DRIVER_REQUEST, fresh=True)

    async def _resume_stored(self, requested: TransferRecord) -> TransferReply | None:
        """The answer of the transfer stored under ``requested``'s id (503 if storage cannot
        be read), or None when none is stored."""
        try:
            stored = await self.read(requested.transfer_id)
        except StorageError:
            return _UNAVAILABLE
        return None if stored is None else await self._resume(stored, requested)

    async def _resume(self, stored: TransferRecord, requested: TransferRecord) -> TransferReply:
        """A known id: the original answer for the same request, else IDEMPOTENCY_KEY_REUSED.
        A payment's posting is no client's transfer: its id is taken (driven by its payment
        only, engine/payments.py)."""
        if stored.payment_id is not None:
            return TransferReply(Outcome.IDEMPOTENCY_KEY_REUSED)
        if (
            stored.from_wallet_id, stored.to_wallet_id, stored.amount, stored.reference,
            stored.metadata,
        ) != (
            requested.from_wallet_id, requested.to_wallet_id, requested.amount,
            requested.reference, requested.metadata,
        ):  # fmt: skip
            return TransferReply(Outcome.IDEMPOTENCY_KEY_REUSED)
        if stored.status is TransferStatus.PENDING:
            return await self._drive(stored, replayed=True, driver=DRIVER_REQUEST)
        return _final_reply(stored, replayed=True)

    async def _drive(
        self, transfer: TransferRecord, *, replayed: bool, driver: str, fresh: bool = False
    ) -> TransferReply:
        """Credit the receiving wallet; refund the sender if it refuses. The transfer is
        PENDING (debited) when this starts; ``fresh`` when this drive's own debit just
        opened it: no other driver has credited it yet (the re-drive waits one interval, a
        retry in this process waits for this drive), and one that does meanwhile is caught
        by the owner's key cache, else by the unique key index (never a second credit)."""
        credit = await self._delivery.deliver(OperationKind.TRANSFER_IN, transfer, fresh=fresh)
        if credit.outcome is Outcome.OK:
            if credit.replayed:
                return await self._answer_from_storage(transfer, replayed=True)
            assert credit.wallet is not None
            completed = transfer._replace(
                status=TransferStatus.COMPLETED, updated_at_us=credit.wallet.updated_at_us
            )
            self._observer.transfer_ended(TransferStatus.COMPLETED.name, driver)
            return TransferReply(Outcome.OK, completed, replayed=replayed)
        if credit.outcome not in _FINAL_CREDIT_REFUSALS:
            # Unknown: perhaps another driver closed it (storage refused our close).
            return await self._answer_from_storage(transfer, replayed=replayed)
        refund = await self._delivery.deliver(
            OperationKind.TRANSFER_REFUND, transfer, credit.outcome.value
        )
        if refund.outcome is not Outcome.OK or refund.replayed:
            return await self._answer_from_storage(transfer, replayed=replayed)
        assert refund.wallet is not None
        failed = transfer._replace(
            status=TransferStatus.FAILED,
            failure_code=credit.outcome.value,
            updated_at_us=refund.wallet.updated_at_us,
        )
        _log.info("transfer %s failed (%s); debit refunded", transfer.transfer_id,
                  credit.outcome.value)  # fmt: skip
        self._observer.transfer_ended(TransferStatus.FAILED.name, driver)
        return _final_reply(failed, replayed=replayed, balance_seen=credit.balance_seen)

    async def _answer_from_storage(
        self, transfer: TransferRecord, *, replayed: bool
    ) -> TransferReply:
        try:
            stored = await self.read(transfer.transfer_id)
        except StorageError:
            return _UNAVAILABLE
        if stored is None or stored.status is TransferStatus.PENDING:
            return _UNAVAILABLE
        return _final_reply(stored, replayed=replayed)


def _final_reply(
    transfer: TransferRecord, *, replayed: bool, balance_seen: int | None = None
) -> TransferReply:
    if transfer.status is TransferStatus.COMPLETED:
        return TransferReply(Outcome.OK, transfer, replayed=replayed)
    assert transfer.failure_code is not None
    return TransferReply(
        Outcome(transfer.failure_code),
        transfer,
        replayed=replayed,
        side=SIDE_TO,
        balance_seen=balance_seen,
        currency=transfer.currency,
    )

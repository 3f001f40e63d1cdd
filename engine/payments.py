"""Payments: several postings (transfers) applied all together or not at all.

A payment is a stored row (its postings, its phase) plus one transfer per posting, whose id
is derived from the payment's id and the posting's index. Its legs are the transfers' legs
(TRANSFER_OUT / TRANSFER_IN / TRANSFER_REFUND, keyed by the posting's transfer id), so a
leg applies once whoever sends it, and money in flight is in PENDING transfers as for any
transfer: conservation is exact at every commit (docs/ARCHITECTURE.md, "Payments")::

    POST /payments ──▶ currencies of every wallet (one currency, else 422; 404 naming
                         │ the posting whose wallet does not exist)
                         ▼
    storage:          open: the payment row, phase DEBITING (a known id replays/resumes)
                         ▼
    owners of FROMs:  every posting's debit, at once (TRANSFER_OUT, each on its sender's
                         │ shard; postings of one sender are checked one after the other
                         │ against its available)
                         ├─ one refused ──▶ decide FAILING ──▶ refund every debited posting
                         │                  (postings not debited are closed FAILED in
                         │                  storage: they can never be debited after)
                         │                  ──▶ 409/404 naming postings[i]
                         ▼ all debited
    storage:          decide CREDITING (turned into FAILING if a receiver is CLOSED; from
                         │ its commit on, no receiver can close: WD009)
                         ▼
    owners of TOs:    every posting's credit, at once ──▶ 201, COMPLETED
                         │ any credit not applied (503, a balance ceiling): the payment
                         ▼ stays PENDING; the re-drive sends the missing credits again
    re-drive:         a payment not final, older than one interval, is driven again by the
                      process that serves its first posting's sending wallet

When one pipeline of this process owns every wallet, a payment just opened goes first as one
``JointPayment``: every debit and credit in one commit, or nothing and then the saga above
(docs/ARCHITECTURE.md, "Payments").

The decision is stored once (a compare-and-set on the payment's phase), so two drivers of
one payment (a client's retry on another process, the re-drive) cannot decide differently;
a credit is never refused for a reason that could make the payment partial (receivers
exist and share the currency before any debit, cannot close from the decision on), so a
CREDITING payment only ever completes. The one credit refusal left is a receiver's balance
ceiling (10^17 minor units) reached by other credits meanwhile: that posting's credit waits,
PENDING, until the wallet has room (never refunded, so never partial).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, NamedTuple, TypeVar
from uuid import UUID

from walletd.engine.bounds import storable_amount
from walletd.engine.commands import Outcome, Reply
from walletd.engine.model import (
    NO_METADATA,
    Metadata,
    OperationKind,
    PaymentDecision,
    PaymentPhase,
    PaymentRecord,
    PaymentStatus,
    PostingRecord,
    TransferRecord,
    TransferStatus,
)
from walletd.engine.money import Currency, to_minor
from walletd.engine.observer import DRIVER_REDRIVE, DRIVER_REQUEST, EngineObserver
from walletd.engine.ports import StorageError, StorageUnavailable, WalletLog
from walletd.engine.transfers import (
    SIDE_FROM,
    SIDE_TO,
    LegDelivery,
    TransferCoordinator,
    run_claimed,
    storage_wave,
)

__all__ = [
    "PAYMENT_KEY_NAMESPACE",
    "PaymentCoordinator",
    "PaymentReply",
    "Posting",
    "posting_transfer_id",
]

_log = logging.getLogger("walletd.engine")

# A payment's id from its Idempotency-Key (uuid5): one key, one payment.
PAYMENT_KEY_NAMESPACE = UUID("5d0e3c1a-8f8e-4d62-9a59-2d3f0c7b9a11")

# Debit refusals that fail the payment (the others leave it DEBITING: not known).
_DEBIT_REFUSALS = frozenset(
    {
        Outcome.INSUFFICIENT_FUNDS,
        Outcome.WALLET_NOT_FOUND,
        Outcome.WALLET_FROZEN,
        Outcome.WALLET_CLOSED,
        Outcome.CURRENCY_MISMATCH,
        Outcome.NOT_STORABLE,
    }
)
_UNAVAILABLE_CODES = frozenset({Outcome.UNAVAILABLE, Outcome.NOT_OWNER})


def posting_transfer_id(payment_id: UUID, index: int) -> UUID:
    """The transfer id of a payment's posting: derived, so every driver of the payment
    names the same legs."""
    return uuid.uuid5(payment_id, f"posting:{index}")


class Posting(NamedTuple):
    """A posting as requested: ``amount`` / 10^``scale`` (scale None: minor units)."""

    from_wallet_id: UUID
    to_wallet_id: UUID
    amount: int
    scale: int | None = None
    metadata: Metadata = NO_METADATA


class PaymentReply(NamedTuple):
    """OK with a COMPLETED payment; a refusal naming the posting (``posting``: its index)
    and its side, with the FAILED payment when one was stored; UNAVAILABLE when the payment
    is PENDING or its outcome unknown (503: read it, or retry with the same key)."""

    outcome: Outcome
    payment: PaymentRecord | None = None
    replayed: bool = False
    posting: int | None = None
    side: str | None = None
    balance_seen: int | None = None
    currency: Currency | None = None


_UNAVAILABLE = PaymentReply(Outcome.UNAVAILABLE)


_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _Waves(Generic[_In, _Out]):
    """Calls of one storage method, coalesced: the items submitted while a wave runs go
    together in the next (at most ``size_max`` each, at most ``in_flight_max`` waves at
    once). So a payment's open and decision cost one statement per wave, not per payment,
    and hold few of the pool's connections (the shards' commits share them), as the
    transfers' lookups do (engine/transfers.py, ``_CoalescedLoads``)."""

    def __init__(
        self,
        call: Callable[[list[_In]], Awaitable[list[_Out]]],
        timeout_s: float,
        size_max: int,
        in_flight_max: int = 2,
    ) -> None:
        self._call = call
        self._timeout_s = timeout_s
        self._size_max = size_max
        self._in_flight_max = in_flight_max
        self._waiting: list[tuple[_In, asyncio.Future[_Out]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, item: _In) -> _Out:
        future: asyncio.Future[_Out] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if len(self._tasks) < self._in_flight_max:
            task = asyncio.create_task(self._run(), name="walletd-payment-wave")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _run(self) -> None:
        while self._waiting:
            wave = self._waiting[: self._size_max]
            del self._waiting[: self._size_max]
            results: list[_Out] = []
            error: StorageError | None = None
            try:
                results = await storage_wave(
                    self._call([item for item, _ in wave]), self._timeout_s,
                    "a payments statement",
                )  # fmt: skip
            except StorageError as storage_error:
                error = storage_error
            for index, (_item, future) in enumerate(wave):
                if future.done():  # its caller went away
                    continue
                if error is None:
                    future.set_result(results[index])
                else:
                    future.set_exception(error)


class PaymentCoordinator:
    """Drives payments (module doc). One task per payment id in a process (``_driving``):
    a retry and the re-drive join the drive under way."""

    def __init__(
        self,
        log: WalletLog,
        delivery: LegDelivery,
        transfers: TransferCoordinator,
        load_timeout_s: float,
        clock_us: Callable[[], int],
        observer: EngineObserver | None = None,
        wave_size_max: int = 256,
    ) -> None:
        self._log = log
        self._delivery = delivery
        self._transfers = transfers
        self._load_timeout_s = load_timeout_s
        self._clock_us = clock_us
        self._observer = observer or EngineObserver()
        self._driving: dict[UUID, asyncio.Future[PaymentReply]] = {}
        self._opens: _Waves[PaymentRecord, PaymentRecord] = _Waves(
            log.open_payments, load_timeout_s, wave_size_max
        )
        self._decisions: _Waves[PaymentDecision, PaymentRecord | None] = _Waves(
            log.decide_payments, load_timeout_s, wave_size_max
        )

    @property
    def driving(self) -> int:
        return len(self._driving)

    async def read(self, payment_id: UUID) -> PaymentRecord | None:
        """The stored payment (raises ``StorageError`` when storage is away)."""
        try:
            found = await asyncio.wait_for(
                self._log.load_payments([payment_id]), self._load_timeout_s
            )
        except TimeoutError:
            raise StorageUnavailable("loading a payment timed out") from None
        return found.get(payment_id)

    async def pay(
        self,
        payment_id: UUID,
        postings: Sequence[Posting],
        reference: str | None,
        metadata: Metadata,
        actor: str | None,
    ) -> PaymentReply:
        """Apply every posting or none (module doc)."""
        currency: Currency | None = None
        seen: set[UUID] = set()  # each wallet's currency once (a sender pays several)
        for index, posting in enumerate(postings):
            for wallet_id, side in ((posting.from_wallet_id, SIDE_FROM),
                                    (posting.to_wallet_id, SIDE_TO)):  # fmt: skip
                if wallet_id in seen:
                    continue
                seen.add(wallet_id)
                found, reply = await self._transfers.currency_of(wallet_id)
                if found is None:
                    return PaymentReply(reply.outcome, posting=index, side=side)
                if currency is None:
                    currency = found
                elif found != currency:
                    return PaymentReply(
                        Outcome.CURRENCY_MISMATCH, posting=index, side=side, currency=currency
                    )
        assert currency is not None
        stored_postings: list[PostingRecord] = []
        for index, posting in enumerate(postings):
            amount = posting.amount
            if posting.scale is not None:
                minor = to_minor(amount, posting.scale, currency.exponent)
                if minor is None or not storable_amount(minor):
                    return PaymentReply(
                        Outcome.AMOUNT_NOT_IN_CURRENCY, posting=index, currency=currency
                    )
                amount = minor
            stored_postings.append(
                PostingRecord(
                    posting_transfer_id(payment_id, index),
                    posting.from_wallet_id,
                    posting.to_wallet_id,
                    amount,
                    posting.metadata,
                )
            )
        now_us = self._clock_us()
        requested = PaymentRecord(
            payment_id, tuple(stored_postings), PaymentPhase.DEBITING, currency, reference,
            metadata, actor, now_us, now_us,
        )  # fmt: skip
        while (running := self._driving.get(payment_id)) is not None:
            await asyncio.wait((running,))
        return await self._claimed(payment_id, lambda: self._open(requested))

    async def redrive(
        self, created_before_us: int, limit: int, owns: Callable[[PaymentRecord], bool]
    ) -> int:
        """Drive again up to ``limit`` payments not final created before the instant, those
        ``owns`` accepts (the first posting's sending wallet served here) and not driven
        here already; how many ended."""
        found = await asyncio.wait_for(
            self._log.pending_payments(created_before_us, limit), self._load_timeout_s
        )
        chosen = [p for p in found if p.payment_id not in self._driving and owns(p)]
        replies = await asyncio.gather(*(self._redrive_one(p) for p in chosen))
        return sum(1 for reply in replies if reply.outcome not in _UNAVAILABLE_CODES)

    async def _redrive_one(self, payment: PaymentRecord) -> PaymentReply:
        if payment.payment_id in self._driving:  # a request took it meanwhile
            return _UNAVAILABLE
        return await self._claimed(
            payment.payment_id, lambda: self._drive(payment, True, DRIVER_REDRIVE)
        )

    # -- the drive -----------------------------------------------------------------------

    async def _claimed(
        self, payment_id: UUID, work: Callable[[], Awaitable[PaymentReply]]
    ) -> PaymentReply:
        return await run_claimed(self._driving, payment_id, work, _UNAVAILABLE)

    async def _open(self, requested: PaymentRecord) -> PaymentReply:
        try:
            stored = await self._opens.submit(requested)
        except StorageError:
            return _UNAVAILABLE
        replayed = stored.created_at_us != requested.created_at_us
        if replayed and not stored.same_request(requested):
            return PaymentReply(Outcome.IDEMPOTENCY_KEY_REUSED)
        if not replayed and (done := await self._joint(stored)) is not None:
            return done
        return await self._drive(stored, replayed, DRIVER_REQUEST)

    async def _joint(self, payment: PaymentRecord) -> PaymentReply | None:
        """A payment just opened here whose wallets one pipeline of this process owns: every
        posting's debit and credit in one commit (``JointPayment``), then its decision (a
        CREDITING that finds them COMPLETED). None when not taken whole (a refusal among
        them, another pipeline, an outcome unknown): the saga then goes on, its keyed legs
        replaying whatever the joint commit wrote."""
        count = len(payment.postings)
        reply = await self._delivery.deliver_joint_payment(
            [_transfer(payment, i) for i in range(count)]
        )
        if reply is None or reply.outcome is not Outcome.OK:
            return None
        done = tuple(p._replace(status=TransferStatus.COMPLETED) for p in payment.postings)
        try:
            decided = await self._decide(
                payment._replace(postings=done), PaymentPhase.CREDITING, None, None, None,
                self._clock_us(),
            )  # fmt: skip
        except StorageError:
            return _UNAVAILABLE  # COMPLETED postings, DEBITING: the re-drive decides it
        if decided is None or decided.status is not PaymentStatus.COMPLETED:
            return None
        self._observer.transfer_ended("PAYMENT_COMPLETED", DRIVER_REQUEST)
        return _final(decided, False)

    async def _drive(self, payment: PaymentRecord, replayed: bool, driver: str) -> PaymentReply:
        if payment.phase is PaymentPhase.DEBITING:
            decided = await self._debit(payment)
            if decided is None:
                return _UNAVAILABLE
            payment = decided
        if payment.status is not PaymentStatus.PENDING:
            return _final(payment, replayed)
        kind = (
            OperationKind.TRANSFER_IN
            if payment.phase is PaymentPhase.CREDITING
            else OperationKind.TRANSFER_REFUND
        )
        code = None if kind is OperationKind.TRANSFER_IN else Outcome.PAYMENT_FAILED.value
        todo = [i for i, p in enumerate(payment.postings) if p.status is TransferStatus.PENDING]
        replies = await asyncio.gather(
            *(self._delivery.deliver(kind, _transfer(payment, i), code) for i in todo)
        )
        closed = (
            TransferStatus.COMPLETED
            if kind is OperationKind.TRANSFER_IN
            else (TransferStatus.FAILED)
        )
        postings = list(payment.postings)
        for index, reply in zip(todo, replies, strict=True):
            if reply.outcome is Outcome.OK:
                postings[index] = postings[index]._replace(status=closed, failure_code=code)
            elif reply.outcome is Outcome.BALANCE_LIMIT_EXCEEDED:
                _log.warning(
                    "payment %s: posting %d waits for room under the balance ceiling of %s",
                    payment.payment_id, index, postings[index].to_wallet_id
                    if kind is OperationKind.TRANSFER_IN else postings[index].from_wallet_id,
                )  # fmt: skip
        payment = payment._replace(postings=tuple(postings))
        if payment.status is PaymentStatus.PENDING:
            return _UNAVAILABLE
        self._observer.transfer_ended("PAYMENT_" + payment.status.name, driver)
        return _final(payment, replayed)

    async def _debit(self, payment: PaymentRecord) -> PaymentRecord | None:
        """Every posting not debited yet, at once; then the decision. None: not decided
        (an outcome unknown), the payment stays DEBITING."""
        todo = [i for i, p in enumerate(payment.postings) if p.status is None]
        debits = (
            self._delivery.deliver(OperationKind.TRANSFER_OUT, _transfer(payment, i)) for i in todo
        )
        replies: list[Reply] = list(await asyncio.gather(*debits))
        refused = next(
            ((i, r) for i, r in zip(todo, replies, strict=True) if r.outcome in _DEBIT_REFUSALS),
            None,
        )
        now_us = self._clock_us()
        try:
            if refused is not None:
                index, reply = refused
                return await self._decide(
                    payment, PaymentPhase.FAILING, index, reply.outcome.value,
                    reply.balance_seen, now_us,
                )  # fmt: skip
            if all(r.outcome is Outcome.OK for r in replies):
                return await self._decide(payment, PaymentPhase.CREDITING, None, None, None, now_us)
            # An outcome not known (or another driver decided FAILING meanwhile, which
            # storage refused our debit for): what storage holds says.
            stored = await self.read(payment.payment_id)
        except (StorageError, TimeoutError):
            return None
        if stored is None or stored.phase is PaymentPhase.DEBITING:
            return None
        return stored

    async def _decide(
        self,
        payment: PaymentRecord,
        phase: PaymentPhase,
        index: int | None,
        code: str | None,
        balance_seen: int | None,
        now_us: int,
    ) -> PaymentRecord | None:
        decided = await self._decisions.submit(
            PaymentDecision(payment, phase, index, code, balance_seen, now_us)
        )
        if decided is None:  # refused by storage: a posting not PENDING (nothing written)
            _log.warning("payment %s could not be decided %s", payment.payment_id, phase.name)
        return decided


def _transfer(payment: PaymentRecord, index: int) -> TransferRecord:
    posting = payment.postings[index]
    return TransferRecord(
        posting.transfer_id, posting.from_wallet_id, posting.to_wallet_id, posting.amount,
        payment.reference, TransferStatus.PENDING, None, payment.created_at_us,
        payment.created_at_us, payment.actor, payment.currency, posting.metadata,
        payment_id=payment.payment_id, payment_index=index,
    )  # fmt: skip


def _final(payment: PaymentRecord, replayed: bool) -> PaymentReply:
    if payment.status is PaymentStatus.COMPLETED:
        return PaymentReply(Outcome.OK, payment, replayed)
    assert payment.failure_code is not None
    assert payment.failed_index is not None
    return PaymentReply(
        Outcome(payment.failure_code), payment, replayed, payment.failed_index,
        payment.failed_side or SIDE_FROM, payment.balance_seen, payment.currency,
    )  # fmt: skip

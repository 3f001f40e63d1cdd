"""Transfers between wallets: a saga of one-shard commits, with its in-flight money visible.

The shard that owns the sending wallet coordinates (docs/ARCHITECTURE.md, "Transfers")::

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
    re-drive loop:   every PENDING transfer older than one interval is driven again
                     (commits 2/3 are keyed by the transfer id: a second copy is impossible)

Every leg goes through ``LegDelivery``, the port "deliver this leg to the owner of its
wallet". ``LocalLegDelivery`` submits it to a shard of this process; when shards live in
several processes, a delivery that forwards the leg to the owning process is the one class
to add (the HTTP forwarding of the scale-out work).

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
from collections.abc import Callable
from typing import NamedTuple
from uuid import UUID

from walletd.engine.commands import JointTransfer, Outcome, Reply, TransferLeg
from walletd.engine.errors import EngineRefused
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus
from walletd.engine.observer import DRIVER_REDRIVE, DRIVER_REQUEST, EngineObserver
from walletd.engine.ports import StorageError, StorageUnavailable, WalletLog

__all__ = [
    "SIDE_FROM",
    "SIDE_TO",
    "LegDelivery",
    "LocalLegDelivery",
    "TransferCoordinator",
    "TransferReply",
]

_log = logging.getLogger("walletd.engine")

SIDE_FROM = "from"
SIDE_TO = "to"

# Refusals of the credit leg that end the transfer FAILED (the debit refunded). Any other
# answer (503) leaves it PENDING, to be driven again.
_FINAL_CREDIT_REFUSALS = frozenset({Outcome.WALLET_NOT_FOUND, Outcome.BALANCE_LIMIT_EXCEEDED})


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


_UNAVAILABLE = TransferReply(Outcome.UNAVAILABLE)


class LegDelivery(abc.ABC):
    """Port: deliver one leg of a transfer to the owner of its wallet; return its reply.

    Contract: the reply is the leg's committed outcome (OK, possibly replayed), a business
    refusal (nothing written), or UNAVAILABLE (not applied, or unknown). Never raises for a
    refusal of the owner to take the leg (overload, stopping): that is UNAVAILABLE too.
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

    async def deliver_joint(self, transfer: TransferRecord) -> Reply | None:
        """Both legs of a new transfer in one commit (``JointTransfer``), when one pipeline
        owns both wallets; None when it cannot (then the legs go one by one)."""
        return None


class LocalLegDelivery(LegDelivery):
    """Delivers legs to the shards of this process (every shard, until shards move)."""

    def __init__(
        self,
        submit: Callable[[TransferLeg], None],
        submit_joint: Callable[[JointTransfer], bool] | None = None,
    ) -> None:
        self._submit = submit
        # Submits both legs when one pipeline owns both wallets, else returns False.
        self._submit_joint = submit_joint

    async def deliver(
        self,
        kind: OperationKind,
        transfer: TransferRecord,
        failure_code: str | None = None,
        *,
        fresh: bool = False,
    ) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            self._submit(TransferLeg(kind, transfer, future, failure_code, fresh=fresh))
        except EngineRefused:
            return Reply(Outcome.UNAVAILABLE)
        return await future

    async def deliver_joint(self, transfer: TransferRecord) -> Reply | None:
        if self._submit_joint is None:
            return None
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        try:
            if not self._submit_joint(JointTransfer(transfer, future)):
                return None
        except EngineRefused:
            # Not taken (another process serves the sender, overload, stopping): nothing
            # was applied; the legs' own path decides what to do, as without this shortcut.
            return None
        return await future


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
                found = await asyncio.wait_for(self._log.load_transfers(ids), self._timeout_s)
            except TimeoutError:
                error = StorageUnavailable("loading transfers timed out")
            except StorageError as storage_error:
                error = storage_error
            except Exception as unexpected:  # never leave a waiter hanging
                _log.error("loading transfers raised", exc_info=unexpected)
                error = StorageError(f"loading transfers failed: {unexpected!r}")
            for transfer_id, futures in wave.items():
                for future in futures:
                    if future.done():  # its caller went away
                        continue
                    if error is None:
                        future.set_result(found.get(transfer_id))
                    else:
                        future.set_exception(error)


class TransferCoordinator:
    def __init__(
        self,
        log: WalletLog,
        delivery: LegDelivery,
        load_timeout_s: float,
        lookup_ids_max: int = 1024,
        observer: EngineObserver | None = None,
    ) -> None:
        self._log = log
        self._observer = observer or EngineObserver()
        self._delivery = delivery
        self._load_timeout_s = load_timeout_s
        self._loads = _CoalescedLoads(log, load_timeout_s, lookup_ids_max)
        # Transfers being driven in this process, by id; an entry lives while one request
        # or re-drive works on it, so the dict is bounded by the requests in flight plus
        # one re-drive batch.
        self._driving: dict[UUID, asyncio.Future[TransferReply]] = {}

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
    ) -> TransferReply:
        """Move ``amount`` between two wallets; the id is the request's idempotency key.

        ``fresh_id``: the id was just drawn at random (no client id, no key), so it cannot be
        stored yet and the lookup by id is skipped (one query less per transfer).
        """
        requested = TransferRecord(
            transfer_id, from_wallet_id, to_wallet_id, amount, reference,
            TransferStatus.PENDING, None, 0, 0,
        )  # fmt: skip
        while (running := self._driving.get(transfer_id)) is not None:
            # The same id is being worked on: wait for it, then answer from storage as a
            # replay (or as a reuse of the id with another request).
            await asyncio.wait((running,))
        future = self._claim(transfer_id)
        try:
            reply = await self._transfer(requested, fresh_id=fresh_id)
        except BaseException:
            future.set_result(_UNAVAILABLE)
            raise
        finally:
            del self._driving[transfer_id]
        future.set_result(reply)
        return reply

    async def read(self, transfer_id: UUID) -> TransferRecord | None:
        """The stored transfer (raises ``StorageError`` when storage is away)."""
        return await self._loads.load(transfer_id)

    async def redrive(self, created_before_us: int, limit: int) -> int:
        """Drive again up to ``limit`` PENDING transfers created before the instant, at
        once; returns how many ended (COMPLETED or FAILED). Ones driven here already are
        left to their driver."""
        pending = await asyncio.wait_for(
            self._log.pending_transfers(created_before_us, limit), self._load_timeout_s
        )
        todo = [t for t in pending if t.transfer_id not in self._driving]
        replies = await asyncio.gather(*(self._redrive_one(t) for t in todo))
        return sum(1 for reply in replies if reply.outcome is not Outcome.UNAVAILABLE)

    # -- the saga ----------------------------------------------------------------------

    def _claim(self, transfer_id: UUID) -> asyncio.Future[TransferReply]:
        future: asyncio.Future[TransferReply] = asyncio.get_running_loop().create_future()
        self._driving[transfer_id] = future
        return future

    async def _redrive_one(self, transfer: TransferRecord) -> TransferReply:
        if transfer.transfer_id in self._driving:
            return _UNAVAILABLE
        future = self._claim(transfer.transfer_id)
        try:
            reply = await self._drive(transfer, replayed=True, driver=DRIVER_REDRIVE)
        except BaseException:
            future.set_result(_UNAVAILABLE)
            raise
        finally:
            del self._driving[transfer.transfer_id]
        future.set_result(reply)
        return reply

    async def _transfer(self, requested: TransferRecord, *, fresh_id: bool) -> TransferReply:
        if not fresh_id:
            try:
                stored = await self.read(requested.transfer_id)
            except StorageError:
                return _UNAVAILABLE
            if stored is not None:
                return await self._resume(stored, requested)
        # Fresh either way: the id was just drawn, or storage had no transfer under it (a
        # debit stored since by another process's driver is caught by the ledger's key
        # cache at the wallet's owner, else by the transfers' primary key). Both legs in
        # one commit when one pipeline owns both wallets.
        debit = await self._delivery.deliver_joint(requested)
        if debit is None:
            debit = await self._delivery.deliver(OperationKind.TRANSFER_OUT, requested, fresh=True)
        elif debit.outcome is Outcome.UNAVAILABLE:
            # The joint commit's outcome is unknown: it wrote both legs or nothing, and no
            # one else drives a transfer that is not stored; storage tells which.
            return await self._answer_from_storage(requested, replayed=False)
        if debit.outcome is not Outcome.OK:
            return TransferReply(debit.outcome, side=SIDE_FROM, balance_seen=debit.balance_seen)
        if debit.replayed:  # another process opened it meanwhile: answer from storage
            return await self._transfer(requested, fresh_id=False)
        assert debit.wallet is not None
        opened_us = debit.wallet.updated_at_us
        opened = requested._replace(created_at_us=opened_us, updated_at_us=opened_us)
        if debit.items:  # credited in the same commit
            credit = debit.items[0]
            assert credit.wallet is not None
            self._observer.transfer_ended(TransferStatus.COMPLETED.name, DRIVER_REQUEST)
            return TransferReply(
                Outcome.OK,
                opened._replace(
                    status=TransferStatus.COMPLETED, updated_at_us=credit.wallet.updated_at_us
                ),
            )
        return await self._drive(opened, replayed=False, driver=DRIVER_REQUEST, fresh=True)

    async def _resume(self, stored: TransferRecord, requested: TransferRecord) -> TransferReply:
        """A known id: the original answer for the same request, else IDEMPOTENCY_KEY_REUSED."""
        if (stored.from_wallet_id, stored.to_wallet_id, stored.amount, stored.reference) != (
            requested.from_wallet_id, requested.to_wallet_id, requested.amount,
            requested.reference,
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
    )

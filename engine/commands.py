"""Commands a shard accepts, and the replies it sends back.

A command carries its reply future (the pykka envelope idea); the shard resolves it only
after the batch holding the command has committed, refusals included, because a refusal
depends on the operations ahead of it.
"""

from __future__ import annotations

import asyncio
import enum
from typing import NamedTuple
from uuid import UUID

from walletd.engine.model import OperationKind, WalletView

__all__ = [
    "ApplyOperation",
    "Command",
    "CreateWallet",
    "Outcome",
    "ReadWallet",
    "Reply",
]


class Outcome(enum.Enum):
    OK = "OK"
    CREATED = "CREATED"
    WALLET_NOT_FOUND = "WALLET_NOT_FOUND"
    WALLET_ALREADY_EXISTS = "WALLET_ALREADY_EXISTS"
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    BALANCE_LIMIT_EXCEEDED = "BALANCE_LIMIT_EXCEEDED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    UNAVAILABLE = "UNAVAILABLE"


class Reply(NamedTuple):
    outcome: Outcome
    wallet: WalletView | None = None
    replayed: bool = False
    # For refusals: the balance the decision was made against (INSUFFICIENT_FUNDS detail).
    balance_seen: int | None = None


class ApplyOperation:
    __slots__ = ("amount", "idempotency_key", "kind", "reply", "wallet_id")

    def __init__(
        self,
        wallet_id: UUID,
        kind: OperationKind,
        amount: int,
        idempotency_key: str | None,
        reply: asyncio.Future[Reply],
    ) -> None:
        self.wallet_id = wallet_id
        self.kind = kind
        self.amount = amount
        self.idempotency_key = idempotency_key
        self.reply = reply


class CreateWallet:
    __slots__ = ("fingerprint", "idempotency_key", "reply", "wallet_id")

    def __init__(
        self,
        wallet_id: UUID,
        idempotency_key: str | None,
        fingerprint: str,
        reply: asyncio.Future[Reply],
    ) -> None:
        self.wallet_id = wallet_id
        self.idempotency_key = idempotency_key
        # What distinguishes one creation request from another under the same key.
        self.fingerprint = fingerprint
        self.reply = reply


class ReadWallet:
    """A read of a wallet that is not resident: the shard loads it, then answers."""

    __slots__ = ("reply", "wallet_id")

    def __init__(self, wallet_id: UUID, reply: asyncio.Future[Reply]) -> None:
        self.wallet_id = wallet_id
        self.reply = reply


Command = ApplyOperation | CreateWallet | ReadWallet

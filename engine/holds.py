"""Holds outside the ledger: their ids, the identity of a request, and answers decided
from the stored hold (docs/ARCHITECTURE.md, "Holds").

A hold lives on its wallet's shard: its PENDING state is in the ledger beside the wallet
(engine/ledger.py), and its id is drawn so that ``shard_of(hold id) == shard_of(wallet
id)``. So ``/api/v1/holds/{id}/...`` routes, by the id in the path, to the wallet's owner
with the routing and forwarding wallets use (HAProxy's hash, NotOwner forwarding).

- Without a key the id is a random version 4 id whose last 12 hex digits are drawn again
  until it lands on the wallet's shard (``random_id_on_shard``: on average
  ``shard_count`` tries, each a CRC of 12 characters).
- With an Idempotency-Key it is uuid5(HOLD_KEY_NAMESPACE, "<wallet>:<counter>:<key>") for
  counter 0, 1, ... until it lands there: deterministic, so a retry finds the same hold.
  A creation key's scope is therefore the wallet (like an operation's).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Final
from uuid import UUID

import orjson

from walletd.engine.commands import HoldAction, Outcome, Reply
from walletd.engine.ids import uuid_with_version
from walletd.engine.model import NO_METADATA, HoldRecord, HoldStatus, Metadata
from walletd.engine.money import EDGE_SCALE_MIN
from walletd.engine.ownership import random_id_on_shard, shard_of, shard_of_unremembered

__all__ = [
    "CAPTURE_TRANSFER_NAMESPACE",
    "HOLD_ID_TRIES_MAX",
    "HOLD_KEY_NAMESPACE",
    "capture_transfer_id",
    "create_fingerprint",
    "fingerprint_amount",
    "is_derived_transfer_id",
    "new_hold_id",
    "replay_creation",
    "resolve_fingerprint",
    "resolved_reply",
]

HOLD_KEY_NAMESPACE: Final = UUID("3c8e7b21-5d4a-4f6e-8b19-2a7d9e0c6f53")
# A capture into another wallet opens the transfer uuid5(namespace, hold id), its version
# field set to 8: one per hold, as a hold resolves once. Anyone can compute it from the
# hold id, so it must be an id no client can take first (a transfer stored under it would
# make the capture's commit refused forever): version-8 ids are reserved to walletd. The
# edge refuses a chosen transfer id of version 8 (422, docs/API.md "Transfers"), and the
# ledger refuses a debit leg (the only other thing that opens a transfer) under one. The
# other ids of transfers are never version 8: uuid4 (drawn), uuid5 (from a key), or chosen.
CAPTURE_TRANSFER_NAMESPACE: Final = UUID("8d2e5f14-7a3b-4c9d-b6e1-0f4a2c7d9e85")
_DERIVED_VERSION: Final = 8
# Draws until a hold id lands on its wallet's shard: the chance that 4096 shards need more
# than this many is below 1e-10; past it the request is refused, never looped forever.
HOLD_ID_TRIES_MAX: Final = 100_000

_ALREADY: Final = {
    HoldStatus.CAPTURED: Outcome.HOLD_ALREADY_CAPTURED,
    HoldStatus.VOIDED: Outcome.HOLD_ALREADY_VOIDED,
    HoldStatus.EXPIRED: Outcome.HOLD_EXPIRED,
}


class HoldIdUnavailable(Exception):
    """No hold id on the wallet's shard within HOLD_ID_TRIES_MAX draws."""


def new_hold_id(wallet_id: UUID, key: str | None, shard_count: int) -> UUID:
    target = shard_of(wallet_id, shard_count)
    if key is None:
        hold_id = random_id_on_shard(target, shard_count, HOLD_ID_TRIES_MAX)
        if hold_id is not None:
            return hold_id
    else:
        # uuid.uuid5(HOLD_KEY_NAMESPACE, "<wallet>:<counter>:<key>") for counter 0, 1, ...,
        # with the SHA-1 of the namespace and "<wallet>:" taken once and copied for each
        # counter; the candidates' shards are not remembered (most are thrown away).
        common = hashlib.sha1(HOLD_KEY_NAMESPACE.bytes + f"{wallet_id}:".encode())
        suffix = f":{key}".encode()
        for counter in range(HOLD_ID_TRIES_MAX):
            digest = common.copy()
            digest.update(b"%d" % counter + suffix)
            hold_id = uuid_with_version(int.from_bytes(digest.digest()[:16]), 5)
            if shard_of_unremembered(hold_id, shard_count) == target:
                return hold_id
    raise HoldIdUnavailable(f"no hold id on shard {target} in {HOLD_ID_TRIES_MAX} draws")


def create_fingerprint(
    amount: int | str,
    expires_in_s: int | None,
    reference: str | None,
    metadata: Metadata = NO_METADATA,
) -> str:
    """What a creation request was, as sent (an omitted expires_in_s is not the default).
    Metadata is spelled only when there is some, so a hold created before metadata existed
    keeps its fingerprint."""
    if metadata:
        return orjson.dumps([amount, expires_in_s, reference, metadata]).decode()
    return orjson.dumps([amount, expires_in_s, reference]).decode()


def fingerprint_amount(amount: int, scale: int | None) -> int | str:
    """An amount as a fingerprint holds it: the integer at the edge's usual scale (as
    before wallets had currencies, so fingerprints stored then still match), else
    "<integer>e-<scale>" (the edge writes each amount at one scale only)."""
    if scale is None or scale == EDGE_SCALE_MIN:
        return amount
    return f"{amount}e-{scale}"


def capture_transfer_id(hold_id: UUID) -> UUID:
    # uuid5's bits with the version field changed (the variant stays RFC 4122's).
    derived = uuid.uuid5(CAPTURE_TRANSFER_NAMESPACE, str(hold_id)).int
    return uuid_with_version(derived, _DERIVED_VERSION)


def is_derived_transfer_id(transfer_id: UUID) -> bool:
    """Whether the id is in the space reserved to ids walletd derives (``capture_transfer_id``)."""
    return transfer_id.version == _DERIVED_VERSION


def resolve_fingerprint(
    action: HoldAction, amount: int | str | None, to_wallet_id: UUID | None = None
) -> str:
    """What a capture or void request was, as sent (an omitted amount is "all of it")."""
    if to_wallet_id is None:
        return orjson.dumps([action.value, amount]).decode()
    return orjson.dumps([action.value, amount, str(to_wallet_id)]).decode()


def replay_creation(stored: HoldRecord, fingerprint: str) -> Reply:
    """A keyed creation whose hold exists: the original answer (the hold as it is now), or
    IDEMPOTENCY_KEY_REUSED for another request under the same key."""
    if stored.create_fingerprint != fingerprint:
        return Reply(Outcome.IDEMPOTENCY_KEY_REUSED, hold=stored)
    return Reply(Outcome.CREATED, hold=stored, replayed=True)


def resolved_reply(stored: HoldRecord, key: str | None, fingerprint: str) -> Reply:
    """A capture or void of a hold that is no longer PENDING. The request that resolved it,
    retried with its Idempotency-Key, gets the original answer; the same key with another
    request is IDEMPOTENCY_KEY_REUSED; anything else is refused by the hold's status."""
    if key is not None and stored.resolve_key == key:
        if stored.resolve_fingerprint != fingerprint:
            return Reply(Outcome.IDEMPOTENCY_KEY_REUSED, hold=stored)
        return Reply(Outcome.OK, hold=stored, replayed=True)
    return Reply(_ALREADY[stored.status], hold=stored)

"""What storage holds, field by field: the ledger refuses anything past it before it joins a
batch, so that what the ledger accepts, storage accepts (one command never fails a batch).

Each bound mirrors a constraint of persistence/migrations/*.sql or a column's type:

    field                                   storage                          here
    amount (log rows, refusals, transfers,  CHECK amount > 0 AND             AMOUNT_MINOR_MAX
      holds)                                  amount <= 10^14; a WALLET_UPDATE (engine/money.py)
                                              row's amount = 0
    balance, balance_after                  CHECK -10^17 <= x <= 10^17       BALANCE_MINOR_MAX
    balance_seen (refusals)                 CHECK 0 <= x <= 2 * 10^17        (available money)
    held                                    CHECK held >= 0; deferred        ledger invariant
                                              trigger: balance - held >=
                                              -overdraft_limit
    overdraft_limit (wallets, WALLET_UPDATE CHECK 0 <= x <= 10^14            OVERDRAFT_LIMIT_
      rows), status                           status 1..3                      MINOR_MAX (money.py)
    idempotency_key, create_idempotency_key CHECK char_length BETWEEN 1..255 KEY_LENGTH_MAX
    reference (log rows, refusals,          CHECK char_length <= 255         REFERENCE_LENGTH_MAX
      transfers, holds)
    actor (log rows)                        CHECK char_length(actor) <= 64   ACTOR_LENGTH_MAX
    metadata (wallets, log rows, refusals)  CHECK walletd_metadata_ok: an    METADATA_*_MAX:
                                              object of strings, <= 50 keys,   KEYS 50, KEY_LENGTH
                                              key 1..40, value <= 500 chars    40, VALUE_LENGTH 500
    kind (log rows / refusals)              CHECK 1..9 / IN (1, 2, 3, 6)     the command's type
    transfers: from <> to, failure_code     CHECK from_wallet_id <>          ledger (legs)
      set only when FAILED                    to_wallet_id, (status = 3) =
                                              (failure_code IS NOT NULL)
    expires_at (holds)                      timestamptz                      the hold expiry
                                                                             limit (EngineLimits)
    any text                                UTF-8 text: no NUL, no lone      storable_text
                                              surrogate (neither encodes)

Unique ids and keys (a transfer id, a hold id, a wallet id, a key per wallet) are kept apart
by construction (engine/holds.py, engine/commands.py) and by the key cache; what storage
still refuses is isolated by the pipeline (engine/shard.py).
"""

from __future__ import annotations

import re
from typing import Final

from walletd.engine.money import AMOUNT_MINOR_MAX

__all__ = [
    "ACTOR_LENGTH_MAX",
    "AMOUNT_MINOR_MAX",
    "KEY_LENGTH_MAX",
    "METADATA_KEYS_MAX",
    "METADATA_KEY_LENGTH_MAX",
    "METADATA_PATCH_KEYS_MAX",
    "METADATA_VALUE_LENGTH_MAX",
    "REFERENCE_LENGTH_MAX",
    "storable_amount",
    "storable_metadata",
    "storable_metadata_patch",
    "storable_text",
]

KEY_LENGTH_MAX: Final = 255
# A key's name (http/keys.py's KEY_NAME_PATTERN allows 64); a leg carries it on the wire.
ACTOR_LENGTH_MAX: Final = 64
REFERENCE_LENGTH_MAX: Final = 255
# A metadata object (wallets, operations, transfers, holds): Stripe's bounds. The largest
# is 50 * (40 + 500) characters: ~27 KB of ASCII JSON, inside the default body bound.
METADATA_KEYS_MAX: Final = 50
METADATA_KEY_LENGTH_MAX: Final = 40
METADATA_VALUE_LENGTH_MAX: Final = 500
# A change of a wallet's metadata (PATCH) names at most this many keys: every key of a full
# wallet deleted and as many set, a whole replacement in one request.
METADATA_PATCH_KEYS_MAX: Final = 2 * METADATA_KEYS_MAX
_SURROGATE: Final = re.compile("[\ud800-\udfff]")


def storable_amount(amount: int) -> bool:
    return 0 < amount <= AMOUNT_MINOR_MAX


def storable_metadata(metadata: tuple[tuple[str, str], ...]) -> bool:
    """Whether storage takes a metadata object (``engine.model.Metadata``: its pairs sorted
    by key, so no key twice): the counts and lengths above, every key and value a text
    PostgreSQL's jsonb holds (no NUL, no lone surrogate)."""
    if len(metadata) > METADATA_KEYS_MAX:
        return False
    previous: str | None = None
    for pair in metadata:
        if type(pair) is not tuple or len(pair) != 2:
            return False
        key, value = pair
        if type(key) is not str or type(value) is not str:
            return False
        if previous is not None and key <= previous:  # sorted, each key once
            return False
        previous = key
        if not (
            storable_text(key, 1, METADATA_KEY_LENGTH_MAX)
            and storable_text(value, 0, METADATA_VALUE_LENGTH_MAX)
        ):
            return False
    return True


def storable_metadata_patch(patch: tuple[tuple[str, str | None], ...]) -> bool:
    """Whether a change of a wallet's metadata (``engine.model.MetadataPatch``) is one
    storage could hold once merged: at most ``METADATA_PATCH_KEYS_MAX`` keys, sorted, each
    once, each key as a metadata key and each value a metadata value or None (a delete).
    How many keys the merge leaves is the ledger's check (it knows the wallet's)."""
    if len(patch) > METADATA_PATCH_KEYS_MAX:
        return False
    previous: str | None = None
    for pair in patch:
        if type(pair) is not tuple or len(pair) != 2:
            return False
        key, value = pair
        if type(key) is not str or (value is not None and type(value) is not str):
            return False
        if previous is not None and key <= previous:
            return False
        previous = key
        if not storable_text(key, 1, METADATA_KEY_LENGTH_MAX) or (
            value is not None and not storable_text(value, 0, METADATA_VALUE_LENGTH_MAX)
        ):
            return False
    return True


def storable_text(text: str, length_min: int, length_max: int) -> bool:
    """Whether a UTF-8 PostgreSQL ``text`` column takes it within the length bounds (in
    characters, as ``char_length`` counts): neither NUL nor a lone surrogate encodes."""
    if not length_min <= len(text) <= length_max or "\x00" in text:
        return False
    return text.isascii() or _SURROGATE.search(text) is None

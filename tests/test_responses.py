"""Rendering at the edge: the hand-written wallet body equals the encoder's, exactly."""

from __future__ import annotations

from decimal import Decimal
from uuid import UUID

import orjson
from hypothesis import given
from hypothesis import strategies as st

from walletd.engine.model import WalletView
from walletd.engine.money import BALANCE_MINOR_MAX, SEED_CURRENCY, Currency, format_minor
from walletd.http.responses import format_timestamp, wallet_body

# From 1970 to 9999-12-31, the range RFC 3339 years can take.
micros = st.integers(min_value=0, max_value=253_402_300_799_999_999)


@given(
    wallet_id=st.uuids(),
    balance=st.integers(min_value=0, max_value=BALANCE_MINOR_MAX),
    held_share=st.floats(min_value=0, max_value=1),
    seq=st.integers(min_value=0, max_value=2**63 - 1),
    created=micros,
    updated=micros,
    currency=st.sampled_from(
        [SEED_CURRENCY, Currency("JPY", 0), Currency("BHD", 3), Currency("TOKEN", 18)]
    ),
)
def test_wallet_body_is_the_json_encoding_of_the_seed_fields(
    wallet_id: UUID,
    balance: int,
    held_share: float,
    seq: int,
    created: int,
    updated: int,
    currency: Currency,
) -> None:
    """wallet_body writes the same bytes orjson makes of the seed's four fields plus
    available, held and currency, for any wallet, its money in its currency's decimals."""
    held = int(balance * held_share)
    view = WalletView(wallet_id, balance, seq, created, updated, held, currency)
    exponent = currency.exponent
    fields = {
        "id": str(wallet_id),
        "balance": format_minor(balance, exponent),
        "available": format_minor(balance - held, exponent),
        "held": format_minor(held, exponent),
        "currency": currency.code,
        "created_at": format_timestamp(created),
        "updated_at": format_timestamp(updated),
    }
    assert wallet_body(view) == orjson.dumps(fields)
    shown = orjson.loads(wallet_body(view))["balance"]
    assert Decimal(shown) == Decimal(balance).scaleb(-exponent)
    assert len(shown.partition(".")[2]) == exponent  # exactly the currency's decimals


def test_timestamps_are_rfc3339_utc_with_microseconds() -> None:
    """The per-second cache renders the same text as a fresh computation would."""
    assert format_timestamp(0) == "1970-01-01T00:00:00.000000Z"
    assert format_timestamp(1_737_280_800_123_456) == "2025-01-19T10:00:00.123456Z"
    assert format_timestamp(1_737_280_800_999_999) == "2025-01-19T10:00:00.999999Z"
    assert format_timestamp(1_737_280_801_000_000) == "2025-01-19T10:00:01.000000Z"

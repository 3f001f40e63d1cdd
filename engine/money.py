"""Money is integer minor units inside walletd; decimals exist only at the HTTP edge.

A wallet holds one currency (``Currency``: a code and its exponent, the number of decimals
of its minor unit: JPY 0, USD 2, BHD 3, an operator's token up to 18). Its balance and
every amount of its log are integers in that currency's minor units.

The limits are in minor units, the same for every currency, chosen so that no balance,
amount or sum of a wallet's log can overflow PostgreSQL's ``bigint`` (9.2e18): a balance is
at most 10^17 minor units, an amount at most 10^14. In whole units that is
10^(17 - exponent) and 10^(14 - exponent): 10^15 and 10^12 for a two-decimal currency,
10^17 and 10^14 for JPY, 10^14 and 10^11 for BHD, but only 0.1 and 0.0001 of an
18-decimal token (docs/API.md, "Currencies", states them per exponent).
"""

from __future__ import annotations

import functools
from typing import Final, NamedTuple

__all__ = [
    "AMOUNT_MINOR_MAX",
    "BALANCE_MINOR_MAX",
    "EDGE_SCALE_MIN",
    "EXPONENT_MAX",
    "MINOR_UNITS_PER_UNIT",
    "OVERDRAFT_LIMIT_MINOR_MAX",
    "SEED_CURRENCY",
    "Currency",
    "currency_of",
    "format_minor",
    "to_minor",
]


class Currency(NamedTuple):
    """A wallet's currency: an ISO 4217 code or an operator-declared asset, and its
    exponent. Immutable for the life of a wallet: it may be cached anywhere."""

    code: str
    exponent: int


@functools.lru_cache(maxsize=1024)
def currency_of(code: str, exponent: int) -> Currency:
    """One shared Currency object per (code, exponent) read from storage or the wire: a
    resident wallet keeps a reference, not a copy. Bounded: past 1024 distinct currencies
    they are merely not shared."""
    return Currency(code, exponent)


EXPONENT_MAX: Final = 18
# The currency of every wallet created before wallets had one (the seed's two decimals),
# and the default of the default currency (cli/config.py).
SEED_CURRENCY: Final = Currency("USD", 2)
MINOR_UNITS_PER_UNIT: Final = 100  # of SEED_CURRENCY
AMOUNT_MINOR_MAX: Final = 10**14  # 1,000,000,000,000.00 per operation in SEED_CURRENCY
BALANCE_MINOR_MAX: Final = 10**17  # 1,000,000,000,000,000.00 per wallet in SEED_CURRENCY
# The edge reads an amount as an integer at a scale (decimals) of at least this, so that
# for a two-decimal wallet it is already in minor units (nothing to rescale on the hot path).
EDGE_SCALE_MIN: Final = SEED_CURRENCY.exponent
_POWERS: Final[tuple[int, ...]] = tuple(10**n for n in range(EXPONENT_MAX + 1))

# How far below zero a wallet's overdraft limit may let its balance go: up to the largest
# amount (10^14 minor units of the wallet's currency), so balance + limit and
# balance - held all fit bigint.
OVERDRAFT_LIMIT_MINOR_MAX: Final = AMOUNT_MINOR_MAX

assert AMOUNT_MINOR_MAX <= BALANCE_MINOR_MAX < 2**63 - 1
assert BALANCE_MINOR_MAX + OVERDRAFT_LIMIT_MINOR_MAX < 2**63 - 1
assert 10**SEED_CURRENCY.exponent == MINOR_UNITS_PER_UNIT


def format_minor(minor: int, exponent: int = 2) -> str:
    """Render minor units as a decimal string with exactly ``exponent`` fractional digits."""
    if minor < 0:
        return "-" + format_minor(-minor, exponent)
    if exponent == 2:  # the hot path: most wallets
        units, cents = divmod(minor, 100)
        return f"{units}.{cents:02d}"
    if exponent == 0:
        return str(minor)
    units, fraction = divmod(minor, _POWERS[exponent])
    return f"{units}.{fraction:0{exponent}d}"


def to_minor(amount: int, scale: int, exponent: int) -> int | None:
    """``amount`` / 10^scale in minor units of an ``exponent`` currency, or None when it has
    more decimals than the currency (a non-zero digit past the exponent)."""
    if scale == exponent:
        return amount
    if scale < exponent:
        return amount * _POWERS[exponent - scale]
    minor, rest = divmod(amount, _POWERS[scale - exponent])
    return None if rest else minor

"""Money is integer minor units inside walletd; decimals exist only at the HTTP edge.

The limits are chosen so that no balance, amount or sum of a wallet's log can overflow
PostgreSQL's ``bigint`` (9.2e18): a balance is at most 10^17 minor units.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "AMOUNT_MINOR_MAX",
    "BALANCE_MINOR_MAX",
    "MINOR_UNITS_PER_UNIT",
    "OVERDRAFT_LIMIT_MINOR_MAX",
    "format_minor",
]

MINOR_UNITS_PER_UNIT: Final = 100
AMOUNT_MINOR_MAX: Final = 10**12 * MINOR_UNITS_PER_UNIT  # 1,000,000,000,000.00 per operation
BALANCE_MINOR_MAX: Final = 10**15 * MINOR_UNITS_PER_UNIT  # 1,000,000,000,000,000.00 per wallet

# How far below zero a wallet's overdraft limit may let its balance go: up to the largest
# amount (1,000,000,000,000.00), so balance + limit and balance - held all fit bigint.
OVERDRAFT_LIMIT_MINOR_MAX: Final = AMOUNT_MINOR_MAX

assert AMOUNT_MINOR_MAX <= BALANCE_MINOR_MAX < 2**63 - 1
assert BALANCE_MINOR_MAX + OVERDRAFT_LIMIT_MINOR_MAX < 2**63 - 1


def format_minor(minor: int) -> str:
    """Render minor units as a decimal string with exactly two fractional digits."""
    if minor < 0:  # a balance in overdraft
        return "-" + format_minor(-minor)
    units, cents = divmod(minor, MINOR_UNITS_PER_UNIT)
    return f"{units}.{cents:02d}"

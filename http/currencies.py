"""The currencies a wallet may be created in: ISO 4217, and the operator's own assets.

An ISO 4217 code's exponent (its minor unit: JPY 0, USD 2, BHD 3) comes from the
``iso4217`` package, which ships ISO's own published table (not CLDR's display digits,
which differ for a few codes, such as IQD: ISO 3, CLDR 0); codes ISO lists with no minor
unit (XAU, XXX and the other funds and metals) are not currencies a wallet can hold. An
operator declares further assets with their exponent, 0 to 18 (``WALLETD_ASSETS``, e.g.
``POINTS:0,TOKEN:18``); an asset may not reuse an ISO code.

A wallet's exponent is stored with it at creation (migration "wallet_currencies"), so a
later change of the table or of the declared assets never re-reads a stored balance.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Final

import iso4217

from walletd.engine.money import EXPONENT_MAX, SEED_CURRENCY, Currency

__all__ = ["ASSET_CODE_PATTERN", "Currencies", "parse_assets"]

# An asset's code: an upper-case letter, then 1 to 11 upper-case letters or digits (the
# storage CHECK wallets_currency_code takes the same).
ASSET_CODE_PATTERN: Final = "^[A-Z][A-Z0-9]{1,11}$"
_ASSET_CODE: Final = re.compile(ASSET_CODE_PATTERN.strip("^$"))
_ASSETS_MAX: Final = 64


def _iso_currencies() -> dict[str, Currency]:
    return {
        currency.code: Currency(currency.code, currency.exponent)
        for currency in iso4217.Currency
        if currency.exponent is not None
    }


def parse_assets(text: str) -> tuple[Currency, ...]:
    """``CODE:EXPONENT`` pairs separated by commas (empty: none); ValueError when malformed,
    an exponent outside 0..18, a code twice, more than 64, or an ISO 4217 code."""
    assets: dict[str, Currency] = {}
    iso = _iso_currencies()
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        code, colon, exponent_text = part.partition(":")
        if not colon or not _ASSET_CODE.fullmatch(code) or not exponent_text.isdigit():
            raise ValueError(f"{part!r} is not CODE:EXPONENT (code {ASSET_CODE_PATTERN})")
        exponent = int(exponent_text)
        if not 0 <= exponent <= EXPONENT_MAX:
            raise ValueError(f"{code}: the exponent must be 0 to {EXPONENT_MAX}")
        if code in iso or code in assets:
            raise ValueError(f"{code} is declared twice or is an ISO 4217 code")
        assets[code] = Currency(code, exponent)
    if len(assets) > _ASSETS_MAX:
        raise ValueError(f"at most {_ASSETS_MAX} assets")
    return tuple(assets.values())


class Currencies(Mapping[str, Currency]):
    """Code -> currency: ISO 4217's and the declared assets; ``default`` is the currency of a
    wallet created without one (``WALLETD_DEFAULT_CURRENCY``)."""

    def __init__(self, assets: tuple[Currency, ...] = (), default: str = SEED_CURRENCY.code):
        self._by_code = _iso_currencies()
        for asset in assets:
            self._by_code[asset.code] = asset
        found = self._by_code.get(default)
        if found is None:
            raise ValueError(f"the default currency {default!r} is neither ISO 4217 nor declared")
        self.default = found

    def __getitem__(self, code: str) -> Currency:
        return self._by_code[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_code)

    def __len__(self) -> int:
        return len(self._by_code)

"""What a load generator was told, per wallet, in integer cents — and the check against reality.

A client can only be sure of an operation's outcome when it got a definitive answer:
a 2xx means applied, a 4xx refusal (409 INSUFFICIENT_FUNDS, ...) means not applied. A 5xx,
a timeout, a dropped connection or a user killed mid-request leaves the outcome unknown
(docs/API.md, Errors: a commit whose outcome is unknown is 503 UNAVAILABLE). Those amounts
are kept apart as bounds, so the reconciliation is exact when nothing was uncertain and a
range check otherwise:

    acked_net - uncertain_withdraw  <=  balance - initial  <=  acked_net + uncertain_deposit

Pure module: standard library only, so the same code runs in Locust workers, on the master
and in unit tests.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = [
    "Ledger",
    "Mismatch",
    "Outcome",
    "WalletTally",
    "format_cents",
    "parse_cents",
    "reconcile",
    "reconcile_total",
]


class Outcome(enum.Enum):
    APPLIED = "applied"
    REFUSED = "refused"
    UNKNOWN = "unknown"


def parse_cents(text: str) -> int:
    """Parses a money string such as "1000.00" into integer cents, without floats."""
    sign = -1 if text.startswith("-") else 1
    digits = text.lstrip("+-")
    whole, _, fraction = digits.partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()) or len(fraction) > 2:
        raise ValueError(f"not a money string with at most 2 decimals: {text!r}")
    return sign * (int(whole) * 100 + int(fraction.ljust(2, "0") or "0"))


def format_cents(cents: int) -> str:
    """Renders integer cents as the API's decimal string ("12.05")."""
    sign = "-" if cents < 0 else ""
    whole, fraction = divmod(abs(cents), 100)
    return f"{sign}{whole}.{fraction:02d}"


@dataclass(slots=True)
class WalletTally:
    """Acknowledged and uncertain movements of one wallet, all in cents."""

    acked_net: int = 0
    uncertain_deposit: int = 0
    uncertain_withdraw: int = 0
    acked_ops: int = 0
    uncertain_ops: int = 0

    def add(self, other: WalletTally) -> None:
        self.acked_net += other.acked_net
        self.uncertain_deposit += other.uncertain_deposit
        self.uncertain_withdraw += other.uncertain_withdraw
        self.acked_ops += other.acked_ops
        self.uncertain_ops += other.uncertain_ops


@dataclass(slots=True)
class Ledger:
    """Per-wallet tallies of one process; mergeable across Locust workers."""

    wallets: dict[str, WalletTally] = field(default_factory=dict)

    def record(self, wallet_id: str, delta_cents: int, outcome: Outcome) -> None:
        """Records one operation: delta > 0 is a deposit, delta < 0 a withdrawal."""
        tally = self.wallets.setdefault(wallet_id, WalletTally())
        if outcome is Outcome.APPLIED:
            tally.acked_net += delta_cents
            tally.acked_ops += 1
        elif outcome is Outcome.UNKNOWN:
            if delta_cents > 0:
                tally.uncertain_deposit += delta_cents
            else:
                tally.uncertain_withdraw += -delta_cents
            tally.uncertain_ops += 1

    def merge(self, other: Ledger) -> None:
        for wallet_id, tally in other.wallets.items():
            self.wallets.setdefault(wallet_id, WalletTally()).add(tally)

    def to_wire(self) -> dict[str, list[int]]:
        """A plain dict for Locust's msgpack messages (no dataclasses on the wire)."""
        return {
            wallet_id: [
                t.acked_net,
                t.uncertain_deposit,
                t.uncertain_withdraw,
                t.acked_ops,
                t.uncertain_ops,
            ]
            for wallet_id, t in self.wallets.items()
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Iterable[int]]) -> Ledger:
        ledger = cls()
        for wallet_id, values in data.items():
            ledger.wallets[wallet_id] = WalletTally(*(int(v) for v in values))
        return ledger


@dataclass(frozen=True, slots=True)
class Mismatch:
    wallet_id: str
    expected_cents: int
    actual_cents: int | None
    tally: WalletTally

    def describe(self) -> str:
        actual = "unreadable" if self.actual_cents is None else format_cents(self.actual_cents)
        expected = format_cents(self.expected_cents)
        return (
            f"wallet {self.wallet_id}: balance {actual}, expected {expected}"
            f" (acked ops {self.tally.acked_ops}, uncertain ops {self.tally.uncertain_ops},"
            f" uncertain +{format_cents(self.tally.uncertain_deposit)}"
            f" -{format_cents(self.tally.uncertain_withdraw)})"
        )


def reconcile(
    ledger: Ledger,
    balances_cents: Mapping[str, int | None],
    initial_cents: Mapping[str, int],
    floors_cents: Mapping[str, int] | None = None,
) -> list[Mismatch]:
    """Returns every wallet whose read-back balance is outside what the acks allow, or
    below its floor (0, or minus its overdraft limit: ``floors_cents``)."""
    floors = floors_cents or {}
    mismatches: list[Mismatch] = []
    for wallet_id in sorted(set(ledger.wallets) | set(balances_cents)):
        tally = ledger.wallets.get(wallet_id, WalletTally())
        expected = initial_cents.get(wallet_id, 0) + tally.acked_net
        actual = balances_cents.get(wallet_id)
        low = expected - tally.uncertain_withdraw
        high = expected + tally.uncertain_deposit
        if actual is None or not (low <= actual <= high) or actual < floors.get(wallet_id, 0):
            mismatches.append(Mismatch(wallet_id, expected, actual, tally))
    return mismatches


def reconcile_total(
    ledger: Ledger,
    balances_cents: Mapping[str, int | None],
    initial_cents: Mapping[str, int],
    wallets: set[str] | None = None,
) -> str | None:
    """The global check: the sum of all balances is the initial sum plus the acknowledged
    net (transfers add nothing to it), within the uncertain amounts; None when it holds.
    ``wallets``: only these (one currency's: money never moves between currencies)."""
    if any(balance is None for balance in balances_cents.values()):
        return "some balances could not be read"
    actual = sum(b for b in balances_cents.values() if b is not None)
    tallies = [t for w, t in ledger.wallets.items() if wallets is None or w in wallets]
    expected = sum(initial_cents.values()) + sum(t.acked_net for t in tallies)
    low = expected - sum(t.uncertain_withdraw for t in tallies)
    high = expected + sum(t.uncertain_deposit for t in tallies)
    if low <= actual <= high:
        return None
    return (
        f"sum of balances {format_cents(actual)}, expected {format_cents(expected)} "
        f"(bounds {format_cents(low)}..{format_cents(high)})"
    )

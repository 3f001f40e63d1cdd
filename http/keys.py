"""Client API keys: a name, the scopes it holds, and a secret; the route scope table.

A key is declared as ``name:scope+scope:secret`` (``WALLETD_API_KEYS``, comma-separated,
or one per line in ``WALLETD_API_KEYS_FILE``). A bare secret (no ``:``), the form walletd
took before keys had names, holds every client scope and is named ``key-<position>``
(its 1-based position in the list, or its line in the file): a name that says nothing about
the secret. What each
scope allows::

    read     GET a wallet (now or as_of), its history, a transfer, a hold
    create   POST /api/v1/wallets (opens a wallet; moves no money)
    move     deposits and withdrawals, bulk, transfers, holds (create, capture, void)
    feed     the change feed: GET /api/v1/events and its SSE stream
    admin    PATCH /api/v1/wallets/{id}: freeze, unfreeze or close a wallet, set its
             overdraft limit (moves no money, but decides who may move it and how far);
             webhook subscriptions (/api/v1/webhooks): where the feed is sent, their
             attempts log and redelivery (moves no money, but sends every event out)

``admin`` is apart from every other scope: a key that moves money cannot lift a freeze or
grant itself credit. A bare secret holds every scope, ``admin`` included (it held every
scope before scopes existed); a named key holds ``admin`` only when declared with it.

``create`` is apart from ``move`` so that a key that opens wallets (onboarding) cannot move
money, and a key that moves money cannot grow the set of wallets; and every row that moves
money is answered for by a ``move`` key (docs/SECURITY.md, "Money cannot be minted").

Each route declares its scope beside its handler with ``@requires(Scope.X)``; the
declarations form one table (``ROUTE_SCOPES``), which the auth middleware reads and the app
factory checks (``check_route_scopes``): a protected route without a scope is refused at
start. Keys are compared in constant time over all keys (``KeyRing``).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TypeVar

from aiohttp import web

from walletd.engine.bounds import ACTOR_LENGTH_MAX

__all__ = [
    "API_KEYS_MAX",
    "KEY_NAME",
    "KEY_NAME_PATTERN",
    "ROUTE_SCOPES",
    "ApiKey",
    "KeyRing",
    "RateLimiter",
    "Scope",
    "check_route_scopes",
    "merge_keys",
    "parse_keys",
    "parse_keys_file",
    "requires",
]


class Scope(enum.Enum):
    READ = "read"
    CREATE = "create"
    MOVE = "move"
    FEED = "feed"
    ADMIN = "admin"


CLIENT_SCOPES: Final = frozenset(Scope)
# Keys are a finite configured set; this bounds it, and with it every per-key table
# (rate buckets, stream counts, metric labels) and the cost of a lookup (all keys compared).
API_KEYS_MAX: Final = 256
# A name is the actor on the rows its requests write: at most what storage holds there.
KEY_NAME_PATTERN: Final = f"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{ACTOR_LENGTH_MAX - 1}}}$"
_KEY_NAME: Final = re.compile(KEY_NAME_PATTERN.strip("^$"))
# Printable ASCII without spaces or commas (the list separator): what fits a header as is.
_SECRET_PATTERN: Final = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scopes: frozenset[Scope]
    # Never in a repr: a logged Config or settings object must not carry it.
    secret: str = field(repr=False)


def _parse_entry(entry: str, where: str, position: int) -> ApiKey:
    """One key; ``ValueError`` naming ``where`` (never echoing the secret) when malformed."""
    if ":" not in entry:
        if _SECRET_PATTERN.fullmatch(entry) is None:
            raise ValueError(f"{where}: a bare secret must be printable ASCII without spaces")
        return ApiKey(f"key-{position}", CLIENT_SCOPES, entry)
    name, sep, rest = entry.partition(":")
    scopes_text, sep, secret = rest.partition(":")
    if not sep:
        # Not echoed: the entry may be a secret with a colon in it.
        raise ValueError(
            f"{where}: expected name:scope+scope:secret (a bare secret may not contain ':')"
        )
    if _KEY_NAME.fullmatch(name) is None:
        raise ValueError(f"{where}: the key name must match {KEY_NAME_PATTERN} (got {name[:64]!r})")
    scopes: set[Scope] = set()
    for word in scopes_text.split("+"):
        try:
            scopes.add(Scope(word.strip().lower()))
        except ValueError:
            known = ", ".join(s.value for s in Scope)
            raise ValueError(
                f"{where} (key {name!r}): unknown scope {word[:32]!r}; known: {known}"
            ) from None
    if _SECRET_PATTERN.fullmatch(secret) is None:
        raise ValueError(
            f"{where} (key {name!r}): the secret must be non-empty printable ASCII without "
            "spaces or commas"
        )
    return ApiKey(name, frozenset(scopes), secret)


def parse_keys(text: str) -> tuple[ApiKey, ...]:
    """The comma-separated keys of ``WALLETD_API_KEYS``; empty entries are skipped."""
    entries = [entry.strip() for entry in text.split(",")]
    keys = tuple(
        _parse_entry(entry, f"entry {position}", position)
        for position, entry in enumerate(entries, 1)
        if entry
    )
    return merge_keys(keys)


def parse_keys_file(path: Path) -> tuple[ApiKey, ...]:
    """One key per line; blank lines and ``#`` comments skipped."""
    keys: list[ApiKey] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            keys.append(_parse_entry(entry, f"{path} line {number}", number))
    return merge_keys(keys)


def merge_keys(*groups: Iterable[ApiKey]) -> tuple[ApiKey, ...]:
    """All keys, refusing a name or a secret declared twice, and more than API_KEYS_MAX."""
    keys: list[ApiKey] = []
    names: set[str] = set()
    secrets_seen: set[str] = set()
    for key in (key for group in groups for key in group):
        if key.name in names:
            raise ValueError(f"key name {key.name!r} is declared twice")
        if key.secret in secrets_seen:
            # Two names for one secret would make the actor of a request ambiguous.
            raise ValueError(f"key {key.name!r} has the same secret as another key")
        names.add(key.name)
        secrets_seen.add(key.secret)
        keys.append(key)
    if len(keys) > API_KEYS_MAX:
        raise ValueError(f"{len(keys)} keys declared; at most {API_KEYS_MAX}")
    return tuple(keys)


class KeyRing:
    """Finds the key a bearer token names, in time that does not depend on which key is
    closest: the token and every secret are reduced to SHA-256 digests (equal lengths, so
    no length leaks either; compare_digest only hides the contents of equal-length inputs)
    and every digest is compared, with no early exit. A plain hash suffices: the digests
    never leave the process; an HMAC under a random key cost 7 times as much per request
    (3.5 us against 0.5 us, python -m timeit)."""

    __slots__ = ("_entries", "keys")

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = merge_keys(keys)
        if not self.keys:
            raise ValueError("a key ring needs at least one key")
        self._entries = tuple((self._digest(key.secret.encode()), key) for key in self.keys)

    @staticmethod
    def _digest(token: bytes) -> bytes:
        return hashlib.sha256(token).digest()

    def find(self, token: bytes) -> ApiKey | None:
        digest = self._digest(token)
        found: ApiKey | None = None
        for expected, key in self._entries:
            if hmac.compare_digest(digest, expected):
                found = key
        return found


# The name of the key a request came with (set by the auth middleware; absent when auth is
# off): what the access log shows, and the actor recorded on the log rows it writes.
KEY_NAME: Final = web.RequestKey("walletd_key_name", str)


# -- the route scope table -----------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
H = TypeVar("H", bound=Handler)

# handler -> the scope a key needs to call it; filled by @requires beside each handler.
ROUTE_SCOPES: dict[Callable[..., object], Scope] = {}


def requires(scope: Scope) -> Callable[[H], H]:
    """Declare the scope a route's handler needs (put it under the route decorator)."""

    def declare(handler: H) -> H:
        ROUTE_SCOPES[handler] = scope
        return handler

    return declare


def check_route_scopes(app: web.Application, protected: Callable[[str], bool]) -> None:
    """Refuse an app with a protected route that declares no scope: it cannot ship."""
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if protected(path) and route.handler not in ROUTE_SCOPES:
            raise RuntimeError(f"route {route.method} {path} declares no scope (@requires)")


# -- per-key request rate -----------------------------------------------------------------


class _Bucket:
    __slots__ = ("tokens", "updated_s")

    def __init__(self, tokens: float, now_s: float) -> None:
        self.tokens = tokens
        self.updated_s = now_s


class RateLimiter:
    """A token bucket per key name: ``rate_per_s`` tokens a second, at most ``burst``.

    The table holds one bucket per configured key, made up front: its size is the key
    count (at most API_KEYS_MAX), never grown by requests. Per process: a key talking to N
    processes may do N times the rate in all (docs/OPERATIONS.md).
    """

    __slots__ = ("_buckets", "_burst", "_rate_per_s")

    def __init__(self, names: Iterable[str], rate_per_s: float, burst: int, now_s: float) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a rate limit needs a positive rate and a burst of at least 1")
        self._rate_per_s = rate_per_s
        self._burst = float(burst)
        self._buckets: Mapping[str, _Bucket] = {name: _Bucket(burst, now_s) for name in names}

    def take(self, name: str, now_s: float) -> int:
        """0 when the request may go on (a token taken), else the whole seconds to wait."""
        bucket = self._buckets[name]
        elapsed_s = max(0.0, now_s - bucket.updated_s)
        bucket.tokens = min(self._burst, bucket.tokens + elapsed_s * self._rate_per_s)
        bucket.updated_s = now_s
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0
        return max(1, math.ceil((1.0 - bucket.tokens) / self._rate_per_s))

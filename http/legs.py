"""Transfer legs between walletd processes: the internal route and its client.

A transfer's coordinator (the process that got ``POST /api/v1/transfers``, or the re-drive of
the process that owns the sending wallet) delivers each leg to the process that serves the
leg's wallet (engine/transfers.py, ``RoutedLegDelivery``). When that is another process, the
leg travels here, batched with the other legs queued for that process meanwhile::

    coordinator ── POST /internal/v1/legs ─────────────▶ owner's INTERNAL listener
                   {"legs": [leg, ...]}                    Engine.deliver_leg, each leg
                   Authorization: Walletd-Cluster <cred>   on its shard, all at once
                 ◀── 200 {"replies": [reply, ...]} ─────── one reply per leg, in order

The route lives only on the internal listener (http/internal.py): its own socket, the
cluster credential on every request, not registered on the public app at all, not in the
public OpenAPI document. It never sends a leg on: a leg whose shard the process does not
serve is answered NOT_OWNER (nothing applied), so a leg never hops twice.

What the client makes of each answer (a leg is keyed, so sending it again is safe):

    200, a reply per leg     each leg's reply (OK, replayed or not; a business refusal;
                             NOT_OWNER; UNAVAILABLE when its commit failed or is unknown)
    503 NOT_OWNER            NOT_OWNER for every leg: nothing applied
    401                      NOT_OWNER for every leg: the credential was refused before
                             anything ran (logged as an error: the processes do not share
                             one cluster credential)
    not connected            NOT_OWNER: the owner never saw the legs; the delivery
                             retries after the next table read
    anything else, timeout,  UNAVAILABLE: the legs may have been applied; the coordinator
    connection lost          reads each transfer back from storage
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING, Any, Final, NamedTuple
from uuid import UUID

import aiohttp
import orjson
from aiohttp import web

from walletd.engine.bounds import (
    ACTOR_LENGTH_MAX,
    REFERENCE_LENGTH_MAX,
    storable_amount,
    storable_metadata,
    storable_text,
)
from walletd.engine.commands import REFUND_FAILURE_CODES, Outcome, Reply, TransferLeg
from walletd.engine.errors import EngineRefused, NotOwner
from walletd.engine.model import (
    NO_METADATA,
    Metadata,
    OperationKind,
    TransferRecord,
    TransferStatus,
    WalletStatus,
    WalletView,
    as_metadata,
)
from walletd.engine.money import EXPONENT_MAX, SEED_CURRENCY, Currency, currency_of
from walletd.engine.router import Engine
from walletd.engine.transfers import RemoteLegs
from walletd.http.bulk import read_bulk_body
from walletd.http.currencies import ASSET_CODE_PATTERN
from walletd.http.problems import ProblemError
from walletd.http.state import STATE_KEY

if TYPE_CHECKING:
    from walletd.http.internal import ClusterCredential

__all__ = [
    "CURRENCY_PATH",
    "INTERNAL_PREFIX",
    "LEGS_PATH",
    "HttpLegs",
    "decode_leg",
    "encode_leg",
    "routes",
]

_log = logging.getLogger("walletd.legs")

INTERNAL_PREFIX: Final = "/internal/v1"
LEGS_PATH: Final = INTERNAL_PREFIX + "/legs"
# A wallet's currency, read by a transfer's coordinator before any money moves
# (engine/transfers.py): GET, answered by the wallet's owner only.
CURRENCY_PATH: Final = INTERNAL_PREFIX + "/wallets/{wallet_id}/currency"
# Legs per request, requests in flight and legs waiting, per other process (HttpLegs).
LEGS_PER_REQUEST_MAX: Final = 256
REQUESTS_PER_PROCESS_MAX: Final = 2
LEGS_WAITING_MAX: Final = 4096
_LEG_KINDS: Final = frozenset(
    {OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN, OperationKind.TRANSFER_REFUND}
)
_JSON: Final = "application/json"
_CURRENCY_CODE: Final = re.compile(ASSET_CODE_PATTERN.strip("^$"))
_NOT_OWNER: Final = Reply(Outcome.NOT_OWNER)
_UNAVAILABLE: Final = Reply(Outcome.UNAVAILABLE)

routes = web.RouteTableDef()


# -- the wire format: plain JSON of the engine's own records --------------------------------


def encode_leg(
    kind: OperationKind, transfer: TransferRecord, failure_code: str | None
) -> dict[str, Any]:
    return {
        "kind": kind.name,
        "failure_code": failure_code,
        "transfer": {
            "id": str(transfer.transfer_id),
            "from_wallet_id": str(transfer.from_wallet_id),
            "to_wallet_id": str(transfer.to_wallet_id),
            "amount": transfer.amount,
            "reference": transfer.reference,
            "status": transfer.status.name,
            "failure_code": transfer.failure_code,
            "created_at_us": transfer.created_at_us,
            "updated_at_us": transfer.updated_at_us,
            "actor": transfer.actor,  # the key that asked for it: on every leg's row
            # Each leg is refused on a wallet of another currency (None: not checked).
            "currency": None if transfer.currency is None else list(transfer.currency),
            "metadata": dict(transfer.metadata),  # the request's: on every leg's row
            # A refund's original: its debit opens the refund with it (storage checks it).
            "refund_of": None if transfer.refund_of is None else str(transfer.refund_of),
        },
    }


def decode_leg(body: dict[str, Any]) -> tuple[OperationKind, TransferRecord, str | None]:
    """The leg in a request body; ``ValueError`` (or ``KeyError``/``TypeError``) when it is
    not one."""
    kind = OperationKind[body["kind"]]
    if kind not in _LEG_KINDS:
        raise ValueError(f"{kind.name} is not a transfer leg")
    t = body["transfer"]
    transfer = TransferRecord(
        UUID(t["id"]), UUID(t["from_wallet_id"]), UUID(t["to_wallet_id"]),
        _int(t["amount"]), _text(t["reference"]), TransferStatus[t["status"]],
        _text(t["failure_code"]), _int(t["created_at_us"]), _int(t["updated_at_us"]),
        _text(t.get("actor")), _currency(t.get("currency")), _metadata(t.get("metadata")),
        _uuid(t.get("refund_of")),
    )  # fmt: skip
    # The ledger's bounds (engine/bounds.py), checked here first so a leg past them is
    # refused at the edge like any request; the ledger refuses it again (NOT_STORABLE).
    reference, failure_code = transfer.reference, _text(body["failure_code"])
    actor = transfer.actor
    if (
        not storable_amount(transfer.amount)
        or transfer.from_wallet_id == transfer.to_wallet_id
        or (reference is not None and not storable_text(reference, 0, REFERENCE_LENGTH_MAX))
        or (actor is not None and not storable_text(actor, 1, ACTOR_LENGTH_MAX))
        or (failure_code is not None and failure_code not in REFUND_FAILURE_CODES)
        or not storable_metadata(transfer.metadata)
    ):
        raise ValueError("not a valid transfer")
    return kind, transfer, failure_code


def _currency(value: object) -> Currency | None:
    """A leg's currency: [code, exponent] (None: a leg of a process of before)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2:
        raise TypeError("a currency is [code, exponent]")
    code, exponent = value
    if type(code) is not str or not _CURRENCY_CODE.fullmatch(code):
        raise ValueError("not a currency code")
    if type(exponent) is not int or not 0 <= exponent <= EXPONENT_MAX:
        raise ValueError("not a currency exponent")
    return currency_of(code, exponent)


def _metadata(value: object) -> Metadata:
    """A leg's metadata object (absent from a process that predates metadata: none)."""
    if value is None:
        return NO_METADATA
    if type(value) is not dict or not all(
        type(k) is str and type(v) is str for k, v in value.items()
    ):
        raise TypeError("metadata must be an object of strings")
    return as_metadata(value)


def _uuid(value: object) -> UUID | None:
    """An optional id (absent from a process that predates refunds: None)."""
    if value is None:
        return None
    if type(value) is not str:
        raise TypeError("an id or null was expected")
    return UUID(value)


def _int(value: object) -> int:
    if type(value) is not int:
        raise TypeError("an integer was expected")
    return value


def _text(value: object) -> str | None:
    if value is not None and type(value) is not str:
        raise TypeError("a string or null was expected")
    return value


def _encode_reply(reply: Reply) -> bytes:
    wallet = reply.wallet
    return orjson.dumps(
        {
            "outcome": reply.outcome.value,
            "replayed": reply.replayed,
            "balance_seen": reply.balance_seen,
            # Every field of the view, whatever it holds: the other process runs this code.
            "wallet": None
            if wallet is None
            else {
                **wallet._asdict(),
                "wallet_id": str(wallet.wallet_id),
                "currency": list(wallet.currency),
            },
        }
    )


def _decode_reply(body: dict[str, Any]) -> Reply:
    wallet = body["wallet"]
    view = None
    if wallet is not None:
        currency = _currency(wallet.get("currency")) or SEED_CURRENCY
        view = WalletView(
            **{
                **wallet,
                "wallet_id": UUID(wallet["wallet_id"]),
                "currency": currency,
                "status": WalletStatus(wallet.get("status", WalletStatus.ACTIVE)),
                # JSON has no tuples: the pairs come back as lists.
                "metadata": tuple((k, v) for k, v in wallet.get("metadata", ())),
            }
        )
    return Reply(Outcome(body["outcome"]), view, bool(body["replayed"]), body["balance_seen"])


# -- the owner's side ----------------------------------------------------------------------


@routes.post(LEGS_PATH)
async def deliver_legs(request: web.Request) -> web.Response:
    """Apply each leg on this process's shard of its wallet, all at once; one reply per
    leg, in order (internal listener only; see the module doc). A leg whose shard this
    process does not serve is NOT_OWNER (nothing applied): the coordinator looks the owner
    up again."""
    state = request.app[STATE_KEY]
    raw = await read_bulk_body(request, state.settings)
    try:
        body = orjson.loads(raw)
        wanted = [decode_leg(leg) for leg in body["legs"]]
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ProblemError(422, "VALIDATION_ERROR", f"not a list of legs: {error!r}") from None
    if not 1 <= len(wanted) <= LEGS_PER_REQUEST_MAX:
        raise ProblemError(422, "VALIDATION_ERROR", f"1..{LEGS_PER_REQUEST_MAX} legs per request")
    engine = state.services.engine
    replies = await asyncio.gather(
        *(_deliver_here(engine, kind, transfer, code) for kind, transfer, code in wanted)
    )
    encoded = b",".join(_encode_reply(reply) for reply in replies)
    return web.Response(body=b'{"replies":[%s]}' % encoded, content_type=_JSON)


async def _deliver_here(
    engine: Engine, kind: OperationKind, transfer: TransferRecord, failure_code: str | None
) -> Reply:
    future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    try:
        return await engine.deliver_leg(TransferLeg(kind, transfer, future, failure_code))
    except NotOwner:
        return _NOT_OWNER
    except EngineRefused:  # overloaded or stopping: not accepted, so not applied
        return _UNAVAILABLE


@routes.get(CURRENCY_PATH)
async def wallet_currency(request: web.Request) -> web.Response:
    """A wallet's currency, for a transfer's coordinator on another process (internal
    listener only): 200 {"currency": [code, exponent]}, 404 WALLET_NOT_FOUND, or 503
    NOT_OWNER when this process does not serve the wallet's shard (it never asks on)."""
    try:
        wallet_id = UUID(request.match_info["wallet_id"])
    except ValueError:
        raise ProblemError(400, "INVALID_WALLET_ID", "not a wallet id") from None
    engine = request.app[STATE_KEY].services.engine
    try:
        reply = await engine.read(wallet_id)
    except NotOwner:
        raise ProblemError(503, "NOT_OWNER", "this process does not serve the wallet") from None
    except EngineRefused:
        raise ProblemError(503, "UNAVAILABLE", "the engine refused the read") from None
    if reply.outcome is Outcome.WALLET_NOT_FOUND:
        raise ProblemError(404, "WALLET_NOT_FOUND", f"wallet {wallet_id} does not exist")
    if reply.outcome is not Outcome.OK or reply.wallet is None:
        raise ProblemError(503, "UNAVAILABLE", "the wallet cannot be read now")
    body = orjson.dumps({"currency": list(reply.wallet.currency)})
    return web.Response(body=body, content_type=_JSON)


# -- the coordinator's side ----------------------------------------------------------------


class _Waiting(NamedTuple):
    leg: bytes  # the leg's JSON
    reply: asyncio.Future[Reply]


class HttpLegs(RemoteLegs):
    """Sends legs to other walletd processes over one bounded HTTP client pool, batched.

    Legs for one process are coalesced: the legs queued while requests to it are in flight
    travel together in the next request (at most ``LEGS_PER_REQUEST_MAX``, at most
    ``REQUESTS_PER_PROCESS_MAX`` requests in flight per process), so under load the cost of
    an HTTP exchange is shared by many legs, as a commit is by many operations. At most
    ``LEGS_WAITING_MAX`` legs wait per process; past it a leg is not sent (UNAVAILABLE: not
    applied, the coordinator reads the transfer back).

    ``timeout_s`` bounds each request (connect to answer); at most ``connections_max``
    connections are open. ``credential``: the cluster credential the other processes'
    internal listeners check (never a client key). Use as an async context manager: the
    pool lives inside it.
    """

    def __init__(
        self, *, timeout_s: float, connections_max: int, credential: ClusterCredential
    ) -> None:
        if timeout_s <= 0 or connections_max < 1:
            raise ValueError("legs need a positive timeout and at least one connection")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._connections_max = connections_max
        self._headers = {"Authorization": credential.authorization(), "Content-Type": _JSON}
        self._session: aiohttp.ClientSession | None = None
        self._waiting: dict[str, list[_Waiting]] = {}
        self._in_flight: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        # Legs sent, by what came of them (tests, logs).
        self.sent: dict[str, int] = {"answered": 0, "not_owner": 0, "unreachable": 0,
                                     "refused": 0, "unknown": 0}  # fmt: skip
        self.requests = 0  # HTTP requests sent (legs / requests = legs per request)

    async def __aenter__(self) -> HttpLegs:
        connector = aiohttp.TCPConnector(limit=self._connections_max)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, url: str, kind: OperationKind, transfer: TransferRecord, failure_code: str | None
    ) -> Reply:
        if self._session is None or self._closing:  # not started, or closed: not sent
            self.sent["unreachable"] += 1
            return _NOT_OWNER
        queue = self._waiting.setdefault(url, [])
        if len(queue) >= LEGS_WAITING_MAX:
            self.sent["unknown"] += 1
            return _UNAVAILABLE  # not sent: nothing applied
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        queue.append(_Waiting(orjson.dumps(encode_leg(kind, transfer, failure_code)), future))
        if self._in_flight.get(url, 0) < REQUESTS_PER_PROCESS_MAX:
            self._start(url)
        return await future

    async def read_currency(self, url: str, wallet_id: UUID) -> Reply:
        """One GET to the owner's internal listener (not batched: a wallet's currency is
        read once per coordinator, then remembered)."""
        session = self._session
        if session is None or self._closing:
            return _NOT_OWNER
        path = CURRENCY_PATH.format(wallet_id=wallet_id)
        try:
            async with session.get(url + path, headers=self._headers) as response:
                status = response.status
                answer = await response.read()
        except aiohttp.ClientConnectorError:
            return _NOT_OWNER
        except (aiohttp.ClientError, TimeoutError) as error:
            _log.warning("reading the currency of %s at %s failed (%r)", wallet_id, url, error)
            return _UNAVAILABLE
        try:
            body = orjson.loads(answer)
            if status == 200:
                currency = _currency(body["currency"])
                if currency is not None:
                    return Reply(Outcome.OK, WalletView(wallet_id, 0, 0, 0, 0, 0, currency))
            elif status == 404:
                return Reply(Outcome.WALLET_NOT_FOUND)
            elif status in (401, 503) and (status == 401 or body.get("code") == "NOT_OWNER"):
                return _NOT_OWNER  # nothing was read there
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
        return _UNAVAILABLE

    def _start(self, url: str) -> None:
        queue = self._waiting.get(url)
        if not queue:
            return
        if self._closing:  # nothing more is sent: these legs were not applied
            for waiting in queue:
                if not waiting.reply.done():
                    waiting.reply.set_result(_NOT_OWNER)
            queue.clear()
            return
        batch = queue[:LEGS_PER_REQUEST_MAX]
        del queue[:LEGS_PER_REQUEST_MAX]
        self._in_flight[url] = self._in_flight.get(url, 0) + 1
        task = asyncio.create_task(self._exchange(url, batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _exchange(self, url: str, batch: list[_Waiting]) -> None:
        replies: list[Reply] = []
        try:
            replies = await self._post(url, batch)
        finally:
            self._in_flight[url] -= 1
            for index, waiting in enumerate(batch):
                if not waiting.reply.done():
                    # Cancelled before the answer (shutdown): the outcome is not known.
                    known = index < len(replies)
                    waiting.reply.set_result(replies[index] if known else _UNAVAILABLE)
            self._start(url)  # what queued meanwhile

    async def _post(self, url: str, batch: list[_Waiting]) -> list[Reply]:
        session = self._session
        if session is None:
            self.sent["unreachable"] += len(batch)
            return [_NOT_OWNER] * len(batch)
        payload = b'{"legs":[%s]}' % b",".join(waiting.leg for waiting in batch)
        self.requests += 1
        try:
            async with session.post(url + LEGS_PATH, data=payload, headers=self._headers) as r:
                status = r.status
                answer = await r.read()
        except aiohttp.ClientConnectorError:
            # Not connected: the owner never saw the legs.
            self.sent["unreachable"] += len(batch)
            return [_NOT_OWNER] * len(batch)
        except (aiohttp.ClientError, TimeoutError) as error:
            self.sent["unknown"] += len(batch)
            _log.warning("%d transfer legs to %s: outcome unknown (%r)", len(batch), url, error)
            return [_UNAVAILABLE] * len(batch)
        return self._replies(status, answer, len(batch), url)

    def _replies(self, status: int, answer: bytes, count: int, url: str) -> list[Reply]:
        if status == 401:
            # Refused before any handler ran: nothing applied. Not a network fault but a
            # configuration one, so it is loud.
            self.sent["refused"] += count
            _log.error(
                "%d transfer legs to %s: the cluster credential was refused; every walletd "
                "process of one cluster needs the same one (docs/OPERATIONS.md)", count, url,
            )  # fmt: skip
            return [_NOT_OWNER] * count
        try:
            body = orjson.loads(answer)
            if status == 200:
                replies = [_decode_reply(reply) for reply in body["replies"]]
                if len(replies) == count:
                    for reply in replies:
                        key = "not_owner" if reply.outcome is Outcome.NOT_OWNER else "answered"
                        self.sent[key] += 1
                    return replies
            elif status == 503 and body.get("code") == "NOT_OWNER":
                self.sent["not_owner"] += count
                return [_NOT_OWNER] * count
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
        self.sent["unknown"] += count
        _log.warning("%d transfer legs to %s answered %d: outcome unknown", count, url, status)
        return [_UNAVAILABLE] * count

"""Transfer legs between walletd processes: the internal route and its client.

A transfer's coordinator (the process that got ``POST /api/v1/transfers``, or the re-drive of
the process that owns the sending wallet) delivers each leg to the process that serves the
leg's wallet (engine/transfers.py, ``RoutedLegDelivery``). When that is another process, the
leg travels here::

    coordinator ── POST /internal/v1/legs ─────────────▶ owner of the wallet's shard
                   X-Walletd-Forwarded: 1                  Engine.deliver_leg (its shard)
                   Authorization: Bearer <a key>           200 {"outcome", "wallet", ...}
                 ◀──────────────────────────────────────── or 503 NOT_OWNER (not applied)

The route is internal: not in the public OpenAPI document, refused by the generated HAProxy
configuration, and behind the same bearer auth as /api/v1 when keys are configured. It
carries the forwarded marker, so a process that does not serve the shard either serves it
after the next table read or answers 503 NOT_OWNER: a leg never hops twice.

What the client makes of each answer (the leg is keyed, so sending it again is safe):

    200                      the owner's reply (OK, replayed or not; a business refusal;
                             UNAVAILABLE when its commit failed or is unknown)
    503 NOT_OWNER            NOT_OWNER: nothing applied; the delivery retries after the
                             next table read
    not connected            NOT_OWNER: the owner never saw the leg
    anything else, timeout,  UNAVAILABLE: the leg may have been applied; the coordinator
    connection lost          reads the transfer back from storage
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Final
from uuid import UUID

import aiohttp
import orjson
from aiohttp import web

from walletd.engine.commands import Outcome, Reply, TransferLeg
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus, WalletView
from walletd.engine.transfers import RemoteLegs
from walletd.http.forwarding import FORWARDED_HEADER
from walletd.http.parsing import read_json_object
from walletd.http.problems import ProblemError
from walletd.http.state import STATE_KEY

__all__ = ["INTERNAL_PREFIX", "LEGS_PATH", "HttpLegs", "decode_leg", "encode_leg", "routes"]

_log = logging.getLogger("walletd.legs")

INTERNAL_PREFIX: Final = "/internal/v1"
LEGS_PATH: Final = INTERNAL_PREFIX + "/legs"
_LEG_KINDS: Final = frozenset(
    {OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN, OperationKind.TRANSFER_REFUND}
)
_JSON: Final = "application/json"
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
    )  # fmt: skip
    if transfer.amount <= 0 or transfer.from_wallet_id == transfer.to_wallet_id:
        raise ValueError("not a valid transfer")
    return kind, transfer, _text(body["failure_code"])


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
            "wallet": None if wallet is None else {**wallet._asdict(), "wallet_id": str(wallet[0])},
        }
    )


def _decode_reply(body: dict[str, Any]) -> Reply:
    wallet = body["wallet"]
    view = None
    if wallet is not None:
        view = WalletView(**{**wallet, "wallet_id": UUID(wallet["wallet_id"])})
    return Reply(Outcome(body["outcome"]), view, bool(body["replayed"]), body["balance_seen"])


# -- the owner's side ----------------------------------------------------------------------


@routes.post(LEGS_PATH)
async def deliver_leg(request: web.Request) -> web.Response:
    """Apply a leg on this process's shard of its wallet (internal; see the module doc)."""
    state = request.app[STATE_KEY]
    if FORWARDED_HEADER not in request.headers:
        # Only walletd sends legs, always marked: without the marker a NotOwner would be
        # forwarded once more, and a leg must never hop twice.
        raise ProblemError(400, "VALIDATION_ERROR", f"a leg must carry {FORWARDED_HEADER}")
    body, _raw = await read_json_object(request, state.settings)
    try:
        kind, transfer, failure_code = decode_leg(body)
    except (KeyError, TypeError, ValueError) as error:
        raise ProblemError(422, "VALIDATION_ERROR", f"not a transfer leg: {error!r}") from None
    future = asyncio.get_running_loop().create_future()
    # NotOwner: the forwarding middleware waits for the next table read and answers it here
    # if this process serves the shard by then, else 503 NOT_OWNER (the marker is set).
    reply = await state.services.engine.deliver_leg(
        TransferLeg(kind, transfer, future, failure_code)
    )
    return web.Response(body=_encode_reply(reply), content_type=_JSON)


# -- the coordinator's side ----------------------------------------------------------------


class HttpLegs(RemoteLegs):
    """Sends legs to other walletd processes over one bounded HTTP client pool.

    ``timeout_s`` bounds each leg (connect to answer); at most ``connections_max`` connections
    are open, past it a leg waits for one (within its timeout). ``api_key``: the bearer key
    the other processes check, when auth is configured (the cluster shares its keys).
    Use as an async context manager: the pool lives inside it.
    """

    def __init__(self, *, timeout_s: float, connections_max: int, api_key: str | None) -> None:
        if timeout_s <= 0 or connections_max < 1:
            raise ValueError("legs need a positive timeout and at least one connection")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._connections_max = connections_max
        self._headers = {FORWARDED_HEADER: "1", "Content-Type": _JSON}
        if api_key is not None:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None
        # Legs sent, by what came of them (metrics and tests).
        self.sent: dict[str, int] = {"answered": 0, "not_owner": 0, "unreachable": 0,
                                     "unknown": 0}  # fmt: skip

    async def __aenter__(self) -> HttpLegs:
        connector = aiohttp.TCPConnector(limit=self._connections_max)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self, url: str, kind: OperationKind, transfer: TransferRecord, failure_code: str | None
    ) -> Reply:
        session = self._session
        if session is None:  # not started, or closed: nothing was sent
            self.sent["unreachable"] += 1
            return _NOT_OWNER
        payload = orjson.dumps(encode_leg(kind, transfer, failure_code))
        try:
            async with session.post(url + LEGS_PATH, data=payload, headers=self._headers) as r:
                status = r.status
                answer = await r.read()
        except aiohttp.ClientConnectorError:
            # Not connected: the owner never saw the leg.
            self.sent["unreachable"] += 1
            return _NOT_OWNER
        except (aiohttp.ClientError, TimeoutError) as error:
            self.sent["unknown"] += 1
            _log.warning("leg %s of transfer %s to %s: outcome unknown (%r)",
                         kind.name, transfer.transfer_id, url, error)  # fmt: skip
            return _UNAVAILABLE
        return self._reply(status, answer, kind, transfer, url)

    def _reply(
        self, status: int, answer: bytes, kind: OperationKind, transfer: TransferRecord, url: str
    ) -> Reply:
        try:
            body = orjson.loads(answer)
            if status == 200:
                reply = _decode_reply(body)
                self.sent["answered"] += 1
                return reply
            if status == 503 and body.get("code") == "NOT_OWNER":
                self.sent["not_owner"] += 1
                return _NOT_OWNER
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
        self.sent["unknown"] += 1
        _log.warning("leg %s of transfer %s to %s answered %d: outcome unknown",
                     kind.name, transfer.transfer_id, url, status)  # fmt: skip
        return _UNAVAILABLE

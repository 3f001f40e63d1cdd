"""The internal route for transfer legs and its client (http/legs.py), on the real internal
app (http/internal.py) beside the real public one, with real PostgreSQL over loopback
sockets: a leg applies once however often it is sent, the route takes only the cluster
credential and is hidden from the public document, and each failure of the network maps to
the answer the coordinator relies on."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid4

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from walletd.engine.commands import Outcome
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus, WalletStatus
from walletd.engine.money import Currency
from walletd.http.forwarding import FORWARDED_HEADER
from walletd.http.internal import ClusterCredential, create_internal_app
from walletd.http.keys import parse_keys
from walletd.http.legs import (
    CURRENCY_PATH,
    LEGS_PATH,
    LEGS_PER_REQUEST_MAX,
    HttpLegs,
    encode_leg,
)
from walletd.http.openapi import build_openapi_document
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]

CREDENTIAL = ClusterCredential.generate()
AUTHORIZED = {"Authorization": CREDENTIAL.authorization()}


async def internal_beside(public: Client, aiohttp_client: Callable[..., Any]) -> Client:
    """The internal app of the process ``public`` serves, on its own socket (as cli/main.py
    serves it), sharing the public app's running engine."""
    internal: Client = await aiohttp_client(create_internal_app(public.app, CREDENTIAL))
    return internal


@pytest.fixture
async def internal(client: Client, aiohttp_client: Callable[..., Any]) -> Client:
    return await internal_beside(client, aiohttp_client)


def legs_client(timeout_s: float = 5, connections_max: int = 2) -> HttpLegs:
    return HttpLegs(timeout_s=timeout_s, connections_max=connections_max, credential=CREDENTIAL)


async def funded_wallet(client: Client, amount: int, headers: dict[str, str] | None = None) -> str:
    response = await client.post("/api/v1/wallets", headers=headers)
    wallet: str = (await response.json())["id"]
    if not amount:
        return wallet
    response = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": amount},
        headers=headers,
    )
    assert response.status == 200
    return wallet


def opened(from_wallet: str, to_wallet: str, amount_minor: int) -> TransferRecord:
    now_us = time.time_ns() // 1000
    return TransferRecord(
        uuid4(), UUID(from_wallet), UUID(to_wallet), amount_minor, None,
        TransferStatus.PENDING, None, now_us, now_us,
    )  # fmt: skip


def url_of(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


async def test_a_leg_sent_twice_applies_once_and_the_second_is_a_replay(
    client: Client, internal: Client
) -> None:
    """The debit and the credit of a transfer sent through HttpLegs commit on the owner; the
    same debit sent again (an unknown outcome's retry) replays, the balance moves once."""
    sender, receiver = await funded_wallet(client, 10), await funded_wallet(client, 0)
    transfer = opened(sender, receiver, 400)
    async with legs_client() as legs:
        first = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
        again = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
        credit = await legs.send(url_of(internal), OperationKind.TRANSFER_IN, transfer, None)
    assert (first.outcome, first.replayed) == (Outcome.OK, False)
    assert first.wallet is not None
    assert first.wallet.balance == 600
    assert (again.outcome, again.replayed) == (Outcome.OK, True)
    assert credit.outcome is Outcome.OK
    response = await client.get(f"/api/v1/wallets/{sender}")
    assert (await response.json())["balance"] == "6.00"
    response = await client.get(f"/api/v1/transfers/{transfer.transfer_id}")
    assert (await response.json())["status"] == "COMPLETED"


async def test_a_refusal_travels_back_with_the_balance_it_was_decided_against(
    client: Client, internal: Client
) -> None:
    """A debit past the balance is INSUFFICIENT_FUNDS with balance_seen; nothing stored."""
    sender, receiver = await funded_wallet(client, 1), await funded_wallet(client, 0)
    transfer = opened(sender, receiver, 500)
    async with legs_client() as legs:
        reply = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
    assert (reply.outcome, reply.balance_seen) == (Outcome.INSUFFICIENT_FUNDS, 100)
    response = await client.get(f"/api/v1/transfers/{transfer.transfer_id}")
    assert response.status == 404


async def test_the_route_needs_a_list_of_legs(client: Client, internal: Client) -> None:
    """A body that is not a list of 1..LEGS_PER_REQUEST_MAX legs is 422 and writes nothing."""
    sender, receiver = await funded_wallet(client, 1), await funded_wallet(client, 0)
    leg = encode_leg(OperationKind.TRANSFER_OUT, opened(sender, receiver, 100), None)
    broken_legs = ({**leg, "kind": "DEPOSIT"}, {**leg, "transfer": {}}, {"kind": 1})
    for broken in (
        *({"legs": [leg, wrong]} for wrong in broken_legs),
        {"legs": []},
        {"legs": [leg] * (LEGS_PER_REQUEST_MAX + 1)},
        leg,
    ):
        response = await internal.post(LEGS_PATH, json=broken, headers=AUTHORIZED)
        assert response.status == 422, await response.text()
    response = await client.get(f"/api/v1/wallets/{sender}")
    assert (await response.json())["balance"] == "1.00"


async def test_a_leg_past_what_storage_holds_is_refused_at_the_edge(
    client: Client, internal: Client
) -> None:
    """A peer's leg whose fields storage would refuse (a reference past 255 characters, an
    actor past the 64 a key name has, metadata past its bounds, which wallet_operations'
    CHECKs refuse) is 422 before it reaches a batch; nothing is written."""
    sender, receiver = await funded_wallet(client, 1), await funded_wallet(client, 0)
    leg = encode_leg(OperationKind.TRANSFER_OUT, opened(sender, receiver, 100), None)
    too_many = {f"k{n}": "v" for n in range(51)}
    for field, value in (
        ("reference", "r" * 256), ("actor", "a" * 65), ("metadata", too_many),
        ("metadata", {"k": 1}), ("metadata", {"k": "v" * 501}),
    ):  # fmt: skip
        forged = {**leg, "transfer": {**leg["transfer"], field: value}}
        response = await internal.post(LEGS_PATH, json={"legs": [forged]}, headers=AUTHORIZED)
        assert response.status == 422, (field, await response.text())
    response = await client.get(f"/api/v1/wallets/{sender}")
    assert (await response.json())["balance"] == "1.00"


async def test_legs_sent_at_once_share_requests_and_each_gets_its_own_reply(
    client: Client, internal: Client
) -> None:
    """40 debits sent at once to one process travel in fewer requests than legs (at most
    two in flight, the rest coalesced); each gets its own answer: 30 OK, 10 refused."""
    sender, receiver = await funded_wallet(client, 30), await funded_wallet(client, 0)
    transfers = [opened(sender, receiver, 100) for _ in range(40)]
    async with legs_client(10, 4) as legs:
        replies = await asyncio.gather(
            *(legs.send(url_of(internal), OperationKind.TRANSFER_OUT, t, None) for t in transfers)
        )
    outcomes = [reply.outcome for reply in replies]
    assert outcomes.count(Outcome.OK) == 30
    assert outcomes.count(Outcome.INSUFFICIENT_FUNDS) == 10
    assert legs.requests < len(transfers)
    response = await client.get(f"/api/v1/wallets/{sender}")
    assert (await response.json())["balance"] == "0.00"


async def test_the_internal_listener_takes_the_cluster_credential_and_no_client_key(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """With API keys configured, a leg carrying a client key (bearer, with the forwarded
    marker, or under the cluster scheme) is 401 problem+json and moves nothing; HttpLegs
    with another credential gets NOT_OWNER (refused, nothing applied); with the cluster's
    credential the leg applies."""
    headers = {"Authorization": "Bearer k1"}
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=parse_keys("k1"))))
    internal = await internal_beside(client, aiohttp_client)
    sender = await funded_wallet(client, 1, headers)
    receiver = await funded_wallet(client, 0, headers)
    transfer = opened(sender, receiver, 100)
    leg = encode_leg(OperationKind.TRANSFER_OUT, transfer, None)
    for refused_headers in (
        {},
        {FORWARDED_HEADER: "1"},
        {**headers, FORWARDED_HEADER: "1"},
        {"Authorization": "Walletd-Cluster k1", FORWARDED_HEADER: "1"},
        {"Authorization": f"Bearer {CREDENTIAL.secret}"},  # the right secret, wrong kind
    ):
        response = await internal.post(LEGS_PATH, json={"legs": [leg]}, headers=refused_headers)
        assert response.status == 401, refused_headers
        assert response.content_type == "application/problem+json"
        assert (await response.json())["code"] == "UNAUTHORIZED"
    response = await client.get(f"/api/v1/wallets/{sender}", headers=headers)
    assert (await response.json())["balance"] == "1.00"
    other = HttpLegs(timeout_s=5, connections_max=2, credential=ClusterCredential.generate())
    async with other as legs:
        refused = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
    assert refused.outcome is Outcome.NOT_OWNER  # refused before anything ran
    assert legs.sent["refused"] == 1
    async with legs_client() as legs:
        reply = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
    assert reply.outcome is Outcome.OK


def test_the_route_is_not_in_the_public_document() -> None:
    """The OpenAPI document describes the public API only."""
    assert not [path for path in build_openapi_document()["paths"] if "internal" in path]


async def test_an_owner_that_cannot_be_connected_to_never_saw_the_leg() -> None:
    """Connection refused is NOT_OWNER (nothing applied: the delivery may go elsewhere)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transfer = opened(str(uuid4()), str(uuid4()), 100)
    async with legs_client() as legs:
        reply = await legs.send(
            f"http://127.0.0.1:{port}", OperationKind.TRANSFER_IN, transfer, None
        )
    assert reply.outcome is Outcome.NOT_OWNER


async def test_an_owner_that_answers_too_late_leaves_the_outcome_unknown() -> None:
    """A leg sent and not answered within the timeout is UNAVAILABLE (it may have landed)."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts, never answers
        port = silent.getsockname()[1]
        transfer = opened(str(uuid4()), str(uuid4()), 100)
        async with legs_client(0.3) as legs:
            reply = await legs.send(
                f"http://127.0.0.1:{port}", OperationKind.TRANSFER_IN, transfer, None
            )
    assert reply.outcome is Outcome.UNAVAILABLE
    assert legs.sent["unknown"] == 1


async def test_a_leg_applied_by_another_process_carries_the_transfers_actor(
    client: Client, internal: Client
) -> None:
    """The key that asked for a transfer, and its metadata, travel with its legs: the rows
    the owner writes for a leg carry them, whichever process (and whatever credential)
    delivered the leg."""
    sender = await funded_wallet(client, 1)
    receiver = await funded_wallet(client, 0)
    transfer = opened(sender, receiver, 100)._replace(actor="billing", metadata=(("m", "1"),))
    async with legs_client() as legs:
        for kind in (OperationKind.TRANSFER_OUT, OperationKind.TRANSFER_IN):
            reply = await legs.send(url_of(internal), kind, transfer, None)
            assert reply.outcome is Outcome.OK
    for wallet in (sender, receiver):
        history = await (await client.get(f"/api/v1/wallets/{wallet}/operations")).json()
        assert history["items"][0]["transfer_id"] == str(transfer.transfer_id)
        assert history["items"][0]["actor"] == "billing"
        assert history["items"][0]["metadata"] == {"m": "1"}


async def test_a_credit_to_a_closed_wallet_is_refused_over_the_wire_and_its_refund_taken(
    client: Client, internal: Client
) -> None:
    """Through the internal route, as between processes: the credit of a transfer to a
    CLOSED wallet is WALLET_CLOSED, the refund leg carrying that failure code is taken
    (the transfer ends FAILED, the sender whole again), and a frozen sender's wallet view
    travels back with its status."""
    sender, receiver = await funded_wallet(client, 10), await funded_wallet(client, 0)
    closed = await client.patch(f"/api/v1/wallets/{receiver}", json={"status": "CLOSED"})
    assert closed.status == 200
    transfer = opened(sender, receiver, 400)
    async with legs_client() as legs:
        debit = await legs.send(url_of(internal), OperationKind.TRANSFER_OUT, transfer, None)
        credit = await legs.send(url_of(internal), OperationKind.TRANSFER_IN, transfer, None)
        frozen = await client.patch(f"/api/v1/wallets/{sender}", json={"status": "FROZEN"})
        assert frozen.status == 200
        refund = await legs.send(
            url_of(internal), OperationKind.TRANSFER_REFUND, transfer, "WALLET_CLOSED"
        )
    assert debit.outcome is Outcome.OK
    assert credit.outcome is Outcome.WALLET_CLOSED
    assert (refund.outcome, refund.replayed) == (Outcome.OK, False)
    assert refund.wallet is not None
    assert (refund.wallet.balance, refund.wallet.status) == (1000, WalletStatus.FROZEN)
    response = await client.get(f"/api/v1/transfers/{transfer.transfer_id}")
    body = await response.json()
    assert (body["status"], body["failure_code"]) == ("FAILED", "WALLET_CLOSED")


async def test_a_wallets_currency_is_read_on_the_internal_listener_only_with_the_credential(
    client: Client, internal: Client
) -> None:
    """GET /internal/v1/wallets/{id}/currency (a coordinator reading a receiver's currency
    before any money moves): 401 without the cluster credential; with it the currency, 404
    for a missing wallet; HttpLegs.read_currency reads it as the coordinator does."""
    response = await client.post("/api/v1/wallets", json={"currency": "JPY"})
    wallet = (await response.json())["id"]
    path = CURRENCY_PATH.format(wallet_id=wallet)
    assert (await internal.get(path)).status == 401
    response = await internal.get(path, headers=AUTHORIZED)
    assert (response.status, await response.json()) == (200, {"currency": ["JPY", 0]})
    missing = await internal.get(CURRENCY_PATH.format(wallet_id=uuid.uuid4()), headers=AUTHORIZED)
    assert missing.status == 404
    assert (await client.get(path)).status == 404  # not a route of the public app
    async with legs_client() as legs:
        reply = await legs.read_currency(url_of(internal), uuid.UUID(wallet))
    assert reply.wallet is not None
    assert reply.wallet.currency == Currency("JPY", 0)

"""The trust boundary between clients and walletd processes (http/internal.py, cli/credential.py).

A forged transfer leg (a credit with no debit: money minted) is refused at two layers: the
public port has no internal route in any path spelling (raw sockets, since clients
normalise paths), and the internal listener takes only the cluster credential, which no
client key can be. Real app, real PostgreSQL, real sockets; `walletd serve` in the slow test.
"""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.conftest import AppFactory
from tests.processes import start_walletd
from walletd.cli.config import load_config
from walletd.cli.credential import CREDENTIAL_FILE_NAME, cluster_credential
from walletd.cli.main import _parser
from walletd.engine.model import OperationKind, TransferRecord, TransferStatus
from walletd.http.forwarding import FORWARDED_HEADER
from walletd.http.internal import ClusterCredential, create_internal_app
from walletd.http.keys import parse_keys
from walletd.http.legs import LEGS_PATH, encode_leg
from walletd.http.settings import HttpSettings
from walletd.persistence.operator import verify

Client = TestClient[web.Request, web.Application]

CLIENT_KEY = "client-key-1"
CLIENT_HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}

# Every way we know to write the internal route so that some normaliser might map it to
# /internal/v1/legs: percent-encoding (whole or partial, either case), case, double and
# dot segments (plain and encoded), encoded slashes, trailing bits, absolute-form targets.
SPELLINGS = (
    "/internal/v1/legs",
    "/%69nternal/v1/legs",
    "/%69%6E%74%65%72%6E%61%6C/v1/legs",
    "/%69%6e%74%65%72%6e%61%6c%2f%76%31%2f%6c%65%67%73",
    "/INTERNAL/v1/legs",
    "/Internal/V1/Legs",
    "//internal/v1/legs",
    "/internal//v1//legs",
    "/./internal/v1/legs",
    "/internal/./v1/legs",
    "/api/v1/../../internal/v1/legs",
    "/api/v1/%2e%2e/%2e%2e/internal/v1/legs",
    "/api/v1/%2E%2E%2F%2E%2E%2Finternal/v1/legs",
    "/x/..%2finternal/v1/legs",
    "/internal%2fv1%2flegs",
    "/internal/v1/legs/",
    "/internal/v1/legs?x=1",
    "/internal/v1/legs;x=1",
    "/internal/v1/legs%00",
    "/%5Cinternal%5Cv1%5Clegs",
    "{base}/internal/v1/legs",
    "{base}/%69nternal/v1/legs",
    "HTTP://{authority}/internal/v1/legs",
    "{base}//internal/v1/legs",
)


async def funded_wallet(client: Client, amount: int) -> str:
    response = await client.post("/api/v1/wallets", headers=CLIENT_HEADERS)
    wallet: str = (await response.json())["id"]
    if amount:
        response = await client.post(
            f"/api/v1/wallets/{wallet}/operation",
            json={"operation_type": "DEPOSIT", "amount": amount},
            headers=CLIENT_HEADERS,
        )
        assert response.status == 200
    return wallet


def forged_credit(to_wallet: str, amount_minor: int) -> bytes:
    """A credit leg of a transfer nobody debited: applied, it would mint the amount."""
    now_us = time.time_ns() // 1000
    transfer = TransferRecord(
        uuid4(), uuid4(), UUID(to_wallet), amount_minor, None,
        TransferStatus.PENDING, None, now_us, now_us,
    )  # fmt: skip
    return orjson.dumps({"legs": [encode_leg(OperationKind.TRANSFER_IN, transfer, None)]})


async def raw_post(host: str, port: int, target: str, body: bytes, headers: dict[str, str]) -> int:
    """POST with the request target exactly as written (no client normalises it); the
    status of the answer."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close",
                 "Content-Type: application/json", f"Content-Length: {len(body)}",
                 *(f"{name}: {value}" for name, value in headers.items())]  # fmt: skip
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(status_line.split()[1])


async def balance(client: Client, wallet: str) -> str:
    response = await client.get(f"/api/v1/wallets/{wallet}", headers=CLIENT_HEADERS)
    answer: str = (await response.json())["balance"]
    return answer


def test_the_public_app_registers_no_internal_route(make_app: AppFactory) -> None:
    """No resource of the public app is, or starts with, the internal prefix."""
    app = make_app(HttpSettings(api_keys=parse_keys(CLIENT_KEY)))
    canonical = [resource.canonical for resource in app.router.resources()]
    assert canonical, "the public app has routes"
    assert not [path for path in canonical if "internal" in path.lower()]


async def test_every_spelling_of_a_forged_leg_on_the_public_port_is_404_or_400(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """A forged credit with a valid client key and the forwarded marker, sent to the public
    port under every spelling of the internal route, is answered 404 or 400 and moves no
    money; `verify` finds every balance equal to its log."""
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=parse_keys(CLIENT_KEY))))
    wallet = await funded_wallet(client, 1)
    host, port = client.server.host, client.server.port
    assert isinstance(port, int)
    authority = f"{host}:{port}"
    statuses = {}
    for spelling in SPELLINGS:
        target = spelling.format(base=f"http://{authority}", authority=authority)
        headers = {**CLIENT_HEADERS, FORWARDED_HEADER: "1"}
        statuses[target] = await raw_post(host, port, target, forged_credit(wallet, 10**9), headers)
    assert {target: s for target, s in statuses.items() if s not in (400, 404)} == {}
    assert await balance(client, wallet) == "1.00"
    assert (await verify(database_url)).clean


async def test_a_client_key_on_the_internal_port_mints_nothing(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str
) -> None:
    """On the internal listener a forged credit carrying a client key (with the marker, as
    a bearer key or under the cluster scheme), or no credential, is 401 and applies
    nothing; `verify` stays clean. The marker alone grants nothing."""
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=parse_keys(CLIENT_KEY))))
    credential = ClusterCredential.generate()
    internal: Client = await aiohttp_client(create_internal_app(client.app, credential))
    wallet = await funded_wallet(client, 1)
    host, port = internal.server.host, internal.server.port
    assert isinstance(port, int)
    for headers in (
        {FORWARDED_HEADER: "1"},
        {**CLIENT_HEADERS, FORWARDED_HEADER: "1"},
        {"Authorization": f"Walletd-Cluster {CLIENT_KEY}", FORWARDED_HEADER: "1"},
        {"Authorization": "Walletd-Cluster " + credential.secret[:-1]},
    ):
        status = await raw_post(host, port, LEGS_PATH, forged_credit(wallet, 10**9), headers)
        assert status == 401, headers
    assert await balance(client, wallet) == "1.00"
    assert (await verify(database_url)).clean


def config_of(*args: str, environ: dict[str, str] | None = None) -> Any:
    return load_config(_parser().parse_args(["serve", *args]), environ or {})


def test_the_credential_is_generated_once_into_a_private_file(tmp_path: Path) -> None:
    """Without one given, the credential is created in the data dir with mode 0600 and read
    back the same by every later start; it is never shown by repr."""
    config = config_of("--data-dir", str(tmp_path))
    first = cluster_credential(config)
    path = tmp_path / CREDENTIAL_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cluster_credential(config).secret == first.secret
    assert first.secret not in repr(first)
    assert first.secret not in str(first)
    assert [p.name for p in tmp_path.iterdir()] == [CREDENTIAL_FILE_NAME]  # nothing left aside


def test_the_variable_beats_the_file_and_a_client_key_cannot_be_the_credential(
    tmp_path: Path,
) -> None:
    """WALLETD_CLUSTER_CREDENTIAL wins over the file; a credential equal to a client key,
    a short one, or a file others may read, is refused with a readable error."""
    secret = "s" * 32
    environ = {"WALLETD_CLUSTER_CREDENTIAL": secret}
    assert cluster_credential(config_of("--data-dir", str(tmp_path), environ=environ)).secret == (
        secret
    )
    assert not (tmp_path / CREDENTIAL_FILE_NAME).exists()
    with pytest.raises(ValueError, match="client API key"):
        cluster_credential(
            config_of(environ={**environ, "WALLETD_API_KEYS": f"other-key,{secret}"})
        )
    # A named key holds the secret too, in the variable or in the keys file.
    with pytest.raises(ValueError, match="client API key"):
        cluster_credential(config_of(environ={**environ, "WALLETD_API_KEYS": f"ops:move:{secret}"}))
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"reports:read:other-key\nbilling:read+move:{secret}\n")
    keys_file.chmod(0o600)
    with pytest.raises(ValueError, match="client API key"):
        cluster_credential(config_of("--api-keys-file", str(keys_file), environ=environ))
    with pytest.raises(ValueError, match="at least"):
        cluster_credential(config_of(environ={"WALLETD_CLUSTER_CREDENTIAL": "short"}))
    shared = tmp_path / "shared"
    shared.write_text(secret + "\n")
    shared.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        cluster_credential(config_of("--cluster-credential-file", str(shared)))
    shared.chmod(0o600)
    assert cluster_credential(config_of("--cluster-credential-file", str(shared))).secret == (
        secret
    )


def test_starts_at_the_same_instant_create_one_credential(tmp_path: Path) -> None:
    """Eight starts creating the same missing file at once all read one credential (the
    file appears whole, by link(), or not at all)."""
    config = config_of("--cluster-credential-file", str(tmp_path / "c" / "credential"))
    start = threading.Barrier(8)

    def load() -> str:
        start.wait()
        return cluster_credential(config).secret

    with ThreadPoolExecutor(8) as pool:
        secrets = set(pool.map(lambda _: load(), range(8)))
    assert len(secrets) == 1
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["credential"]


@pytest.mark.slow
async def test_walletd_serve_publishes_its_internal_listener_and_refuses_forged_legs(
    database_url: str, tmp_path: Path
) -> None:
    """A real `walletd serve` with a client key: the lease table names its internal
    listener (another port); a forged credit with the key is 404 on the public port and 401
    on the internal one; nothing moves, `verify` stays clean."""
    server = start_walletd(
        ["--database-url", database_url, "--shards", "4", "--data-dir", str(tmp_path / "d")],
        env={"WALLETD_API_KEYS": CLIENT_KEY},
        log_dir=tmp_path,
    )
    try:
        import aiohttp

        async with aiohttp.ClientSession(headers=CLIENT_HEADERS) as http:
            async with http.post(f"{server.url}/api/v1/wallets") as response:
                wallet = (await response.json())["id"]
            connection = await asyncpg.connect(database_url)
            try:
                internal_url = await connection.fetchval(
                    "SELECT internal_url FROM walletd_members WHERE url = $1", server.url
                )
            finally:
                await connection.close()
            assert internal_url is not None
            assert internal_url != server.url
            headers = {**CLIENT_HEADERS, FORWARDED_HEADER: "1"}
            for base, expected in ((server.url, 404), (internal_url, 401)):
                async with http.post(
                    base + LEGS_PATH, data=forged_credit(wallet, 10**9), headers=headers
                ) as response:
                    assert response.status == expected, base
            async with http.get(f"{server.url}/api/v1/wallets/{wallet}") as response:
                assert (await response.json())["balance"] == "0.00"
        credential_file = tmp_path / "d" / CREDENTIAL_FILE_NAME
        assert stat.S_IMODE(os.stat(credential_file).st_mode) == 0o600
    finally:
        server.terminate()
    assert (await verify(database_url)).clean

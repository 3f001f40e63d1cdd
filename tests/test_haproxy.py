"""Routing through a real HAProxy (.ci/install-haproxy): it computes the same shard as walletd
for every id, and its shard map follows the ownership table through the runtime API."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from tests.conftest import AppFactory
from tests.test_internal_listener import (
    CLIENT_HEADERS,
    CLIENT_KEY,
    SPELLINGS,
    Client,
    balance,
    forged_credit,
    funded_wallet,
    raw_post,
)
from walletd.cli.config import SETTINGS
from walletd.cli.haproxy import (
    SHARD_HEADER,
    MapSync,
    backend_name,
    haproxy_binary,
    initial_map,
    render_config,
    runtime_command,
    start_haproxy,
    wait_listening,
)
from walletd.engine.ownership import shard_of, shard_of_text
from walletd.http.forwarding import FORWARDED_HEADER
from walletd.http.keys import parse_keys
from walletd.http.settings import HttpSettings
from walletd.persistence.leases import ensure_cluster
from walletd.persistence.operator import verify

# Every test here starts walletd, PostgreSQL or HAProxy processes.
pytestmark = pytest.mark.slow

SHARDS = 64
IDS = 3000
WAIT_S = 20.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def stub(name: str) -> AsyncIterator[str]:
    """An HTTP server that answers every request with its name, the path it saw and the
    shard HAProxy computed."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {"server": name, "path": request.raw_path, "shard": request.headers.get(SHARD_HEADER)}
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    # Each request's server-side connection, by HAProxy's source port (keep-alive tests).
    app.on_response_prepare.append(_note_connection)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


SERVER_CONNECTIONS: list[int] = []


async def _note_connection(request: web.Request, _response: web.StreamResponse) -> None:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer is not None and request.path.startswith("/api/"):  # not HAProxy's health checks
        SERVER_CONNECTIONS.append(peer[1])


@contextlib.asynccontextmanager
async def haproxy(
    servers: list[str], folder: Path, sockets: list[Path] | None = None
) -> AsyncIterator[tuple[str, Path, Path]]:
    """HAProxy for these servers (on their Unix ``sockets`` when given); yields its URL, its
    map file and its stats socket."""
    port = free_port()
    map_path = folder / "shards.map"
    socket_path = folder / "haproxy.sock"
    map_path.write_text(initial_map(SHARDS))
    config_path = folder / "haproxy.cfg"
    config_path.write_text(
        render_config(
            servers,
            bind=f"127.0.0.1:{port}",
            shard_count=SHARDS,
            map_path=map_path,
            socket_path=socket_path,
            sockets=sockets,
        )
    )
    process = start_haproxy(config_path, folder / "haproxy.log")
    try:
        await wait_listening("127.0.0.1", port, process, WAIT_S, stats_socket=socket_path)
        yield f"http://127.0.0.1:{port}", map_path, socket_path
    finally:
        process.terminate()
        process.wait(10)


def some_paths(rng: random.Random) -> Iterator[tuple[str, str, str]]:
    """(method, path, id as written) over many ids: lowercase, uppercase, mixed."""

    def mixed(text: str) -> str:
        return "".join(rng.choice((c.lower(), c.upper())) for c in text)

    forms: list[Callable[[str], str]] = [str.lower, str.upper, mixed]
    for number in range(IDS):
        written = forms[number % 3](str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        yield rng.choice(
            [
                ("GET", f"/api/v1/wallets/{written}", written),
                ("POST", f"/api/v1/wallets/{written}/operation", written),
                ("GET", f"/api/v1/wallets/{written}/operations?limit=5", written),
            ]
        )


async def test_haproxy_computes_the_shard_walletd_computes_for_every_id(tmp_path: Path) -> None:
    """Over 3,000 random ids in three spellings and three routes, the shard HAProxy computes
    (path,field(5,/),lower,crc32,mod(64)) equals walletd's shard_of for the id."""
    async with stub("only") as server, haproxy([server], tmp_path) as (url, _map, _socket):
        rng = random.Random(20261202)
        requests = list(some_paths(rng))
        disagreements: list[tuple[str, str | None, int]] = []
        semaphore = asyncio.Semaphore(32)
        async with aiohttp.ClientSession() as http:

            async def check(method: str, path: str, written: str) -> None:
                async with semaphore, http.request(method, url + path) as response:
                    body = await response.json()
                expected = shard_of_text(written, SHARDS)
                assert expected == shard_of(uuid.UUID(written), SHARDS)
                assert body["path"] == path
                if body["shard"] != str(expected):
                    disagreements.append((written, body["shard"], expected))

            await asyncio.gather(*(check(*request) for request in requests))
        assert not disagreements, disagreements[:5]
        assert len({shard_of_text(w, SHARDS) for _, _, w in requests}) == SHARDS


async def test_a_creation_with_an_id_is_routed_by_its_id(tmp_path: Path) -> None:
    """POST /api/v1/wallets with {"id": …} gets the id's shard from HAProxy (so it goes to
    the owner, no forwarding hop), in any spelling of the id; without an id (or with an
    empty body) it has no shard and goes round-robin."""
    async with (
        stub("only") as server,
        haproxy([server], tmp_path) as (url, _map, _socket),
        aiohttp.ClientSession() as http,
    ):
        for number in range(30):
            wallet = str(uuid.uuid4())
            written = wallet.upper() if number % 2 else wallet
            async with http.post(f"{url}/api/v1/wallets", json={"id": written}) as response:
                assert (await response.json())["shard"] == str(shard_of_text(wallet, SHARDS))
        for body in (b"{}", b""):
            async with http.post(f"{url}/api/v1/wallets", data=body) as response:
                assert (await response.json())["shard"] is None


async def test_haproxy_keeps_its_connections_to_walletd_alive(tmp_path: Path) -> None:
    """Requests through HAProxy reuse its server-side connections (docs/SCALING.md,
    "Keep-alive and shutdown") instead of a new connection per request: 60 requests, on
    two client connections, reach the server on at most four connections."""
    SERVER_CONNECTIONS.clear()
    async with stub("only") as server, haproxy([server], tmp_path) as (url, _map, _socket):
        connector = aiohttp.TCPConnector(limit=2)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def some(count: int) -> None:
                for _ in range(count):
                    async with http.get(f"{url}/api/v1/wallets/{uuid.uuid4()}") as response:
                        assert response.status == 200

            await asyncio.gather(some(30), some(30))
    assert len(SERVER_CONNECTIONS) == 60
    assert len(set(SERVER_CONNECTIONS)) <= 4, len(set(SERVER_CONNECTIONS))


def test_walletd_keeps_idle_connections_longer_than_haproxy_does() -> None:
    """The ordering keep-alive's safety rests on (docs/SCALING.md, "Keep-alive and
    shutdown"): HAProxy gives up an idle server connection (its http-keep-alive timeout,
    then its pool's purge delay) before walletd's --keepalive-timeout would close it, so
    walletd never closes a connection HAProxy is about to send on."""
    config = render_config(
        ["http://127.0.0.1:1"], bind="127.0.0.1:2", shard_count=SHARDS,
        map_path=Path("shards.map"), socket_path=Path("haproxy.sock"),
    )  # fmt: skip

    def seconds(pattern: str) -> float:
        match = re.search(pattern + r" (\d+)s\b", config)
        assert match is not None, pattern
        return float(match.group(1))

    haproxy_idle_s = seconds("timeout http-keep-alive") + seconds("pool-purge-delay")
    walletd_idle_s = next(s.default for s in SETTINGS if s.name == "keepalive_timeout_s")
    assert isinstance(walletd_idle_s, float)
    assert walletd_idle_s > haproxy_idle_s
    assert "http-server-close" not in config
    assert "http-reuse safe" in config


async def test_the_shard_map_follows_the_ownership_table(database_url: str, tmp_path: Path) -> None:
    """MapSync pushes the owners from walletd_shard_leases into HAProxy's map (`set map`):
    a request goes to its shard's owner, and to the new owner once the shard moves."""
    connection = await asyncpg.connect(database_url)
    try:
        await ensure_cluster(connection, SHARDS)
        async with stub("a") as a, stub("b") as b, haproxy([a, b], tmp_path) as proxy:
            url, map_path, socket_path = proxy
            await connection.execute(
                "UPDATE walletd_shard_leases SET owner = 'x', epoch = epoch + 1,"
                " owner_url = CASE WHEN shard % 2 = 0 THEN $1 ELSE $2 END,"
                " expires_at = now() + interval '1 minute'",
                a, b,
            )  # fmt: skip
            sync = MapSync(database_url, [a, b], map_path=map_path, socket_path=socket_path)
            try:
                assert await sync.sync_once() == SHARDS
                assert await sync.sync_once() == 0
                shown = await runtime_command(socket_path, f"show map {map_path}")
                assert f" 0 {backend_name(0)}" in shown
                assert f" 1 {backend_name(1)}" in shown

                wallets = {shard_of(w, SHARDS): w for w in (uuid.uuid4() for _ in range(2000))}
                async with aiohttp.ClientSession() as http:

                    async def served_by(wallet: uuid.UUID) -> str:
                        async with http.get(f"{url}/api/v1/wallets/{wallet}") as response:
                            server: str = (await response.json())["server"]
                            return server

                    for shard, wallet in sorted(wallets.items())[:16]:
                        assert await served_by(wallet) == ("a" if shard % 2 == 0 else "b")

                    await connection.execute(
                        "UPDATE walletd_shard_leases SET owner_url = $1 WHERE shard = 0", b
                    )
                    assert await sync.sync_once() == 1
                    assert await served_by(wallets[0]) == "b"
            finally:
                await sync.close()
    finally:
        await connection.close()


async def test_no_spelling_of_the_internal_route_gets_through_haproxy(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], database_url: str, tmp_path: Path
) -> None:
    """The generated configuration in front of the real public app: a forged credit leg
    with a client key and the forwarded marker, under every spelling of the internal route,
    is answered 404 or 400 and moves no money; `verify` stays clean."""
    client: Client = await aiohttp_client(make_app(HttpSettings(api_keys=parse_keys(CLIENT_KEY))))
    wallet = await funded_wallet(client, 1)
    server = str(client.make_url("")).rstrip("/")
    async with haproxy([server], tmp_path) as (url, _map, _socket):
        host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
        statuses = {}
        for spelling in SPELLINGS:
            target = spelling.format(base=url, authority=f"{host}:{port}")
            headers = {**CLIENT_HEADERS, FORWARDED_HEADER: "1"}
            forged = forged_credit(wallet, 10**9)
            statuses[target] = await raw_post(host, port, target, forged, headers)
    assert {target: s for target, s in statuses.items() if s not in (400, 404)} == {}
    assert await balance(client, wallet) == "1.00"
    assert (await verify(database_url)).clean


async def test_a_process_dying_mid_request_is_answered_in_problem_json(tmp_path: Path) -> None:
    """A walletd process that dies (kill -9) after HAProxy sent it a request makes HAProxy
    answer 502 itself; the client gets walletd's problem+json UNAVAILABLE (outcome unknown,
    retry with the same key), not HAProxy's HTML page. The red-team review saw such 502s
    when one cluster member was killed under load."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # the request reached the "process"...
        if head.startswith(b"GET /healthz "):  # (alive for HAProxy's health checks)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        writer.transport.abort()  # ...which died before answering

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with (
            haproxy([f"http://127.0.0.1:{port}"], tmp_path) as (url, _map, _socket),
            aiohttp.ClientSession() as session,
            session.post(f"{url}/api/v1/transfers", json={}) as response,
        ):
            body = await response.json(content_type=None)
            content_type = response.headers.get("Content-Type")
    finally:
        server.close()
        await server.wait_closed()
    assert response.status == 502
    assert content_type == "application/problem+json"
    assert (body["status"], body["code"]) == (502, "UNAVAILABLE")


def _server_lines(config: str) -> list[str]:
    return [line.split()[2] for line in config.splitlines() if line.startswith("    server ")]


def test_with_sockets_every_server_line_names_its_unix_socket(tmp_path: Path) -> None:
    """`sockets` (walletd cluster): every server line, in be_any and as owner or backup in
    each be_wN, is unix@ its process's socket, in the servers' order, and HAProxy accepts
    the file (`haproxy -c`). Without them (walletd haproxy-config, Docker) the URLs' TCP
    addresses, as before; a socket list of another length is refused."""
    urls = ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
    sockets = [tmp_path / "walletd-0.sock", tmp_path / "walletd-1.sock"]
    common: dict[str, Any] = {
        "bind": "127.0.0.1:2", "shard_count": SHARDS,
        "map_path": tmp_path / "shards.map", "socket_path": tmp_path / "haproxy.sock",
    }  # fmt: skip
    config = render_config(urls, sockets=sockets, **common)
    unix = [f"unix@{sockets[0]}", f"unix@{sockets[1]}"]
    # be_any (both), be_w0 (owner 0, backup 1), be_w1 (owner 1, backup 0)
    assert _server_lines(config) == [unix[0], unix[1], unix[0], unix[1], unix[1], unix[0]]
    assert "127.0.0.1:700" not in config
    (tmp_path / "shards.map").write_text(initial_map(SHARDS))
    (tmp_path / "haproxy.cfg").write_text(config)
    checked = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(tmp_path / "haproxy.cfg")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tcp = ["127.0.0.1:7001", "127.0.0.1:7002"]
    assert _server_lines(render_config(urls, **common)) == [
        tcp[0],
        tcp[1],
        tcp[0],
        tcp[1],
        tcp[1],
        tcp[0],
    ]
    with pytest.raises(ValueError, match="1 Unix sockets for 2 walletd servers"):
        render_config(urls, sockets=sockets[:1], **common)


async def test_haproxy_reaches_a_server_on_its_unix_socket_only(tmp_path: Path) -> None:
    """With `sockets`, requests and health checks go to the socket: the server's URL names
    a TCP port nothing listens on, yet every request through HAProxy is answered by the
    server (over TCP it would be HAProxy's own 503), and the health check reaches it."""
    path = tmp_path / "w.sock"
    seen: list[str] = []

    async def echo(request: web.Request) -> web.Response:
        seen.append(request.path)
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response({"peer": peer, "server": "unix"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.UnixSite(runner, str(path)).start()
    try:
        async with (
            haproxy([f"http://127.0.0.1:{free_port()}"], tmp_path, [path]) as (url, _m, _s),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http,
        ):
            for _ in range(20):
                async with http.get(f"{url}/api/v1/wallets/{uuid.uuid4()}") as response:
                    assert response.status == 200, await response.text()
                    body = await response.json()
                assert body["server"] == "unix"
                assert not body["peer"]  # a TCP peer always has an address

            async def checked() -> bool:
                return "/healthz" in seen

            deadline = asyncio.get_running_loop().time() + WAIT_S
            while not await checked():
                assert asyncio.get_running_loop().time() < deadline, "no health check"
                await asyncio.sleep(0.05)
    finally:
        await runner.cleanup()


async def test_waiting_for_haproxy_includes_its_stats_socket(tmp_path: Path) -> None:
    """A frontend port that accepts before the stats socket's file exists (HAProxy binds in
    no promised order) is not "up" for a caller that sends runtime commands: wait_listening
    returns once the socket answers too. A stand-in plays HAProxy's two listeners, since the
    real one's order cannot be forced."""
    socket_path = tmp_path / "stats.sock"
    late_s = 0.5

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"Name: HAProxy\n")
        writer.close()

    frontend = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = frontend.sockets[0].getsockname()[1]
    # The process whose exit would end the wait.
    stand_in = await asyncio.to_thread(subprocess.Popen, ["sleep", "30"])
    stats: asyncio.Server | None = None
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await wait_listening("127.0.0.1", port, stand_in, WAIT_S)
        assert loop.time() - started < late_s  # the port alone: at once

        async def bind_late() -> asyncio.Server:
            await asyncio.sleep(late_s)
            return await asyncio.start_unix_server(answer, str(socket_path))

        binding = asyncio.create_task(bind_late())
        started = loop.time()
        await wait_listening("127.0.0.1", port, stand_in, WAIT_S, stats_socket=socket_path)
        assert loop.time() - started >= late_s * 0.9
        assert "HAProxy" in await runtime_command(socket_path, "show info")
        stats = await binding
    finally:
        stand_in.kill()
        stand_in.wait()
        frontend.close()
        if stats is not None:
            stats.close()

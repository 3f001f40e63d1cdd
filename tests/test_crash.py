"""The walletd process under abuse: kill -9 under load, SIGTERM drain, and overload."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import Callable
from decimal import Decimal

import aiohttp
import asyncpg
import pytest

from tests.processes import WalletdProcess
from tests.test_faults import check_database
from walletd.engine.money import MINOR_UNITS_PER_UNIT

pytestmark = pytest.mark.slow

StartWalletd = Callable[..., WalletdProcess]
WORKERS = 16
REQUESTS_PER_WORKER_MAX = 2000
TIMEOUT = aiohttp.ClientTimeout(total=30)


async def start(walletd_process: StartWalletd, *args: str) -> WalletdProcess:
    return await asyncio.to_thread(walletd_process, *args)


async def create_wallets(session: aiohttp.ClientSession, url: str, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        async with session.post(f"{url}/api/v1/wallets") as response:
            assert response.status == 201
            ids.append((await response.json())["id"])
    return ids


def _reset_by_peer(error: BaseException) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ConnectionResetError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class Load:
    """Keyed deposits from concurrent workers until stopped; remembers every 2xx."""

    def __init__(self, session: aiohttp.ClientSession, url: str, wallets: list[str]) -> None:
        self.session, self.url, self.wallets = session, url, wallets
        self.acked: dict[str, tuple[str, int]] = {}
        self.statuses: Counter[int] = Counter()
        self.codes: Counter[str] = Counter()
        self.refused = 0  # the connection was refused: the request never reached walletd
        # Reset by the peer before any answer: what the kernel does to connections still in
        # the listener's backlog when it closes; they never reached walletd (checked below).
        self.reset: dict[str, str] = {}
        self.dropped: list[str] = []  # sent, then closed or timed out without an answer
        self.stop = asyncio.Event()

    async def worker(self, number: int) -> None:
        for n in range(REQUESTS_PER_WORKER_MAX):
            if self.stop.is_set():
                return
            wallet = self.wallets[(number + n) % len(self.wallets)]
            key, amount = f"w{number}-{n}", 1 + n % 5
            try:
                async with self.session.post(
                    f"{self.url}/api/v1/wallets/{wallet}/operation",
                    json={"operation_type": "DEPOSIT", "amount": amount},
                    headers={"Idempotency-Key": key},
                ) as response:
                    self.statuses[response.status] += 1
                    if response.status == 200:
                        self.acked[key] = (wallet, amount * MINOR_UNITS_PER_UNIT)
                    elif response.status >= 400:
                        self.codes[(await response.json())["code"]] += 1
            except aiohttp.ClientConnectorError:
                # Nothing listens any more (drain done, or killed): the request was not sent.
                self.refused += 1
                await asyncio.sleep(0.01)
            except (TimeoutError, aiohttp.ClientError) as error:
                # Sent and never answered: a crash may do that, a drain must not.
                if _reset_by_peer(error):
                    self.reset[key] = repr(error)
                else:
                    self.dropped.append(f"{key}: {error!r}")
                await asyncio.sleep(0.01)

    async def run(self) -> None:
        await asyncio.gather(*(self.worker(n) for n in range(WORKERS)))

    async def until_acked(self, count: int) -> None:
        for _ in range(3000):
            if len(self.acked) >= count:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.acked)} deposits acknowledged")


async def test_kill_9_under_load_loses_nothing_acknowledged(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """SIGKILL during concurrent deposits; after a restart every acknowledged deposit is
    stored once, balance == sum(log), and the API reports the stored balances."""
    first = await start(walletd_process, "--database-url", database_url, "--shards", "2")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        wallets = await create_wallets(session, first.url, 8)
        load = Load(session, first.url, wallets)
        loading = asyncio.create_task(load.run())
        await load.until_acked(200)
        first.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(first.process.wait, 10)
        load.stop.set()
        await loading
    assert set(load.statuses) <= {200}, load.statuses  # no 5xx before the kill
    await check_database(database_url, load.acked)

    second = await start(walletd_process, "--database-url", database_url, "--shards", "2")
    connection = await asyncpg.connect(database_url)
    try:
        stored = {str(r["id"]): r["balance"] for r in await connection.fetch(
            "SELECT id, balance FROM wallets")}  # fmt: skip
    finally:
        await connection.close()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        for wallet in wallets:
            async with session.get(f"{second.url}/api/v1/wallets/{wallet}") as response:
                body = await response.json()
            assert Decimal(body["balance"]) * MINOR_UNITS_PER_UNIT == stored[wallet]


async def test_sigterm_drains_and_exits_cleanly(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """SIGTERM under load: every request sent gets a real answer (200, or 503 UNAVAILABLE
    once stopping); after the drain connections are refused, never dropped mid-request;
    exit code 0, and every acknowledged deposit is stored."""
    process = await start(walletd_process, "--database-url", database_url)
    # One connection per request: no idle keep-alive connection for the drain to close under
    # a request being written, so every failure is either refused or a dropped request.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        wallets = await create_wallets(session, process.url, 8)
        load = Load(session, process.url, wallets)
        loading = asyncio.create_task(load.run())
        await load.until_acked(100)
        process.process.send_signal(signal.SIGTERM)
        exit_code = await asyncio.to_thread(process.process.wait, 60)
        load.stop.set()
        await loading
    assert exit_code == 0, process.log()
    assert load.dropped == [], load.dropped
    assert set(load.statuses) <= {200, 503}, load.statuses
    assert set(load.codes) <= {"UNAVAILABLE"}, load.codes
    assert "Traceback" not in process.log()
    await check_database(database_url, load.acked)
    connection = await asyncpg.connect(database_url)
    try:
        applied_reset = await connection.fetch(
            "SELECT idempotency_key FROM wallet_operations WHERE idempotency_key = ANY($1)",
            list(load.reset),
        )
    finally:
        await connection.close()
    assert applied_reset == [], "a request reset without an answer was applied"


async def test_overload_answers_503_at_once_and_applies_only_accepted(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """Far more concurrent requests than a tiny mailbox: some get 503 OVERLOADED with
    Retry-After, nothing else fails, and exactly the accepted deposits are stored."""
    process = await start(
        walletd_process, "--database-url", database_url,
        "--shards", "1", "--mailbox-max", "2", "--batch-max", "1",
    )  # fmt: skip
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector) as session:
        (wallet,) = await create_wallets(session, process.url, 1)
        url = f"{process.url}/api/v1/wallets/{wallet}/operation"

        async def one(number: int) -> tuple[int, str | None, str | None]:
            async with session.post(
                url,
                json={"operation_type": "DEPOSIT", "amount": 1},
                headers={"Idempotency-Key": f"k{number}"},
            ) as response:
                code = None if response.status == 200 else (await response.json())["code"]
                return response.status, code, response.headers.get("Retry-After")

        results = await asyncio.gather(*(one(n) for n in range(400)))
    statuses = Counter(status for status, _code, _retry in results)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[503] > 0
    assert all(code == "OVERLOADED" and retry for status, code, retry in results if status == 503)
    accepted = {f"k{n}" for n, (status, _c, _r) in enumerate(results) if status == 200}
    connection = await asyncpg.connect(database_url)
    try:
        logged = {
            r[0] for r in await connection.fetch("SELECT idempotency_key FROM wallet_operations")
        }
        balance = await connection.fetchval("SELECT balance FROM wallets")
    finally:
        await connection.close()
    assert logged == accepted
    assert balance == len(accepted) * MINOR_UNITS_PER_UNIT


async def test_sigterm_fails_healthz_and_serves_through_the_drain_grace(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """After SIGTERM, for --drain-grace, /healthz answers 503 (a proxy stops opening
    connections) while requests are still served; then walletd exits 0. Without the grace
    the listener closed at once and HAProxy dropped requests on connections the kernel had
    completed but walletd had not accepted (the rolling-restart test in test_cluster.py)."""
    process = await start(walletd_process, "--database-url", database_url, "--drain-grace", "5")
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        (wallet,) = await create_wallets(session, process.url, 1)
        async with session.get(f"{process.url}/healthz") as response:
            assert response.status == 200
        process.process.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            async with session.get(f"{process.url}/healthz") as response:
                return response.status == 503

        for _ in range(100):
            if await draining():
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("/healthz never failed after SIGTERM")
        async with session.get(f"{process.url}/readyz") as response:
            assert response.status == 503
            assert (await response.json())["code"] == "UNAVAILABLE"
        async with session.post(
            f"{process.url}/api/v1/wallets/{wallet}/operation",
            json={"operation_type": "DEPOSIT", "amount": "1.00"},
        ) as response:
            assert response.status == 200, await response.text()
        assert process.process.poll() is None  # still inside its grace
    exit_code = await asyncio.to_thread(process.process.wait, 30)
    assert exit_code == 0, process.log()


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str
) -> tuple[int, dict[str, str]]:
    """One GET on a kept-alive connection; the status and the headers (lowercase names)."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: walletd\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    status_line, *lines = head.decode().split("\r\n")
    headers = {
        name.strip().lower(): value.strip()
        for name, _, value in (line.partition(":") for line in lines if line)
    }
    await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status_line.split()[1]), headers


async def test_while_draining_answers_close_their_connection_and_idle_ones_stay_open(
    walletd_process: StartWalletd, database_url: str
) -> None:
    """A proxy keeps connections to walletd alive (docs/SCALING.md, "Keep-alive and
    shutdown"). After SIGTERM each answer says `Connection: close` and its connection ends
    once written, so the proxy never sends on it again; a connection that sat idle is not
    closed during the grace (the proxy may still send on it until it marks walletd down):
    a request sent on it in the middle of the grace is answered."""
    process = await start(walletd_process, "--database-url", database_url, "--drain-grace", "4")
    host, port = process.url.removeprefix("http://").split(":")
    busy = await asyncio.open_connection(host, int(port))
    idle = await asyncio.open_connection(host, int(port))
    try:
        for connection in (busy, idle):
            status, headers = await _exchange(*connection, "/healthz")
            assert status == 200
            assert headers.get("connection", "").lower() != "close"
        process.process.send_signal(signal.SIGTERM)
        for _ in range(100):
            status, headers = await _exchange(*busy, "/healthz")
            if status == 503:
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError("/healthz never failed after SIGTERM")
        assert headers["connection"].lower() == "close"
        assert await asyncio.wait_for(busy[0].read(), 5) == b""  # walletd closed it
        await asyncio.sleep(1.5)  # idle through part of the grace: still open
        status, headers = await _exchange(*idle, "/api/v1/wallets")
        assert process.process.poll() is None
        assert headers["connection"].lower() == "close", (status, headers)
        assert await asyncio.wait_for(idle[0].read(), 5) == b""
    finally:
        for _reader, writer in (busy, idle):
            writer.close()
    exit_code = await asyncio.to_thread(process.process.wait, 30)
    assert exit_code == 0, process.log()

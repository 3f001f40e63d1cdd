"""walletd.client against the real app on real sockets: exact money, the error tree,
and exactly-once through retries of real faults (connections cut by a proxy, a 503 burst)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from loadtest import bench
from tests.conftest import AppFactory
from walletd.client.api import BulkItem, WalletdClient
from walletd.client.errors import (
    PROBLEM_CLASSES,
    Forbidden,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidRequest,
    ProblemError,
    RateLimited,
    Refused,
    TransportError,
    ValidationError,
    WalletAlreadyExists,
    WalletNotFound,
    problem_error,
)
from walletd.client.retrying import RetryPolicy, parse_retry_after_s
from walletd.engine.limits import EngineLimits
from walletd.http.keys import parse_keys
from walletd.http.problems import TITLES
from walletd.http.settings import HttpSettings

Client = TestClient[web.Request, web.Application]
FAST_RETRIES = RetryPolicy(attempts_max=5, total_s_max=20.0, backoff_base_s=0.01)


def base_url(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


class CountingSession:
    """An aiohttp session that counts the HTTP attempts it starts (real requests, traced)."""

    def __init__(self) -> None:
        self.attempts = 0
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        self.session = aiohttp.ClientSession(trace_configs=[trace])

    async def _started(self, session: Any, context: SimpleNamespace, params: Any) -> None:
        self.attempts += 1


@contextlib.asynccontextmanager
async def counting_client(
    url: str, policy: RetryPolicy = FAST_RETRIES, api_key: str | None = None
) -> AsyncIterator[tuple[WalletdClient, CountingSession]]:
    counting = CountingSession()
    try:
        async with WalletdClient(
            url, api_key=api_key, retry=policy, session=counting.session
        ) as walletd:
            yield walletd, counting
    finally:
        await counting.session.close()


class CuttingProxy:
    """A TCP proxy on loopback that forwards each request to walletd in full, then cuts the
    client's connection as the first bytes of the answer arrive, for the first ``cuts``
    answers: the operation was applied, and the client never hears of it."""

    def __init__(self, upstream_host: str, upstream_port: int, cuts: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.cuts_left = cuts
        self.cut = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()  # every pump ends on its own; no task is cancelled
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(
        self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_in, upstream_out = await asyncio.open_connection(*self.upstream)
        self._writers.update((client_out, upstream_out))
        try:
            await asyncio.gather(
                self._pump(client_in, upstream_out),
                self._answer(upstream_in, client_out),
            )
        except OSError:
            pass  # either side went away: the other is closed below
        finally:
            self._tasks.discard(task)
            self._writers.difference_update((client_out, upstream_out))
            upstream_out.transport.abort()
            client_out.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.close()

    async def _answer(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.cuts_left > 0:
                self.cuts_left -= 1
                self.cut += 1
                sink.transport.abort()  # a reset, as when a network path dies
                return
            sink.write(data)
            await sink.drain()
        sink.close()


StartProxy = Callable[[int], Awaitable[tuple[CuttingProxy, str]]]


@pytest.fixture
async def cutting_proxy(client: Client) -> AsyncIterator[StartProxy]:
    """Starts CuttingProxy instances in front of the real app; each is stopped at the end."""
    proxies: list[CuttingProxy] = []
    assert client.port is not None

    async def start(cuts: int) -> tuple[CuttingProxy, str]:
        assert client.port is not None
        proxy = CuttingProxy(client.host, client.port, cuts)
        proxies.append(proxy)
        return proxy, await proxy.start()

    yield start
    for proxy in proxies:
        await proxy.stop()


async def history_items(walletd: WalletdClient, wallet_id: str) -> list[Any]:
    return [item async for page in walletd.history(wallet_id, page_size=2) for item in page.items]


async def test_calls_round_trip_with_exact_decimals(client: Client) -> None:
    """create, deposit, withdraw, get and paged history work, and money stays exact Decimal."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, Decimal("0.10"))
        await walletd.deposit(wallet.id, "0.20")
        after = await walletd.deposit(wallet.id, 3)
        assert after.balance == Decimal("3.30")
        after = await walletd.withdraw(wallet.id, Decimal("1E+0"))
        assert after.balance == Decimal("2.30")
        assert (await walletd.get_wallet(uuid.UUID(wallet.id))).balance == Decimal("2.30")
        chosen = uuid.uuid4()
        assert (await walletd.create_wallet(chosen)).id == str(chosen)
        items = await history_items(walletd, wallet.id)
        assert [(i.operation_type, i.amount, i.balance_after) for i in items] == [
            ("WITHDRAW", Decimal("1.00"), Decimal("2.30")),
            ("DEPOSIT", Decimal("3.00"), Decimal("3.30")),
            ("DEPOSIT", Decimal("0.20"), Decimal("0.30")),
            ("DEPOSIT", Decimal("0.10"), Decimal("0.10")),
        ]
        assert all(item.idempotency_key for item in items)  # one generated per call


async def test_floats_are_refused_before_sending(client: Client) -> None:
    """A float amount raises TypeError: the client never rounds money through binary floats."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        with pytest.raises(TypeError):
            await walletd.deposit(wallet.id, 0.1)  # type: ignore[arg-type]


async def test_each_problem_code_raises_its_class_once(client: Client) -> None:
    """Each 4xx maps to its exception class, and none is retried (one attempt each)."""
    async with counting_client(base_url(client)) as (walletd, counting):
        wallet = await walletd.create_wallet()
        cases: list[tuple[type[ProblemError], Any]] = [
            (InsufficientFunds, walletd.withdraw(wallet.id, "5.00")),
            (WalletNotFound, walletd.get_wallet(uuid.uuid4())),
            (WalletAlreadyExists, walletd.create_wallet(wallet.id)),
            (ValidationError, walletd.deposit(wallet.id, "0.001")),
            (InvalidRequest, walletd.get_wallet("not-a-uuid")),
        ]
        for expected, call in cases:
            before = counting.attempts
            with pytest.raises(expected) as raised:
                await call
            assert counting.attempts == before + 1, f"{expected.__name__} was retried"
            assert raised.value.status in {400, 404, 409, 422}
        await walletd.deposit(wallet.id, "1.00", idempotency_key="order-1")
        with pytest.raises(IdempotencyKeyReused):
            await walletd.deposit(wallet.id, "2.00", idempotency_key="order-1")
        assert issubclass(InsufficientFunds, Refused)


async def test_a_connection_cut_after_the_request_is_applied_exactly_once(
    client: Client, cutting_proxy: StartProxy
) -> None:
    """The answers to a creation and to a deposit are cut after walletd applied them: the
    client retries each with its key, gets the original answer replayed, and the money
    moves once."""
    proxy, url = await cutting_proxy(0)
    async with counting_client(url) as (walletd, counting):
        proxy.cuts_left = 1
        wallet = await walletd.create_wallet()
        proxy.cuts_left = 1
        deposited = await walletd.deposit(wallet.id, "10.00")
        assert proxy.cut == 2
        assert counting.attempts == 4
        assert wallet.replayed
        assert deposited.replayed
        assert deposited.balance == Decimal("10.00")
        assert (await walletd.get_wallet(wallet.id)).balance == Decimal("10.00")
        assert len(await history_items(walletd, wallet.id)) == 1


async def test_a_post_without_a_key_is_never_retried(
    client: Client, cutting_proxy: StartProxy
) -> None:
    """A POST without an Idempotency-Key is sent once: a cut answer is a TransportError."""
    proxy, url = await cutting_proxy(1)
    async with counting_client(url) as (walletd, counting):
        with pytest.raises(TransportError):
            await walletd._call("POST", "/wallets")
        assert (proxy.cut, counting.attempts) == (1, 1)


async def test_retries_are_bounded(client: Client, cutting_proxy: StartProxy) -> None:
    """With every answer cut, a keyed call stops after attempts_max attempts."""
    proxy, url = await cutting_proxy(100)
    async with counting_client(url, RetryPolicy(attempts_max=3, backoff_base_s=0.01)) as (
        walletd,
        counting,
    ):
        with pytest.raises(TransportError):
            await walletd.create_wallet()
        assert (proxy.cut, counting.attempts) == (3, 3)


def _unavailable_total(metrics_text: str, reason: str) -> float:
    match = re.search(rf'^walletd_http_unavailable_total{{reason="{reason}"}} (\S+)$',
                      metrics_text, re.MULTILINE)  # fmt: skip
    return float(match.group(1)) if match else 0.0


async def test_a_503_burst_is_retried_to_exactly_once(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """A shard with a one-command mailbox refuses most of 16 concurrent deposits with 503
    OVERLOADED; the client honours Retry-After, retries each with its key, and every deposit
    lands exactly once."""
    limits = EngineLimits(
        pipelines=1, mailbox_commands_max=1, batch_ops_max=1, inflight_batches_max=1,
        idempotency_keys_max=1000,
    )  # fmt: skip
    server: Client = await aiohttp_client(make_app(limits=limits))
    policy = RetryPolicy(attempts_max=30, total_s_max=60.0, backoff_base_s=0.05, backoff_cap_s=1)
    deposits = 16
    async with counting_client(base_url(server), policy) as (walletd, counting):
        wallet = await walletd.create_wallet()
        answers = await asyncio.gather(
            *(walletd.deposit(wallet.id, "1.00") for _ in range(deposits))
        )
        assert all(answer.balance >= Decimal("1.00") for answer in answers)
        assert (await walletd.get_wallet(wallet.id)).balance == Decimal(deposits)
        assert len(await history_items(walletd, wallet.id)) == deposits
        assert counting.attempts > deposits + 1 + 2  # the burst really happened
    metrics = await (await server.get("/metrics")).text()
    assert _unavailable_total(metrics, "OVERLOADED") > 0


def test_backoff_is_jittered_exponential_and_honours_retry_after() -> None:
    """The wait grows as base * 2**(n-1) up to the cap, scaled by the draw, plus Retry-After."""
    policy = RetryPolicy(backoff_base_s=0.1, backoff_cap_s=1.0, retry_after_s_max=10.0)
    assert policy.delay_s(1, None, 0.5) == pytest.approx(0.05)
    assert policy.delay_s(3, None, 1.0) == pytest.approx(0.4)
    assert policy.delay_s(10, None, 1.0) == pytest.approx(1.0)
    assert policy.delay_s(1, 2.0, 0.0) == pytest.approx(2.0)
    assert policy.delay_s(1, 60.0, 0.0) == pytest.approx(10.0)


def test_retry_after_parses_seconds_and_dates() -> None:
    """Retry-After is delta-seconds or an HTTP-date; anything else means plain backoff."""
    assert parse_retry_after_s("1") == 1.0
    assert parse_retry_after_s(None) is None
    assert parse_retry_after_s("soon") is None
    now_s = 1_700_000_000.0
    assert parse_retry_after_s("Tue, 14 Nov 2023 22:13:25 GMT", now_s) == pytest.approx(5.0)


def test_unknown_codes_fall_back_to_their_status_class() -> None:
    """A code the client does not know yet still raises the class of its status."""
    assert type(problem_error(409, {"code": "SOME_FUTURE_REFUSAL"})).__name__ == "Refused"
    assert type(problem_error(503, {"code": "FENCED"})).__name__ == "ServiceUnavailable"
    assert type(problem_error(418, {})).__name__ == "InvalidRequest"


@pytest.mark.slow
async def test_the_example_script_runs_against_walletd(client: Client) -> None:
    """examples/quickstart.py runs to the end against a real walletd and prints the balance."""
    script = Path(__file__).parent.parent / "examples" / "quickstart.py"
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), base_url(client),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    output = stdout.decode()
    assert "refused as expected: INSUFFICIENT_FUNDS" in output
    assert ": 99.90\n" in output


async def test_the_bench_helpers_go_through_the_client(client: Client) -> None:
    """make bench creates its wallets and reads its balances back through walletd.client."""
    ids = await bench.create_wallets(base_url(client), 3)
    async with WalletdClient(base_url(client)) as walletd:
        await walletd.deposit(ids[1], "2.50")
    assert await bench.read_balances_cents(base_url(client), ids) == [0, 250, 0]


def test_every_code_the_server_answers_has_its_class() -> None:
    """Each problem code walletd's edge can answer maps to a class in the client's tree."""
    assert set(TITLES) <= set(PROBLEM_CLASSES), set(TITLES) - set(PROBLEM_CLASSES)


async def test_an_id_cannot_leave_its_path_segment(client: Client) -> None:
    """A wallet id with '/' or '..' is sent as one escaped segment, never as another route."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        with pytest.raises(InvalidRequest) as raised:
            await walletd.deposit(f"{wallet.id}/../../wallets", "1.00")
        assert raised.value.code == "INVALID_WALLET_ID"
        assert (await walletd.get_wallet(wallet.id)).balance == Decimal("0.00")


async def test_no_attempt_outlives_the_total_time(client: Client) -> None:
    """Against a server that never answers, the call ends near total_s_max, not after
    attempts_max full request timeouts."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    policy = RetryPolicy(attempts_max=10, total_s_max=1.0, backoff_base_s=0.01)
    started = asyncio.get_running_loop().time()
    try:
        async with WalletdClient(f"http://127.0.0.1:{port}", retry=policy,
                                 request_timeout_s=30.0) as walletd:  # fmt: skip
            with pytest.raises(TransportError):
                await walletd.get_wallet(uuid.uuid4())
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()
    assert asyncio.get_running_loop().time() - started < 5.0


async def test_bulk_through_a_cut_connection_applies_each_item_once(
    client: Client, cutting_proxy: StartProxy
) -> None:
    """A bulk call whose answer is cut after walletd applied it is retried with its request
    key: every item comes back replayed, and each item's money moved once; refused items
    come back as the single call's exception."""
    proxy, url = await cutting_proxy(0)
    async with counting_client(url) as (walletd, counting):
        a, b = await walletd.create_wallet(), await walletd.create_wallet()
        items = [
            BulkItem(a.id, "DEPOSIT", "1.50"),
            BulkItem(b.id, "DEPOSIT", Decimal("2")),
            BulkItem(b.id, "WITHDRAW", "9.00", idempotency_key="too-much"),
        ]
        before = counting.attempts
        proxy.cuts_left = 1
        results = await walletd.bulk(items)
        assert counting.attempts == before + 2
        assert [r.status for r in results] == [200, 200, 409]
        assert [r.wallet.replayed for r in results if r.wallet] == [True, True]
        assert isinstance(results[2].problem, InsufficientFunds)
        assert (await walletd.get_wallet(a.id)).balance == Decimal("1.50")
        assert (await walletd.get_wallet(b.id)).balance == Decimal("2.00")
        with pytest.raises(InsufficientFunds) as refused:
            # One wallet: an atomic request must fit one of the fixture's two shard actors.
            await walletd.bulk([BulkItem(b.id, "DEPOSIT", "0.50"), items[2]], atomic=True)
        assert refused.value.body["index"] == 1
        assert (await walletd.get_wallet(b.id)).balance == Decimal("2.00")


async def test_a_key_without_the_scope_or_over_its_rate_raises_its_class(
    make_app: AppFactory, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    """403 FORBIDDEN raises Forbidden (not retried); 429 RATE_LIMITED raises RateLimited
    with the server's Retry-After as ``retry_after``, once the retries are spent (a 429 is
    retried even without an Idempotency-Key: nothing was applied)."""
    keys = parse_keys("reader:read:reader-secret-1,maker:create:maker-secret-2")
    settings = HttpSettings(api_keys=keys, key_rate_per_s=0.2, key_rate_burst=1)
    client = await aiohttp_client(make_app(settings))
    url = base_url(client)
    once = RetryPolicy(attempts_max=1)
    async with WalletdClient(url, api_key="reader-secret-1", retry=once) as reader:
        with pytest.raises(Forbidden) as forbidden:
            await reader.create_wallet()
        assert forbidden.value.code == "FORBIDDEN"
    async with WalletdClient(url, api_key="maker-secret-2", retry=once) as maker:
        await maker.create_wallet()
        with pytest.raises(RateLimited) as limited:
            await maker.create_wallet()
        assert limited.value.retry_after == 5.0
    twice = RetryPolicy(attempts_max=2, total_s_max=0.5, retry_after_s_max=0.05)
    async with counting_client(url, twice, api_key="maker-secret-2") as (maker, counting):
        with pytest.raises(RateLimited):
            await maker.create_wallet()
        assert counting.attempts == 2

"""walletd.client against the real app on real sockets: exact money, the error tree,
and exactly-once through retries of real faults (connections cut by a proxy, a 503 burst)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
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
from tests.processes import WalletdProcess
from walletd.client.api import BulkItem, Event, Operation, WalletdClient
from walletd.client.errors import (
    PROBLEM_CLASSES,
    AlreadyReversed,
    AsOfNotSettled,
    CloseBlocked,
    CurrencyMismatch,
    Forbidden,
    IdempotencyKeyReused,
    InsufficientFunds,
    InvalidPaymentId,
    InvalidRequest,
    InvalidTransferId,
    OverdraftLimitInUse,
    PaymentNotCompleted,
    PaymentNotFound,
    PreconditionFailed,
    ProblemError,
    RateExceeded,
    RateLimited,
    RefundExceedsTransfer,
    Refused,
    TransferNotFound,
    TransportError,
    ValidationError,
    WalletAlreadyExists,
    WalletClosed,
    WalletFrozen,
    WalletNotFound,
    class_for_status,
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
    return [item async for item in walletd.history(wallet_id, page_size=2)]


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


async def test_update_wallet_sets_status_and_limit_and_maps_its_refusals(
    client: Client,
) -> None:
    """update_wallet (PATCH) sets a limit (the balance may then go below zero), a status and
    metadata (merged; 51 keys after the merge is ValidationError);
    Wallet.version is the ETag's seq and if_match uses it; each refusal raises its class:
    OverdraftLimitInUse, WalletFrozen, CloseBlocked (blocked_by), WalletClosed,
    PreconditionFailed (seq)."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        assert (wallet.status, wallet.overdraft_limit, wallet.version) == (
            "ACTIVE", Decimal(0), 0,
        )  # fmt: skip
        limited = await walletd.update_wallet(wallet.id, overdraft_limit="25.00")
        assert (limited.overdraft_limit, limited.available, limited.version) == (
            Decimal("25.00"), Decimal("25.00"), 1,
        )  # fmt: skip
        owing = await walletd.withdraw(wallet.id, "20.00", if_match=limited.version)
        assert (owing.balance, owing.version) == (Decimal("-20.00"), 2)
        with pytest.raises(PreconditionFailed) as stale:
            await walletd.withdraw(wallet.id, "1.00", if_match=limited.version)
        assert stale.value.seq == 2
        with pytest.raises(OverdraftLimitInUse):
            await walletd.update_wallet(wallet.id, overdraft_limit=0)
        frozen = await walletd.update_wallet(
            wallet.id, status="FROZEN", metadata={"tier": "gold", "gone": None}
        )
        assert (frozen.status, frozen.metadata) == ("FROZEN", {"tier": "gold"})
        with pytest.raises(ValidationError):
            await walletd.update_wallet(wallet.id, metadata={f"k{n}": "v" for n in range(50)})
        with pytest.raises(WalletFrozen):
            await walletd.withdraw(wallet.id, "1.00")
        with pytest.raises(CloseBlocked) as blocked:
            await walletd.update_wallet(wallet.id, status="CLOSED")
        assert blocked.value.blocked_by == ["BALANCE"]
        await walletd.deposit(wallet.id, "20.00")
        closed = await walletd.update_wallet(wallet.id, status="CLOSED", overdraft_limit=0)
        assert (closed.status, closed.balance, closed.overdraft_limit) == (
            "CLOSED", Decimal("0.00"), Decimal(0),
        )  # fmt: skip
        with pytest.raises(WalletClosed):
            await walletd.deposit(wallet.id, "1.00")
        items = await history_items(walletd, wallet.id)
        assert (items[0].operation_type, items[0].status) == ("WALLET_UPDATE", "CLOSED")


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


# -- every problem code has its own class; every error names its call -----------------------


def _codes_in(document: Any) -> set[str]:
    """Every problem code the OpenAPI document lists, wherever it keeps them: each error
    response's `x-problem-codes`, or a string enum of codes (a restructured document still
    lists them)."""
    found: set[str] = set()
    if isinstance(document, dict):
        enum = document.get("enum")
        if isinstance(enum, list) and "INTERNAL_ERROR" in enum:
            found.update(code for code in enum if isinstance(code, str))
        listed = document.get("x-problem-codes")
        if isinstance(listed, list):
            found.update(code for code in listed if isinstance(code, str))
        for value in document.values():
            found |= _codes_in(value)
    elif isinstance(document, list):
        for value in document:
            found |= _codes_in(value)
    return found


async def test_every_problem_code_the_server_declares_has_a_class_of_its_own(
    client: Client,
) -> None:
    """Each code in walletd.http.problems and in the live OpenAPI document maps to a class
    used by no other code and by no status fallback, and the answer raises exactly it."""
    response = await client.get("/api/openapi.json")
    declared = _codes_in(await response.json())
    assert "WALLET_NOT_FOUND" in declared
    codes = declared | set(TITLES)
    missing = codes - set(PROBLEM_CLASSES)
    assert not missing, f"codes without a class: {sorted(missing)}"
    fallbacks = {class_for_status(status) for status in range(400, 600)}
    by_class: dict[type[ProblemError], list[str]] = {}
    for code in sorted(codes):
        by_class.setdefault(PROBLEM_CLASSES[code], []).append(code)
    shared = {cls.__name__: names for cls, names in by_class.items() if len(names) > 1}
    assert not shared, f"classes shared by codes: {shared}"
    generic = sorted(code for code in codes if PROBLEM_CLASSES[code] in fallbacks)
    assert not generic, f"codes that raise a generic status class: {generic}"
    for code in codes:
        assert type(problem_error(400, {"code": code})) is PROBLEM_CLASSES[code]


class HeaderLog:
    """An aiohttp session that keeps each attempt's X-Request-Id, sent and answered."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answered: list[str] = []
        trace = aiohttp.TraceConfig()
        trace.on_request_start.append(self._started)
        trace.on_request_end.append(self._ended)
        self.session = aiohttp.ClientSession(trace_configs=[trace])

    async def _started(self, session: Any, context: SimpleNamespace, params: Any) -> None:
        self.sent.append(params.headers["X-Request-Id"])

    async def _ended(self, session: Any, context: SimpleNamespace, params: Any) -> None:
        self.answered.append(params.response.headers["X-Request-Id"])


async def test_errors_carry_the_calls_request_id_and_retry_after(
    make_app: AppFactory, aiohttp_client: Callable[..., Any], cutting_proxy: StartProxy
) -> None:
    """A refusal keeps the X-Request-Id walletd echoed and its Retry-After (AS_OF_NOT_SETTLED
    for an instant ahead says when to ask again); a call's retries share one request id,
    which a TransportError keeps too."""
    server: Client = await aiohttp_client(make_app())
    log = HeaderLog()
    try:
        async with WalletdClient(
            base_url(server), retry=FAST_RETRIES, session=log.session
        ) as walletd:
            wallet = await walletd.create_wallet()
            with pytest.raises(InsufficientFunds) as refused:
                await walletd.withdraw(wallet.id, "1.00")
            assert refused.value.request_id == log.answered[-1] == log.sent[-1]
            assert refused.value.retry_after_s is None
            ahead = datetime.now(UTC) + timedelta(seconds=30)
            with pytest.raises(AsOfNotSettled) as unsettled:
                await walletd.get_wallet(wallet.id, as_of=ahead)
            assert unsettled.value.retry_after_s is not None
            assert 28 <= unsettled.value.retry_after_s <= 30
            assert unsettled.value.request_id == log.answered[-1]
            assert len(set(log.sent)) == len(log.sent)  # one id per call
    finally:
        await log.session.close()

    _proxy, url = await cutting_proxy(100)
    log = HeaderLog()
    try:
        policy = RetryPolicy(attempts_max=3, backoff_base_s=0.01)
        async with WalletdClient(url, retry=policy, session=log.session) as walletd:
            with pytest.raises(TransportError) as cut:
                await walletd.create_wallet()
        assert len(log.sent) == 3
        assert set(log.sent) == {cut.value.request_id}
    finally:
        await log.session.close()


# -- every resource ----------------------------------------------------------------------


async def test_references_travel_with_operations_bulk_items_and_history(client: Client) -> None:
    """A reference given to deposit, withdraw and a bulk item comes back in the history;
    the same key with another reference is IdempotencyKeyReused."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, "5.00", reference="invoice-1", idempotency_key="k1")
        await walletd.withdraw(wallet.id, "1.00", reference="refund-1")
        (result,) = await walletd.bulk([BulkItem(wallet.id, "DEPOSIT", "2", reference="batch-7")])
        assert result.wallet is not None
        assert result.wallet.balance == Decimal("6.00")
        references = [item.reference async for item in walletd.history(wallet.id)]
        assert references == ["batch-7", "refund-1", "invoice-1"]
        with pytest.raises(IdempotencyKeyReused):
            await walletd.deposit(wallet.id, "5.00", reference="invoice-2", idempotency_key="k1")


async def test_metadata_travels_with_every_call_and_read(client: Client) -> None:
    """metadata= on create_wallet, deposit, withdraw, a bulk item, create_transfer and
    create_hold comes back in Wallet, Operation, Transfer and Hold; a wallet without has
    empty metadata; the same key with other metadata is IdempotencyKeyReused."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet(metadata={"owner": "u-1"})
        assert wallet.metadata == {"owner": "u-1"}
        assert (await walletd.get_wallet(wallet.id)).metadata == {"owner": "u-1"}
        plain = await walletd.create_wallet()
        assert plain.metadata == {}
        after = await walletd.deposit(wallet.id, "9", metadata={"op": "d"}, idempotency_key="m1")
        assert after.metadata == {"owner": "u-1"}  # the reply is the wallet
        await walletd.withdraw(wallet.id, "1", metadata={"op": "w"})
        (result,) = await walletd.bulk([BulkItem(wallet.id, "DEPOSIT", "1", metadata={"op": "b"})])
        assert result.wallet is not None
        moved = await walletd.create_transfer(wallet.id, plain.id, "2", metadata={"op": "t"})
        assert moved.metadata == {"op": "t"}
        assert (await walletd.get_transfer(moved.id)).metadata == {"op": "t"}
        hold = await walletd.create_hold(wallet.id, "1", metadata={"op": "h"})
        assert (await walletd.get_hold(hold.id)).metadata == {"op": "h"}
        seen = [op.metadata async for op in walletd.history(wallet.id)]
        assert seen == [{"op": "h"}, {"op": "t"}, {"op": "b"}, {"op": "w"}, {"op": "d"}]
        with pytest.raises(IdempotencyKeyReused):
            await walletd.deposit(wallet.id, "9", metadata={"op": "x"}, idempotency_key="m1")


async def test_history_is_an_item_iterator_with_the_apis_filters(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """history() yields Operation items across pages, filtered by since (inclusive),
    until (exclusive) and operation_type, with aware datetimes or RFC 3339 text; as_of
    reads the wallet as it was; a naive datetime is refused before anything is sent."""
    server: Client = await aiohttp_client(make_app())
    async with WalletdClient(base_url(server)) as walletd:
        wallet = await walletd.create_wallet()
        for amount in ("1.00", "2.00", "3.00"):
            await walletd.deposit(wallet.id, amount)
        await walletd.withdraw(wallet.id, "0.50")
        await walletd.deposit(wallet.id, "4.00")
        everything = [op async for op in walletd.history(wallet.id, page_size=2)]
        assert [op.seq for op in everything] == [5, 4, 3, 2, 1]
        assert all(isinstance(op, Operation) for op in everything)
        second, fourth = everything[3], everything[1]
        window = [
            op.seq
            async for op in walletd.history(
                wallet.id, since=second.created_at, until=fourth.created_at.isoformat(),
                page_size=1,
            )
        ]  # fmt: skip
        assert window == [3, 2]
        deposits = [
            op.amount
            async for op in walletd.history(wallet.id, operation_type="DEPOSIT", page_size=1)
        ]
        assert deposits == [Decimal("4.00"), Decimal("3.00"), Decimal("2.00"), Decimal("1.00")]
        page = await walletd.history_page(wallet.id, operation_type="WITHDRAW", limit=5)
        assert ([op.amount for op in page.items], page.next_cursor) == ([Decimal("0.50")], None)
        then = await walletd.get_wallet(wallet.id, as_of=fourth.created_at)
        assert (then.balance, then.as_of) == (Decimal("5.50"), fourth.created_at)
        with pytest.raises(ValueError, match="aware"):
            await walletd.get_wallet(wallet.id, as_of=datetime(2025, 1, 1))
        with pytest.raises(ValidationError) as invalid:
            await walletd.history_page(wallet.id, operation_type="GIFT")
        assert invalid.value.errors[0]["field"] == "operation_type"


async def test_transfers_are_created_replayed_read_and_refused_by_class(client: Client) -> None:
    """create_transfer moves money (COMPLETED), a retry with its key or its id replays it,
    get_transfer reads it; a sender short of money is InsufficientFunds (side from), a
    missing receiver is WalletNotFound with the FAILED, refunded transfer; an unknown or
    malformed id raises TransferNotFound / InvalidTransferId."""
    async with WalletdClient(base_url(client)) as walletd:
        payer, payee = await walletd.create_wallet(), await walletd.create_wallet()
        await walletd.deposit(payer.id, "10.00")
        moved = await walletd.create_transfer(
            payer.id, payee.id, "4.00", reference="rent", idempotency_key="t-1"
        )
        assert (moved.status, moved.amount, moved.reference) == (
            "COMPLETED",
            Decimal("4.00"),
            "rent",
        )
        again = await walletd.create_transfer(
            payer.id, payee.id, "4.00", reference="rent", idempotency_key="t-1"
        )
        assert (again.id, again.replayed) == (moved.id, True)
        chosen = uuid.uuid4()
        by_id = await walletd.create_transfer(payer.id, payee.id, "1.00", transfer_id=chosen)
        assert by_id.id == str(chosen)
        assert (
            await walletd.create_transfer(payer.id, payee.id, "1.00", transfer_id=chosen)
        ).replayed
        assert await walletd.get_transfer(moved.id) == moved
        assert (await walletd.get_wallet(payee.id)).balance == Decimal("5.00")
        with pytest.raises(InsufficientFunds) as short:
            await walletd.create_transfer(payer.id, payee.id, "99.00")
        assert short.value.body["side"] == "from"
        with pytest.raises(WalletNotFound) as nowhere:
            await walletd.create_transfer(payer.id, uuid.uuid4(), "1.00")
        assert nowhere.value.body["side"] == "to"
        assert nowhere.value.body["transfer"]["status"] == "FAILED"
        assert (await walletd.get_wallet(payer.id)).balance == Decimal("5.00")  # refunded
        with pytest.raises(TransferNotFound):
            await walletd.get_transfer(uuid.uuid4())
        with pytest.raises(InvalidTransferId):
            await walletd.get_transfer("not-a-transfer")


async def test_refunds_and_reversals_through_the_client(client: Client) -> None:
    """refund_transfer gives money back (refund_of, the original's refunded_amount), a
    retry with its key replays it, past what is left is RefundExceedsTransfer; refunds()
    lists them; reverse_operation reverses a deposit once (AlreadyReversed under another
    key), and the history carries the links both ways."""
    async with WalletdClient(base_url(client)) as walletd:
        payer, payee = await walletd.create_wallet(), await walletd.create_wallet()
        await walletd.deposit(payer.id, "10.00")
        moved = await walletd.create_transfer(payer.id, payee.id, "4.00")
        back = await walletd.refund_transfer(
            moved.id, "1.50", reason="broken", metadata={"case": "7"}, idempotency_key="rf"
        )
        assert (back.refund_of, back.amount, back.reference) == (
            moved.id,
            Decimal("1.50"),
            "broken",
        )
        again = await walletd.refund_transfer(
            moved.id, "1.50", reason="broken", metadata={"case": "7"}, idempotency_key="rf"
        )
        assert (again.id, again.replayed) == (back.id, True)
        assert (await walletd.get_transfer(moved.id)).refunded_amount == Decimal("1.50")
        with pytest.raises(RefundExceedsTransfer) as past:
            await walletd.refund_transfer(moved.id, "2.51")
        assert past.value.body["refundable"] == "2.50"
        rest = await walletd.refund_transfer(moved.id)
        assert rest.amount == Decimal("2.50")
        assert [r.id async for r in walletd.refunds(moved.id)] == [rest.id, back.id]
        wallet = await walletd.reverse_operation(payer.id, 1, reason="chargeback")
        assert wallet.balance == Decimal("0.00")
        with pytest.raises(AlreadyReversed):
            await walletd.reverse_operation(payer.id, 1)
        rows = [row async for row in walletd.history(payer.id)]
        assert (rows[0].operation_type, rows[0].reversal_of) == ("DEPOSIT_REVERSAL", 1)
        assert (rows[-1].operation_type, rows[-1].reversed_by) == ("DEPOSIT", rows[0].seq)
        assert rows[1].refund_of == moved.id


async def test_payments_are_created_replayed_read_and_refused_naming_the_posting(
    client: Client,
) -> None:
    """create_payment applies every posting (COMPLETED), a retry with its key replays it,
    get_payment reads it; a refusal raises its class with the posting's index and side and
    the FAILED payment; unknown or malformed ids raise PaymentNotFound / InvalidPaymentId."""
    async with WalletdClient(base_url(client)) as walletd:
        buyer, merchant, fee = (
            await walletd.create_wallet(), await walletd.create_wallet(),
            await walletd.create_wallet(),
        )  # fmt: skip
        await walletd.deposit(buyer.id, "10.00")
        postings: list[tuple[str, str, str] | dict[str, Any]] = [
            (buyer.id, merchant.id, "9.70"),
            {"from_wallet_id": buyer.id, "to_wallet_id": fee.id, "amount": "0.30",
             "metadata": {"role": "fee"}},
        ]  # fmt: skip
        paid = await walletd.create_payment(postings, reference="o-1", idempotency_key="p-1")
        assert (paid.status, [p.amount for p in paid.postings]) == (
            "COMPLETED", [Decimal("9.70"), Decimal("0.30")],
        )  # fmt: skip
        assert paid.postings[1].metadata == {"role": "fee"}
        again = await walletd.create_payment(postings, reference="o-1", idempotency_key="p-1")
        assert (again.id, again.replayed) == (paid.id, True)
        assert await walletd.get_payment(paid.id) == paid
        with pytest.raises(InsufficientFunds) as short:
            await walletd.create_payment([(buyer.id, merchant.id, "0.01")] * 2)
        assert (short.value.body["posting"], short.value.body["side"]) == (0, "from")
        assert short.value.body["payment"]["status"] == "FAILED"
        with pytest.raises(PaymentNotFound):
            await walletd.get_payment(uuid.uuid4())
        with pytest.raises(InvalidPaymentId):
            await walletd.get_payment("not-a-payment")


async def test_a_payment_is_refunded_per_posting_through_the_client(client: Client) -> None:
    """get_transfer of a posting names its payment; refund_payment answers one
    PaymentRefund per posting (the refund, or the problem as its class), replayed under its
    key; a FAILED payment raises PaymentNotCompleted."""
    async with WalletdClient(base_url(client)) as walletd:
        buyer, merchant, fee = (
            await walletd.create_wallet(), await walletd.create_wallet(),
            await walletd.create_wallet(),
        )  # fmt: skip
        await walletd.deposit(buyer.id, "10.00")
        paid = await walletd.create_payment(
            [(buyer.id, merchant.id, "9.70"), (buyer.id, fee.id, "0.30")]
        )
        first = paid.postings[0].transfer_id
        assert (await walletd.get_transfer(first)).payment_id == paid.id
        await walletd.withdraw(merchant.id, "5.00")
        results = await walletd.refund_payment(paid.id, reason="returned", idempotency_key="r")
        assert [(r.posting, r.transfer_id, r.status) for r in results] == [
            (0, first, 409), (1, paid.postings[1].transfer_id, 201),
        ]  # fmt: skip
        assert isinstance(results[0].problem, InsufficientFunds)
        assert results[1].refund is not None
        assert (results[1].refund.amount, results[1].refund.refund_of) == (
            Decimal("0.30"), paid.postings[1].transfer_id,
        )  # fmt: skip
        again = await walletd.refund_payment(paid.id, reason="returned", idempotency_key="r")
        assert [(r.refund_id, r.replayed) for r in again] == [(r.refund_id, True) for r in results]
        later = await walletd.refund_payment(paid.id)
        assert isinstance(later[1].problem, RefundExceedsTransfer)
        with pytest.raises(PaymentNotCompleted):
            await walletd.refund_payment((await _failed_payment(walletd, buyer.id, merchant.id)).id)


async def _failed_payment(walletd: WalletdClient, sender: str, receiver: str) -> Any:
    """A FAILED payment (its sender short of money), read back."""
    payment_id = uuid.uuid4()
    with pytest.raises(InsufficientFunds) as short:
        await walletd.create_payment([(sender, receiver, "1000.00")], payment_id=payment_id)
    assert short.value.body["payment"]["status"] == "FAILED"
    return await walletd.get_payment(payment_id)


async def test_a_capture_into_a_wallet_returns_its_transfer(client: Client) -> None:
    """capture(to_wallet_id=...) answers the hold with the transfer that moved the money,
    the same one get_transfer reads."""
    async with WalletdClient(base_url(client)) as walletd:
        source, target = await walletd.create_wallet(), await walletd.create_wallet()
        await walletd.deposit(source.id, "3.00")
        hold = await walletd.create_hold(source.id, "2.00", reference="order-5")
        captured = await walletd.capture(hold.id, "1.50", to_wallet_id=target.id)
        assert captured.transfer is not None
        assert (captured.transfer.status, captured.transfer.amount) == (
            "COMPLETED",
            Decimal("1.50"),
        )
        assert captured.transfer.id == captured.transfer_id
        assert await walletd.get_transfer(captured.transfer.id) == captured.transfer
        assert (await walletd.get_hold(hold.id)).transfer is None  # only on the capture's answer


# -- the change feed ---------------------------------------------------------------------


async def test_events_page_pages_the_feed_with_money_as_decimal(client: Client) -> None:
    """events_page() returns the feed in order from the start, page by page through
    next_position; an empty page keeps the position; amounts are Decimal."""
    async with WalletdClient(base_url(client)) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, "1.25", reference="feed")
        await walletd.withdraw(wallet.id, "0.25")
        events: list[Event] = []
        after: str | None = None
        for _ in range(10):
            page = await walletd.events_page(after=after, limit=2)
            events.extend(page.events)
            if not page.events:
                assert page.next_position == after
                break
            after = page.next_position
        assert [event.type for event in events] == [
            "wallet.created", "operation.applied", "operation.applied",
        ]  # fmt: skip
        assert all(event.wallet_id == wallet.id for event in events)
        assert [event.data.get("amount") for event in events[1:]] == [
            Decimal("1.25"), Decimal("0.25"),
        ]  # fmt: skip


class StreamProxy:
    """A TCP proxy in front of walletd that forwards both ways until the test cuts every
    open connection (a reset, as when a network path dies); it keeps each connection's
    first bytes from the client (its request head)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.heads: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def cut(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        upstream_in, upstream_out = await asyncio.open_connection(*self.upstream)
        self._writers.update((writer, upstream_out))
        try:
            head = await reader.read(65536)
            self.heads.append(head)
            upstream_out.write(head)
            await asyncio.gather(self._pump(reader, upstream_out), self._pump(upstream_in, writer))
        except OSError:
            pass  # one side was cut: the other is closed below
        finally:
            self._tasks.discard(task)
            self._writers.difference_update((writer, upstream_out))
            writer.transport.abort()
            upstream_out.transport.abort()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        sink.transport.abort()  # one side ended: so does the other


def _last_event_id(head: bytes) -> str | None:
    match = re.search(rb"^Last-Event-ID: (\S+)\r$", head, re.MULTILINE | re.IGNORECASE)
    return None if match is None else match.group(1).decode()


async def _take(events: AsyncIterator[Event], count: int) -> list[Event]:
    taken: list[Event] = []
    async with asyncio.timeout(20):
        while len(taken) < count:
            taken.append(await anext(events))
    return taken


async def test_the_event_stream_resumes_after_a_cut_connection_without_loss_or_repeat(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> None:
    """The SSE connection is reset twice, once idle and once while events flow; events()
    reopens it with Last-Event-ID (the last event it yielded) and every change arrives
    exactly once, in feed order."""
    settings = HttpSettings(feed_poll_interval_s=0.02)
    server: Client = await aiohttp_client(make_app(settings=settings))
    assert server.port is not None
    proxy = StreamProxy(server.host, server.port)
    url = await proxy.start()
    try:
        async with (
            WalletdClient(base_url(server)) as writer,
            WalletdClient(url, retry=FAST_RETRIES) as reader,
        ):
            wallet = await writer.create_wallet()
            for _ in range(3):
                await writer.deposit(wallet.id, "1.00")
            events = reader.events()
            seen = await _take(events, 4)
            assert _last_event_id(proxy.heads[0]) is None
            proxy.cut()  # idle: everything so far was delivered
            await writer.deposit(wallet.id, "1.00")
            seen += await _take(events, 1)
            assert len(proxy.heads) == 2
            assert _last_event_id(proxy.heads[1]) == seen[3].position

            async def deposit_many() -> None:
                for _ in range(30):
                    await writer.deposit(wallet.id, "0.01")

            depositing = asyncio.create_task(deposit_many())
            seen += await _take(events, 10)
            proxy.cut()  # mid-flow: the rest of the deposits land while it reconnects
            await depositing
            seen += await _take(events, 35 - len(seen))
            await events.aclose()
        assert len(proxy.heads) == 3
        resumed_at = _last_event_id(proxy.heads[2])
        assert resumed_at in {event.position for event in seen}
        positions = [event.position for event in seen]
        assert len(set(positions)) == len(positions) == 35
        assert [event.data.get("seq") for event in seen[1:]] == list(range(1, 35))
        assert sum(event.data["amount"] for event in seen[1:]) == Decimal("4.30")
    finally:
        await proxy.stop()


@pytest.mark.slow
async def test_the_event_stream_survives_a_walletd_restart(
    walletd_process: Callable[..., WalletdProcess], database_url: str
) -> None:
    """A real walletd process is stopped (SIGTERM ends its streams) and started again on
    the same port while events() is open: it retries through the refused connections,
    resumes from its last event, and sees the changes made after the restart once."""
    first = walletd_process("--database-url", database_url, "--feed-poll-interval", "0.05")
    port = first.url.rsplit(":", 1)[1]
    policy = RetryPolicy(attempts_max=100, total_s_max=60.0, backoff_base_s=0.05, backoff_cap_s=0.5)
    async with WalletdClient(first.url, retry=policy) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, "1.00")
        events = walletd.events()
        seen = await _take(events, 2)
        assert await asyncio.to_thread(first.terminate) == 0
        second = walletd_process(
            "--database-url", database_url, "--feed-poll-interval", "0.05", "--port", port
        )
        assert second.url == first.url
        await walletd.deposit(wallet.id, "2.00")
        seen += await _take(events, 1)
        await events.aclose()
    assert [event.type for event in seen] == ["wallet.created", *["operation.applied"] * 2]
    assert [event.data["balance_after"] for event in seen[1:]] == [Decimal("1.00"), Decimal("3.00")]


async def test_a_key_without_the_scope_or_over_its_rate_raises_its_class(
    make_app: AppFactory, aiohttp_client: Callable[..., Awaitable[Client]]
) -> None:
    """403 FORBIDDEN raises Forbidden (not retried); 429 RATE_LIMITED raises RateLimited
    with the server's Retry-After as ``retry_after_s``, once the retries are spent (a 429 is
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
        with pytest.raises(RateExceeded) as limited:
            await maker.create_wallet()
        assert isinstance(limited.value, RateLimited)
        assert limited.value.retry_after_s == 5.0
    twice = RetryPolicy(attempts_max=2, total_s_max=0.5, retry_after_s_max=0.05)
    async with counting_client(url, twice, api_key="maker-secret-2") as (maker, counting):
        with pytest.raises(RateLimited):
            await maker.create_wallet()
        assert counting.attempts == 2


async def test_currencies_are_created_read_and_refused_by_class(client: Client) -> None:
    """create_wallet(currency=...) makes a wallet in it (Wallet.currency; money exact in its
    decimals); a transfer across currencies raises CurrencyMismatch, nothing moved; an
    amount past the currency's decimals raises ValidationError naming ``amount``."""
    async with WalletdClient(base_url(client)) as walletd:
        yen, dollars = await walletd.create_wallet(currency="JPY"), await walletd.create_wallet()
        assert (yen.currency, dollars.currency) == ("JPY", "USD")
        deposited = await walletd.deposit(yen.id, "1500")
        assert (deposited.balance, deposited.currency) == (Decimal(1500), "JPY")
        with pytest.raises(CurrencyMismatch):
            await walletd.create_transfer(yen.id, dollars.id, "10")
        with pytest.raises(ValidationError) as refused:
            await walletd.deposit(yen.id, "0.5")
        assert refused.value.errors[0]["field"] == "amount"
        assert (await walletd.get_wallet(yen.id)).balance == Decimal(1500)

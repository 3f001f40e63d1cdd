"""Shared fixtures: a real PostgreSQL per test session, real apps on real sockets.

PostgreSQL: an embedded server started once per session in a temporary folder, or the
server in ``WALLETD_TEST_DATABASE_URL``; either way every session works in databases it
creates itself (``walletd_test_*``) and drops at the end, never in leftovers.

The ``slow`` marker is kept true by a guard, not by review: a test that is not marked
``slow`` and starts a process (a walletd, a walletd command, Locust, a browser, a tool, a
PostgreSQL of its own, or stops/starts one) fails with the name of the process. So
``pytest -m "not slow"`` is a process-free loop; only the session's own PostgreSQL is
started for it, once.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.processes import WalletdProcess, start_walletd
from walletd.engine.limits import EngineLimits
from walletd.engine.observer import EngineObserver
from walletd.engine.router import Engine
from walletd.http.app import create_app
from walletd.http.metrics import Metrics
from walletd.http.settings import HttpSettings
from walletd.http.state import Services
from walletd.persistence.database import PoolSettings, create_pool
from walletd.persistence.embedded import EmbeddedPostgres
from walletd.persistence.log_reads import PostgresLogReader
from walletd.persistence.postgres_log import PostgresLog
from walletd.persistence.webhooks import PostgresWebhookStore

# Audit events (PEP 578) raised by everything that starts a program or forks this one.
_PROCESS_EVENTS = frozenset(
    {"subprocess.Popen", "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn",
     "os.spawn"}
)  # fmt: skip


class ProcessGuard:
    """Refuses to start a process while a test that is not marked ``slow`` runs."""

    def __init__(self) -> None:
        self.test: str | None = None  # the node id of the running unmarked test
        self._allowed = 0

    def __call__(self, event: str, args: tuple[object, ...]) -> None:
        if self.test is not None and not self._allowed and event in _PROCESS_EVENTS:
            program = args[1] if event == "subprocess.Popen" and len(args) > 1 else args[:1]
            raise RuntimeError(
                f"{self.test} starts a process ({event}: {program!r}) but is not marked "
                "slow: mark it @pytest.mark.slow (README, Testing)"
            )

    @contextlib.contextmanager
    def allowed(self) -> Iterator[None]:
        """For the session's PostgreSQL, which every test shares and none owns."""
        self._allowed += 1
        try:
            yield
        finally:
            self._allowed -= 1


PROCESS_GUARD = ProcessGuard()
sys.addaudithook(PROCESS_GUARD)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    """Setup, call and teardown of an unmarked test run under the guard."""
    PROCESS_GUARD.test = None if item.get_closest_marker("slow") else item.nodeid
    try:
        return (yield)
    finally:
        PROCESS_GUARD.test = None


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + database))


@dataclass
class PostgresServer:
    """The session's PostgreSQL: an admin DSN, and the embedded handle when we own it."""

    admin_dsn: str
    embedded: EmbeddedPostgres | None

    async def create_database(self) -> str:
        name = f"walletd_test_{secrets.token_hex(6)}"
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        finally:
            await connection.close()
        return with_database(self.admin_dsn, name)

    async def drop_database(self, dsn: str) -> None:
        name = urlsplit(dsn).path.lstrip("/")
        connection = await asyncpg.connect(self.admin_dsn)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    external = os.environ.get("WALLETD_TEST_DATABASE_URL")
    if external:
        yield PostgresServer(external, None)
        return
    folder = Path(tempfile.mkdtemp(prefix="walletd-test-pg-"))
    embedded = EmbeddedPostgres(folder)
    with PROCESS_GUARD.allowed():
        embedded.start()
    try:
        yield PostgresServer(embedded.dsn, embedded)
    finally:
        with PROCESS_GUARD.allowed():
            embedded.stop("immediate")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def own_server() -> AsyncIterator[str]:
    """A second embedded PostgreSQL, ours to misconfigure; its admin DSN.

    Not under tmp_path: every pytest session run as root resets /tmp/pytest-of-root to
    0700, which would lock the cluster's unprivileged owner out of its own data.
    """
    folder = Path(tempfile.mkdtemp(prefix="walletd-test-own-pg-"))
    embedded = EmbeddedPostgres(folder)
    dsn = embedded.start()
    try:
        yield dsn
    finally:
        embedded.destroy()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
async def fresh_database_url(pg_server: PostgresServer) -> AsyncIterator[str]:
    """A new, empty database for one test (migrations not applied)."""
    dsn = await pg_server.create_database()
    try:
        yield dsn
    finally:
        await pg_server.drop_database(dsn)


@pytest.fixture
async def database_url(fresh_database_url: str) -> str:
    """A new database for one test, migrated."""
    from walletd.cli.service import migrate_database

    await migrate_database(fresh_database_url)
    return fresh_database_url


@contextlib.asynccontextmanager
async def running_services(
    dsn: str, limits: EngineLimits | None = None, observer: EngineObserver | None = None
) -> AsyncIterator[Services]:
    """The production wiring minus the embedded server and the leases: pool, log, engine."""
    pool = await create_pool(dsn, PoolSettings(size_max=8))
    log = PostgresLog(pool)
    engine = Engine(log, limits or EngineLimits(pipelines=2), observer=observer)
    await engine.start()

    async def ready() -> str | None:
        return None if engine.accepting else "engine stopped"

    try:
        yield Services(
            engine, log, ready, PostgresLogReader(pool), webhooks=PostgresWebhookStore(pool)
        )
    finally:
        await engine.stop()
        await pool.close()


AppFactory = Callable[..., web.Application]


@pytest.fixture
def make_app(database_url: str) -> AppFactory:
    def build(
        settings: HttpSettings | None = None, limits: EngineLimits | None = None
    ) -> web.Application:
        # Wired like cli/main.py: the engine reports to the app's own metrics.
        metrics = Metrics()
        return create_app(
            settings or HttpSettings(),
            lambda: running_services(database_url, limits, metrics.engine),
            metrics=metrics,
        )

    return build


@pytest.fixture
async def client(
    make_app: AppFactory, aiohttp_client: Callable[..., Any]
) -> TestClient[web.Request, web.Application]:
    """The real walletd app on a real loopback socket, on a fresh migrated database."""
    test_client: TestClient[web.Request, web.Application] = await aiohttp_client(make_app())
    return test_client


@pytest.fixture
def walletd_process(tmp_path: Path) -> Iterator[Callable[..., WalletdProcess]]:
    """Start ``walletd serve`` as a real process; every one started is stopped at the end."""
    started: list[WalletdProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> WalletdProcess:
        process = start_walletd(list(args), env=env, log_dir=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill()


@pytest.fixture(scope="module")
async def module_client(
    pg_server: PostgresServer,
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """One real app (default settings) on one fresh migrated database for a whole module.

    For tables of many independent requests: each test makes its own wallets, and nothing
    it does can change another test's wallets.
    """
    from walletd.cli.service import migrate_database

    dsn = await pg_server.create_database()
    try:
        await migrate_database(dsn)
        metrics = Metrics()
        app = create_app(
            HttpSettings(), lambda: running_services(dsn, None, metrics.engine), metrics=metrics
        )
        async with TestClient(TestServer(app)) as test_client:
            yield test_client
    finally:
        await pg_server.drop_database(dsn)

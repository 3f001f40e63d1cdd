"""Several real `walletd serve` processes on one PostgreSQL: shard count, zombie, failover.

Leases last 1 s here (renewed every 0.25 s) so that moves take about a second; the shard
count is 16. Every test bounds its waits; the slow ones are marked slow.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from loadtest.procs import REPO_ROOT, children
from tests.processes import WalletdProcess, start_walletd, walletd_command
from tests.test_transfers_api import conservation_gap
from walletd.cli.cluster import INFLIGHT_BATCHES_ENV, MEMBER_INFLIGHT_BATCHES, _child_environment
from walletd.cli.config import SETTINGS, flags_as_environment, load_config
from walletd.cli.haproxy import (
    MapSync,
    initial_map,
    render_config,
    start_haproxy,
    wait_listening,
)
from walletd.cli.main import _COMMAND_SETTINGS, _parser
from walletd.engine.money import MINOR_UNITS_PER_UNIT
from walletd.engine.ownership import shard_of_text
from walletd.http.responses import format_timestamp
from walletd.persistence.operator import SIGNED_BALANCE_SQL

# Every test here starts walletd, PostgreSQL or HAProxy processes.
pytestmark = pytest.mark.slow

SHARDS = 16
LEASE_TTL_S = 1.0
FAILOVER_BOUND_S = 30.0  # loose on purpose; the measured figure is in docs/SCALING.md
WAIT_S = 30.0


@contextlib.asynccontextmanager
async def routed(
    dsn: str, urls: list[str], folder: Path, sockets: list[Path] | None = None
) -> AsyncIterator[str]:
    """HAProxy in front of these servers (on their Unix ``sockets`` when given), its shard
    map kept current; yields its URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    map_path, socket_path = folder / "shards.map", folder / "haproxy.sock"
    map_path.write_text(initial_map(SHARDS))
    config_path = folder / "haproxy.cfg"
    config_path.write_text(
        render_config(
            urls,
            bind=f"127.0.0.1:{port}",
            shard_count=SHARDS,
            map_path=map_path,
            socket_path=socket_path,
            log_requests=True,
            sockets=sockets,
        )
    )
    proxy = start_haproxy(config_path, folder / "haproxy.log")
    sync = MapSync(dsn, urls, map_path=map_path, socket_path=socket_path, interval_s=0.1)
    syncing: asyncio.Task[None] | None = None
    try:
        await wait_listening("127.0.0.1", port, proxy, WAIT_S, stats_socket=socket_path)
        syncing = asyncio.create_task(sync.run())
        yield f"http://127.0.0.1:{port}"
    finally:
        if syncing is not None:
            syncing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await syncing
        await sync.close()
        proxy.terminate()
        proxy.wait(10)


def serve(dsn: str, log_dir: Path, *extra: str) -> WalletdProcess:
    # A restart on the port a stopped process listened on can find it taken for a moment:
    # once free, the kernel may hand it out as the local port of an outgoing connection
    # (HAProxy's checks, forwarding), which bind() then collides with. Try again shortly.
    for attempt in range(5):
        try:
            return start_walletd(
                ["--database-url", dsn, "--shards", str(SHARDS), "--lease-ttl",
                 str(LEASE_TTL_S), "--lease-moves-max", "8", *extra],
                log_dir=log_dir,
            )  # fmt: skip
        except RuntimeError as error:
            if "Address already in use" not in str(error) or attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


async def until(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s} s: {what}")
        await asyncio.sleep(0.05)


async def leases(dsn: str) -> list[asyncpg.Record]:
    connection = await asyncpg.connect(dsn)
    try:
        rows: list[asyncpg.Record] = await connection.fetch(
            "SELECT shard, owner, owner_url, epoch, expires_at > now() AS live"
            " FROM walletd_shard_leases ORDER BY shard"
        )
        return rows
    finally:
        await connection.close()


async def create_wallet(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(f"{url}/api/v1/wallets") as response:
        assert response.status == 201, await response.text()
        wallet: str = (await response.json())["id"]
        return wallet


async def operate(
    http: aiohttp.ClientSession, url: str, wallet: str, kind: str, amount: int, key: str
) -> tuple[int, dict[str, Any]]:
    async with http.post(
        f"{url}/api/v1/wallets/{wallet}/operation",
        json={"operation_type": kind, "amount": amount},
        headers={"Idempotency-Key": key},
    ) as response:
        return response.status, await response.json(content_type=None)


async def balance_at(http: aiohttp.ClientSession, url: str, wallet: str) -> tuple[int, str]:
    async with http.get(f"{url}/api/v1/wallets/{wallet}") as response:
        body = await response.json(content_type=None)
        if response.status == 200:
            return 200, str(body["balance"])
        return response.status, str(body.get("code"))


async def check_money(dsn: str) -> None:
    """balance == sum(log) and seq == count(log) for every wallet (each row signed as
    `walletd verify` signs it); no key logged twice; balances plus PENDING transfers equal
    deposits minus withdrawals."""
    connection = await asyncpg.connect(dsn)
    try:
        mismatched = await connection.fetch(
            f"""SELECT w.id FROM wallets w LEFT JOIN wallet_operations o ON o.wallet_id = w.id
                GROUP BY w.id
               HAVING w.balance <> coalesce(sum({SIGNED_BALANCE_SQL}), 0)
                   OR w.seq <> count(o.id)"""
        )
        assert mismatched == []
        assert await conservation_gap(connection) == 0
        twice = await connection.fetch(
            "SELECT wallet_id, idempotency_key FROM wallet_operations"
            " WHERE idempotency_key IS NOT NULL GROUP BY 1, 2 HAVING count(*) > 1"
        )
        assert twice == []
    finally:
        await connection.close()


def test_a_different_shard_count_than_the_database_is_refused_at_start(
    database_url: str, tmp_path: Path
) -> None:
    """Issue 11 item 8, cluster form: the first server stores its shard count; a server
    started with another count exits 2 at once with one line naming both counts."""
    first = serve(database_url, tmp_path)
    try:
        done = subprocess.run(
            walletd_command(
                ["serve", "--port", "0", "--database-url", database_url, "--shards", "8"]
            ),
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
    finally:
        first.terminate()
    assert done.returncode == 2
    # One line of error (the start-up log lines before it are not errors).
    errors = [line for line in done.stderr.splitlines() if line.startswith("walletd: error:")]
    assert len(errors) == 1, done.stderr
    assert f"has {SHARDS} shards, walletd was started with 8" in errors[0]
    assert "Traceback" not in done.stderr


@pytest.mark.slow
async def test_a_second_server_joins_and_two_never_own_one_shard(
    database_url: str, tmp_path: Path
) -> None:
    """Issue 11 item 8, cluster form: a second `walletd serve` on the same database is not
    refused but takes half of the shards; each shard has one owner throughout; a wallet is
    served through either process (forwarded when needed), as-of reads by its owner only."""
    first = serve(database_url, tmp_path)
    second: WalletdProcess | None = None
    try:
        async with aiohttp.ClientSession() as http:
            wallet = await create_wallet(http, first.url)
            second = serve(database_url, tmp_path)
            urls = {first.url, second.url}

            async def split_evenly() -> bool:
                rows = await leases(database_url)
                assert all(row["owner_url"] in urls | {None} for row in rows)
                held = Counter(row["owner_url"] for row in rows if row["live"])
                return held[first.url] == held[second.url] == SHARDS // 2

            await until(split_evenly, "each server holds half of the shards")
            for url in urls:
                status, body = await operate(http, url, wallet, "DEPOSIT", 1, f"k-{url}")
                assert status == 200, body
            for url in urls:
                assert await balance_at(http, url, wallet) == (200, "2.00")

            # A request that already took its one hop and still meets a non-owner is not
            # sent on: 503 NOT_OWNER, nothing applied.
            owner_url = (await leases(database_url))[shard_of_text(wallet, SHARDS)]["owner_url"]
            other = next(url for url in urls if url != owner_url)
            async with http.post(
                f"{other}/api/v1/wallets/{wallet}/operation",
                json={"operation_type": "DEPOSIT", "amount": 5},
                headers={"Idempotency-Key": "hop", "X-Walletd-Forwarded": "1"},
            ) as response:
                body = await response.json(content_type=None)
                assert response.status == 503, body
                assert body["code"] == "NOT_OWNER"
                assert response.headers["Retry-After"]
            assert await balance_at(http, owner_url, wallet) == (200, "2.00")

            # An as-of read is answered by the owner alone (only it knows its commits in
            # flight): "now" reads the same through either process, and a non-owner asked
            # after the one hop does not answer it from the log itself.
            now = {"as_of": format_timestamp(time.time_ns() // 1000)}
            for url in urls:
                async with http.get(f"{url}/api/v1/wallets/{wallet}", params=now) as response:
                    body = await response.json(content_type=None)
                    assert (response.status, body.get("balance")) == (200, "2.00"), body
            async with http.get(
                f"{other}/api/v1/wallets/{wallet}", params=now,
                headers={"X-Walletd-Forwarded": "1"},
            ) as response:  # fmt: skip
                body = await response.json(content_type=None)
                assert (response.status, body["code"]) == (503, "NOT_OWNER"), body
    finally:
        if second is not None:
            assert second.terminate() == 0
        assert first.terminate() == 0
    await check_money(database_url)


@pytest.mark.slow
async def test_a_stopped_owner_is_fenced_out_and_after_sigcont_serves_nothing_stale(
    database_url: str, tmp_path: Path
) -> None:
    """The zombie: SIGSTOP the owner past its lease, a successor takes the shards and moves
    money, SIGCONT: the old owner answers nothing from its memory (every read through it is
    the successor's truth or 503 NOT_OWNER), it gives the shards up, and money adds up."""
    first = serve(database_url, tmp_path)
    second: WalletdProcess | None = None
    try:
        async with aiohttp.ClientSession() as http:
            wallet = await create_wallet(http, first.url)
            status, _ = await operate(http, first.url, wallet, "DEPOSIT", 10, "before")
            assert status == 200
            assert await balance_at(http, first.url, wallet) == (200, "10.00")
            shard = shard_of_text(wallet, SHARDS)

            first.process.send_signal(signal.SIGSTOP)
            try:
                second = serve(database_url, tmp_path)
                taken_over = second.url

                async def second_owns_it() -> bool:
                    row = (await leases(database_url))[shard]
                    return bool(row["live"] and row["owner_url"] == taken_over)

                await until(second_owns_it, "the successor holds the wallet's shard")
                status, body = await operate(http, second.url, wallet, "DEPOSIT", 5, "after")
                assert status == 200, body
                assert body["balance"] == "15.00"
            finally:
                first.process.send_signal(signal.SIGCONT)

            seen: Counter[tuple[int, str]] = Counter()
            deadline = time.monotonic() + 4 * LEASE_TTL_S
            while time.monotonic() < deadline:
                seen[await balance_at(http, first.url, wallet)] += 1
            assert set(seen) <= {(200, "15.00"), (503, "NOT_OWNER"), (503, "UNAVAILABLE")}, seen
            status, body = await operate(http, first.url, wallet, "DEPOSIT", 1, "resumed")
            assert status in (200, 503), body
            async with http.get(f"{first.url}/metrics") as response:
                metrics = await response.text()
            assert 'walletd_shard_moves_total{direction="LOST"}' in metrics
            lost = next(
                line for line in metrics.splitlines()
                if line.startswith('walletd_shard_moves_total{direction="LOST"}')
            )  # fmt: skip
            assert float(lost.split()[-1]) >= 1
    finally:
        if second is not None:
            second.terminate()
        first.terminate()
    await check_money(database_url)


@pytest.mark.slow
async def test_kill_9_of_one_of_three_moves_its_shards_and_loses_no_money(
    database_url: str, tmp_path: Path
) -> None:
    """Three servers behind a real HAProxy under keyed deposits and withdrawals; kill -9 one:
    its shards are served by the others within the bound; the only failures are counted
    NOT_OWNER (nothing applied) and UNAVAILABLE 503s; every acknowledged operation is in the
    log once; retrying every key applies nothing twice; balances equal their logs."""
    servers = [serve(database_url, tmp_path) for _ in range(3)]
    victim = servers[1]
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
            routed(database_url, [s.url for s in servers], tmp_path) as proxy_url,
        ):

            async def spread() -> bool:
                rows = await leases(database_url)
                held = Counter(row["owner_url"] for row in rows if row["live"])
                share = math.ceil(SHARDS / 3)
                return sum(held.values()) == SHARDS and all(
                    1 <= held[s.url] <= share for s in servers
                )

            await until(spread, "the three servers share the shards")
            wallets = [await create_wallet(http, servers[0].url) for _ in range(24)]
            for number, wallet in enumerate(wallets):
                status, _ = await operate(
                    http, servers[2].url, wallet, "DEPOSIT", 100, f"f{number}"
                )
                assert status == 200
            acked: dict[str, tuple[str, str, int]] = {}
            tried: dict[str, tuple[str, str, int]] = {}
            statuses: Counter[tuple[int, str]] = Counter()
            stop = asyncio.Event()
            live = [s.url for s in servers]
            keys = itertools.count()
            # Most requests go through HAProxy; some straight to a process (a stale client).
            targets = [proxy_url, proxy_url, proxy_url, *live]

            async def worker(seed: int) -> None:
                rng = random.Random(seed)
                while not stop.is_set():
                    key = f"op-{next(keys)}"
                    wallet = rng.choice(wallets)
                    kind = rng.choice(("DEPOSIT", "WITHDRAW"))
                    amount = rng.randint(1, 5)
                    tried[key] = (wallet, kind, amount)
                    url = rng.choice([t for t in targets if t in live or t == proxy_url])
                    try:
                        status, body = await operate(http, url, wallet, kind, amount, key)
                    except aiohttp.ClientConnectionError:
                        statuses[(0, "connection")] += 1
                        continue
                    statuses[(status, str(body.get("code", "")))] += 1
                    if status == 200:
                        acked[key] = (wallet, kind, amount)

            workers = [asyncio.create_task(worker(n)) for n in range(6)]
            await asyncio.sleep(1.0)  # load before the kill
            victim_url = victim.url
            killed_at = time.monotonic()
            victim.kill()
            live.remove(victim_url)
            # What a client saw, for the report: HAProxy retries a refused connection on a
            # backup, which forwards; a request caught inside the killed process is lost.

            async def moved() -> bool:
                rows = await leases(database_url)
                return all(row["live"] and row["owner_url"] in live for row in rows)

            await until(moved, "every shard is served by a survivor", FAILOVER_BOUND_S)
            failover_s = time.monotonic() - killed_at
            await asyncio.sleep(1.0)  # load after the move
            stop.set()
            await asyncio.gather(*workers)
            print(f"failover: kill -9 -> every shard owned by a survivor in {failover_s:.2f} s")
            print(f"answers: {dict(statuses)}")
            assert failover_s < FAILOVER_BOUND_S
            assert sum(n for (status, _), n in statuses.items() if status == 200) > 0
            unexpected = {
                k: n for k, n in statuses.items()
                if k[0] not in (0, 200, 409) and k != (503, "NOT_OWNER")
                and k != (503, "UNAVAILABLE")
            }  # fmt: skip
            assert not unexpected, statuses

            # Retry every key through a survivor: what was applied is replayed, never again.
            for key, (wallet, kind, amount) in tried.items():
                for _ in range(50):
                    status, body = await operate(http, live[0], wallet, kind, amount, key)
                    if status != 503:
                        break
                    await asyncio.sleep(0.1)
                assert status in (200, 409), (key, status, body)
                if key in acked:
                    assert status == 200, (key, body)
    finally:
        victim.kill()
        for server in servers:
            if server is not victim:
                server.terminate()
    await check_money(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        logged = {
            row["idempotency_key"]: (str(row["wallet_id"]), row["kind"], row["amount"])
            for row in await connection.fetch(
                "SELECT wallet_id, idempotency_key, kind, amount FROM wallet_operations"
            )
        }
    finally:
        await connection.close()
    for key, (wallet, kind, amount) in acked.items():
        kind_code = 1 if kind == "DEPOSIT" else 2
        assert logged[key] == (wallet, kind_code, amount * MINOR_UNITS_PER_UNIT)


def start_cluster(
    args: list[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    with log_path.open("w") as log_file:
        return subprocess.Popen(
            walletd_command(["cluster", *args]), stdout=subprocess.PIPE, stderr=log_file,
            text=True, env=None if env is None else {**os.environ, **env},
        )  # fmt: skip


def members_environment(cluster_pid: int, name: str) -> list[str]:
    """The value of environment variable ``name`` in each walletd the cluster started."""
    values = []
    for pid in children(cluster_pid):
        if b"walletd.cli.main\x00serve" in Path(f"/proc/{pid}/cmdline").read_bytes():
            for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\x00"):
                if entry.startswith(f"{name}=".encode()):
                    values.append(entry.split(b"=", 1)[1].decode())
    return values


def shards_table(args: list[str]) -> str:
    return subprocess.run(
        walletd_command(["shards", *args]), capture_output=True, text=True, timeout=60, check=True
    ).stdout


def test_every_setting_given_to_walletd_cluster_is_parsed_alike_by_its_members(
    tmp_path: Path,
) -> None:
    """A member reads, from the environment the cluster gives it, the same settings the
    cluster parsed from its flags: every flag `walletd cluster` accepts is carried (each
    under its first name, as typed), and a member's configuration built from them alone
    equals the cluster's on each of them."""
    command_settings = _COMMAND_SETTINGS["cluster"]
    assert command_settings is not None
    flagged = {s.flag: s for s in SETTINGS if s.flag is not None and s.name in command_settings}
    argv = [
        "cluster",
        *itertools.chain.from_iterable((f, f"v-{s.name}") for f, s in flagged.items()),
    ]
    assert flags_as_environment(_parser().parse_args(argv)) == {
        setting.env[0]: f"v-{setting.name}" for setting in flagged.values()
    }

    keys_file = tmp_path / "keys"
    keys_file.write_text("reader:read:" + "r" * 32 + "\n")
    argv = [
        "cluster", "--batch-max", "7", "--access-log", "--api-keys-file", str(keys_file),
        "--webhook-allowed-hosts", "a.example,b.example", "--key-rate", "5",
    ]  # fmt: skip
    flags = _parser().parse_args(argv)
    cluster = load_config(flags, environ={})
    member = load_config(argparse.Namespace(), environ=flags_as_environment(flags))
    for name in ("batch_ops_max", "access_log", "api_keys_file", "webhook_allowed_hosts",
                 "key_rate_per_s", "client_keys"):  # fmt: skip
        assert (
            getattr(member, name)
            == getattr(cluster, name)
            != getattr(load_config(argparse.Namespace(), environ={}), name)
        ), name


def test_members_of_a_cluster_commit_one_batch_at_a_time_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two or more members: one batch in flight each (one PostgreSQL takes all their
    commits); one member keeps serve's default; a flag or the environment always wins."""
    monkeypatch.delenv(INFLIGHT_BATCHES_ENV, raising=False)
    config = load_config(argparse.Namespace(), environ={})

    def inflight(processes: int, given: dict[str, str]) -> str | None:
        environment = _child_environment(config, "postgresql://db", given, processes)
        return environment.get(INFLIGHT_BATCHES_ENV)

    assert inflight(2, {}) == inflight(8, {}) == str(MEMBER_INFLIGHT_BATCHES) == "1"
    assert inflight(1, {}) is None
    assert inflight(2, {INFLIGHT_BATCHES_ENV: "3"}) == "3"
    monkeypatch.setenv(INFLIGHT_BATCHES_ENV, "2")
    assert inflight(2, {}) == "2"


def test_a_member_is_given_the_database_and_never_one_advertised_url_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each member advertises its own URL (a URL set for the cluster would send every
    forward to one member) and reaches the cluster's database under the one spelling that
    walletd reads first, whatever the operator's environment held."""
    monkeypatch.setenv("WALLETD_ADVERTISE_URL", "http://one-for-all:8000")
    monkeypatch.setenv("DATABASE_URL", "postgresql://stale")
    config = load_config(argparse.Namespace(), environ={})
    given = {"WALLETD_ADVERTISE_URL": "http://given:8000", "WALLETD_BATCH_MAX": "7"}
    environment = _child_environment(config, "postgresql://cluster-db", given, 2)
    assert "WALLETD_ADVERTISE_URL" not in environment
    assert "DATABASE_URL" not in environment
    assert environment["WALLETD_DATABASE_URL"] == "postgresql://cluster-db"
    assert environment["WALLETD_BATCH_MAX"] == "7"


@pytest.mark.slow
async def test_walletd_cluster_gives_its_members_the_keys_and_settings_of_its_flags(
    database_url: str, tmp_path: Path
) -> None:
    """`walletd cluster --api-keys-file F --access-log`: the members serve with those keys
    (no key: 401; a read key creating a wallet: 403; a create key: 201) and log every
    request. Flags reach the members through their environment, never their command line;
    a member given its defaults instead would serve an open API."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    reader, creator = "r" * 32, "c" * 32
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"reader:read:{reader}\ncreator:create:{creator}\n")
    keys_file.chmod(0o600)
    log_path = tmp_path / "cluster.log"
    cluster = start_cluster(
        ["--processes", "1", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--database-url", database_url, "--shards", str(SHARDS),
         "--api-keys-file", str(keys_file), "--access-log"],
        log_path,
    )  # fmt: skip
    assert cluster.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(cluster.stdout.readline), WAIT_S * 2)
        assert "walletd cluster listening" in line, line + log_path.read_text()
        url = f"http://127.0.0.1:{port}/api/v1/wallets"
        async with aiohttp.ClientSession() as http:
            answers = []
            for secret in (None, reader, creator):
                headers = {} if secret is None else {"Authorization": f"Bearer {secret}"}
                async with http.post(url, json={}, headers=headers) as response:
                    answers.append(response.status)
        assert answers == [401, 403, 201], answers
    finally:
        cluster.send_signal(signal.SIGTERM)
        code = cluster.wait(60)
        cluster.stdout.close()
    assert code == 0, log_path.read_text()
    member_log = (tmp_path / "data" / "cluster" / "walletd-0.log").read_text()
    logged = [json.loads(line)["status"] for line in member_log.splitlines() if line[:1] == "{"]
    assert logged.count(401) == 1, logged
    assert logged.count(201) == 1, logged


@pytest.mark.slow
async def test_walletd_cluster_serves_at_one_url_and_stops_cleanly(
    database_url: str, tmp_path: Path
) -> None:
    """`walletd cluster --processes 2` starts two servers and HAProxy at one URL: wallets
    work through it, `walletd shards` shows two owners sharing the shards, and SIGTERM stops
    everything with exit 0, every lease released. HAProxy reaches the servers on their Unix
    sockets in the run folder (0600, removed at the stop): its config names them, and a
    request sent through it reached a server with no peer address (a TCP connection always
    has one), while the cluster still prints the servers' TCP URLs."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    common = ["--database-url", database_url, "--shards", str(SHARDS)]
    log_path = tmp_path / "cluster.log"
    run_dir = tmp_path / "data" / "cluster"
    cluster = start_cluster(
        ["--processes", "2", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--lease-ttl", str(LEASE_TTL_S), *common],
        log_path, env={"WALLETD_ACCESS_LOG": "true"},
    )  # fmt: skip
    assert cluster.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(cluster.stdout.readline), WAIT_S * 2)
        assert f"walletd cluster listening on http://127.0.0.1:{port}" in line, (
            line + log_path.read_text()
        )
        assert re.search(r"2 processes: http://127\.0\.0\.1:\d+, http://127\.0\.0\.1:\d+;", line)
        sockets = [run_dir / f"walletd-{index}.sock" for index in range(2)]
        servers = re.findall(r"^    server w\d (\S+) ", (run_dir / "haproxy.cfg").read_text(), re.M)
        assert set(servers) == {f"unix@{path}" for path in sockets}, servers
        assert [stat.S_IMODE(path.lstat().st_mode) for path in sockets] == [0o600, 0o600]
        inflight = members_environment(cluster.pid, INFLIGHT_BATCHES_ENV)
        assert inflight == ["1", "1"], inflight
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            wallet = await create_wallet(http, url)
            status, body = await operate(http, url, wallet, "DEPOSIT", 3, "one")
            assert status == 200, body
            async with http.get(
                f"{url}/api/v1/wallets/{wallet}", headers={"X-Request-Id": "through-haproxy"}
            ) as response:
                assert response.status == 200
            assert await balance_at(http, url, wallet.upper()) == (200, "3.00")

            async def two_owners() -> bool:
                rows = await leases(database_url)
                held = Counter(row["owner_url"] for row in rows if row["live"])
                return len(held) == 2 and sum(held.values()) == SHARDS

            await until(two_owners, "two processes share the shards")
        table = shards_table(common)
        states = [line.split()[1] for line in table.splitlines()[1 : SHARDS + 1]]
        assert states == ["live"] * SHARDS, table
        assert "2 live walletd processes" in table
    finally:
        cluster.send_signal(signal.SIGTERM)
        code = cluster.wait(60)
        cluster.stdout.close()
    assert code == 0, log_path.read_text()
    assert not any(path.exists() for path in sockets)
    access = [
        json.loads(line)
        for index in range(2)
        for line in (run_dir / f"walletd-{index}.log").read_text().splitlines()
        if line.startswith("{")
    ]
    remotes = {entry["remote"] for entry in access if entry["request_id"] == "through-haproxy"}
    assert "" in remotes, remotes  # the first hop; a forward to the owner would be TCP
    rows = await leases(database_url)
    assert all(row["owner"] is None for row in rows)
    await check_money(database_url)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_a_rolling_restart_under_load_costs_only_counted_not_owner_answers(
    database_url: str, tmp_path: Path, transport: str
) -> None:
    """Three servers behind HAProxy under keyed load; each is restarted in turn (SIGTERM:
    drain, release its leases; then a new process on the same port): every answer is a
    success, a refusal (409) or a counted 503 NOT_OWNER; no outcome-unknown 503, no exit
    other than 0; every acknowledged operation is logged once; balances equal their logs.
    HAProxy reaches the servers on their Unix sockets (`walletd cluster`) or over TCP
    (`walletd haproxy-config`, Docker): the drain keeps both safe."""
    ports = []
    for _ in range(3):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    sockets = [tmp_path / f"w{index}.sock" for index in range(3)] if transport == "unix" else None

    def listen(index: int) -> list[str]:
        unix = [] if sockets is None else ["--unix-socket", str(sockets[index])]
        return ["--port", str(ports[index]), *unix]

    servers = [serve(database_url, tmp_path, *listen(index)) for index in range(3)]
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http,
            routed(database_url, [s.url for s in servers], tmp_path, sockets) as proxy_url,
        ):
            wallets = [await create_wallet(http, proxy_url) for _ in range(16)]
            for number, wallet in enumerate(wallets):
                status, _ = await operate(http, proxy_url, wallet, "DEPOSIT", 100, f"f{number}")
                assert status == 200
            acked: dict[str, tuple[str, str, int]] = {}
            statuses: Counter[tuple[int, str]] = Counter()
            stop = asyncio.Event()
            keys = itertools.count()

            async def worker(seed: int) -> None:
                rng = random.Random(seed)
                while not stop.is_set():
                    key = f"op-{next(keys)}"
                    wallet = rng.choice(wallets)
                    kind = rng.choice(("DEPOSIT", "WITHDRAW"))
                    amount = rng.randint(1, 5)
                    status, body = await operate(http, proxy_url, wallet, kind, amount, key)
                    statuses[(status, str(body.get("code", "")))] += 1
                    if status == 200:
                        acked[key] = (wallet, kind, amount)

            workers = [asyncio.create_task(worker(n)) for n in range(6)]
            for index in range(len(ports)):
                await asyncio.sleep(0.5)
                assert await asyncio.to_thread(servers[index].terminate) == 0
                servers[index] = serve(database_url, tmp_path, *listen(index))

                async def all_owned() -> bool:
                    rows = await leases(database_url)
                    return all(row["live"] for row in rows)

                await until(all_owned, "every shard owned again")
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.gather(*workers)
            print(f"rolling restart answers: {dict(statuses)}")
            allowed = {(200, ""), (409, "INSUFFICIENT_FUNDS"), (503, "NOT_OWNER")}
            assert set(statuses) <= allowed, statuses
            assert statuses[(200, "")] > 0
    finally:
        for server in servers:
            server.terminate()
    await check_money(database_url)
    connection = await asyncpg.connect(database_url)
    try:
        logged = {
            row["idempotency_key"]
            for row in await connection.fetch("SELECT idempotency_key FROM wallet_operations")
        }
    finally:
        await connection.close()
    assert set(acked) <= logged


def run_locust(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loadtest.run_locust", "--url", url, "--duration", "5",
         "--users", "20", "--classes", *CLUSTER_USER_CLASSES],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


# Every scenario: the ones whose requests name one wallet, transfers (their legs go to
# whichever process owns each wallet) and bulk requests (each process's items go to it).
CLUSTER_USER_CLASSES = (
    "HotWalletUser", "UniformUser", "ReadHeavyUser", "OverdraftUser", "IdempotentRetryUser",
    "TransferUser", "BulkUser",
)  # fmt: skip


@pytest.mark.slow
async def test_the_locust_scenarios_reconcile_through_haproxy_on_a_local_cluster(
    database_url: str, tmp_path: Path
) -> None:
    """Five seconds of every Locust scenario (single wallets, transfers, bulk) through the
    one URL (HAProxy) of `walletd cluster --processes 2`: no failed request, every balance
    and the global sum reconcile."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log_path = tmp_path / "cluster.log"
    cluster = start_cluster(
        ["--processes", "2", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--lease-ttl", str(LEASE_TTL_S), "--database-url", database_url,
         "--shards", str(SHARDS)],
        log_path,
    )  # fmt: skip
    assert cluster.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(cluster.stdout.readline), WAIT_S * 2)
        assert "walletd cluster listening" in line, line + log_path.read_text()
        completed = await asyncio.to_thread(run_locust, f"http://127.0.0.1:{port}")
    finally:
        cluster.send_signal(signal.SIGTERM)
        code = cluster.wait(60)
        cluster.stdout.close()
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "reconciliation PASSED" in output
    assert code == 0, log_path.read_text()
    await check_money(database_url)

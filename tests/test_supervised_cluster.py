"""`walletd cluster` survives its members (cli/cluster.py): a member killed with -9 is
restarted on its port while the survivors serve its shards; a member that keeps dying past
--member-restarts-max stops the cluster with exit 5 and one line.

Leases last 1 s (as in tests/test_cluster.py); start-up waits are generous, only the
asserted bound (every wallet answers within 10 s of the kill) is strict.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import re
import signal
import socket
import subprocess
import time
from collections import Counter, deque
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from tests.test_cluster import LEASE_TTL_S, SHARDS, check_money, leases, start_cluster, until
from walletd.cli.cluster import EXIT_CLUSTER_FAILED, RestartPolicy

START_WAIT_S = 180.0  # a cluster of three on a loaded 2-core machine
ANSWER_BOUND_S = 10.0  # kill -9 → every wallet answers again
WALLETS = 100
CLIENTS = 4
_LISTENING = re.compile(r"walletd cluster listening on (\S+) \(\d+ processes: ([^;]+);")


def test_restarts_back_off_exponentially_and_stop_past_the_bound() -> None:
    """The n-th restart in the window waits backoff × 2^(n-1); one more than the bound is
    refused; restarts older than the window no longer count."""
    policy = RestartPolicy(restarts_max=3, window_s=60.0, backoff_s=0.5)
    restarts: deque[float] = deque()
    assert [policy.next_delay_s(restarts, t) for t in (0.0, 1.0, 2.0)] == [0.5, 1.0, 2.0]
    assert policy.next_delay_s(restarts, 3.0) is None
    assert policy.next_delay_s(restarts, 60.5) == 2.0  # the one at 0.0 left the window
    with pytest.raises(ValueError, match="member-restarts-max"):
        RestartPolicy(restarts_max=-1, window_s=60.0, backoff_s=0.5)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def member_pid(cluster: subprocess.Popen[str], port: int) -> int | None:
    """The PID of the cluster's child listening on ``port``, if one does."""
    for child in psutil.Process(cluster.pid).children():
        try:
            connections = child.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in connections):
            pid: int = child.pid
            return pid
    return None


async def started(cluster: subprocess.Popen[str], log_path: Path) -> tuple[str, list[str]]:
    """The cluster's URL and its members' URLs, from its announcement."""
    assert cluster.stdout is not None
    line = await asyncio.wait_for(asyncio.to_thread(cluster.stdout.readline), START_WAIT_S)
    match = _LISTENING.search(line)
    assert match, line + log_path.read_text(errors="replace")  # noqa: ASYNC240
    return match.group(1), [url.strip() for url in match.group(2).split(",")]


def stop(cluster: subprocess.Popen[str]) -> int:
    if cluster.poll() is None:
        cluster.send_signal(signal.SIGTERM)
    try:
        code = cluster.wait(90)
    except subprocess.TimeoutExpired:
        cluster.kill()
        code = cluster.wait(10)
    if cluster.stdout is not None:
        cluster.stdout.close()
    return code


async def healthy(url: str) -> bool:
    """/healthz answers 200 (it binds its port before it serves: a listening socket alone
    is a member still starting)."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"{url}/healthz") as response,
        ):
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def deposit(http: aiohttp.ClientSession, url: str, wallet: str, amount: int, key: str) -> int:
    """The status of one keyed deposit; 0 when no answer came (outcome unknown)."""
    try:
        async with http.post(
            f"{url}/api/v1/wallets/{wallet}/operation",
            json={"operation_type": "DEPOSIT", "amount": amount},
            headers={"Idempotency-Key": key},
        ) as response:
            await response.read()
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


@pytest.mark.slow
async def test_a_member_killed_under_load_is_restarted_and_nothing_acknowledged_is_lost(
    database_url: str, tmp_path: Path
) -> None:
    """`walletd cluster --processes 3` under keyed deposits to 100 wallets; kill -9 one
    member: every wallet answers a deposit again within 10 s, the cluster keeps running,
    the member is back on its port (new pid) and holds shards again; every acknowledged
    deposit is logged once, a retry of every key applies nothing twice, and each balance
    equals the sum of its (now all acknowledged) deposits."""
    port = _free_port()
    log_path = tmp_path / "cluster.log"
    cluster = start_cluster(
        ["--processes", "3", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--database-url", database_url, "--shards", str(SHARDS),
         "--lease-ttl", str(LEASE_TTL_S), "--member-restart-backoff", "0.2"],
        log_path,
    )  # fmt: skip
    tried: dict[str, tuple[str, int]] = {}
    acked: set[str] = set()
    try:
        url, members = await started(cluster, log_path)
        victim_url = members[1]
        victim_port = int(victim_url.rsplit(":", 1)[1])
        victim_pid = member_pid(cluster, victim_port)
        assert victim_pid is not None
        timeout = aiohttp.ClientTimeout(total=20)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            wallets = []
            for _ in range(WALLETS):
                async with http.post(f"{url}/api/v1/wallets") as response:
                    assert response.status == 201, await response.text()
                    wallets.append((await response.json())["id"])
            keys = itertools.count()
            statuses: Counter[int] = Counter()
            running = asyncio.Event()
            running.set()

            async def send(wallet: str, amount: int) -> int:
                key = f"k-{next(keys)}"
                tried[key] = (wallet, amount)
                status = await deposit(http, url, wallet, amount, key)
                statuses[status] += 1
                if 200 <= status < 300:
                    acked.add(key)
                return status

            async def client(seed: int) -> None:
                rng = random.Random(seed)
                while running.is_set():
                    await send(rng.choice(wallets), rng.randint(1, 9))

            clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
            try:
                await asyncio.sleep(2.0)  # load before the kill
                # Its leases carry its URL, which the restarted member keeps: tell them apart
                # by owner id (new per process).
                old_owners = {r["owner"] for r in await leases(database_url)} - {None}
                killed_at = time.monotonic()
                psutil.Process(victim_pid).kill()

                # Sweeps over every wallet until one in which each answers a deposit 2xx.
                sweep_limit = asyncio.Semaphore(8)

                async def answers(wallet: str) -> bool:
                    async with sweep_limit:
                        return 200 <= await send(wallet, 1) < 300

                while not all(await asyncio.gather(*(answers(w) for w in wallets))):
                    assert time.monotonic() - killed_at < ANSWER_BOUND_S * 3, statuses
                    await asyncio.sleep(0.05)
                answered_s = time.monotonic() - killed_at

                async def back() -> int | None:
                    pid = member_pid(cluster, victim_port)
                    return pid if pid not in (None, victim_pid) else None

                new_pid = await until(back, "the member listens again on its port", START_WAIT_S)
                await until(lambda: healthy(victim_url), "the member serves again", START_WAIT_S)
                restarted_s = time.monotonic() - killed_at

                async def holds_shards() -> bool:
                    rows = await leases(database_url)
                    return any(
                        row["live"] and row["owner_url"] == victim_url
                        and row["owner"] not in old_owners
                        for row in rows
                    )  # fmt: skip

                await until(holds_shards, "the restarted member holds shards", START_WAIT_S)
                await asyncio.sleep(1.0)  # load after the member is back
            finally:
                running.clear()
                await asyncio.gather(*clients, return_exceptions=True)
            print(
                f"kill -9 -> every wallet answered in {answered_s:.2f} s; member back "
                f"(pid {victim_pid} -> {new_pid}) in {restarted_s:.2f} s; "
                f"answers {dict(statuses)}"
            )
            assert answered_s < ANSWER_BOUND_S
            # HAProxy's 502 and no answer (0): requests inside the killed process, unknown until
            # retried below; 503: nothing applied or unknown, per the contract. Never a 500.
            assert set(statuses) <= {0, 200, 502, 503}, statuses
            assert cluster.poll() is None, log_path.read_text()

            # Every acknowledged deposit is in the log, once.
            connection = await asyncpg.connect(database_url)
            try:
                logged = Counter(
                    row[0]
                    for row in await connection.fetch(
                        "SELECT idempotency_key FROM wallet_operations"
                        " WHERE idempotency_key LIKE 'k-%'"
                    )
                )
            finally:
                await connection.close()
            assert all(logged[key] == 1 for key in acked)
            assert set(logged) <= set(tried)
            # A retry of every key: what was applied is replayed, the rest applies now.
            for key, (wallet, amount) in tried.items():
                for _ in range(100):
                    status = await deposit(http, url, wallet, amount, key)
                    if status not in (0, 503):
                        break
                    await asyncio.sleep(0.1)
                assert status == 200, (key, status)
            expected = Counter[str]()
            for wallet, amount in tried.values():
                expected[wallet] += amount
            for wallet in wallets:
                async with http.get(f"{url}/api/v1/wallets/{wallet}") as response:
                    body = await response.json()
                    assert response.status == 200, body
                    assert body["balance"] == f"{expected[wallet]}.00", wallet
    finally:
        code = stop(cluster)
    assert code == 0, log_path.read_text()
    await check_money(database_url)


@pytest.mark.slow
async def test_a_member_that_keeps_dying_stops_the_cluster_past_the_bound(
    database_url: str, tmp_path: Path
) -> None:
    """With --member-restarts-max 2, a member killed three times (restarted twice, on its
    port, after backoff) stops the cluster: exit 5, one line naming the member and the
    bound, every member and HAProxy gone."""
    port = _free_port()
    log_path = tmp_path / "cluster.log"
    cluster = start_cluster(
        ["--processes", "2", "--port", str(port), "--data-dir", str(tmp_path / "data"),
         "--database-url", database_url, "--shards", str(SHARDS),
         "--lease-ttl", str(LEASE_TTL_S), "--member-restarts-max", "2",
         "--member-restart-window", "600", "--member-restart-backoff", "0.1"],
        log_path,
    )  # fmt: skip
    try:
        _url, members = await started(cluster, log_path)
        victim_port = int(members[0].rsplit(":", 1)[1])
        children = psutil.Process(cluster.pid).children(recursive=True)
        killed: list[int] = []
        for _ in range(3):

            async def serving() -> int | None:
                pid = member_pid(cluster, victim_port)
                if pid is None or pid in killed or not await healthy(members[0]):
                    return None
                return pid

            pid = await until(serving, "the member serves on its port", START_WAIT_S)
            killed.append(pid)
            psutil.Process(pid).kill()
        code = await asyncio.to_thread(cluster.wait, START_WAIT_S)
    finally:
        stop(cluster)
    errors = [
        line for line in log_path.read_text().splitlines() if line.startswith("walletd: error:")
    ]
    assert code == EXIT_CLUSTER_FAILED, log_path.read_text()
    assert errors == [
        f"walletd: error: walletd 0 ({members[0]}) exited with -9, past --member-restarts-max "
        "2 restarts within 600 s; the cluster stopped"
    ], log_path.read_text()
    assert not [child for child in children if child.is_running()]

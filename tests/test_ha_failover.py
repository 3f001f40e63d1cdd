"""The failure table of docs/HA.md, with real processes: etcd, three Patroni-managed
PostgreSQL nodes in strict synchronous mode behind HAProxy's PostgreSQL frontend
(cli/ha.py), and `walletd cluster --require-sync-replica` (two walletd processes and HAProxy)
under keyed load.

One stack serves every row, in this order (the last one leaves two nodes): a switchover, the
synchronous standby killed, the primary's postmaster killed, the primary frozen past the
TTL, etcd killed and kept away past the TTL, the primary's whole node lost. After each row:
every acknowledged deposit is on the surviving primary, a retry of every key applies
nothing twice (an acknowledged one is replayed), each balance equals its history, and
`walletd verify` exits 0. Only 200 and 503 are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest

from tests.processes import walletd_command
from walletd.cli.ha import TTL_S, HaNode, HaStack

pytestmark = pytest.mark.slow

CLIENTS = 8
SHARDS = 16
START_WAIT_S = 180.0
HEALTHY_WAIT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
STOP_WAIT_S = 60.0
# What each row may cost in seconds without a 2xx (measured figures: docs/HA.md).
OUTAGE_BOUND_S = {
    "switchover": 15.0,
    "sync standby killed": 15.0,
    "primary postmaster killed": 15.0,
    "primary frozen": TTL_S + 25.0,
    # failsafe_mode: the primary keeps serving while every Patroni answers it (without it,
    # writes stopped for as long as etcd was away: 18–23 s).
    "etcd lost": 10.0,
    # Patroni and PostgreSQL die together: nobody releases the leader key, so the
    # synchronous standby waits for it to expire (the TTL) before it promotes.
    "primary node lost": TTL_S + 10.0,
}
_LISTENING = re.compile(r"walletd cluster listening on (\S+) ")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _amount(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


@dataclass
class Ledger:
    """Every deposit sent, by Idempotency-Key: its wallet and cents; which were answered 200
    (with the body), and when each 200 came."""

    sent: dict[str, tuple[str, int]] = field(default_factory=dict)
    acked: dict[str, bytes] = field(default_factory=dict)
    success_times: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    # Keys already retried after an earlier row (each key is retried once, after its row).
    retried: set[str] = field(default_factory=set)

    def outage_s(self, since: float, until: float) -> float:
        """The longest stretch without a 200 between ``since`` and ``until``."""
        times = [since, *(t for t in self.success_times if since < t < until), until]
        return max(b - a for a, b in itertools.pairwise(times))


async def _deposit(
    session: aiohttp.ClientSession, url: str, wallet: str, key: str, cents: int
) -> tuple[int, bytes, bool]:
    async with session.post(
        f"{url}/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "DEPOSIT", "amount": _amount(cents)},
        headers={"Idempotency-Key": key},
    ) as response:
        body = await response.read()
        return response.status, body, response.headers.get("Idempotent-Replayed") == "true"


async def _client(
    session: aiohttp.ClientSession, url: str, wallet: str, ledger: Ledger, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        key, cents = str(uuid.uuid4()), random.randint(1, 10_000)
        ledger.sent[key] = (wallet, cents)
        try:
            status, body, _replayed = await _deposit(session, url, wallet, key, cents)
        except (aiohttp.ClientError, TimeoutError):
            ledger.statuses[0] += 1
            await asyncio.sleep(0.05)
            continue
        ledger.statuses[status] += 1
        if status == 200:
            ledger.acked[key] = body
            ledger.success_times.append(time.monotonic())
        else:
            await asyncio.sleep(0.05)


@dataclass
class Ha:
    stack: HaStack
    url: str
    wallets: list[str]
    ledger: Ledger
    data_dir: Path
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ha]:
    folder = tmp_path_factory.mktemp("ha")
    stack = HaStack(folder / "ha")
    cluster: subprocess.Popen[str] | None = None
    extra: list[subprocess.Popen[bytes]] = []
    try:
        dsn = stack.start()
        port = _free_port()
        environment = {**os.environ, "WALLETD_DATABASE_URL": dsn}
        environment.pop("DATABASE_URL", None)
        log_path = folder / "cluster.log"
        with log_path.open("w") as log_file:
            cluster = subprocess.Popen(
                walletd_command(
                    [
                        "cluster", "--processes", "2", "--port", str(port),
                        "--data-dir", str(folder / "walletd"), "--shards", str(SHARDS),
                        "--require-sync-replica", "--member-restarts-max", "20",
                    ]
                ),
                stdout=subprocess.PIPE, stderr=log_file, text=True, env=environment,
            )  # fmt: skip
        assert cluster.stdout is not None
        line = cluster.stdout.readline()
        match = _LISTENING.search(line)
        assert match, line + log_path.read_text(errors="replace")
        yield Ha(stack, match.group(1), [], Ledger(), folder / "walletd", extra)
    finally:
        stopped: int | None = None
        if cluster is not None:
            cluster.send_signal(signal.SIGTERM)
            try:
                stopped = cluster.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(cluster.pid).children(recursive=True):
                    child.kill()
                cluster.kill()
                cluster.wait()
            if cluster.stdout is not None:
                cluster.stdout.close()
        for process in extra:
            process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(30)
        stack.stop()
    # After the failovers, SIGTERM still stops walletd and its HAProxy (a shard map sync that
    # died on DatabaseUnreachable during a failover once kept them running).
    assert stopped == 0, f"walletd cluster did not stop on SIGTERM: {stopped}"


@contextlib.asynccontextmanager
async def load(ha: Ha) -> AsyncIterator[None]:
    """CLIENTS keyed depositors, one wallet each, through HAProxy, for the block's length."""
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while len(ha.wallets) < CLIENTS:
            async with session.post(f"{ha.url}/api/v1/wallets", json={}) as response:
                if response.status == 201:
                    ha.wallets.append((await response.json())["id"])
                else:
                    await asyncio.sleep(0.2)
        stop = asyncio.Event()
        clients = [
            asyncio.create_task(_client(session, ha.url, wallet, ha.ledger, stop))
            for wallet in ha.wallets
        ]
        try:
            yield
        finally:
            stop.set()
            await asyncio.gather(*clients)


async def until_served(ha: Ha, since: float, timeout_s: float) -> float:
    """Seconds from ``since`` to the first 200 after it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        later = [t for t in ha.ledger.success_times if t > since]
        if later:
            return later[0] - since
        await asyncio.sleep(0.05)
    raise AssertionError(f"no 200 within {timeout_s:g} s; members {ha.stack.members()}")


async def keep_serving(ha: Ha, seconds: float, timeout_s: float = HEALTHY_WAIT_S) -> None:
    """Until 200s have kept coming for ``seconds`` (no gap of a second), within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    since = time.monotonic()
    while time.monotonic() - since < seconds:
        assert time.monotonic() < deadline, f"not serving steadily: {ha.ledger.statuses}"
        await asyncio.sleep(0.1)
        last = ha.ledger.success_times[-1] if ha.ledger.success_times else 0.0
        if time.monotonic() - last > 1.0:
            since = time.monotonic()


def _kill_node(node: HaNode, signum: signal.Signals) -> None:
    """``signum`` to the node's Patroni and every process of its PostgreSQL."""
    if node.process is not None and node.process.poll() is None:
        os.kill(node.process.pid, signum)
    for pid in node.postgres_pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


async def check_money(ha: Ha, row: str) -> None:
    """Acknowledged deposits on the surviving primary; every key retried applies once;
    balances equal their histories; `walletd verify` exits 0."""
    ledger = ha.ledger
    assert set(ledger.statuses) <= {0, 200, 503}, f"{row}: {ledger.statuses}"
    leader = ha.stack.leader()
    assert leader is not None, f"{row}: no leader: {ha.stack.members()}"
    connection = await asyncpg.connect(ha.stack.node_dsn(leader))
    try:
        stored = {
            row_["idempotency_key"]
            for row_ in await connection.fetch(
                "SELECT idempotency_key FROM wallet_operations WHERE idempotency_key = any($1)",
                list(ledger.acked),
            )
        }
    finally:
        await connection.close()
    lost = set(ledger.acked) - stored
    assert not lost, f"{row}: {len(lost)} acknowledged deposits missing on {leader.name}"
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def retry(key: str) -> None:
            wallet, cents = ledger.sent[key]
            deadline = time.monotonic() + HEALTHY_WAIT_S
            while True:
                try:
                    status, body, replayed = await _deposit(session, ha.url, wallet, key, cents)
                except (aiohttp.ClientError, TimeoutError):
                    status, body, replayed = 0, b"", False
                if status == 200:
                    if key in ledger.acked:
                        assert replayed, f"{row}: an acknowledged key applied again"
                        assert body == ledger.acked[key], f"{row}: another answer on replay"
                    ledger.acked[key] = body
                    return
                assert status in (0, 503), f"{row}: retry answered {status}: {body!r}"
                assert time.monotonic() < deadline, f"{row}: retries kept failing"
                await asyncio.sleep(0.2)

        keys = [key for key in ledger.sent if key not in ledger.retried]
        for start in range(0, len(keys), 64):
            await asyncio.gather(*(retry(key) for key in keys[start : start + 64]))
        ledger.retried.update(keys)
        for wallet in ha.wallets:
            expected = sum(cents for w, cents in ledger.sent.values() if w == wallet)
            async with session.get(f"{ha.url}/api/v1/wallets/{wallet}") as response:
                assert response.status == 200
                balance = (await response.json())["balance"]
            assert balance == _amount(expected), f"{row}: {wallet} has {balance}"
    environment = {**os.environ, "WALLETD_DATABASE_URL": ha.stack.dsn}
    environment.pop("DATABASE_URL", None)
    verify = await asyncio.create_subprocess_exec(
        *walletd_command(["verify"]), env=environment,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await verify.communicate()
    assert verify.returncode == 0, f"{row}: verify: {output.decode(errors='replace')}"
    print(f"{row}: {len(ledger.acked)} deposits acknowledged so far; {dict(ledger.statuses)}")


async def _healthy(ha: Ha, expected: int | None = None) -> None:
    await asyncio.to_thread(ha.stack.wait_healthy, HEALTHY_WAIT_S, expected)


async def test_a_switchover_under_load_costs_only_503s(ha: Ha) -> None:
    """`patronictl switchover` to the synchronous standby: a few 503, nothing lost."""
    async with load(ha):
        await keep_serving(ha, 1.0)
        leader, standby = ha.stack.leader(), ha.stack.sync_standby()
        assert leader is not None
        assert standby is not None
        # Patroni's REST API changes nothing without its password (docs/SECURITY.md).
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{leader.rest_url}/switchover",
                json={"leader": leader.name, "candidate": standby.name},
            ) as refused,
        ):
            assert refused.status == 401
        started = time.monotonic()
        switchover = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).parent / "patronictl"),
            "-c", str(leader.directory / "patroni.yml"),
            "switchover", "--leader", leader.name, "--candidate", standby.name, "--force",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await switchover.communicate()
        assert switchover.returncode == 0, output.decode(errors="replace")
        await until_served(ha, started, OUTAGE_BOUND_S["switchover"])
        await keep_serving(ha, 2.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    await _healthy(ha)
    assert ha.stack.leader() is standby
    print(f"switchover: {outage:.1f} s without a 200")
    assert outage <= OUTAGE_BOUND_S["switchover"]
    await check_money(ha, "switchover")


async def test_the_synchronous_standby_killed_hands_sync_to_the_other(ha: Ha) -> None:
    """kill -9 of the synchronous standby's Patroni and PostgreSQL: the other standby becomes
    synchronous and writes go on after a stall; no 2xx rests on one copy meanwhile."""
    async with load(ha):
        await keep_serving(ha, 1.0)
        standby = ha.stack.sync_standby()
        assert standby is not None
        started = time.monotonic()
        _kill_node(standby, signal.SIGKILL)
        deadline = time.monotonic() + HEALTHY_WAIT_S
        while ha.stack.sync_standby() in (None, standby):
            assert time.monotonic() < deadline, ha.stack.members()
            await asyncio.sleep(0.1)
        handed_over = time.monotonic() - started
        await until_served(ha, started, OUTAGE_BOUND_S["sync standby killed"])
        await keep_serving(ha, 2.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    print(f"sync standby killed: sync moved in {handed_over:.1f} s; {outage:.1f} s without a 200")
    assert outage <= OUTAGE_BOUND_S["sync standby killed"]
    await check_money(ha, "sync standby killed")
    await asyncio.to_thread(ha.stack.restart_node, standby)
    await _healthy(ha)


async def test_the_primary_postmaster_killed_fails_over_to_the_sync_standby(ha: Ha) -> None:
    """kill -9 of the primary's postmaster: the synchronous standby is promoted, walletd
    answers again within the bound, the old primary rejoins as a standby."""
    async with load(ha):
        await keep_serving(ha, 1.0)
        leader, standby = ha.stack.leader(), ha.stack.sync_standby()
        assert leader is not None
        pid = leader.postmaster_pid()
        assert pid is not None
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await until_served(ha, started, OUTAGE_BOUND_S["primary postmaster killed"])
        await keep_serving(ha, 2.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    await _healthy(ha)
    print(f"primary postmaster killed: {outage:.1f} s without a 200")
    await check_money(ha, "primary postmaster killed")
    assert outage <= OUTAGE_BOUND_S["primary postmaster killed"]
    assert ha.stack.leader() is standby


async def test_a_frozen_primary_is_replaced_and_rejoins_without_acknowledging(ha: Ha) -> None:
    """SIGSTOP of the primary's Patroni and PostgreSQL past the TTL: the synchronous standby
    is promoted; after SIGCONT the old primary is demoted and rejoins, and nothing it might
    have committed after the promotion was acknowledged (all acknowledged rows are on the
    new primary)."""
    async with load(ha):
        await keep_serving(ha, 1.0)
        leader = ha.stack.leader()
        assert leader is not None
        started = time.monotonic()
        _kill_node(leader, signal.SIGSTOP)
        try:
            await until_served(ha, started, OUTAGE_BOUND_S["primary frozen"])
            await keep_serving(ha, 2.0)
        finally:
            _kill_node(leader, signal.SIGCONT)
        await keep_serving(ha, 3.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    await _healthy(ha)
    assert ha.stack.leader() is not leader
    print(f"primary frozen: {outage:.1f} s without a 200")
    assert outage <= OUTAGE_BOUND_S["primary frozen"]
    await check_money(ha, "primary frozen")


async def test_losing_etcd_splits_no_brain_and_writes_resume(ha: Ha) -> None:
    """etcd (the only member: quorum lost) killed and kept away past the TTL: never two
    primaries; the primary keeps serving (Patroni's failsafe mode: every member answers it);
    nothing acknowledged is lost."""
    assert ha.stack.etcd is not None
    async with load(ha):
        await keep_serving(ha, 1.0)
        started = time.monotonic()
        ha.stack.etcd.kill()
        ha.stack.etcd.wait()
        while time.monotonic() - started < TTL_S + 2:
            primaries = 0
            for node in ha.stack.nodes:
                with contextlib.suppress(OSError):
                    async with (
                        aiohttp.ClientSession() as session,
                        session.get(
                            f"{node.rest_url}/primary", timeout=aiohttp.ClientTimeout(1)
                        ) as r,
                    ):
                        primaries += r.status == 200
            assert primaries <= 1, "two primaries"
            await asyncio.sleep(0.5)
        returned = time.monotonic()
        await asyncio.to_thread(ha.stack.start_etcd)
        await until_served(ha, returned, OUTAGE_BOUND_S["etcd lost"])
        await keep_serving(ha, 2.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    await _healthy(ha)
    print(f"etcd lost for {returned - started:.1f} s: {outage:.1f} s without a 200")
    await check_money(ha, "etcd lost")
    assert outage <= OUTAGE_BOUND_S["etcd lost"]


async def test_the_whole_primary_node_lost_for_good(ha: Ha) -> None:
    """kill -9 of the primary's Patroni and PostgreSQL, never restarted: the synchronous
    standby is promoted and the last node becomes synchronous; writes resume."""
    async with load(ha):
        await keep_serving(ha, 1.0)
        leader = ha.stack.leader()
        assert leader is not None
        started = time.monotonic()
        _kill_node(leader, signal.SIGKILL)
        await until_served(ha, started, OUTAGE_BOUND_S["primary node lost"])
        await keep_serving(ha, 2.0)
        outage = ha.ledger.outage_s(started, time.monotonic())
    await _healthy(ha, expected=2)
    print(f"primary node lost: {outage:.1f} s without a 200")
    assert outage <= OUTAGE_BOUND_S["primary node lost"]
    await check_money(ha, "primary node lost")

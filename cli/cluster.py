"""``walletd cluster``: a whole cluster on loopback with one command, and one URL to use.

    walletd cluster --processes 3 --port 8000
        embedded PostgreSQL (or --database-url)
        3 × `walletd serve --port 0 --internal-port 0 --unix-socket RUN_DIR/walletd-N.sock`
            (each claims its share of the shards; the database URL and the cluster
            credential's file in its environment)
        HAProxy on 127.0.0.1:8000, routing by shard to each member's Unix socket; its map
            kept current (MapSync)

The members reach each other over TCP (forwarding, transfer legs) and the cluster prints
their TCP URLs; only HAProxy uses the sockets (cheaper per request than loopback TCP).

The cluster holds its data dir (cli/data_dir.py): a second cluster or serve on it is
refused with exit 4.

A member that dies (kill -9, a crash, the engine giving up) is restarted on the port it had,
so HAProxy's server line for it stays valid; meanwhile its leases expire and the survivors
serve its shards (HAProxy's backups forward, MapSync follows the lease table), and once back
it claims its share again::

    member exits ─▶ restarts in the window < --member-restarts-max?
                      yes: wait --member-restart-backoff × 2^(n-1), start it on its port
                      no:  "walletd N (URL) exited with S, past --member-restarts-max K
                           restarts within W s; the cluster stopped"; exit 5

SIGTERM or Ctrl-C stops HAProxy, then each walletd (drain, release its leases), then the
embedded PostgreSQL. HAProxy exiting stops the cluster too (exit 5).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from walletd.cli.config import Config
from walletd.cli.credential import cluster_credential, credential_path
from walletd.cli.data_dir import DataDirClaim
from walletd.cli.ha import ETCD_RESTART_DELAY_S, HaStack
from walletd.cli.haproxy import (
    MapSync,
    initial_map,
    render_config,
    start_haproxy,
    wait_listening,
)
from walletd.cli.service import check_cluster, migrate_database, storage
from walletd.cli.unix_socket import check_path_length
from walletd.persistence.database import connect

__all__ = [
    "EXIT_CLUSTER_FAILED",
    "PROCESSES_MAX",
    "ClusterError",
    "ClusterFailed",
    "RestartPolicy",
    "cluster_run_dir",
    "member_socket",
    "run_cluster",
]

_log = logging.getLogger("walletd.cluster")

PROCESSES_MAX = 64
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0
# What each member of a cluster of two or more commits at once unless the operator sets it
# (_child_environment says why).
MEMBER_INFLIGHT_BATCHES = 1
INFLIGHT_BATCHES_ENV = "WALLETD_INFLIGHT_BATCHES"
_LISTENING = re.compile(r"walletd listening on (http://\S+)")


# Exit status of `walletd cluster` when a part failed for good: a member died past its
# restart bound, or HAProxy exited.
EXIT_CLUSTER_FAILED = 5


class ClusterError(Exception):
    """A part of the cluster did not start."""


class ClusterFailed(Exception):
    """A running cluster lost a part for good; the cluster stopped."""


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """At most ``restarts_max`` restarts of one member within ``window_s``, the n-th of them
    ``backoff_s × 2^(n-1)`` after the death (so never longer than backoff × 2^(max-1))."""

    restarts_max: int
    window_s: float
    backoff_s: float

    def __post_init__(self) -> None:
        if self.restarts_max < 0 or self.window_s <= 0 or self.backoff_s < 0:
            raise ValueError(
                "--member-restarts-max must be >= 0, --member-restart-window > 0 and "
                "--member-restart-backoff >= 0"
            )

    def next_delay_s(self, restarts: deque[float], now: float) -> float | None:
        """Record a restart at ``now`` and return its delay, or None past the bound."""
        while restarts and now - restarts[0] >= self.window_s:
            restarts.popleft()
        if len(restarts) >= self.restarts_max:
            return None
        restarts.append(now)
        return self.backoff_s * (1 << (len(restarts) - 1))


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    url: str


@dataclass
class _Member:
    """One walletd slot of the cluster: its current process, and its restarts so far."""

    index: int
    server: _Server
    restarts: deque[float] = field(default_factory=deque)

    @property
    def port(self) -> int:
        port = urlsplit(self.server.url).port
        assert port is not None  # the URL walletd printed always has one
        return port


def _child_environment(
    config: Config, dsn: str, given: Mapping[str, str], processes: int
) -> dict[str, str]:
    """What a walletd of the cluster gets through its environment: every setting the
    cluster was given as a flag (``given``: keys, limits, timeouts; without them a member
    would serve with its defaults, an open API among them) and the secrets. A command line
    is readable by every user of the machine (/proc/PID/cmdline, ps); a process's
    environment only by its own user and root. So the database URL (it may hold a password)
    and the credential's source never appear in argv. What the cluster gives each member
    itself comes as flags, which beat the environment."""
    environment = os.environ.copy()
    environment.update(given)
    if processes > 1 and not environment.get(INFLIGHT_BATCHES_ENV):
        # One PostgreSQL takes every member's commits. Two batches in flight per process
        # keep one process busy while PostgreSQL commits (docs/BENCHMARKS.md); with several
        # members the others use that time, and two each would only halve every batch:
        # PostgreSQL CPU per request 101-120 -> 72-88 us on 10,000 wallets with two members
        # at one each (docs/BENCHMARKS.md, "Two processes, one batch in flight each").
        environment[INFLIGHT_BATCHES_ENV] = str(MEMBER_INFLIGHT_BATCHES)
    # Each member is reached at its own URL: one advertised URL for all would send every
    # forward to one of them.
    environment.pop("WALLETD_ADVERTISE_URL", None)
    environment.pop("DATABASE_URL", None)  # one spelling, so no stale alias can win
    environment["WALLETD_DATABASE_URL"] = dsn
    if not config.cluster_credential:
        # Every child reads the one file this command created (or was given).
        environment["WALLETD_CLUSTER_CREDENTIAL_FILE"] = str(credential_path(config).resolve())
    return environment


def _sync_replica_flags(config: Config) -> list[str]:
    """`walletd ha-dev` requires two copies of every commit of its members."""
    if not config.require_sync_replica:
        return []
    return ["--require-sync-replica", "--sync-replica-wait", str(config.sync_replica_wait_s)]


def cluster_run_dir(config: Config) -> Path:
    """The cluster's run folder: members' logs and sockets, HAProxy's config and map."""
    return config.data_dir.resolve() / "cluster"


def member_socket(run_dir: Path, index: int) -> Path:
    """Where member ``index`` serves its public app for HAProxy (``--unix-socket``)."""
    return run_dir / f"walletd-{index}.sock"


async def _start_server(
    config: Config, environment: Mapping[str, str], index: int, run_dir: Path, port: int = 0
) -> _Server:
    """Start member ``index`` (on ``port``, 0 = any) and wait until it listens. Called at
    start-up and for every restart: a restart passes the public port the member had and
    binds the same Unix socket (HAProxy's server line names it; a killed member's file is
    stale and replaced). Its internal listener takes any free port each time: a process
    publishes its internal URL in its member row on every heartbeat, and a restarted one
    is a new owner, so legs reach the new port once it claims shards."""
    log_path = run_dir / f"walletd-{index}.log"
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "walletd.cli.main", "serve",
            "--host", "127.0.0.1", "--port", str(port),
            "--unix-socket", str(member_socket(run_dir, index)),
            "--internal-host", "127.0.0.1", "--internal-port", "0",
            "--shards", str(config.shards), "--pipelines", str(config.pipelines),
            "--lease-ttl", str(config.lease_ttl_s),
            "--lease-moves-max", str(config.lease_moves_max),
            *_sync_replica_flags(config),
            stdout=asyncio.subprocess.PIPE, stderr=log_file,
            env=environment,
        )  # fmt: skip
    assert process.stdout is not None
    started = False
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while line := (await process.stdout.readline()).decode():
                if match := _LISTENING.search(line):
                    started = True
                    return _Server(process, match.group(1))
    except TimeoutError:
        pass
    finally:
        # Also when cancelled (the cluster stopping during a restart): no orphan member.
        if not started:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await asyncio.shield(process.wait())
    raise ClusterError(f"walletd {index} did not start; see {log_path}")


async def _stop_server(server: _Server) -> None:
    if server.process.returncode is None:
        server.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(server.process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        server.process.kill()
        await server.process.wait()


_OWNERS = """
SELECT owner_url, count(*) FROM walletd_shard_leases
 WHERE owner IS NOT NULL AND expires_at > now() GROUP BY owner_url
"""


async def _wait_balanced(dsn: str, urls: list[str], shard_count: int) -> None:
    """Until every shard is owned and no process holds more than its fair share, so the
    cluster is announced once the first moves are over (bounded by START_TIMEOUT_S)."""
    share = math.ceil(shard_count / len(urls))
    connection = await connect(dsn)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                held = dict(await connection.fetch(_OWNERS))
                if sum(held.values()) == shard_count and all(
                    held.get(url, 0) <= share for url in urls
                ):
                    return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise ClusterError("the walletd processes did not share the shards in time") from None
    finally:
        await connection.close()


async def run_cluster(
    config: Config, processes: int, *, given: Mapping[str, str], ha_nodes: int = 0
) -> int:
    """``ha_nodes`` > 0: `walletd ha-dev`, on an HA PostgreSQL of that many nodes (cli/ha.py)
    started in the data dir, every member with --require-sync-replica. ``given``: the
    settings this command was given as flags, as environment variables
    (config.flags_as_environment); every member gets them."""
    if not 1 <= processes <= PROCESSES_MAX:
        raise ValueError(f"--processes must be within 1..{PROCESSES_MAX}")
    policy = RestartPolicy(
        config.member_restarts_max, config.member_restart_window_s, config.member_restart_backoff_s
    )
    command = "walletd ha-dev" if ha_nodes else "walletd cluster"
    # Before anything starts: the longest member socket path must fit a Unix socket address.
    check_path_length(
        member_socket(cluster_run_dir(config), processes - 1),
        "a member's Unix socket", "use a shorter --data-dir",
    )  # fmt: skip
    # The cluster owns its data dir (its run folder; the embedded PostgreSQL when no URL).
    with DataDirClaim.take(config.data_dir, command):
        if not ha_nodes:
            return await _run_claimed(config, processes, policy, given)
        return await _run_on_ha(config, processes, policy, ha_nodes, given)


async def _run_on_ha(
    config: Config, processes: int, policy: RestartPolicy, nodes: int, given: Mapping[str, str]
) -> int:
    stack = HaStack(config.data_dir / "ha", nodes)
    # Until the members run (and _supervise takes the signals over), a SIGTERM or Ctrl-C
    # cancels the start; the stack is stopped either way, never left behind.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    keeper: asyncio.Task[None] | None = None
    starting = asyncio.ensure_future(asyncio.to_thread(stack.start))
    try:
        try:
            dsn = await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await starting  # the thread runs on: let it finish, then stop what it made
            raise
        print(
            f"walletd ha-dev: {nodes} Patroni nodes up; the primary's frontend and every "
            f"process id are in {stack.root / 'state.json'}",
            flush=True,
        )
        keeper = asyncio.create_task(_keep_etcd(stack))
        ha_config = dataclasses.replace(config, database_url=dsn, require_sync_replica=True)
        return await _run_claimed(ha_config, processes, policy, given)
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        await asyncio.shield(asyncio.to_thread(stack.stop))


async def _keep_etcd(stack: HaStack) -> None:
    """Restart etcd whenever it exits (its service manager's job in production)."""
    while True:
        await asyncio.to_thread(stack.keep_etcd)
        await asyncio.sleep(ETCD_RESTART_DELAY_S)


async def _run_claimed(
    config: Config, processes: int, policy: RestartPolicy, given: Mapping[str, str]
) -> int:
    run_dir = cluster_run_dir(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    # A Unix socket path is limited to ~100 bytes: the stats socket lives in a short folder.
    socket_dir = Path(tempfile.mkdtemp(prefix="walletd-haproxy-"))
    # Created (or checked) once here, before any child reads it: the children share it.
    cluster_credential(config)
    async with storage(config, "cluster", owner=True) as dsn:
        await migrate_database(dsn)
        await check_cluster(dsn, config.shards)
        environment = _child_environment(config, dsn, given, processes)
        members: list[_Member] = []
        haproxy: subprocess.Popen[bytes] | None = None
        sync: MapSync | None = None
        sync_task: asyncio.Task[None] | None = None
        try:
            for index in range(processes):
                members.append(
                    _Member(index, await _start_server(config, environment, index, run_dir))
                )
            urls = [member.server.url for member in members]
            await _wait_balanced(dsn, urls, config.shards)
            map_path = run_dir / "shards.map"
            socket_path = socket_dir / "haproxy.sock"
            map_path.write_text(initial_map(config.shards))
            config_path = run_dir / "haproxy.cfg"
            config_path.write_text(
                render_config(
                    urls,
                    bind=f"{config.host}:{config.port}",
                    shard_count=config.shards,
                    map_path=map_path,
                    socket_path=socket_path,
                    sockets=[member_socket(run_dir, member.index) for member in members],
                )
            )
            haproxy = start_haproxy(config_path, run_dir / "haproxy.log")
            await wait_listening(config.host, config.port, haproxy, stats_socket=socket_path)
            sync = MapSync(dsn, urls, map_path=map_path, socket_path=socket_path)
            await sync.sync_once()
            sync_task = asyncio.create_task(sync.run())
            print(
                f"walletd cluster listening on http://{config.host}:{config.port} "
                f"({processes} processes: {', '.join(urls)}; logs in {run_dir})",
                flush=True,
            )

            async def restart(index: int, port: int) -> _Server:
                return await _start_server(config, environment, index, run_dir, port)

            return await _supervise(members, haproxy, restart, policy)
        finally:
            if sync_task is not None:
                sync_task.cancel()
                try:
                    await sync_task
                except asyncio.CancelledError:
                    pass
                except Exception:  # never a reason to leave HAProxy and the members running
                    _log.exception("the shard map sync had failed")
            if sync is not None:
                await sync.close()
            if haproxy is not None:
                haproxy.terminate()
                await asyncio.to_thread(haproxy.wait, 10)
            await asyncio.gather(*(_stop_server(member.server) for member in members))
            shutil.rmtree(socket_dir, ignore_errors=True)


# Starts member (index) again on (port): _start_server with the cluster's settings.
_Restart = Callable[[int, int], Awaitable[_Server]]


async def _supervise(
    members: list[_Member],
    haproxy: subprocess.Popen[bytes],
    restart: _Restart,
    policy: RestartPolicy,
) -> int:
    """Until SIGTERM/SIGINT (0), or until HAProxy exits or a member dies past the restart
    bound (ClusterFailed). Dead members are restarted meanwhile."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    keepers = [asyncio.create_task(_keep_alive(m, restart, policy, stop)) for m in members]
    stopper = asyncio.create_task(stop.wait())
    proxy = asyncio.create_task(asyncio.to_thread(haproxy.wait))
    try:
        done, _pending = await asyncio.wait(
            [stopper, proxy, *keepers], return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        # A keeper cancelled in the middle of a restart kills the process it was starting.
        for task in [stopper, proxy, *keepers]:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
    if stop.is_set():  # also when a member, stopped by the same Ctrl-C, exited first
        _log.info("stopping the cluster")
        return 0
    if proxy in done:
        raise ClusterFailed(f"haproxy exited with {haproxy.returncode}; the cluster stopped")
    raise ClusterFailed(next(task.result() for task in keepers if task in done))


async def _keep_alive(
    member: _Member, restart: _Restart, policy: RestartPolicy, stop: asyncio.Event
) -> str:
    """Restart ``member`` whenever it dies, on the port it had (HAProxy's server line names
    it); returns the line that stops the cluster once it died past the bound."""
    loop = asyncio.get_running_loop()
    url, port = member.server.url, member.port
    how = f"exited with {await member.server.process.wait()}"
    while not stop.is_set():
        delay_s = policy.next_delay_s(member.restarts, loop.time())
        if delay_s is None:
            return (
                f"walletd {member.index} ({url}) {how}, past --member-restarts-max "
                f"{policy.restarts_max} restarts within {policy.window_s:g} s; "
                f"the cluster stopped"
            )
        _log.error(
            "walletd %d (%s) %s; restarting it on port %d in %.1f s (restart %d of %d "
            "within %g s)", member.index, url, how, port, delay_s, len(member.restarts),
            policy.restarts_max, policy.window_s,
        )  # fmt: skip
        await asyncio.sleep(delay_s)
        if stop.is_set():
            break
        try:
            member.server = await restart(member.index, port)
        except ClusterError as error:
            # E.g. its port, free again, was lent to an outgoing connection for a moment.
            how = f"did not start again ({error})"
            continue
        _log.info("walletd %d restarted at %s (pid %d)", member.index, url,
                  member.server.process.pid)  # fmt: skip
        how = f"exited with {await member.server.process.wait()}"
    return "stopping"  # Ctrl-C reaches every member too: not a death to restart

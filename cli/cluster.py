"""``walletd cluster``: a whole cluster on loopback with one command, and one URL to use.

    walletd cluster --processes 3 --port 8000
        embedded PostgreSQL (or --database-url)
        3 × `walletd serve --port 0 --internal-port 0` (each claims its share of the
            shards; the database URL and the cluster credential's file in its environment)
        HAProxy on 127.0.0.1:8000, routing by shard; its map kept current (MapSync)

SIGTERM or Ctrl-C stops HAProxy, then each walletd (drain, release its leases), then the
embedded PostgreSQL. A walletd that exits on its own stops the cluster with its exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from walletd.cli.config import Config
from walletd.cli.credential import cluster_credential, credential_path
from walletd.cli.haproxy import (
    MapSync,
    initial_map,
    render_config,
    start_haproxy,
    wait_listening,
)
from walletd.cli.service import check_cluster, migrate_database, storage
from walletd.persistence.database import connect

__all__ = ["PROCESSES_MAX", "ClusterError", "run_cluster"]

_log = logging.getLogger("walletd.cluster")

PROCESSES_MAX = 64
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 45.0
_LISTENING = re.compile(r"walletd listening on (http://\S+)")


class ClusterError(Exception):
    """A part of the cluster did not start."""


@dataclass
class _Server:
    process: asyncio.subprocess.Process
    url: str


def _child_environment(config: Config, dsn: str) -> dict[str, str]:
    """What a walletd of the cluster gets through its environment: the secrets. A command
    line is readable by every user of the machine (/proc/PID/cmdline, ps); a process's
    environment only by its own user and root. So the database URL (it may hold a password)
    and the credential's source never appear in argv."""
    environment = os.environ.copy()
    environment.pop("DATABASE_URL", None)  # one spelling, so no stale alias can win
    environment["WALLETD_DATABASE_URL"] = dsn
    if not config.cluster_credential:
        # Every child reads the one file this command created (or was given).
        environment["WALLETD_CLUSTER_CREDENTIAL_FILE"] = str(credential_path(config).resolve())
    return environment


async def _start_server(config: Config, dsn: str, index: int, log_dir: Path) -> _Server:
    log_path = log_dir / f"walletd-{index}.log"
    with log_path.open("ab") as log_file:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "walletd.cli.main", "serve",
            "--host", "127.0.0.1", "--port", "0",
            "--internal-host", "127.0.0.1", "--internal-port", "0",
            "--shards", str(config.shards), "--pipelines", str(config.pipelines),
            "--lease-ttl", str(config.lease_ttl_s),
            "--lease-moves-max", str(config.lease_moves_max),
            stdout=asyncio.subprocess.PIPE, stderr=log_file,
            env=_child_environment(config, dsn),
        )  # fmt: skip
    assert process.stdout is not None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while line := (await process.stdout.readline()).decode():
                if match := _LISTENING.search(line):
                    return _Server(process, match.group(1))
    except TimeoutError:
        pass
    process.kill()
    await process.wait()
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


async def run_cluster(config: Config, processes: int) -> int:
    if not 1 <= processes <= PROCESSES_MAX:
        raise ValueError(f"--processes must be within 1..{PROCESSES_MAX}")
    run_dir = config.data_dir.resolve() / "cluster"
    run_dir.mkdir(parents=True, exist_ok=True)
    # A Unix socket path is limited to ~100 bytes: the stats socket lives in a short folder.
    socket_dir = Path(tempfile.mkdtemp(prefix="walletd-haproxy-"))
    # Created (or checked) once here, before any child reads it: the children share it.
    cluster_credential(config)
    async with storage(config) as dsn:
        await migrate_database(dsn)
        await check_cluster(dsn, config.shards)
        servers: list[_Server] = []
        haproxy: subprocess.Popen[bytes] | None = None
        sync: MapSync | None = None
        sync_task: asyncio.Task[None] | None = None
        try:
            for index in range(processes):
                servers.append(await _start_server(config, dsn, index, run_dir))
            urls = [server.url for server in servers]
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
                )
            )
            haproxy = start_haproxy(config_path, run_dir / "haproxy.log")
            await wait_listening(config.host, config.port, haproxy)
            sync = MapSync(dsn, urls, map_path=map_path, socket_path=socket_path)
            await sync.sync_once()
            sync_task = asyncio.create_task(sync.run())
            print(
                f"walletd cluster listening on http://{config.host}:{config.port} "
                f"({processes} processes: {', '.join(urls)}; logs in {run_dir})",
                flush=True,
            )
            return await _wait_for_stop(servers, haproxy)
        finally:
            if sync_task is not None:
                sync_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sync_task
            if sync is not None:
                await sync.close()
            if haproxy is not None:
                haproxy.terminate()
                await asyncio.to_thread(haproxy.wait, 10)
            await asyncio.gather(*(_stop_server(server) for server in servers))
            shutil.rmtree(socket_dir, ignore_errors=True)


async def _wait_for_stop(servers: list[_Server], haproxy: subprocess.Popen[bytes]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    waiters = {asyncio.create_task(server.process.wait()): server for server in servers}
    stopper = asyncio.create_task(stop.wait())
    proxy = asyncio.create_task(asyncio.to_thread(haproxy.wait))
    done, _pending = await asyncio.wait(
        [stopper, proxy, *waiters], return_when=asyncio.FIRST_COMPLETED
    )
    for task in [stopper, proxy, *waiters]:
        task.cancel()
    if stopper in done:
        _log.info("stopping the cluster")
        return 0
    if proxy in done:
        _log.error("haproxy exited with %s; stopping the cluster", haproxy.returncode)
        return 1
    exited = next(waiters[task] for task in done if task in waiters)
    _log.error("walletd at %s exited with %s; stopping the cluster", exited.url,
               exited.process.returncode)  # fmt: skip
    return 1

"""HAProxy in front of a walletd cluster: its configuration, and its shard map kept current.

HAProxy computes each request's shard itself, exactly as walletd does
(``crc32(canonical lowercase id) % shard_count``, engine/ownership.py), and looks the
shard's backend up in a map that walletd keeps current through HAProxy's runtime API::

    GET /api/v1/wallets/6F1C9A52-…/operations   (or /api/v1/holds/{id}/…: a hold id hashes
                                                 to its wallet's shard, engine/holds.py)
        path,field(5,/)  → "6F1C9A52-…"       the id as written in the path
        lower            → "6f1c9a52-…"       the canonical spelling
        crc32            → 3443831466         IEEE CRC-32, as zlib.crc32 (no avalanche)
        mod(64)          → 42                 the shard
        map_int(shards.map, be_any) → be_w1   its owner's backend (be_any: no owner known)

Each ``be_wN`` backend has its owner as the server and every other walletd as a backup:
HAProxy retries only connection failures (``retry-on conn-failure``, redispatched to a
backup), never a 503 or a timeout, whose outcome may be unknown; a backup that receives
a request it does not own forwards it to the owner (http/forwarding.py). A creation with a
client id in its body (``{"id": …}``) is routed by that id the same way; other requests
without a wallet in the path (a creation without an id, transfers, bulk) go round-robin to
any walletd.

``MapSync`` reads the ownership table (walletd_shard_leases) every ``interval_s`` and sends
``set map`` for every shard whose backend changed, over the stats socket; a stale map only
costs a forwarding hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from walletd.persistence.database import DatabaseError, connect

__all__ = [
    "ANY_BACKEND",
    "SHARD_HEADER",
    "HaproxyMissing",
    "MapSync",
    "backend_name",
    "haproxy_binary",
    "initial_map",
    "render_config",
    "render_postgres_config",
    "runtime_command",
    "start_haproxy",
    "wait_listening",
]

_log = logging.getLogger("walletd.haproxy")

ANY_BACKEND = "be_any"
SHARD_HEADER = "X-Walletd-Shard"
# The wallet id is the fifth field of /api/v1/wallets/{id}/…, counting the empty one
# before the first slash.
_ID_FIELD = 5


_NO_SERVER_PROBLEM = (
    '{"type":"about:blank","title":"Shard not served here","status":503,'
    '"detail":"no walletd process could be reached for this request; nothing was applied, '
    'retry shortly","code":"NOT_OWNER"}'
)

# A process that died (or stopped answering) after HAProxy sent it the request: HAProxy's
# own 502 / 504. The request may have been applied, so it is walletd's UNAVAILABLE
# (outcome unknown: retry with the same Idempotency-Key), in problem+json like every error.
_LOST_ANSWER_PROBLEM = (
    '{{"type":"about:blank","title":"Service unavailable","status":{status},'
    '"detail":"the walletd process stopped answering after it got this request; it may have '
    'been applied: retry with the same Idempotency-Key","code":"UNAVAILABLE"}}'
)


def backend_name(index: int) -> str:
    return f"be_w{index}"


def _server_address(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname is None or parts.port is None:
        raise ValueError(f"a walletd server must be http://HOST:PORT, not {url!r}")
    return f"{parts.hostname}:{parts.port}"


def render_config(
    servers: Sequence[str],
    *,
    bind: str,
    shard_count: int,
    map_path: Path,
    socket_path: Path,
    connections_max: int = 4096,
    socket_mode: str = "600",
    docker_dns: bool = False,
    log_requests: bool = False,
    sockets: Sequence[Path] | None = None,
) -> str:
    """The whole haproxy.cfg for these walletd servers (URLs, in a fixed order).

    ``docker_dns``: resolve the servers' names through Docker's DNS at run time too (a
    container restarted with a new address is found again); HAProxy starts even when a
    name does not resolve yet.

    ``sockets``: each server's Unix socket (its ``--unix-socket``), in the servers' order;
    HAProxy then reaches the servers there (``unix@PATH``: requests and health checks),
    which costs both sides less per request than loopback TCP (docs/SCALING.md). The URLs
    still name the servers: the shard map follows the owners' URLs (MapSync).
    """
    if not servers:
        raise ValueError("at least one walletd server is needed")
    addresses = [_server_address(url) for url in servers]
    if sockets is not None:
        if len(sockets) != len(servers):
            raise ValueError(f"{len(sockets)} Unix sockets for {len(servers)} walletd servers")
        addresses = [f"unix@{path}" for path in sockets]
    # A check may be slow on a loaded machine: three misses of 2 s before a server is down.
    # Once one fails, the next come every 250 ms: a walletd draining after SIGTERM (/healthz
    # 503) is down within 1.5 s, inside its --drain-grace, before it closes its listener.
    check = "check inter 1s fastinter 250ms fall 3 rise 1"
    lines = [
        "# Generated by `walletd haproxy-config`; the shard map is kept current by walletd",
        "# through the stats socket (`set map`).",
        "global",
        f"    stats socket {socket_path} mode {socket_mode} level admin",
        f"    maxconn {connections_max}",
        "",
    ]
    if log_requests:  # one line per request on HAProxy's stdout (its termination state too)
        lines[-1:-1] = ["    log stdout format raw local0"]
    if docker_dns:
        lines += ["resolvers docker", "    nameserver dns 127.0.0.11:53", "    hold valid 1s", ""]
    lines += [
        "defaults",
        "    mode http",
        # Server connections are kept alive and shared between requests (docs/SCALING.md,
        # "Keep-alive and shutdown"). A request sent on an idle connection at the moment
        # walletd closes it would get no answer (a 502 whose outcome nobody knows), so
        # walletd never closes one HAProxy may still use: it keeps idle connections longer
        # than HAProxy does (--keepalive-timeout 120 s > the 75 s below + the pool purge),
        # and while draining it answers `Connection: close` and closes the idle ones only
        # after /healthz has failed long enough for HAProxy to mark it down.
        "    option http-keep-alive",
        "    http-reuse safe",
        "    timeout connect 2s",
        # Idle client connections live longer than clients keep them (aiohttp 15 s, walletd's
        # own server 120 s): closing one a client is about to reuse loses its request. A
        # server connection follows its client's (the first request of a client connection
        # opens or takes one), so it too is idle at most this long before HAProxy closes it
        # or returns it to the pool, where pool-purge-delay closes half the idle ones each
        # period.
        "    timeout client 90s",
        "    timeout http-keep-alive 75s",
        "    timeout server 60s",
        "    timeout http-request 10s",
        "    timeout check 2s",
        # Only connection failures: the request never reached walletd. A 503 or a timeout
        # may mean "outcome unknown", so it goes back to the client as it is.
        "    retries 2",
        "    retry-on conn-failure",
        "    option redispatch 1",
        "    option httpchk GET /healthz",
        *(["    log global", "    option httplog"] if log_requests else []),
        # A refused connection in live traffic marks the server down at once (backups take
        # over) rather than after three failed health checks.
        "    default-server init-addr last,libc,none observe layer4 error-limit 1 "
        "on-error mark-down pool-purge-delay 5s" + (" resolvers docker" if docker_dns else ""),
        # HAProxy answers 503 itself only when no server could be connected: nothing
        # was sent, so nothing applied. Said in walletd's words: problem+json NOT_OWNER.
        "    http-error status 503 content-type application/problem+json hdr Retry-After 1 "
        f"string '{_NO_SERVER_PROBLEM}'",
        *(
            f"    http-error status {status} content-type application/problem+json "
            f"string '{_LOST_ANSWER_PROBLEM.format(status=status)}'"
            for status in (502, 504)
        ),
        "",
        "frontend walletd",
        f"    bind {bind}",
        # No rule hides /internal/: the servers are walletd's public listeners, which have
        # no internal route in any spelling. Transfer legs go process to process on the
        # internal listeners (http/internal.py), which HAProxy is never configured with.
        "    http-request set-var(txn.shard) "
        f"path,field({_ID_FIELD},/),lower,crc32,mod({shard_count}) "
        "if { path_beg /api/v1/wallets/ /api/v1/holds/ }",
        # A creation with a client id ({"id": "<uuid>"}, the only field besides none) goes to
        # the id's owner too: HAProxy waits for that small body (at most 1 s) and hashes the
        # id the same way. Without an id the process it lands on draws one it serves.
        "    http-request wait-for-body time 1s if { method POST } { path /api/v1/wallets }",
        "    http-request set-var(txn.shard) "
        f"req.body,json_query('$.id'),lower,crc32,mod({shard_count}) "
        "if { method POST } { path /api/v1/wallets }",
        # For the owner's logs and for tests/test_haproxy.py: the shard HAProxy computed.
        f"    http-request set-header {SHARD_HEADER} %[var(txn.shard)] "
        "if { var(txn.shard) -m found }",
        f"    use_backend %[var(txn.shard),map_int({map_path},{ANY_BACKEND})] "
        "if { var(txn.shard) -m found }",
        f"    default_backend {ANY_BACKEND}",
        "",
        f"backend {ANY_BACKEND}",
        "    balance roundrobin",
    ]
    lines += [f"    server w{i} {address} {check}" for i, address in enumerate(addresses)]
    for index, address in enumerate(addresses):
        lines += ["", f"backend {backend_name(index)}", f"    server w{index} {address} {check}"]
        lines += [
            f"    server w{other} {other_address} {check} backup"
            for other, other_address in enumerate(addresses)
            if other != index
        ]
    return "\n".join(lines) + "\n"


def render_postgres_config(
    nodes: Sequence[tuple[str, str, int, int]],
    *,
    bind: str,
    socket_path: Path,
    connections_max: int = 1024,
    docker_dns: bool = False,
) -> str:
    """haproxy.cfg for the PostgreSQL frontend of `walletd ha-dev` (cli/ha.py): TCP to the
    one node whose Patroni answers ``GET /primary`` with 200 (it holds the leader key and
    runs as primary). ``nodes``: (name, host, PostgreSQL port, Patroni REST port).

    A node is down after two failed checks 250 ms apart (a frozen node's REST API times out
    in 500 ms), and ``on-marked-down shutdown-sessions`` cuts every connection to it: a
    demoted or frozen old primary keeps no session that could still commit.
    """
    if not nodes:
        raise ValueError("at least one PostgreSQL node is needed")
    lines = [
        "# Generated by walletd (cli/haproxy.py render_postgres_config): PostgreSQL's primary,",
        "# found by Patroni's REST API.",
        "global",
        f"    maxconn {connections_max}",
        # HAProxy counts a server up until its first checks fail: `walletd ha-dev` reads the
        # servers' states here and hands out the frontend once only the primary is up.
        f"    stats socket {socket_path} mode 600 level admin",
        "",
    ]
    if docker_dns:  # docker-compose's `ha` profile: a node's container may start later
        lines += ["resolvers docker", "    nameserver dns 127.0.0.11:53", "    hold valid 1s", ""]
    lines += [
        "defaults",
        "    mode tcp",
        "    timeout connect 1s",
        # Pooled connections idle for minutes; walletd's own timeouts bound each statement.
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout check 500ms",
        "",
        "listen postgres",
        f"    bind {bind}",
        "    option httpchk GET /primary",
        "    http-check expect status 200",
        "    default-server inter 250ms fastinter 250ms downinter 250ms fall 2 rise 1 "
        "on-marked-down shutdown-sessions"
        + (" init-addr last,libc,none resolvers docker" if docker_dns else ""),
    ]
    lines += [
        f"    server {name} {host}:{pg_port} check port {rest_port}"
        for name, host, pg_port, rest_port in nodes
    ]
    return "\n".join(lines) + "\n"


def initial_map(shard_count: int) -> str:
    """Every shard to any walletd, until the first sync names the owners."""
    return "".join(f"{shard} {ANY_BACKEND}\n" for shard in range(shard_count))


async def runtime_command(socket_path: Path, command: str, timeout_s: float = 2.0) -> str:
    """One command (or several, separated by ';') on HAProxy's stats socket; its answer."""

    async def exchange() -> str:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            return (await reader.read()).decode()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.wait_for(exchange(), timeout_s)


_OWNERS = """
SELECT shard, CASE WHEN expires_at > now() THEN owner_url END
  FROM walletd_shard_leases ORDER BY shard
"""
# Commands per write to the socket: HAProxy reads a bounded line.
_COMMANDS_PER_WRITE_MAX = 64


class MapSync:
    """Keeps HAProxy's shard map equal to the ownership table (see the module docstring)."""

    def __init__(
        self,
        dsn: str,
        servers: Sequence[str],
        *,
        map_path: Path,
        socket_path: Path,
        interval_s: float = 0.25,
    ) -> None:
        self._dsn = dsn
        self._backends = {url.rstrip("/"): backend_name(i) for i, url in enumerate(servers)}
        self._map_path = map_path
        self._socket_path = socket_path
        self._interval_s = interval_s
        self._pushed: dict[int, str] = {}
        self._connection: asyncpg.Connection | None = None
        self.updates = 0

    async def sync_once(self) -> int:
        """Push every changed entry; returns how many changed."""
        if self._connection is None or self._connection.is_closed():
            self._connection = await connect(self._dsn, self._interval_s * 8)
        rows = await self._connection.fetch(_OWNERS, timeout=self._interval_s * 8)
        wanted = {row[0]: self._backends.get(row[1] or "", ANY_BACKEND) for row in rows}
        changed = [shard for shard, backend in wanted.items() if self._pushed.get(shard) != backend]
        for start in range(0, len(changed), _COMMANDS_PER_WRITE_MAX):
            part = changed[start : start + _COMMANDS_PER_WRITE_MAX]
            await runtime_command(
                self._socket_path,
                ";".join(f"set map {self._map_path} {shard} {wanted[shard]}" for shard in part),
            )
            for shard in part:
                self._pushed[shard] = wanted[shard]
        self.updates += len(changed)
        return len(changed)

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except (
                OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, DatabaseError
            ) as error:  # fmt: skip
                # HAProxy restarted (its map is the file again) or PostgreSQL is away (connect
                # raises DatabaseUnreachable, e.g. during a failover): push everything again
                # once both answer.
                _log.warning("shard map sync failed: %r", error)
                self._pushed.clear()
                if self._connection is not None:
                    self._connection.terminate()
                    self._connection = None
            await asyncio.sleep(self._interval_s)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError, TimeoutError, asyncpg.InterfaceError):
                await asyncio.wait_for(self._connection.close(), 2.0)
            self._connection = None


class HaproxyMissing(RuntimeError):
    """The haproxy binary is not installed."""


def haproxy_binary() -> str:
    found = shutil.which("haproxy") or next(
        (path for path in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(path).exists()),
        None,
    )
    if found is None:
        raise HaproxyMissing("haproxy is not installed; run .ci/install-haproxy (as root)")
    return found


def start_haproxy(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """HAProxy in the foreground (-db), its output in ``log_path``; stopped with SIGTERM."""
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [haproxy_binary(), "-f", str(config_path), "-db"],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def wait_listening(
    host: str,
    port: int,
    process: subprocess.Popen[bytes],
    timeout_s: float = 10.0,
    *,
    stats_socket: Path | None = None,
) -> None:
    """Until ``host:port`` accepts connections and, when given, HAProxy's stats socket
    answers; fails early if the process exited. HAProxy binds its listeners in no order it
    promises: the frontend's port can accept before the stats socket's file exists, and a
    runtime command sent then fails with ENOENT (seen: `walletd ha-dev` exiting with
    "[Errno 2] No such file or directory" on its first map sync)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s

    async def answers() -> bool:
        if not await _accepts(host, port):
            return False
        if stats_socket is None:
            return True
        try:
            await runtime_command(stats_socket, "show info")
        except OSError:  # TimeoutError is one
            return False
        return True

    while not await answers():
        if process.poll() is not None:
            raise RuntimeError(f"haproxy exited with {process.returncode}")
        if loop.time() > deadline:
            where = f"{host}:{port}" + (f" and {stats_socket}" if stats_socket else "")
            raise TimeoutError(f"HAProxy does not answer on {where}")
        await asyncio.sleep(0.02)


async def _accepts(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True

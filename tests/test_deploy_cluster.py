"""The `cluster` profile of docker-compose.yml, checked statically like the rest of the
deployment files (no Docker engine here): `docker-compose --profile cluster config` accepts
it, the replicas are walletd with walletd's own environment, and deploy/haproxy holds
exactly what `walletd haproxy-config` generates for them, which a real HAProxy accepts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deployment import COMPOSE_FILE, ROOT, TOOL_TIMEOUT_S, clean_environment, tool
from walletd.cli.config import SETTINGS
from walletd.cli.haproxy import haproxy_binary, initial_map, render_config

# Every test here starts walletd, PostgreSQL or HAProxy processes.
pytestmark = pytest.mark.slow

DEPLOY = ROOT / "deploy" / "haproxy"
REPLICAS = ("walletd", "walletd-2", "walletd-3")


def cluster_config(tmp_path: Path) -> dict[str, Any]:
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    done = subprocess.run(
        [tool("docker-compose"), "--env-file", str(empty_env_file), "--profile", "cluster",
         "--file", str(COMPOSE_FILE), "config"],
        cwd=ROOT, env=clean_environment(), capture_output=True, text=True,
        timeout=TOOL_TIMEOUT_S,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert isinstance(resolved, dict)
    return resolved


def sync_flags(services: dict[str, Any]) -> dict[str, list[str]]:
    flags: dict[str, list[str]] = {}
    for argument in services["haproxy-sync"]["command"][2:]:
        name, _, value = argument.partition("=")
        flags.setdefault(name, []).append(value)
    return flags


def test_the_cluster_profile_runs_three_walletd_behind_haproxy(tmp_path: Path) -> None:
    """Three walletd services share one environment and advertise their own service names
    (their host names); haproxy-sync names exactly them; HAProxy mounts deploy/haproxy."""
    services = cluster_config(tmp_path)["services"]
    environments = [services[name]["environment"] for name in REPLICAS]
    assert all(environment == environments[0] for environment in environments)
    assert [services[name]["hostname"] for name in REPLICAS] == list(REPLICAS)
    assert all(
        "WALLETD_ADVERTISE_URL" not in e or not e["WALLETD_ADVERTISE_URL"] for e in environments
    )
    flags = sync_flags(services)
    assert flags["--server"] == [f"http://{name}:8000" for name in REPLICAS]
    mounts = services["haproxy"]["volumes"]
    assert any(str(DEPLOY) in str(mount) for mount in mounts)
    assert (
        services["haproxy-sync"]["environment"]["WALLETD_DATABASE_URL"]
        == (services["walletd"]["environment"]["WALLETD_DATABASE_URL"])
    )


def test_deploy_haproxy_is_what_walletd_generates_and_haproxy_accepts(tmp_path: Path) -> None:
    """deploy/haproxy/haproxy.cfg and shards.map equal `walletd haproxy-config` output for the
    profile's servers and the default shard count; `haproxy -c` accepts the config."""
    services = cluster_config(tmp_path)["services"]
    flags = sync_flags(services)
    shards = next(s.default for s in SETTINGS if s.name == "shards")
    map_path = Path(flags["--map-file"][0])
    expected = render_config(
        flags["--server"], bind=":8080", shard_count=shards, map_path=map_path,
        socket_path=Path(flags["--socket"][0]), socket_mode="666", docker_dns=True,
    )  # fmt: skip
    regenerate = "regenerate deploy/haproxy (docs/SCALING.md, 'docker-compose')"
    assert (DEPLOY / "haproxy.cfg").read_text() == expected, regenerate
    assert (DEPLOY / "shards.map").read_text() == initial_map(shards), regenerate

    local = tmp_path / "haproxy.cfg"
    local.write_text(expected.replace(str(map_path), str(DEPLOY / "shards.map")))
    done = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(local)],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr

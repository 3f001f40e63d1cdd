"""The deployment files: Dockerfile, docker-compose.yml, env.example and their docs.

No Docker engine runs here, so these tests check what can be checked without one: the files
parse with the real tools (`docker-compose config`, hadolint), they name only flags and
variables walletd accepts, their defaults are walletd's own, the generated documentation
equals what cli/config.py SETTINGS renders, and the image's healthcheck and command work
against a real walletd process.
"""

from __future__ import annotations

import argparse
import fnmatch
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.processes import WalletdProcess
from walletd.cli.config import (
    SETTINGS,
    SETTINGS_TABLE_END,
    SETTINGS_TABLE_START,
    Config,
    default_text,
    env_names,
    load_config,
    render_env_example,
    render_settings_table,
    replace_settings_table,
)
from walletd.cli.main import _parser
from walletd.cli.service import engine_limits
from walletd.http.app import create_app
from walletd.http.settings import HttpSettings
from walletd.persistence.embedded import AUTOVACUUM_NAPTIME

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_MD = ROOT / "docs" / "DOCKER.md"
README = ROOT / "README.md"
DOCKER_SECTION_HEADING = "## Run with Docker"
TOOL_TIMEOUT_S = 60.0
REGENERATE = "stale: run `make docs-config` after changing cli/config.py SETTINGS"

# Settings docker-compose.yml does not take from the environment, and why. Every other
# setting, including any added later, must be passed as `NAME: ${NAME:-default}`.
FIXED_IN_CONTAINER = {
    "host": "the image's command says --host 0.0.0.0 (a flag beats the environment)",
    "port": "8000 inside the container; no host port reaches it (HAProxy's is PUBLISHED_PORT)",
    "unix_socket": "HAProxy runs in a container of its own and reaches each walletd over the "
    "compose network (TCP); a Unix socket needs both in one host's file system",
    "internal_host": "each walletd service's command binds it to its own address on the "
    "walletd-only `walletd-cluster` network",
    "internal_port": "9000 in each walletd service's command, published nowhere",
    "cluster_credential_file": "in the `walletd-cluster-credential` volume, which only the "
    "walletd services mount",
    "data_dir": "only for the embedded PostgreSQL, never started in Docker",
    "embedded_start_timeout_s": "only for the embedded PostgreSQL, never started in Docker",
    "database_url": "built from POSTGRES_PASSWORD to reach the compose `postgres` service",
    # Compose runs each walletd as a service of its own (its restart policy restarts it).
    "member_restarts_max": "only for `walletd cluster`, which Docker does not run",
    "member_restart_window_s": "only for `walletd cluster`, which Docker does not run",
    "member_restart_backoff_s": "only for `walletd cluster`, which Docker does not run",
}
# PostgreSQL keeps these for superusers (its superuser_reserved_connections default).
POSTGRES_RESERVED_CONNECTIONS = 3
# Beside its pool walletd holds one connection renewing its shard leases.
WALLETD_CONNECTIONS_OUTSIDE_POOL = 1

_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")
_WALLETD_VARIABLE = re.compile(r"^(WALLETD_[A-Z0-9_]+|DATABASE_URL)$")


# --- reading the files ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # Docker drops comment lines even inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[-1] :]


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON argument list of CMD/ENTRYPOINT/HEALTHCHECK CMD; shell form fails the test."""
    arguments = instruction.arguments
    if instruction.keyword == "HEALTHCHECK":
        arguments = arguments[arguments.index(" CMD ") + len(" CMD ") :]
    parsed = json.loads(arguments)
    assert isinstance(parsed, list), f"{instruction.keyword} is not in exec form"
    assert all(isinstance(item, str) for item in parsed)
    return parsed


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def image_command() -> list[str]:
    """ENTRYPOINT + CMD of the final stage, as Docker would run them."""
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    entrypoint = [i for i in stage if i.keyword == "ENTRYPOINT"]
    command = only(stage, "CMD")
    return [*(exec_form(entrypoint[-1]) if entrypoint else []), *exec_form(command)]


def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def walletd_service() -> dict[str, Any]:
    service = compose()["services"]["walletd"]
    assert isinstance(service, dict)
    return service


def walletd_services(document: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Every service that runs `walletd serve` (the image's command or its own)."""
    services = (document or compose())["services"]
    return {
        name: service for name, service in services.items()
        if service.get("image") == "walletd:local"
        and service.get("command", image_command())[:2] == ["walletd", "serve"]
    }  # fmt: skip


def volume_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Volume (or host path) → where the service mounts it, short or long syntax."""
    mounts: dict[str, Path] = {}
    for mount in service.get("volumes") or []:
        if isinstance(mount, dict):
            mounts[str(mount["source"])] = Path(mount["target"])
        else:
            source, target = str(mount).split(":")[:2]
            mounts[source] = Path(target)
    return mounts


def compose_interpolations() -> dict[str, str]:
    """Every `${NAME:-default}` in docker-compose.yml: name → default ("" when none)."""
    found: dict[str, str] = {}
    for name, default in _INTERPOLATION.findall(COMPOSE_FILE.read_text()):
        assert found.setdefault(name, default) == default, f"{name} has two defaults"
    return found


def setting_env_names() -> set[str]:
    return set(env_names())


def settings_block(document: str) -> str:
    start = document.index(SETTINGS_TABLE_START) + len(SETTINGS_TABLE_START)
    return document[start : document.index(SETTINGS_TABLE_END, start)]


def docker_section(document: str) -> str:
    return document[document.index(DOCKER_SECTION_HEADING) :]


# --- tools the suite needs (`make tools` installs them) ---------------------------------------

# The one command that installs each tool; `make test` runs it first (make tools).
INSTALL_COMMANDS = {
    "docker-compose": ".ci/install-docker-tools",
    "hadolint": "make install-dev",
}


def tool(name: str) -> str:
    """The tool's path; a missing tool fails the test (a skip is not a pass)."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is not None:
        return found
    pytest.fail(f"{name} is not installed; install it with: {INSTALL_COMMANDS[name]}")


def clean_environment() -> dict[str, str]:
    """This process's environment less every variable docker-compose.yml interpolates."""
    interpolated = set(compose_interpolations())
    return {key: value for key, value in os.environ.items() if key not in interpolated}


def compose_config(tmp_path: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """`docker-compose config`: the file validated and resolved, ignoring any local .env."""
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")
    command = [tool("docker-compose"), "--env-file", str(empty_env_file)]
    done = subprocess.run(
        [*command, "--file", str(COMPOSE_FILE), "config"],
        cwd=ROOT,
        env={**clean_environment(), **environ},
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert isinstance(resolved, dict)
    return resolved


def resolved_walletd_environment(resolved: dict[str, Any]) -> dict[str, str]:
    environment = resolved["services"]["walletd"]["environment"]
    assert isinstance(environment, dict)
    return {str(key): "" if value is None else str(value) for key, value in environment.items()}


def serve_parser() -> argparse.ArgumentParser:
    commands = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    serve = commands[0].choices["serve"]
    assert isinstance(serve, argparse.ArgumentParser)
    return serve


def container_config(environment: Mapping[str, str]) -> Config:
    """The Config walletd builds in the container: the image's command, compose's env."""
    args = _parser().parse_args(image_command()[1:])
    return load_config(args, environment)


# --- generated documentation ---------------------------------------------------------------


def test_env_example_is_rendered_from_settings() -> None:
    """env.example equals what SETTINGS renders (`make docs-config` rewrites it)."""
    assert (ROOT / "env.example").read_text() == render_env_example(), REGENERATE


def test_env_example_names_every_variable_walletd_reads() -> None:
    """Each setting's preferred variable appears with its default, and aliases are named."""
    text = render_env_example()
    for setting in SETTINGS:
        first, *aliases = setting.env
        assert f"# {first}={default_text(setting)}\n" in text
        for alias in aliases:
            assert alias in text


@pytest.mark.parametrize("document", [README, DOCKER_MD], ids=lambda path: path.name)
def test_configuration_tables_are_rendered_from_settings(document: Path) -> None:
    """README.md and docs/DOCKER.md carry exactly the rendered table between the markers."""
    text = document.read_text()
    assert settings_block(text) == "\n" + render_settings_table(), REGENERATE
    for setting in SETTINGS:
        assert f"`{setting.env[0]}`" in settings_block(text)


@pytest.mark.slow
def test_docs_config_rewrites_a_stale_table_and_env_example(tmp_path: Path) -> None:
    """`make docs-config`'s commands turn a stale table and env.example into the rendered ones."""
    stale = tmp_path / "stale-table.md"
    stale.write_text(f"# Title\n{SETTINGS_TABLE_START}\n| old |\n{SETTINGS_TABLE_END}\nafter\n")
    recipe = subprocess.run(
        ["make", "-n", "--always-make", "docs-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert recipe.returncode == 0, recipe.stderr
    assert "-m walletd.cli.config --env-example > env.example" in recipe.stdout
    assert "-m walletd.cli.config --update-docs README.md docs/DOCKER.md" in recipe.stdout
    command = [sys.executable, "-m", "walletd.cli.config"]
    run = subprocess.run(
        [*command, "--update-docs", str(stale), "--env-example"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == render_env_example()
    assert stale.read_text() == replace_settings_table(stale.read_text())
    assert stale.read_text().startswith("# Title\n" + SETTINGS_TABLE_START + "\n| Variable |")
    assert stale.read_text().endswith(SETTINGS_TABLE_END + "\nafter\n")


def test_settings_table_cells_cannot_break_the_table() -> None:
    """Every row has the header's four cells, whatever a help text contains."""
    for row in render_settings_table().splitlines():
        assert len(re.split(r"(?<!\\)\|", row)) == 6, row


def test_readme_carries_the_docker_commands_of_docs_docker_md() -> None:
    """README.md's "Run with Docker" shows docs/DOCKER.md's commands, word for word, and
    links the page for the rest (the README is a tour; the page says it once)."""
    commands = re.compile(r"^```bash\n(.*?)^```$", re.MULTILINE | re.DOTALL)
    readme = docker_section(README.read_text())
    assert commands.findall(readme)[0] == commands.findall(docker_section(DOCKER_MD.read_text()))[0]
    assert "(docs/DOCKER.md)" in readme


def test_docs_name_only_real_variables() -> None:
    """Every WALLETD_* the Docker docs name is a setting; every other one is in compose."""
    text = DOCKER_MD.read_text()
    compose_text = COMPOSE_FILE.read_text()
    for name in set(re.findall(r"\b(?:WALLETD|POSTGRES|PUBLISHED)_[A-Z0-9_]+\b", text)):
        if name.startswith("WALLETD_"):
            assert name in setting_env_names(), name
        else:
            assert name in compose_text, name


def test_compose_only_variables_are_documented_with_their_defaults() -> None:
    """Each variable compose reads that walletd does not has a row in docs/DOCKER.md."""
    text = DOCKER_MD.read_text()
    own = compose_interpolations().items()
    extra = {name: default for name, default in own if name not in setting_env_names()}
    assert extra, "compose reads at least POSTGRES_PASSWORD"
    for name, default in extra.items():
        assert f"| `{name}` | `{default}` |" in text, name


# --- docker-compose.yml --------------------------------------------------------------------


@pytest.mark.slow
def test_compose_file_is_valid_and_resolves_to_walletds_defaults(tmp_path: Path) -> None:
    """`docker-compose config` accepts the file; unset variables resolve to SETTINGS' defaults."""
    environment = resolved_walletd_environment(compose_config(tmp_path, {}))
    for setting in SETTINGS:
        if setting.name in FIXED_IN_CONTAINER:
            continue
        assert environment[setting.env[0]] == default_text(setting), setting.env[0]
    config = container_config(environment)
    engine_limits(config)  # raises when the limits do not fit together
    assert (config.host, config.port) == ("0.0.0.0", 8000)
    assert config.database_url is not None
    assert urlsplit(config.database_url).hostname == "postgres"


@pytest.mark.slow
def test_compose_settings_change_without_a_rebuild(tmp_path: Path) -> None:
    """An exported variable reaches walletd's environment; the build section is unchanged."""
    before = compose_config(tmp_path, {})
    after = compose_config(
        tmp_path, {"WALLETD_PIPELINES": "7", "WALLETD_API_KEYS": "k1,k2", "PUBLISHED_PORT": "9000"}
    )
    environment = resolved_walletd_environment(after)
    assert environment["WALLETD_PIPELINES"] == "7"
    assert [key.secret for key in container_config(environment).api_keys] == ["k1", "k2"]
    assert after["services"]["haproxy"]["ports"] == ["127.0.0.1:9000:8080/tcp"]
    assert after["services"]["walletd"]["build"] == before["services"]["walletd"]["build"]


def test_compose_passes_every_setting_from_the_environment_with_its_default() -> None:
    """Each setting not fixed in the container is `NAME: ${NAME:-default}`, new ones included."""
    environment = walletd_service()["environment"]
    missing = []
    for setting in SETTINGS:
        if setting.name in FIXED_IN_CONTAINER:
            continue
        name = setting.env[0]
        if environment.get(name) != f"${{{name}:-{default_text(setting)}}}":
            missing.append(f"{name}: ${{{name}:-{default_text(setting)}}}")
    assert not missing, "docker-compose.yml should pass:\n" + "\n".join(missing)


def test_compose_names_only_variables_walletd_reads() -> None:
    """Every WALLETD_*/DATABASE_URL in compose, as key or `${...}`, is a setting's variable."""
    service = walletd_service()
    named = {key for key in service["environment"] if _WALLETD_VARIABLE.match(key)}
    named |= {name for name in compose_interpolations() if _WALLETD_VARIABLE.match(name)}
    assert named, "compose passes walletd settings"
    assert named <= setting_env_names(), sorted(named - setting_env_names())
    assert set(service["environment"]) <= setting_env_names(), "walletd ignores the others"


def test_compose_and_image_commands_use_only_real_flags() -> None:
    """The image's CMD and any compose `command` parse with `walletd serve`'s own parser."""
    commands = [image_command()]
    for service in walletd_services().values():
        service_command = service.get("command", image_command())
        assert isinstance(service_command, list), "compose `command` in list form"
        commands.append([str(arg) for arg in service_command])
    # Exact option strings: argparse would also accept an abbreviation such as `--hos`.
    serve_flags = {flag for action in serve_parser()._actions for flag in action.option_strings}
    for command in commands:
        assert command[:2] == ["walletd", "serve"], command
        assert {arg for arg in command if arg.startswith("-")} <= serve_flags, command
        try:
            _parser().parse_args(command[1:])
        except SystemExit as error:
            pytest.fail(f"`{' '.join(command)}` does not parse: exit {error.code}")


@pytest.mark.slow
def test_only_haproxy_publishes_a_port_and_the_internal_listener_stays_among_walletds(
    tmp_path: Path,
) -> None:
    """Resolved with the cluster profile: no walletd service publishes or exposes a port
    (HAProxy's is the only one for clients); each binds its internal listener to its own
    address on `walletd-cluster`, an internal network that only walletd services join; the
    credential volume is mounted by them alone; HAProxy's servers are public ports only."""
    document = compose_config(tmp_path, {"COMPOSE_PROFILES": "cluster"})
    services = document["services"]
    walletds = walletd_services(document)
    assert sorted(walletds) == ["walletd", "walletd-2", "walletd-3"]
    published = {name for name, service in services.items() if service.get("ports")}
    assert "haproxy" in published
    assert not published & set(walletds), "walletd's own ports are published nowhere"
    assert not any(service.get("expose") for service in walletds.values())
    network = document["networks"]["walletd-cluster"]
    assert network["internal"] is True
    members = {name for name, service in services.items()
               if "walletd-cluster" in (service.get("networks") or {})}  # fmt: skip
    assert members == set(walletds)
    subnet = ipaddress.ip_network(network["ipam"]["config"][0]["subnet"])
    config_by_service = {}
    for name, service in walletds.items():
        args = _parser().parse_args([str(arg) for arg in service["command"][1:]])
        config = load_config(args, resolved_walletd_environment(document))
        config_by_service[name] = config
        address = service["networks"]["walletd-cluster"]["ipv4_address"]
        assert config.internal_host == address, name
        assert ipaddress.ip_address(address) in subnet
        assert config.internal_port not in (0, config.port)
        credential_file = config.cluster_credential_file
        assert credential_file is not None
        assert volume_mounts(service).get("walletd-cluster-credential") == credential_file.parent
    mounted = {name for name, service in services.items()
               if "walletd-cluster-credential" in volume_mounts(service)}  # fmt: skip
    assert mounted == set(walletds)
    haproxy_cfg = (ROOT / "deploy" / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s+server \S+ (\S+)", haproxy_cfg, re.MULTILINE)
    assert servers
    internal = {f"{c.internal_host}:{c.internal_port}" for c in config_by_service.values()}
    public_port = {c.port for c in config_by_service.values()}
    assert all(int(server.rsplit(":", 1)[1]) in public_port for server in servers)
    assert not internal & set(servers)


def test_compose_gates_walletd_on_a_healthy_postgres_with_a_named_volume() -> None:
    """walletd starts after pg_isready succeeds; the data lives in a named volume."""
    document = compose()
    postgres = document["services"]["postgres"]
    assert postgres["image"] == "postgres:17"
    assert "pg_isready" in postgres["healthcheck"]["test"]
    assert walletd_service()["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    volume, _, mount = postgres["volumes"][0].partition(":")
    assert volume in document["volumes"]
    assert mount == "/var/lib/postgresql/data"  # the postgres:17 image's PGDATA
    assert "env_file" not in walletd_service(), "compose reads .env itself; it stays optional"


def test_postgres_settings_fit_walletds_pool_and_durability() -> None:
    """max_connections holds walletd's pool at compose's defaults; synchronous_commit stays on;
    a young database is analyzed as soon as on the embedded server."""
    command = " ".join(compose()["services"]["postgres"]["command"])
    defaults = compose_interpolations()
    settings = dict(
        re.findall(r"-c (\w+)=(\S+)", _INTERPOLATION.sub(lambda m: defaults[m[1]], command))
    )
    assert settings["synchronous_commit"] == "on"
    assert settings["autovacuum_naptime"] == AUTOVACUUM_NAPTIME  # as the embedded server's
    assert re.fullmatch(r"\d+(kB|MB|GB)", settings["shared_buffers"])
    environment = {name: default for name, default in defaults.items() if default}
    config = container_config(environment)
    needed = config.pool_size + WALLETD_CONNECTIONS_OUTSIDE_POOL + POSTGRES_RESERVED_CONNECTIONS
    assert int(settings["max_connections"]) >= needed
    # The documented arithmetic (pool = (in-flight batches + 1) × pipelines + 4) is the code's.
    assert config.pool_size_max == 0
    assert config.pool_size == (config.inflight_batches_max + 1) * config.pipelines + 4


def test_stop_grace_period_outlasts_walletds_drain() -> None:
    """Docker waits longer than walletd's drain before SIGKILL."""
    from walletd.cli.main import SHUTDOWN_TIMEOUT_S

    grace = walletd_service()["stop_grace_period"]
    assert re.fullmatch(r"\d+s", grace)
    assert int(grace[:-1]) > SHUTDOWN_TIMEOUT_S


# --- Dockerfile ----------------------------------------------------------------------------


@pytest.mark.slow
def test_dockerfile_passes_hadolint() -> None:
    """hadolint reports nothing, not even style notes."""
    done = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfile_is_multi_stage_slim_and_unprivileged() -> None:
    """Builder and final stage share one slim Python; the final one copies only the venv."""
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    images = [i.arguments.split()[0] for i in instructions if i.keyword == "FROM"]
    assert len(images) >= 2
    # A venv refers to its interpreter by path: both stages need the same Python.
    assert set(images) == {"python:3.11-slim"}
    stage = final_stage(instructions)
    copies = [i.arguments for i in stage if i.keyword == "COPY"]
    assert copies == ["--from=builder /opt/walletd /opt/walletd"]
    runs = " ".join(i.arguments for i in stage if i.keyword == "RUN")
    assert not re.search(r"apt-get|apk|gcc|build-essential|pip install", runs)
    user = only(stage, "USER").arguments.split(":")[0]
    assert user not in {"root", "0"}
    assert image_command() == ["walletd", "serve", "--host", "0.0.0.0"]


def test_image_ports_agree() -> None:
    """EXPOSE, the healthcheck URL, the compose mapping and walletd's port are all one port."""
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    exposed = int(only(stage, "EXPOSE").arguments)
    health_url = re.search(r"http://[^'\"]+", only(stage, "HEALTHCHECK").arguments)
    assert health_url is not None
    parts = urlsplit(health_url.group(0))
    # No host port reaches walletd (HAProxy's does): the port HAProxy's servers name.
    servers = [arg for arg in compose()["services"]["haproxy-sync"]["command"] if "--server" in arg]
    assert servers
    published = {urlsplit(arg.partition("=")[2]).port for arg in servers}
    served = container_config({}).port
    assert {exposed, parts.port, served} == published
    routes = {
        resource.canonical
        for resource in create_app(HttpSettings(), _no_services).router.resources()
    }
    assert parts.path in routes


def _no_services() -> Any:
    raise AssertionError("the app is only inspected, never started")


def test_build_context_holds_what_the_dockerfile_copies() -> None:
    """Each COPY source exists and survives .dockerignore; every package folder is copied."""
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources: set[str] = set()
    for instruction in dockerfile_instructions(DOCKERFILE.read_text()):
        if instruction.keyword != "COPY" or instruction.arguments.startswith("--from"):
            continue
        sources.update(instruction.arguments.split()[:-1])
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["setuptools"]["package-dir"].values()) <= sources
    assert pyproject["project"]["readme"] in sources


def test_tool_installers_follow_the_convention() -> None:
    """Every .ci/install-* is an executable strict bash script that, when not root, names the
    sudo command that installs its tool; .ci/run and make tools run them all."""
    installers = sorted((ROOT / ".ci").glob("install-*"))
    assert {path.name for path in installers} >= {"install-chromium", "install-docker-tools"}
    for installer in installers:
        text = installer.read_text()
        assert os.access(installer, os.X_OK), installer.name
        assert text.startswith("#!/usr/bin/env bash\n"), installer.name
        assert "set -euo pipefail" in text, installer.name
        # Not root and the tool missing: fail with the command that would install it.
        assert '"$(id -u)"' in text, installer.name
        assert "sudo" in text, installer.name
    assert "for script in .ci/install-*" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_make_test_runs_every_installer_first_and_stops_on_a_failing_one(
    tmp_path: Path,
) -> None:
    """`make test` depends on `make tools`, which runs every executable .ci/install-* and
    fails when one does (a tool it cannot install), so the suite never runs short of one."""
    makefile = (ROOT / "Makefile").read_text()
    test_rule = re.search(r"^test:(.*)$", makefile, re.MULTILINE)
    assert test_rule is not None
    assert test_rule.group(1).split()[0] == "tools"
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    ci = tmp_path / ".ci"
    ci.mkdir()
    for name, body in [
        ("install-alpha", "touch alpha-ran"),
        ("install-beta", "echo 'beta is missing; install it with: sudo x' >&2; exit 1"),
        ("install-gamma", "touch gamma-ran"),
        ("install-not-executable", "touch must-not-run"),
    ]:
        script = ci / name
        script.write_text(f"#!/usr/bin/env bash\nset -euo pipefail\n{body}\n")
        script.chmod(0o644 if name.endswith("not-executable") else 0o755)
    done = subprocess.run(
        ["make", "--no-print-directory", "tools"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "beta is missing; install it with: sudo x" in done.stderr
    assert (tmp_path / "alpha-ran").exists()
    assert not (tmp_path / "gamma-ran").exists()  # stopped at the first failure
    assert not (tmp_path / "must-not-run").exists()
    (ci / "install-beta").write_text("#!/usr/bin/env bash\nexit 0\n")
    done = subprocess.run(
        ["make", "--no-print-directory", "tools"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "gamma-ran").exists()
    assert not (tmp_path / "must-not-run").exists()


# --- against a real walletd ----------------------------------------------------------------


def healthcheck_command(port: int) -> list[str]:
    """The image's HEALTHCHECK command, run by this Python, pointed at `port`."""
    stage = final_stage(dockerfile_instructions(DOCKERFILE.read_text()))
    command = exec_form(only(stage, "HEALTHCHECK"))
    assert command[0] == "python"
    pointed = [arg.replace(":8000/", f":{port}/") for arg in command[1:]]
    assert pointed != command[1:], "the healthcheck URL names port 8000"
    return [sys.executable, *pointed]


@pytest.mark.slow
def test_image_command_with_compose_defaults_serves_and_passes_the_healthcheck(
    tmp_path: Path,
    fresh_database_url: str,
    walletd_process: Callable[..., WalletdProcess],
) -> None:
    """walletd started with the image's flags and compose's environment migrates an empty
    database, serves, and the HEALTHCHECK command exits 0; with nothing listening, non-zero."""
    environment = {
        key: _INTERPOLATION.sub(lambda match: match[2] or "", str(value))
        for key, value in walletd_service()["environment"].items()
    }
    environment["WALLETD_DATABASE_URL"] = fresh_database_url
    flags = image_command()[2:]
    # Tests serve on loopback only: keep every flag of the image but the address.
    flags[flags.index("--host") + 1] = "127.0.0.1"
    process = walletd_process(*flags, env=environment)
    port = urlsplit(process.url).port
    assert port is not None
    check = subprocess.run(
        healthcheck_command(port), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    assert check.returncode == 0, check.stderr + process.log()
    assert process.terminate() == 0
    refused = subprocess.run(
        healthcheck_command(port), capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )
    assert refused.returncode != 0

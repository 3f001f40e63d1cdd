"""A client generated from the served OpenAPI document works as a new user would use it.

openapi-python-client (a dev dependency, run offline) generates a client from
/api/openapi.json into a temporary directory and must print no warning: a warning means a
response or a model was dropped (every problem+json response was, when errors narrowed
the problem schema per response). The client is then type-checked (mypy strict) and run in
a subprocess against a real ``walletd serve`` on a loopback port: a success, a 404, a 409
and a 422 each come back parsed into their typed model, with an unauthenticated ``Client``
(auth is off when no keys are configured).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import pytest

from tests.conftest import PostgresServer
from tests.processes import start_walletd
from walletd.http.openapi import openapi_json_bytes

pytestmark = pytest.mark.slow

PACKAGE: Final = "walletd_api_client"
GENERATOR_TIMEOUT_S: Final = 300
CLIENT_TIMEOUT_S: Final = 120

# What a user writes against the generated client; run as a script against a live server.
# Each `isinstance` narrows the union a function returns, so mypy checks the types too.
USAGE: Final = """
from __future__ import annotations

import sys
from uuid import UUID

from walletd_api_client import Client
from walletd_api_client.api.wallets import apply_operation, create_wallet, get_wallet
from walletd_api_client.models import (
    CreateWalletRequest,
    OperationRequest,
    OperationRequestCamelCase,
    Problem,
    RequestOperationType,
    Wallet,
)

client = Client(base_url=sys.argv[1], raise_on_unexpected_status=True)

created = create_wallet.sync_detailed(client=client, body=CreateWalletRequest())
assert created.status_code == 201 and isinstance(created.parsed, Wallet), created
wallet_id = created.parsed.id

deposit = apply_operation.sync(
    wallet_id,
    client=client,
    body=OperationRequest(operation_type=RequestOperationType.DEPOSIT, amount="10.50"),
)
assert isinstance(deposit, Wallet) and deposit.balance == "10.50", deposit
alias = apply_operation.sync(
    wallet_id,
    client=client,
    body=OperationRequestCamelCase(operation_type=RequestOperationType.DEPOSIT, amount=1),
)
assert isinstance(alias, Wallet) and alias.balance == "11.50", alias

missing = get_wallet.sync_detailed(UUID("00000000-0000-4000-8000-000000000000"), client=client)
assert missing.status_code == 404 and isinstance(missing.parsed, Problem), missing
assert missing.parsed.code == "WALLET_NOT_FOUND", missing.parsed

overdraw = apply_operation.sync_detailed(
    wallet_id,
    client=client,
    body=OperationRequest(operation_type=RequestOperationType.WITHDRAW, amount="100.00"),
)
assert overdraw.status_code == 409 and isinstance(overdraw.parsed, Problem), overdraw
assert overdraw.parsed.code == "INSUFFICIENT_FUNDS", overdraw.parsed

invalid = apply_operation.sync_detailed(
    wallet_id,
    client=client,
    body=OperationRequest(operation_type=RequestOperationType.DEPOSIT, amount="0.001"),
)
assert invalid.status_code == 422 and isinstance(invalid.parsed, Problem), invalid
assert invalid.parsed.code == "VALIDATION_ERROR", invalid.parsed
assert [error.field for error in invalid.parsed.errors or []] == ["amount"], invalid.parsed
print("ok")
"""


def _tool(name: str) -> str:
    """A console script of this virtualenv (the dev extra installs both)."""
    return str(Path(sys.executable).with_name(name))


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The client generated from the served document, and what the generator printed."""
    work = tmp_path_factory.mktemp("generated-client")
    document = work / "openapi.json"
    document.write_bytes(openapi_json_bytes())
    config = work / "config.yaml"
    # No post hooks: they would run `ruff` on the output, which changes no type.
    config.write_text(f"package_name_override: {PACKAGE}\npost_hooks: []\n")
    output = work / PACKAGE
    result = subprocess.run(
        [_tool("openapi-python-client"), "generate", "--path", str(document), "--meta",
         "none", "--output-path", str(output), "--config", str(config)],
        capture_output=True, text=True, timeout=GENERATOR_TIMEOUT_S, check=False,
    )  # fmt: skip
    printed = result.stdout + result.stderr
    assert result.returncode == 0, printed
    return work, printed


def test_generator_prints_no_warning(generated: tuple[Path, str]) -> None:
    """openapi-python-client generates the client with 0 warnings: no response, model or
    body left out or typed Any."""
    work, printed = generated
    assert printed.strip().splitlines() == [f"Generating {work / PACKAGE}"], printed
    assert (work / PACKAGE / "models" / "problem.py").exists()


def test_usage_type_checks(generated: tuple[Path, str]) -> None:
    """The usage script and the generated client pass mypy strict: bodies are typed models,
    errors a typed Problem, and a plain (unauthenticated) Client is accepted."""
    work, _printed = generated
    script = work / "usage.py"
    script.write_text(USAGE)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports",
         "silent", str(script)],
        capture_output=True, text=True, timeout=GENERATOR_TIMEOUT_S, check=False,
        cwd=work, env={**os.environ, "MYPYPATH": str(work)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
async def live_database(pg_server: PostgresServer) -> AsyncIterator[str]:
    dsn = await pg_server.create_database()
    yield dsn
    await pg_server.drop_database(dsn)


@pytest.fixture(scope="module")
def live_url(live_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``walletd serve`` process without API keys."""
    log_dir = tmp_path_factory.mktemp("walletd-generated-client")
    process = start_walletd(["--database-url", live_database], log_dir=log_dir)
    try:
        yield process.url
    finally:
        assert process.terminate() == 0, process.log()


def test_generated_client_parses_success_and_errors(
    generated: tuple[Path, str], live_url: str
) -> None:
    """Against a live walletd, the generated client gets a Wallet for a success and a typed
    Problem for a 404, a 409 and a 422 (with its field errors)."""
    work, _printed = generated
    script = work / "usage.py"
    script.write_text(USAGE)
    result = subprocess.run(
        [sys.executable, str(script), live_url],
        capture_output=True, text=True, timeout=CLIENT_TIMEOUT_S, check=False,
        cwd=work, env={**os.environ, "PYTHONPATH": str(work)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "ok"

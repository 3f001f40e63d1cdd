"""walletd-client (client/pyproject.toml) installs and works alone: built from the client
folder, installed in a fresh venv next to nothing but aiohttp and its dependencies, it
calls a live walletd, and the server's packages are not there."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from packaging.requirements import Requirement

Client = TestClient[web.Request, web.Application]
ROOT = Path(__file__).resolve().parent.parent
# Run inside the clean venv, from a directory outside the repository.
PROBE = """
import asyncio, importlib.util, sys
from decimal import Decimal
from importlib import metadata
from pathlib import Path

import walletd.client
from walletd.client import InsufficientFunds, WalletdClient

for server_only in ("walletd.engine", "walletd.http", "asyncpg", "orjson", "uvloop"):
    assert importlib.util.find_spec(server_only) is None, f"{server_only} is importable"
assert (Path(walletd.client.__file__).parent / "py.typed").is_file()
assert metadata.requires("walletd-client") == ["aiohttp<4,>=3.10"], metadata.requires(
    "walletd-client"
)

async def main(url: str) -> None:
    async with WalletdClient(url) as walletd:
        wallet = await walletd.create_wallet()
        await walletd.deposit(wallet.id, Decimal("2.50"), reference="dist")
        try:
            await walletd.withdraw(wallet.id, "9.00")
        except InsufficientFunds as refused:
            assert refused.request_id
        print((await walletd.get_wallet(wallet.id)).balance)

asyncio.run(main(sys.argv[1]))
"""


def _closure(name: str) -> set[str]:
    """The distributions ``name`` needs here (its requirements whose markers hold, each
    with its own), as installed in this interpreter."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for text in metadata.requires(current) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _link_distributions(names: set[str], target: Path) -> None:
    """Symlinks the installed files of ``names`` (their top-level packages, modules and
    dist-info) into ``target``: that directory then holds those distributions and nothing
    else, without a download."""
    target.mkdir()
    for name in names:
        distribution = metadata.distribution(name)
        for path in distribution.files or []:
            top = path.parts[0]
            if top.startswith("..") or top.endswith(".pth") or top == "__pycache__":
                continue
            link = target / top
            if not link.exists():
                link.symlink_to(Path(str(distribution.locate_file(top))).resolve())


def _install_client_alone(tmp_path: Path) -> Path:
    """Builds the wheel from a copy of client/ and installs it in a fresh venv beside
    aiohttp's closure only; returns that venv's python."""
    source = tmp_path / "client-src"
    # A copy: building writes build/ and egg-info next to the sources.
    shutil.copytree(ROOT / "client", source, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path / "dist"
    run = [sys.executable, "-m", "pip"]
    subprocess.run(
        [*run, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(dist),
         str(source)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (wheel,) = dist.glob("walletd_client-*.whl")
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run(
        [base_python, "-m", "venv", "--without-pip", str(venv)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    python = venv / "bin" / "python"
    subprocess.run(
        [*run, "--python", str(python), "install", "--quiet", "--no-deps", "--no-index",
         str(wheel)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True, timeout=60,
        ).stdout.strip()
    )  # fmt: skip
    assert not str(site_packages).startswith(sysconfig.get_paths()["purelib"])
    _link_distributions(_closure("aiohttp"), tmp_path / "aiohttp-only")
    (site_packages / "aiohttp-only.pth").write_text(f"{tmp_path / 'aiohttp-only'}\n")
    checked = subprocess.run(
        [*run, "--python", str(python), "check"], capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

    return python


@pytest.mark.slow
async def test_the_client_distribution_installs_and_calls_walletd_alone(
    client: Client, tmp_path: Path
) -> None:
    """The wheel built from client/ holds walletd.client and py.typed and requires only
    aiohttp; in a venv with only aiohttp's closure beside it, walletd.engine, asyncpg and
    orjson are not importable, and the client creates a wallet, moves money and reads an
    error's request id against the live app."""
    python = await asyncio.to_thread(_install_client_alone, tmp_path)
    url = str(client.make_url("")).rstrip("/")
    process = await asyncio.create_subprocess_exec(
        str(python), "-I", "-c", PROBE, url, cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "2.50"

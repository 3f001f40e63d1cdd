"""The root `http/` folder must never shadow the standard library's `http`
(docs/ARCHITECTURE.md, "Packaging")."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_stdlib_http_wins_from_the_repository_root() -> None:
    """`python -c 'import http.client'` run from the repository root imports the stdlib."""
    code = (
        "import http.client, sysconfig, sys; "
        "assert http.client.__file__.startswith(sysconfig.get_paths()['stdlib']), "
        "http.client.__file__; import aiohttp.web; print('ok')"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_stdlib_http_wins_inside_the_test_process() -> None:
    """In this pytest process too (the repository root is on sys.path)."""
    import http.client

    assert str(ROOT) in sys.path or "" in sys.path
    assert http.client.__file__ is not None
    assert http.client.__file__.startswith(sysconfig.get_paths()["stdlib"])


def test_walletd_http_is_the_root_folder() -> None:
    """`walletd.http` is the project's `http/` folder, mapped by pyproject.toml."""
    import walletd.http.app

    assert walletd.http.app.__file__ is not None
    assert Path(walletd.http.app.__file__).resolve().parent == ROOT / "http"

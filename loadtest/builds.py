"""Another build of walletd beside this checkout: a git revision's packages, run in a child.

``export_revision`` writes a revision's packages to a temporary directory as a ``walletd``
package tree; ``python_command`` is the command that runs a module (``python -m``) with
``walletd`` imported from such a tree instead of this venv's editable install, or from the
editable install when the tree is None. The modules of ``loadtest`` (this checkout's) stay
importable, so a tool can run its own measuring code on either build
(``loadtest.ab_probe``, ``loadtest.engine_bench``, ``loadtest.poison_bench``).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

from loadtest.procs import REPO_ROOT

__all__ = ["PACKAGES", "export_revision", "python_command"]

PACKAGES = ("engine", "http", "persistence", "cli", "client")
# Runs a module as ``python -m`` would, with walletd from the tree given as argv[1]: the
# editable install's finder is taken out of the way and the tree put first; the checkout
# (the working directory) is added last, for ``loadtest``.
_LAUNCHER = """
import os
import runpy
import sys
tree = sys.argv.pop(1)
module = sys.argv.pop(1)
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, tree)
sys.path.append(os.getcwd())
import walletd.engine
assert walletd.engine.__path__[0].startswith(tree), walletd.engine.__path__
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def export_revision(revision: str, into: Path) -> Path:
    """The revision's packages as walletd.<package> symlinks under ``into``/pkg."""
    into.mkdir(parents=True)
    archive = into / "src.tar"
    with archive.open("wb") as out:
        subprocess.run(["git", "archive", revision], cwd=REPO_ROOT, stdout=out, check=True)
    source = into / "src"
    with tarfile.open(archive) as tar:
        tar.extractall(source, filter="data")
    package = into / "pkg" / "walletd"
    package.mkdir(parents=True)
    for name in PACKAGES:
        (package / name).symlink_to(source / name)
    return into / "pkg"


def python_command(tree: Path | None, module: str, tmp: Path) -> list[str]:
    """``python -m module`` with this venv's interpreter, on the build of ``tree`` (an
    ``export_revision`` result; None: this checkout). Run it with the checkout as working
    directory (``REPO_ROOT``); the launcher is written to ``tmp``."""
    if tree is None:
        return [sys.executable, "-m", module]
    launcher = tmp / "launch.py"
    launcher.write_text(_LAUNCHER)
    return [sys.executable, str(launcher), str(tree), module]

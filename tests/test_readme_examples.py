"""The README's examples run: its ``sh`` blocks and its Python blocks, in order, against a
real ``walletd serve``, with their outputs compared where the README shows them.

Conventions (stated in the README, "The API"):

- a block fenced ```` ```sh ```` is a runnable step of the tour; the test runs every such
  block, in order, in one bash script, so a variable one step sets (``WALLET=$(…)``) is there
  for the next ones. Blocks fenced ```` ```bash ```` are commands for your machine (``make``,
  docker) that the test does not run; an API example is never one of them.
- a line ``# → <text>`` right after a command is what that command prints; ``…`` matches any
  text. In a Python block, ``# → <text>`` ending a line is what that line prints.
- the README's address, ``127.0.0.1:8000``, is replaced by the test server's.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import WalletdProcess

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_ADDRESS = "127.0.0.1:8000"
ARROW = "# → "
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
_STEP_END = re.compile(r"^@@step (\d+) (\d+)@@$", re.MULTILINE)


@dataclass
class Step:
    """One shell command (continuation lines included) and what the README says it prints."""

    command: str
    expected: list[str] = field(default_factory=list)


def blocks(text: str, language: str) -> list[str]:
    return [body for tag, body in _FENCE.findall(text) if tag == language]


def shell_steps(block: str) -> list[Step]:
    """Splits a block into commands; comments and blank lines end nothing and run nothing."""
    steps: list[Step] = []
    pending: list[str] = []
    for line in block.splitlines():
        if line.startswith(ARROW):
            assert steps, f"an output line follows no command: {line!r}"
            assert not pending, f"an output line inside a command: {line!r}"
            steps[-1].expected.append(line[len(ARROW) :])
            continue
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending.append(line)
        if not line.endswith("\\"):
            steps.append(Step("\n".join(pending)))
            pending = []
    assert not pending, f"a command ends with a continuation: {pending!r}"
    return steps


def python_expected(block: str) -> list[str]:
    return [line.split(ARROW, 1)[1] for line in block.splitlines() if ARROW in line]


def matches(expected: str, actual: str) -> bool:
    """``…`` in the expected text stands for any text; everything else is literal."""
    pattern = ".*".join(re.escape(part) for part in expected.split("…"))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


def run_shell(steps: list[Step], address: str) -> list[tuple[int, str]]:
    """Runs every step in one bash (variables carry over); returns each one's status and output."""
    script = "\n".join(
        f"{step.command.replace(README_ADDRESS, address)}\nprintf '\\n@@step {index} %d@@\\n' $?"
        for index, step in enumerate(steps)
    )
    done = subprocess.run(
        ["bash", "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert not done.stderr, done.stderr
    results: list[tuple[int, str]] = []
    start = 0
    for match in _STEP_END.finditer(done.stdout):
        results.append((int(match.group(2)), done.stdout[start : match.start()].strip("\n")))
        start = match.end() + 1
    assert len(results) == len(steps), done.stdout
    return results


def test_the_readme_marks_every_api_example_runnable() -> None:
    """No README block that calls the API is left out of the run (every one is ``sh``)."""
    text = README.read_text()
    for tag, body in _FENCE.findall(text):
        if "/api/v1" in body and tag != "sh":
            pytest.fail(f"a ```{tag} block calls the API but is not run:\n{body}")
    assert shell_steps("\n".join(blocks(text, "sh"))), "no runnable block"
    assert blocks(text, "python"), "no Python block"


@pytest.mark.slow
def test_the_readme_examples_run_in_order_and_print_what_it_shows(
    fresh_database_url: str, walletd_process: Callable[..., WalletdProcess]
) -> None:
    """Every ``sh`` step of the README exits 0 and prints what its ``# →`` lines show, against a
    live walletd on a fresh database; then its Python blocks run as scripts and print theirs."""
    server = walletd_process("--database-url", fresh_database_url, "--log-level", "WARNING")
    address = server.url.removeprefix("http://")
    text = README.read_text()
    steps = shell_steps("\n".join(blocks(text, "sh")))
    for step, (status, output) in zip(steps, run_shell(steps, address), strict=True):
        assert status == 0, f"{step.command}\nexited {status}:\n{output}"
        if step.expected:
            expected = "\n".join(step.expected)
            shown = f"{step.command}\nprinted:\n{output}\nnot:\n{expected}"
            assert matches(expected, output), shown
    for block in blocks(text, "python"):
        done = subprocess.run(
            [sys.executable, "-c", block.replace(README_ADDRESS, address)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert done.returncode == 0, f"{block}\n{done.stderr}"
        assert done.stdout.splitlines() == python_expected(block), done.stdout

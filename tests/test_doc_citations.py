"""Every document the repository cites is in the repository.

A comment, a docstring or a doc that sends its reader to a Markdown file the reader does not
have (a design note kept outside the project) says nothing; the needed words belong in the
project's own docs. Two kinds of citation are checked, in every text file of the tree:

- a Markdown file named in capitals (``OPERATIONS.md``, ``docs/SCALING.md``): it must be a
  file of the tree, as a path from the citing file's folder or from the root, or, written
  without a folder, the name of some file of the tree;
- a Markdown link ``[text](target)`` in a ``.md`` file whose target is not a URL or an
  anchor: the target (its ``#section`` cut) must exist from the citing file's folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Folders that are not the project's: the VCS, environments, build and tool output.
SKIPPED = {".git", ".venv", "build", "dist", ".typecheck", ".mypy_cache", ".ruff_cache",
           ".pytest_cache", ".walletd", "node_modules", "__pycache__"}  # fmt: skip
_CITED = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Z][A-Z0-9_]*\.md)\b")
_LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")


def tree_files() -> Iterator[Path]:
    for path in sorted(ROOT.iterdir()):
        if path.name in SKIPPED or path.name.endswith(".egg-info"):
            continue
        if path.is_dir():
            yield from (
                inner
                for inner in sorted(path.rglob("*"))
                if inner.is_file() and not SKIPPED.intersection(inner.relative_to(ROOT).parts)
            )
        elif path.is_file():
            yield path


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def missing_citations() -> list[str]:
    files = list(tree_files())
    names = {path.name for path in files}
    missing: list[str] = []
    for path in files:
        text = text_of(path)
        if text is None:
            continue
        where = path.relative_to(ROOT)
        for cited in set(_CITED.findall(text)):
            found = (
                (path.parent / cited).is_file()
                or (ROOT / cited).is_file()
                or ("/" not in cited and cited in names)
            )
            if not found:
                missing.append(f"{where}: {cited}")
        if path.suffix != ".md":
            continue
        for target in set(_LINK.findall(text)):
            if re.match(r"[a-z][a-z0-9+.-]*:|#", target):
                continue  # a URL (http:, mailto:) or a section of this page
            if not (path.parent / target.split("#", 1)[0]).exists():
                missing.append(f"{where}: link {target}")
    return sorted(missing)


def test_every_cited_document_is_in_the_repository() -> None:
    """No file of the tree names a capitalised .md file or links a path that is not in it."""
    assert missing_citations() == []


def test_the_scan_finds_a_citation_of_a_missing_document(tmp_path: Path) -> None:
    """The patterns catch both forms (so the test above cannot pass by matching nothing)."""
    md = ".md"  # spelt apart, so this file cites nothing itself
    assert _CITED.findall(f"see NOWHERE{md} and docs/API_NOTES{md}, not foo{md}") == [
        f"NOWHERE{md}",
        f"docs/API_NOTES{md}",
    ]
    assert _LINK.findall(f"[a](docs/X{md}#y) [b](https://x.org) [c](#z)") == [
        f"docs/X{md}#y",
        "https://x.org",
        "#z",
    ]
    cited = tmp_path / "docs"
    cited.mkdir()
    (cited / f"A{md}").write_text(f"[b](B{md}) and C{md}")
    assert _LINK.findall((cited / f"A{md}").read_text()) == [f"B{md}"]
    assert not (cited / f"B{md}").exists()

"""Every test a document names as the proof of something exists.

SECURITY.md proves each boundary by naming a test (``tests/test_scopes.py::test_…``), and the
other docs do the same for guarantees; a renamed or deleted test would leave the claim with
no proof while the document still reads as proven. Only the full form (file and name) is
checked: the short ``::name`` form refers to the file named just before it in prose.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CITED_TEST = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def _test_names(path: Path) -> set[str]:
    """Functions, classes and module-level assignments (``TestEngineModel = Machine.TestCase``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    }
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            names.update(t.id for t in statement.targets if isinstance(t, ast.Name))
    return names


def test_every_cited_test_exists() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    missing = []
    for document in documents:
        for match in _CITED_TEST.finditer(document.read_text(encoding="utf-8")):
            file, name = match.groups()
            path = ROOT / file
            if not path.is_file() or name not in _test_names(path):
                missing.append(f"{document.name}: {file}::{name}")
    assert not missing, missing

"""Every function in wbc_batch/ fits on a screen: at most MAX_LINES lines, from its ``def`` to its last line.

Why a test: a long function is where a step that belongs on its own hides (quantisation once did its
calibration, metadata, speed and accuracy in one body); the limit is checked, not remembered.
"""

from __future__ import annotations

import ast
from pathlib import Path

import wbc_batch

MAX_LINES = 60
PACKAGE = Path(wbc_batch.__file__).parent


def function_lengths(path: Path) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method in ``path``, nested ones included."""
    out = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((f"{prefix}{child.name}", child.lineno, child.end_lineno - child.lineno + 1))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(path.read_text(encoding="utf-8")), "")
    return out


def test_no_function_in_the_package_is_longer_than_the_limit() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    long = [f"{p.relative_to(PACKAGE.parent)}:{line} {name} ({n} lines)" for p in files for name, line, n in function_lengths(p) if n > MAX_LINES]
    assert long == []


def test_the_measure_counts_from_def_to_the_last_line(tmp_path) -> None:
    src = tmp_path / "m.py"
    src.write_text("class A:\n    def f(self):\n        def g():\n            return 1\n\n        return g\n", encoding="utf-8")
    assert function_lengths(src) == [("A.f", 2, 5), ("A.f.g", 3, 2)]
    assert len(list(PACKAGE.rglob("*.py"))) > 50  # the package itself, not an empty folder

"""The import graph of wbc_batch has no cycle.

Why it matters: in a cycle, which module runs first depends on who imports the pair first, so a
name can be missing half-way through an import (an ImportError that appears with one entry point
and not another), and neither module of the pair can be understood, tested or replaced alone.

The graph is read from the source with :mod:`ast` (nothing is imported): an edge for every import
that runs when a module is imported (its body, including ``if``/``try`` blocks; not function bodies,
which run later, and not ``if TYPE_CHECKING:`` blocks, which never run). Relative imports resolve
against the module's package; ``from . import x`` is an edge to the submodule ``x``. A package's
``__init__`` is its own node; importing a submodule is not counted as an edge to its parents (Python
runs the parent first, and the package ``__init__`` files here load their names lazily).

The whole package is held to more: no cycle even through deferred imports in function
bodies (a lazy ``__getattr__`` that imports back is a cycle all the same, met later).
"""

from __future__ import annotations

import ast
import graphlib
import itertools
from pathlib import Path

import pytest

import wbc_batch

PACKAGE = Path(wbc_batch.__file__).parent


def _modules(root: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's ``__init__``)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        is_init = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_init else parts)] = (path, is_init)
    return found


def _type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def _imports(tree: ast.AST, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements that run at import time (and, with ``deferred``, those in function bodies too)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif _type_checking(child) or (not deferred and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
                continue
            else:
                todo.append(child)
    return found


def _targets(stmt: ast.Import | ast.ImportFrom, module: str, is_init: bool, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``stmt``, written in ``module``, imports."""
    if isinstance(stmt, ast.Import):
        return {a.name for a in stmt.names if a.name in known}
    base = stmt.module or ""
    if stmt.level:
        package = module.split(".") if is_init else module.split(".")[:-1]
        anchor = package[: len(package) - (stmt.level - 1)]
        base = ".".join([*anchor, *([stmt.module] if stmt.module else [])])
    out = set()
    for a in stmt.names:
        sub = f"{base}.{a.name}"
        if sub in known:
            out.add(sub)  # from . import x, from .pkg import module
        elif base in known:
            out.add(base)  # from .module import name
    return out


def import_graph(root: Path, package: str, deferred: bool = False) -> dict[str, set[str]]:
    """Each module of the package under ``root`` -> the package's modules it imports (see the module docstring)."""
    mods = _modules(root, package)
    graph = {}
    for name, (path, is_init) in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        graph[name] = set().union(*(_targets(s, name, is_init, set(mods)) for s in _imports(tree, deferred))) - {name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of ``graph``, each module importing the next (the first repeated at the end), or None."""
    try:
        graphlib.TopologicalSorter(graph).prepare()  # graph: module -> what must come first, its imports
    except graphlib.CycleError as e:
        return list(reversed(e.args[1]))  # graphlib lists each node before the one that needs it
    return None


def test_wbc_batch_has_no_import_cycle():
    graph = import_graph(PACKAGE, "wbc_batch")
    assert {"wbc_batch.inference.engine", "wbc_batch.inference.predictions"} <= graph["wbc_batch.inference.orchestrator"]  # read, not empty
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_wbc_batch_has_no_import_cycle_even_through_deferred_imports():
    # Deferred imports (in function bodies) included: the registry's builders import the networks (training.nets),
    # never the deployable wrapper that imports the registry.
    graph = import_graph(PACKAGE, "wbc_batch", deferred=True)
    assert "wbc_batch.inference.local_engine" in graph["wbc_batch.inference.orchestrator"]
    assert "wbc_batch.training.nets" in graph["wbc_batch.training.archs"]  # read, not empty
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found or [])


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_the_graph_resolves_relative_imports(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "from ._lazy import f\n",
        "_lazy.py": "import os\n",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": "from .. import _lazy\nfrom .b import name\nfrom ..sub import c\nimport p.sub.c\n",
        "sub/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import x\ntry:\n    from ._missing import y\nexcept ImportError:\n    pass\n",
        "sub/c.py": "def later():\n    from .a import z\n",
    })
    assert import_graph(root, "p") == {
        "p": {"p._lazy"},
        "p._lazy": set(),
        "p.sub": {"p.sub.a"},
        "p.sub.a": {"p._lazy", "p.sub.b", "p.sub.c"},
        "p.sub.b": set(),
        "p.sub.c": set(),
    }
    assert import_graph(root, "p", deferred=True)["p.sub.c"] == {"p.sub.a"}


@pytest.mark.parametrize("deferred", [False, True])
def test_a_cycle_is_found_and_named(tmp_path, deferred):
    root = _package(tmp_path, {
        "__init__.py": "",
        "a.py": "from .b import x\n",
        "b.py": "from . import c\n",
        "c.py": ("def f():\n    from .a import y\n" if deferred else "from .a import y\n"),
    })
    graph = import_graph(root, "p", deferred=deferred)
    found = cycle(graph)
    assert found is not None and sorted(found[:-1]) == ["p.a", "p.b", "p.c"] and found[0] == found[-1]
    assert all(b in graph[a] for a, b in itertools.pairwise(found))  # each imports the next
    if deferred:
        assert cycle(import_graph(root, "p")) is None  # a deferred import alone closes no cycle at import time

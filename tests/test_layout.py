"""The layout's import rule, read from the source (ast): no circles, and imports go one way.

core <- data <- train <- evaluate <- export; tracking imports only core and is used by train,
evaluate and export; the app modules at the top (cli, chat, pipeline, summary, serve) may use
everything, and nothing in the library imports `cli` or the `stages/` scripts.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "src" / "tunepipe"
SUBPACKAGES = ("data", "train", "evaluate", "export", "tracking")
APP_MODULES = ("cli", "chat", "pipeline", "summary", "serve")
# layer -> the layers it may import (besides itself)
ALLOWED = {
    "core": set(),
    "tracking": {"core"},
    "data": {"core"},
    "train": {"core", "data", "tracking"},
    "evaluate": {"core", "data", "train", "tracking"},
    "export": {"core", "data", "train", "evaluate", "tracking"},
    "app": {"core", "data", "train", "evaluate", "export", "tracking"},
}


def module_name(path: Path) -> str:
    parts = ("tunepipe",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Every tunepipe module `path` imports, top-level or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in MODULES else node.module)
    return {name for name in found if name in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> str:
    top = module.split(".")[1] if "." in module else ""
    if top in SUBPACKAGES:
        return top
    return "app" if top in APP_MODULES else "core"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_the_packages_modules():
    assert {"tunepipe.cli", "tunepipe.data.tokenize", "tunepipe.train", "tunepipe.evaluate.run",
            "tunepipe.export.merge", "tunepipe.tracking.tracker"} <= set(MODULES)
    assert "tunepipe.train.parallel.launch" in GRAPH["tunepipe.train"]
    assert "tunepipe.data.tokenizing.chunks" in GRAPH["tunepipe.data.tokenize"]
    assert "tunepipe.data.tokenizing.encoding" in GRAPH["tunepipe.data.tokenizing.chunks"]


def test_no_import_circles():
    assert cycles(GRAPH) == []


def test_the_circle_finder_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_one_way(module):
    own = layer(module)
    wrong = sorted(dep for dep in GRAPH[module] if layer(dep) != own and layer(dep) not in ALLOWED[own])
    assert wrong == [], f"{module} ({own}) imports {wrong}"


def test_nothing_in_the_library_imports_the_cli():
    importers = sorted(name for name, deps in GRAPH.items() if "tunepipe.cli" in deps)
    assert importers == []
    for path in MODULES.values():
        assert "stages" not in imported_names(path), path


def imported_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module}


def test_top_level_fits_on_one_screen():
    entries = [p.name for p in PACKAGE_DIR.iterdir() if p.name != "__pycache__"]
    # 18: models/ holds the Hub, base-model and trained-weights modules of the core
    assert len(entries) <= 18, sorted(entries)
    for sub in SUBPACKAGES:
        init = PACKAGE_DIR / sub / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))), f"{init} has no docstring"


def test_every_package_is_grouped_by_concept_past_fifteen_modules():
    """The top level has its own rule above; every subpackage holds at most 15 modules."""
    for package in sorted(p for p in PACKAGE_DIR.rglob("*/__init__.py") if "__pycache__" not in p.parts):
        modules = [m.name for m in package.parent.iterdir() if m.suffix == ".py" or (m / "__init__.py").exists()]
        assert len(modules) <= 16, (package.parent, sorted(modules))  # 15 modules + __init__
        assert ast.get_docstring(ast.parse(package.read_text(encoding="utf-8"))), f"{package} has no docstring"

"""The tunepipe modules a stage script imports, transitively: what its dvc.yaml `deps:` must list.

Read with `ast`, never by importing, so the answer is what the source says. An import
counts wherever it appears (module level or inside a function), and so does a string
constant naming a tunepipe module, because the library dispatches lazily through
`importlib.import_module("tunepipe.x")` in places.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

_MODULE_STRING = re.compile(r"^tunepipe(\.[A-Za-z_][A-Za-z0-9_]*)+$")


def module_file(src: Path, dotted: str) -> Path | None:
    """`tunepipe.train.sft` -> src/tunepipe/train/sft.py (or the package __init__.py)."""
    base = src.joinpath(*dotted.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def imported_modules(path: Path, src: Path) -> set[str]:
    """Dotted tunepipe modules named by the imports (and module strings) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path, src)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve_from(node, package)
            found.add(base)
            # `from tunepipe import x` / `from tunepipe.train import sft`: x may be a module
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            found.add(node.value)
    return {name for name in _with_parents(found) if name.startswith("tunepipe") and module_file(src, name)}


def _package_of(path: Path, src: Path) -> str | None:
    try:
        rel = path.resolve().relative_to(src.resolve())
    except ValueError:
        return None  # a stage script outside the package
    return ".".join(rel.parent.parts)


def _resolve_from(node: ast.ImportFrom, package: str | None) -> str:
    if not node.level:
        return node.module or ""
    parts = (package or "").split(".")
    base = parts[: len(parts) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _with_parents(names: set[str]) -> set[str]:
    """Importing tunepipe.train.sft runs tunepipe/train/__init__.py too."""
    out = set()
    for name in names:
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def transitive_imports(script: Path, src: Path) -> set[Path]:
    """Every src/tunepipe file that running `script` imports, following the library's imports."""
    seen: set[str] = set()
    todo = list(imported_modules(script, src))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(imported_modules(module_file(src, name), src) - seen)
    return {module_file(src, name) for name in seen}


def expand_deps(deps: list[str], root: Path) -> set[Path]:
    """dvc.yaml deps as files: a folder dep stands for every .py file under it."""
    out: set[Path] = set()
    for dep in deps:
        path = root / dep
        if path.is_dir():
            out.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        else:
            out.add(path)
    return out

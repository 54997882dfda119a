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


def library_deps(script: Path, root: Path) -> set[str]:
    """What a stage's dvc.yaml `deps:` must name for the library: a subpackage folder
    (src/tunepipe/data) for any module imported from it, a core module's own file otherwise.
    The root package's __init__ (the version only) is left out: a version bump re-runs nothing."""
    package = root / "src" / "tunepipe"
    deps = set()
    for path in transitive_imports(script, root / "src"):
        rel = path.relative_to(package)
        if rel.parts == ("__init__.py",):
            continue
        deps.add((package / rel.parts[0] if len(rel.parts) > 1 else path).relative_to(root).as_posix())
    return deps

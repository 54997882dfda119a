"""Docs generated from the code, so they cannot drift from it.

Two kinds of section, each between `<!-- BEGIN GENERATED name -->` and
`<!-- END GENERATED name -->` markers in a Markdown file:

- `config-reference` (README.md): every key of every params.yaml group with its type,
  default and the one-line docstring written under the field (config/groups.py, config/training.py);
- `lf-keys` / `tunepipe-keys` (docs/migrating-from-llama-factory.md): every
  LLaMA-Factory key and what tunepipe does with it, from the config fields and
  `lf_keys.py`; then the keys tunepipe adds.

`python -m tunepipe.config.docgen` rewrites the sections in place; `--check` only reports
stale files (exit 1). tests/test_docgen.py runs the check.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from tunepipe.config import GROUPS
from tunepipe.config.lf_keys import (
    ALIAS_KEYS,
    INSTEAD_KEYS,
    NOOP_VALUES,
    OPERATIONAL_KEYS,
    TUNEPIPE_ONLY_KEYS,
    UNSUPPORTED_KEYS,
)
from tunepipe.errors import TunepipeError

REPO_ROOT = Path(__file__).resolve().parents[3]
BEGIN = "<!-- BEGIN GENERATED {name}: edit the code, then run `python -m tunepipe.config.docgen` -->"
END = "<!-- END GENERATED {name} -->"


def field_docs(source: str | None = None) -> dict[str, dict[str, str]]:
    """class name -> field name -> the string literal right after the field (ast only:
    dataclass fields have no runtime docstrings)."""
    if source is None:
        # every module that defines a group's dataclass (the train group has a file of its own)
        files = sorted({Path(sys.modules[cls.__module__].__file__) for cls in GROUPS.values()})
        source = "\n".join(path.read_text(encoding="utf-8") for path in files)
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        per_field = docs.setdefault(node.name, {})
        for stmt, following in zip(node.body, node.body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = _string_literal(following)
                if doc is not None:
                    per_field[stmt.target.id] = " ".join(doc.split())
    return docs


def _string_literal(node) -> str | None:
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
        return node.value.value
    return None


def group_fields() -> list[tuple[str, dataclasses.Field, str]]:
    """(group, field, docstring) for every config key; a field without a docstring is an error."""
    docs = field_docs()
    rows = []
    for group, cls in GROUPS.items():
        for fld in dataclasses.fields(cls):
            doc = docs.get(cls.__name__, {}).get(fld.name)
            if not doc:
                raise TunepipeError(f"{cls.__module__}: {cls.__name__}.{fld.name} has no docstring",
                                    hint="write a one-line string literal right under the field")
            rows.append((group, fld, doc))
    return rows


def render_type(annotation: str) -> str:
    """`Optional[Literal['a', 'b']]` -> `a`, `b` or null: readable in a table, no pipes."""
    return _render_type_node(ast.parse(annotation, mode="eval").body)


_SCALARS = {"str": "string", "int": "integer", "float": "number", "bool": "bool", "dict": "mapping"}


def _render_type_node(node) -> str:
    if isinstance(node, ast.Name):
        return _SCALARS.get(node.id, node.id)
    if isinstance(node, ast.Constant):
        return "null" if node.value is None else f"`{node.value}`"
    if isinstance(node, ast.Subscript):
        outer = ast.unparse(node.value)
        inner = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        if outer == "Literal":
            return ", ".join(_render_type_node(item) for item in inner)
        if outer == "Optional":
            return f"{_render_type_node(inner[0])} or null"
        if outer == "Union":
            return " or ".join(_render_type_node(item) for item in inner)
        if outer == "list":
            return f"list of {_render_type_node(inner[0])}"
    return ast.unparse(node)


def render_default(fld: dataclasses.Field) -> str:
    if fld.default is not dataclasses.MISSING:
        value = fld.default
    elif fld.default_factory is not dataclasses.MISSING:
        value = fld.default_factory()
    else:
        return "(required)"
    if value is None:
        return "unset"
    return f"`{json.dumps(value, ensure_ascii=False)}`" if not isinstance(value, str) else f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def config_reference() -> str:
    lines = []
    by_group: dict[str, list] = {}
    for group, fld, doc in group_fields():
        by_group.setdefault(group, []).append((fld, doc))
    for group, rows in by_group.items():
        lines += [f"#### `{group}`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for fld, doc in rows:
            lines.append(f"| `{fld.name}` | {_cell(render_type(str(fld.type)))} | "
                         f"{_cell(render_default(fld))} | {_cell(doc)} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def lf_key_status() -> dict[str, tuple[str, str]]:
    """Every LLaMA-Factory key tunepipe knows -> (what tunepipe does, why / meaning)."""
    status: dict[str, tuple[str, str]] = {}
    for group, fld, doc in group_fields():
        if fld.name not in TUNEPIPE_ONLY_KEYS:
            status[fld.name] = (f"supported: `{group}.{fld.name}`", doc)
    for key, why in OPERATIONAL_KEYS.items():
        status[key] = ("accepted, ignored with a warning", why)
    for key, value in NOOP_VALUES.items():
        shown = json.dumps(value)
        status[key] = (f"accepted only as `{shown}`",
                       f"`{shown}` is what tunepipe always does; any other value is an error")
    for key, (default, instead) in INSTEAD_KEYS.items():
        status[key] = (f"accepted; other than `{json.dumps(default)}` warns", instead)
    for key, why in UNSUPPORTED_KEYS.items():
        status[key] = ("not supported: error", why)
    for key, target in ALIAS_KEYS.items():
        status[key] = (f"supported: read as `{target}`", status[target][1])
    return status


def lf_key_table() -> str:
    lines = ["| LLaMA-Factory key | tunepipe | meaning, or why not |", "| --- | --- | --- |"]
    for key, (what, why) in sorted(lf_key_status().items()):
        lines.append(f"| `{key}` | {_cell(what)} | {_cell(why)} |")
    return "\n".join(lines) + "\n"


def tunepipe_key_table() -> str:
    lines = ["| key | meaning |", "| --- | --- |"]
    for group, fld, doc in group_fields():
        if fld.name in TUNEPIPE_ONLY_KEYS:
            lines.append(f"| `{group}.{fld.name}` | {_cell(doc)} |")
    return "\n".join(lines) + "\n"


SECTIONS: dict[str, dict[str, Callable[[], str]]] = {
    "README.md": {"config-reference": config_reference},
    "docs/migrating-from-llama-factory.md": {"lf-keys": lf_key_table, "tunepipe-keys": tunepipe_key_table},
}


def replace_section(text: str, name: str, body: str, where: str) -> str:
    # the begin marker's trailing text may be edited by hand; only its name is matched
    pattern = re.compile(r"<!-- BEGIN GENERATED " + re.escape(name) + r"\b[^>]*-->\n.*?"
                         + re.escape(END.format(name=name)), re.DOTALL)
    if not pattern.search(text):
        raise TunepipeError(f"{where}: no generated section {name!r}",
                            hint=f"add the lines {BEGIN.format(name=name)} and {END.format(name=name)}")
    block = f"{BEGIN.format(name=name)}\n\n{body}\n{END.format(name=name)}"
    return pattern.sub(lambda _: block, text, count=1)


def render_all(root: Path = REPO_ROOT) -> dict[Path, tuple[str, str]]:
    """path -> (current text, regenerated text) for every file with generated sections."""
    out = {}
    for rel, sections in SECTIONS.items():
        path = root / rel
        if not path.is_file():
            raise TunepipeError(f"{path}: not found (run from the repository root or pass --root)")
        current = path.read_text(encoding="utf-8")
        new = current
        for name, render in sections.items():
            new = replace_section(new, name, render(), str(path))
        out[path] = (current, new)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tunepipe.config.docgen", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root")
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1)")
    args = parser.parse_args(argv)
    stale = []
    for path, (current, new) in render_all(args.root).items():
        if current == new:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"rewrote {path}")
    if args.check and stale:
        print("stale generated docs: " + ", ".join(map(str, stale))
              + "\nrun: python -m tunepipe.config.docgen", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The JSON Schemas in the repository's `schemas/` folder, compiled once.

Validation runs on every data row, so it uses jsonschema-rs (a Rust validator of the
same JSON Schema 2020-12 standard, about a hundred times faster than the pure-Python
`jsonschema` on these small rows); the test suite meta-checks the schema files with
`jsonschema` itself.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tunepipe.errors import TunepipeError


def schema_dir() -> Path:
    """`schemas/` at the repository root (TUNEPIPE_SCHEMAS overrides, e.g. for an installed wheel)."""
    override = os.environ.get("TUNEPIPE_SCHEMAS")
    return Path(override) if override else Path(__file__).resolve().parents[4] / "schemas"


def schema_path(name: str) -> Path:
    return schema_dir() / f"{name}.json"


@functools.cache
def load_schema(name: str) -> dict:
    path = schema_path(name)
    if not path.is_file():
        raise TunepipeError(f"JSON Schema {path} not found",
                            hint="run from a tunepipe checkout or set TUNEPIPE_SCHEMAS to its schemas/ folder")
    return json.loads(path.read_text(encoding="utf-8"))


@functools.cache
def load_validator(name: str):
    import jsonschema_rs

    return jsonschema_rs.Draft202012Validator(load_schema(name))


def pointer(path) -> str:
    """A JSON pointer (RFC 6901) from path parts: ['conversations', 3, 'from'] -> /conversations/3/from."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in path)

"""Strict loading of params.yaml / LLaMA-Factory YAML into `Config`.

Two shapes load into the same groups: tunepipe's grouped params.yaml
(`train: {lora_rank: 8}`) and LLaMA-Factory's flat files (`lora_rank: 8` at the
top level). Every key is checked: an unknown key names its group and the closest
valid key, a LLaMA-Factory key tunepipe does not support yet is listed (never
silently ignored), and every value is checked against its field's type.
"""

from __future__ import annotations

import datetime
import difflib
import logging
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from tunepipe.config import GROUPS, Config, shown_value
from tunepipe.config.lf_keys import ALIAS_KEYS, INSTEAD_KEYS, NOOP_VALUES, OPERATIONAL_KEYS, UNSUPPORTED_KEYS
from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

_NONE = type(None)


def field_names(group: str) -> list[str]:
    return [f.name for f in fields(GROUPS[group])]


def key_index() -> dict[str, str]:
    """Every config key -> its group (keys are unique across groups by design)."""
    return {key: group for group in GROUPS for key in field_names(group)}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (grouped or flat), apply `key=value` overrides, check everything."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = read_yaml(Path(path))
    grouped = group_keys(raw, source=str(path or "config"))
    for override in overrides or []:
        apply_override(grouped, override)
    return build_config(grouped)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise TunepipeError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise TunepipeError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TunepipeError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def group_keys(raw: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """Sort top-level keys into groups; nested group mappings pass through."""
    index = key_index()
    grouped: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    unsupported, unknown = [], []
    for key, value in raw.items():
        key = ALIAS_KEYS.get(key, key)  # LLaMA-Factory's other names of one key
        if key in GROUPS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                _place(grouped, key, sub_key, sub_value, unsupported, unknown, index)
        elif key in index:
            grouped[index[key]][key] = value
        else:
            _place_flat(key, value, unsupported, unknown)
    _raise_key_errors(source, unsupported, unknown, index)
    return grouped


def _place(grouped, group, key, value, unsupported, unknown, index) -> None:
    key = ALIAS_KEYS.get(key, key)
    if key in field_names(group):
        grouped[group][key] = value
    elif key in index:
        unknown.append((f"{group}.{key}", f"it belongs to group {index[key]!r}: {index[key]}.{key}"))
    else:
        _place_flat(key, value, unsupported, unknown, group)


def _place_flat(key, value, unsupported, unknown, group: str | None = None) -> None:
    if key in OPERATIONAL_KEYS:
        log.warning("ignoring operational LLaMA-Factory key %s: %s", key, OPERATIONAL_KEYS[key])
    elif key in NOOP_VALUES and value == NOOP_VALUES[key]:
        log.warning("ignoring %s: %r (tunepipe's behaviour already)", key, value)
    elif key in INSTEAD_KEYS:
        default, instead = INSTEAD_KEYS[key]
        if value != default:
            log.warning("%s: %r: %s", key, value, instead)
    elif key in UNSUPPORTED_KEYS or key in NOOP_VALUES:
        unsupported.append(key)
    else:
        unknown.append((key if group is None else f"{group}.{key}", _suggest(key, group)))


def _suggest(key: str, group: str | None) -> str:
    candidates = field_names(group) if group else list(key_index())
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    where = f"group {group!r}" if group else "any group"
    if close:
        return f"not a key of {where}; did you mean {close[0]}?"
    return f"not a key of {where}"


def _raise_key_errors(source, unsupported, unknown, index) -> None:
    lines = [f"unknown key {key!r}: {why}" for key, why in unknown]
    if unsupported:
        detail = "; ".join(f"{key} ({UNSUPPORTED_KEYS.get(key, 'only its default is supported')})"
                           for key in unsupported)
        lines.append(f"LLaMA-Factory keys tunepipe does not support yet: {detail}")
    if lines:
        raise TunepipeError(f"{source}: " + "\n  ".join(lines),
                            hint="see docs/migrating-from-llama-factory.md for every supported key")


def apply_override(grouped: dict[str, dict[str, Any]], override: str) -> None:
    """`key=value` or `group.key=value`; the value is parsed as YAML."""
    if "=" not in override:
        raise TunepipeError(f"override {override!r}: expected key=value")
    key, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    if "." in key:
        group, sub_key = key.split(".", 1)
        if group not in GROUPS:
            raise TunepipeError(f"override {override!r}: unknown group {group!r} "
                                f"(groups: {', '.join(GROUPS)})")
        flat = group_keys({group: {sub_key: value}}, source="command line")
    else:
        flat = group_keys({key: value}, source="command line")
    for group, values in flat.items():
        grouped[group].update(values)


def build_config(grouped: dict[str, dict[str, Any]]) -> Config:
    groups = {}
    for name, cls in GROUPS.items():
        hints = typing.get_type_hints(cls)
        values = {key: coerce(value, hints[key], f"{name}.{key}") for key, value in grouped[name].items()}
        groups[name] = cls(**values)
    config = Config(**groups)
    config.check()
    return config


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; return it (numbers normalised)."""
    try:
        return _coerce(value, annotation)
    except (TypeError, ValueError) as exc:
        raise TunepipeError(f"{where}={shown_value(where, value)}: {exc}") from None


def _coerce(value: Any, annotation: Any) -> Any:
    origin = get_origin(annotation)
    if origin is Union:
        return _coerce_union(value, get_args(annotation))
    if origin is Literal:
        choices = get_args(annotation)
        if value is False and "no" in choices:
            # `eval_strategy: no` unquoted reads as false in YAML 1.1 (PyYAML); DVC writes
            # params.yaml as YAML 1.2 and drops the quotes on `dvc exp run -S`.
            return "no"
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        raise ValueError(f"must be one of {', '.join(map(repr, choices))}")
    if origin is list:
        if not isinstance(value, list):
            raise TypeError("expected a list")
        (item_type,) = get_args(annotation)
        return [_coerce(item, item_type) for item in value]
    return _coerce_scalar(value, annotation)


def _coerce_union(value: Any, options: tuple) -> Any:
    if value is None:
        if _NONE in options:
            return None
        raise TypeError("must be set")
    errors = []
    for option in options:
        if option is _NONE:
            continue
        try:
            return _coerce(value, option)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    raise TypeError(" or ".join(errors))


def _coerce_scalar(value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("expected true or false")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise TypeError("expected an integer")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise TypeError("expected a number")
    if kind is dict:
        if isinstance(value, dict):
            return value
        raise TypeError("expected a mapping")
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, datetime.date):  # YAML reads an unquoted 2024-07-26 as a date
            return value.isoformat()
        raise TypeError("expected a string")
    raise TypeError(f"unsupported field type {kind}")

"""dataset_info.json: LLaMA-Factory's dataset registry, read unchanged.

An entry names a local file (or a folder of same-type files) inside `dataset_dir`, or a
Hub dataset (`hf_hub_url`, see `hub_data`; `file_name` wins when an entry has both, so
local data replaces a hub entry without deleting its URL), its `formatting` (alpaca,
sharegpt, openai), whether it is a preference set
(`ranking`), and how its columns and sharegpt tags are called. Unlike LLaMA-Factory,
the `columns` / `tags` an entry gives are merged over the defaults instead of
replacing them, so naming one column never silently drops the others.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.data.checks.schemas import load_validator, pointer
from tunepipe.data.sources.hub_data import HubDataset, hub_dataset
from tunepipe.data.sources.media import SUPPORTED as MEDIA_COLUMNS
from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

DATASET_INFO = "dataset_info.json"
# file extension -> reader kind (as LLaMA-Factory maps them)
FILE_TYPES = {".json": "json", ".jsonl": "jsonl", ".csv": "csv", ".parquet": "parquet",
              ".arrow": "arrow", ".txt": "txt"}

# LLaMA-Factory's defaults: the alpaca columns, the sharegpt messages column and tags.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
DEFAULT_TAGS = {
    "sharegpt": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"},
    "openai": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "observation_tag": "tool", "function_tag": "function_call", "system_tag": "system"},
}


@dataclass
class DatasetEntry:
    """One dataset_info.json entry, resolved: defaults merged, files found."""

    name: str
    formatting: str
    ranking: bool
    columns: dict[str, str]
    """logical column (prompt, response, messages, ...) -> the file's column name"""
    user_columns: frozenset[str]
    """logical columns the entry named itself (a missing one is an error, not a default)"""
    tags: dict[str, str]
    files: list[Path]
    file_type: str  # a key of FILE_TYPES' values, or "hub"
    num_samples: int | None = None
    info: dict = field(default_factory=dict)
    hub: HubDataset | None = None
    """the Hub dataset it names (files is then empty)"""

    @property
    def media(self) -> tuple[str, ...]:
        """The media columns (images, videos) the entry maps."""
        return tuple(kind for kind in MEDIA_COLUMNS if kind in self.columns)

    @property
    def is_kto(self) -> bool:
        return "kto_tag" in self.columns

    def kind(self, stage: str) -> str:
        """What the rows become: sft, preference, kto or pretrain (stage pt reads any entry as text)."""
        if stage == "pt":
            return "pretrain"
        if self.ranking:
            return "preference"
        return "kto" if self.is_kto else "sft"

    def describe_files(self, dataset_dir: Path) -> str:
        if self.hub is not None:
            return self.hub.shown()
        return ", ".join(_relative(f, dataset_dir) for f in self.files)


def parse_names(value) -> list[str]:
    """`data.dataset` as a list: LLaMA-Factory's comma-separated string or a YAML list."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def load_dataset_info(dataset_dir: str | Path) -> dict:
    """Read and schema-check `<dataset_dir>/dataset_info.json`."""
    path = Path(dataset_dir) / DATASET_INFO
    if not path.is_file():
        raise TunepipeError(f"{path}: not found", hint="data.dataset_dir must be the folder holding dataset_info.json")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise TunepipeError(f"{path}: not UTF-8 (byte offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise TunepipeError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    errors = [f"{pointer(e.instance_path) or '/'}: {e.message}"
              for e in load_validator("dataset_info").iter_errors(info)]
    if errors:
        raise TunepipeError(f"{path}: " + "; ".join(errors[:10]),
                            hint="see LLaMA-Factory's data/README.md for the entry format")
    return info


def get_entries(names, dataset_dir: str | Path) -> list[DatasetEntry]:
    """Resolve every named dataset (a list or a comma-separated string) against dataset_info.json."""
    dataset_dir = Path(dataset_dir)
    info = load_dataset_info(dataset_dir)
    entries = []
    for name in parse_names(names):
        if name not in info:
            known = ", ".join(sorted(info)[:20])
            raise TunepipeError(f"dataset {name!r} is not in {dataset_dir / DATASET_INFO}",
                                hint=f"known names include: {known}")
        entries.append(resolve_entry(name, info[name], dataset_dir))
    return entries


def resolve_entry(name: str, raw: dict, dataset_dir: Path) -> DatasetEntry:
    hub = None
    if "file_name" in raw:
        files, file_type = local_files(name, raw, dataset_dir)
    else:
        hub, files, file_type = hub_dataset(name, raw, dataset_dir), [], "hub"
    formatting = raw.get("formatting", "alpaca")
    user_columns = {k: v for k, v in (raw.get("columns") or {}).items() if v}
    columns = {**DEFAULT_COLUMNS[formatting], **user_columns}
    if file_type == "txt" and "prompt" not in user_columns:
        columns["prompt"] = "text"  # a .txt file has one `text` column
    tags = {**DEFAULT_TAGS.get(formatting, {}), **{k: v for k, v in (raw.get("tags") or {}).items() if v}}
    return DatasetEntry(name=name, formatting=formatting, ranking=bool(raw.get("ranking", False)),
                        columns=columns, user_columns=frozenset(user_columns), tags=tags, files=files,
                        file_type=file_type, num_samples=raw.get("num_samples"), info=raw, hub=hub)


def local_files(name: str, raw: dict, dataset_dir: Path) -> tuple[list[Path], str]:
    """An entry's `file_name`, with the hub-only keys that cannot apply to a local file."""
    split = raw.get("split", "train")
    if split != "train":
        raise TunepipeError(f"dataset {name!r}: split {split!r}: a local file has a single split (train)",
                            hint="point file_name at the file holding that split and drop \"split\"")
    for key in ("subset", "folder", "revision"):
        if raw.get(key):
            log.warning("dataset %r: %s=%r only applies to hub datasets; ignored for a local file",
                        name, key, raw[key])
    return resolve_files(name, raw["file_name"], dataset_dir)


def resolve_files(name: str, file_name: str, dataset_dir: Path) -> tuple[list[Path], str]:
    """The entry's file(s), confined to dataset_dir; a folder must hold files of one type."""
    root = dataset_dir.resolve()
    path = (dataset_dir / file_name).resolve()
    if path != root and root not in path.parents:
        raise TunepipeError(f"dataset {name!r}: file_name {file_name!r} points outside {dataset_dir}",
                            hint="keep dataset files inside data.dataset_dir")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise TunepipeError(f"dataset {name!r}: folder {_relative(path, root)} holds no files")
    elif path.is_file():
        files = [path]
    else:
        raise TunepipeError(f"dataset {name!r}: {dataset_dir / file_name} not found")
    types = {FILE_TYPES.get(f.suffix.lower()) for f in files}
    if None in types:
        odd = next(f for f in files if f.suffix.lower() not in FILE_TYPES)
        raise TunepipeError(f"dataset {name!r}: {_relative(odd, root)}: unsupported file type "
                            f"(use {', '.join(sorted(FILE_TYPES))})")
    if len(types) > 1:
        raise TunepipeError(f"dataset {name!r}: folder {_relative(path, root)} mixes file types "
                            f"{sorted(types)}; a dataset folder must hold files of one type")
    return files, types.pop()


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)

"""`data/validated/`: the canonical rows the validate stage writes and the tokenize stage reads.

One `<dataset>.jsonl` per dataset (a canonical row per line) and `manifest.json`:
`{"stage": ..., "train": [item, ...], "eval": [item, ...]}`, each item
`{"name", "kind", "rows", "file", "num_samples"}`. Kept apart from `validate` so the
tokenize stage does not depend on (and re-run for) the validation code. Rows are
written one at a time as validation accepts them (`ValidatedWriter`) and read back by
byte offset (`line_offsets`), so neither stage holds a dataset in memory.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Self

import numpy as np

from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir

MANIFEST = "manifest.json"
# train.stage -> the kind of rows it trains on
# (grpo trains on prompts; its rows are sft rows whose last answer is the rewards' reference)
KINDS_FOR_STAGE = {"sft": "sft", "pt": "pretrain", "dpo": "preference", "rm": "preference", "kto": "kto",
                   "grpo": "sft"}
# train.stage -> the kind of shards the tokenize stage writes, where it differs from the rows' kind
SHARD_KINDS = {"grpo": "prompt"}


class ValidatedWriter:
    """`with ValidatedWriter(target, stage) as out: out.add(name, row) ...; out.finish(splits, items)`:
    rows go to disk as they come; the folder replaces `target` only when the block ends cleanly."""

    def __init__(self, target: Path, stage: str):
        self.target, self.stage = target, stage
        self.files: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        self.handles: dict[str, object] = {}
        self._stack = ExitStack()
        self._dumps = json.dumps

    def __enter__(self) -> Self:
        self.tmp = self._stack.enter_context(atomic_dir(self.target))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles.values():
            handle.close()
        return self._stack.__exit__(*exc)

    def open(self, name: str) -> None:
        """Start a dataset's file (so a dataset with no valid rows still has one)."""
        if name not in self.handles:
            self.files[name] = f"{safe_name(name)}.jsonl"
            self.counts[name] = 0
            self.handles[name] = open(self.tmp / self.files[name], "w", encoding="utf-8")  # noqa: SIM115

    def add(self, name: str, row: dict) -> None:
        self.handles[name].write(self._dumps(row, ensure_ascii=False) + "\n")
        self.counts[name] += 1

    def finish(self, splits: dict[str, list[str]], items: dict[str, dict]) -> None:
        manifest = {"stage": self.stage, **{split: [{"name": name, **items[name], "rows": self.counts[name],
                                                     "file": self.files[name]} for name in names]
                                            for split, names in splits.items()}}
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def write_validated(target: Path, stage: str, splits: dict[str, list[str]], rows: dict[str, list[dict]],
                    items: dict[str, dict]) -> None:
    """Every dataset's rows and the manifest at once (small data, tests)."""
    with ValidatedWriter(target, stage) as out:
        for name, dataset_rows in rows.items():
            out.open(name)
            for row in dataset_rows:
                out.add(name, row)
        out.finish(splits, items)


def read_manifest(validated: Path) -> dict:
    path = validated / MANIFEST
    if not path.is_file():
        raise TunepipeError(f"{path} not found", hint="run the validate stage first (tunepipe validate CONFIG)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_validated(validated: Path, item: dict) -> list[dict]:
    """The canonical rows of one manifest item (all in memory: small data, tests)."""
    with open(validated / item["file"], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def line_offsets(path: Path, block: int = 1 << 24) -> np.ndarray:
    """The byte offset where each line of a JSON Lines file starts (8 bytes a row)."""
    parts, position = [np.zeros(1, dtype=np.int64)], 0
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10)
            parts.append(newlines.astype(np.int64) + position + 1)
            position += len(chunk)
    offsets = np.concatenate(parts)
    return offsets[:-1] if offsets[-1] == position else offsets  # no line starts after the last newline


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

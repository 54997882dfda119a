"""`data/validated/`: the canonical rows the validate stage writes and the tokenize stage reads.

One `<dataset>.jsonl` per dataset (a canonical row per line) and `manifest.json`:
`{"stage": ..., "train": [item, ...], "eval": [item, ...]}`, each item
`{"name", "kind", "rows", "file", "num_samples"}`. Kept apart from `validate` so the
tokenize stage does not depend on (and re-run for) the validation code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir

MANIFEST = "manifest.json"
# train.stage -> the kind of rows it trains on
KINDS_FOR_STAGE = {"sft": "sft", "pt": "pretrain", "dpo": "preference", "rm": "preference", "kto": "kto"}


def write_validated(target: Path, stage: str, splits: dict[str, list[str]], rows: dict[str, list[dict]],
                    items: dict[str, dict]) -> None:
    """Write every dataset's rows and the manifest, atomically (a crash leaves the old dir)."""
    files = {name: f"{safe_name(name)}.jsonl" for name in rows}
    with atomic_dir(target) as tmp:
        dumps = json.dumps
        for name, dataset_rows in rows.items():
            with open(tmp / files[name], "w", encoding="utf-8") as handle:
                handle.writelines(dumps(row, ensure_ascii=False) + "\n" for row in dataset_rows)
        manifest = {"stage": stage, **{split: [{"name": name, **items[name], "rows": len(rows[name]),
                                                "file": files[name]} for name in names]
                                       for split, names in splits.items()}}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def read_manifest(validated: Path) -> dict:
    path = validated / MANIFEST
    if not path.is_file():
        raise TunepipeError(f"{path} not found", hint="run the validate stage first (tunepipe validate CONFIG)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_validated(validated: Path, item: dict) -> list[dict]:
    """The canonical rows of one manifest item."""
    with open(validated / item["file"], encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)

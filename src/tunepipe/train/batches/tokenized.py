"""The tokenized shards a trainer reads (`data/tokenized/{train,eval}` + `meta.json`).

For the preference trainers: `load_tokenized(layout, stage, columns)` returns the train and
eval datasets (eval None when empty) after checking that the shards were made for this
stage and hold the contract's columns; any mismatch names the path and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunepipe.errors import TunepipeError
from tunepipe.io_utils import read_json
from tunepipe.layout import Layout


@dataclass
class TokenizedSplits:
    train: object
    eval: object | None
    meta: dict


def load_tokenized(layout: Layout, stage: str, columns: tuple[str, ...]) -> TokenizedSplits:
    from datasets import load_from_disk

    root = layout.tokenized
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise TunepipeError(f"{root}: no tokenized shards (meta.json missing)",
                            hint="run the tokenize stage first (dvc repro tokenize, or tunepipe tokenize)")
    meta = read_json(meta_path)
    if meta.get("stage") != stage:
        raise TunepipeError(f"{meta_path}: shards were tokenized for train.stage={meta.get('stage')!r}, "
                            f"not {stage!r}", hint="re-run the tokenize stage with this config")
    splits = {}
    for split in ("train", "eval"):
        path = root / split
        if not path.is_dir():
            raise TunepipeError(f"{path}: missing split", hint="re-run the tokenize stage")
        dataset = load_from_disk(str(path))
        missing = [c for c in columns if c not in dataset.column_names] if len(dataset) else []
        if missing:
            raise TunepipeError(f"{path}: columns {missing} missing (has {dataset.column_names})",
                                hint="re-run the tokenize stage with this tunepipe version")
        splits[split] = dataset
    if len(splits["train"]) == 0:
        raise TunepipeError(f"{root / 'train'}: no training rows")
    return TokenizedSplits(splits["train"], splits["eval"] if len(splits["eval"]) else None, meta)

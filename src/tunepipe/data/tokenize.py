"""The tokenize stage: validated canonical rows -> `data/tokenized/{train,eval}` Arrow shards.

Reads `data/validated/` (manifest + rows), the base model's tokenizer and `data.*`;
writes HF datasets with `save_to_disk` (sharded by size, `load_from_disk`-compatible),
`data/tokenized/meta.json` and `metrics/data.json`. Columns per objective are fixed in
docs/architecture.md ("Tokenized shards"). The same inputs and params give
byte-identical shards, so DVC's hash does not change on a rerun.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tunepipe.config import Config, DataConfig
from tunepipe.data.batching import BatchEncoder
from tunepipe.data.encoding import Stats, encode_conversations, encode_preference
from tunepipe.data.mixing import mix, sample_rows, split_eval
from tunepipe.data.packing import pack, pretrain_blocks
from tunepipe.data.templates import ChatFormat
from tunepipe.data.validated import KINDS_FOR_STAGE, read_manifest, read_validated
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir, write_json_atomic
from tunepipe.layout import Layout
from tunepipe.modeling import load_tokenizer

log = logging.getLogger(__name__)

META = "meta.json"
METRICS = "data.json"
MAX_SHARD_SIZE = "500MB"
ID_COLUMNS = ("input_ids", "labels", "seq_lens", "prompt_ids", "chosen_input_ids", "chosen_labels",
              "rejected_input_ids", "rejected_labels")


def run_tokenize(cfg: Config, layout: Layout) -> dict:
    """Tokenize the validated rows; return the stats written to metrics/data.json."""
    data, stage = cfg.data, cfg.train.stage
    manifest = read_manifest(layout.validated)
    if manifest.get("stage") != stage:
        raise TunepipeError(f"{layout.validated} holds rows validated for train.stage={manifest.get('stage')}, "
                            f"not {stage}", hint="re-run the validate stage with this config")
    kind = KINDS_FOR_STAGE[stage]
    if data.packing and kind not in ("sft", "pretrain"):
        raise TunepipeError(f"data.packing=true: packing applies to stage sft and pt, not {stage}")
    tokenizer = load_tokenizer(layout.base_model, trust_remote_code=cfg.model.trust_remote_code)
    fmt = None if kind == "pretrain" else ChatFormat(tokenizer, data.template, data.tool_format)

    train_rows = gather(manifest["train"], layout.validated, data)
    if manifest["eval"]:
        eval_rows = gather(manifest["eval"], layout.validated, data)
    else:
        train_rows, eval_rows = split_eval(train_rows, data.val_size, data.split_seed)

    splits, stats = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        splits[split], stats[split] = encode_split(rows, kind, split, tokenizer, fmt, data)
    if not splits["train"]["input_ids" if "input_ids" in splits["train"] else "chosen_input_ids"]:
        raise TunepipeError(f"no training rows left after tokenization: {stats['train']}",
                            hint="raise data.cutoff_len or use data.overlong: truncate")
    metrics = {"stage": stage, "template": fmt.name if fmt else None, "cutoff_len": data.cutoff_len, **stats}
    meta = build_meta(cfg, kind, tokenizer, fmt, splits)
    with atomic_dir(layout.tokenized) as tmp:
        for split, columns in splits.items():
            save_split(columns, kind, split, data.packing, tmp / split)
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_json_atomic(layout.metrics / METRICS, metrics)
    log.info("tokenized %d train / %d eval rows into %s", stats["train"]["rows_out"], stats["eval"]["rows_out"],
             layout.tokenized)
    return metrics


def gather(items: list[dict], validated: Path, data: DataConfig) -> list[dict]:
    """The manifest's datasets, each sampled (num_samples, max_samples), then mixed."""
    datasets = [sample_rows(read_validated(validated, item), item.get("num_samples"), data.max_samples,
                            data.split_seed) for item in items]
    return mix(datasets, data)


def encode_split(rows: list[dict], kind: str, split: str, tokenizer, fmt: ChatFormat | None,
                 data: DataConfig) -> tuple[dict[str, list], dict]:
    stats = Stats()
    if kind == "pretrain":
        columns = encode_pretrain(rows, tokenizer, data, packed=data.packing and split == "train", stats=stats)
    elif kind == "preference":
        columns = encode_preference(rows, fmt, data, stats)
    else:
        columns = encode_conversations(rows, fmt, data, kind, eval_columns=(kind == "sft" and split == "eval"),
                                       stats=stats)
    summary = stats.as_dict()
    if kind == "sft" and data.packing and split == "train":
        columns = pack(columns["input_ids"], columns["labels"], data.cutoff_len)
        summary["packed_rows"] = len(columns["input_ids"])
    if "seq_lens" in columns:
        slots = len(columns["input_ids"]) * data.cutoff_len
        summary["packing_efficiency"] = round(summary["tokens"] / slots, 4) if slots else 0.0
    return columns, summary


def encode_pretrain(rows: list[dict], tokenizer, data: DataConfig, packed: bool, stats: Stats) -> dict:
    """Text + EOS per document, concatenated and cut into cutoff_len blocks."""
    if tokenizer.eos_token_id is None:
        raise TunepipeError("stage pt needs an EOS token between documents; the tokenizer has none")
    documents = [ids + [tokenizer.eos_token_id] for ids in BatchEncoder(tokenizer)([r["text"] for r in rows])]
    columns = pretrain_blocks(documents, data.cutoff_len, with_seq_lens=packed)
    stats.rows_in, stats.rows_out = len(rows), len(columns["input_ids"])
    stats.lengths = [len(block) for block in columns["input_ids"]]
    return columns


def column_names(kind: str, split: str, packing: bool) -> list[str]:
    if kind == "preference":
        return ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"]
    names = ["input_ids", "labels"]
    if packing and split == "train":
        names.append("seq_lens")
    if kind == "sft" and split == "eval":
        names += ["prompt_ids", "label_text"]
    if kind == "kto":
        names.append("kto_tag")
    return names


def save_split(columns: dict[str, list], kind: str, split: str, packing: bool, path: Path) -> None:
    import pyarrow as pa
    from datasets import Dataset

    arrays = {}
    for name in column_names(kind, split, packing):
        values = columns.get(name, [])
        if name in ID_COLUMNS:
            arrays[name] = int32_lists(values)
        else:
            arrays[name] = pa.array(values, type=pa.bool_() if name == "kto_tag" else pa.string())
    dataset = Dataset(pa.table(arrays))
    # datasets writes zero shards for an empty dataset, which it then cannot load back
    shards = {"max_shard_size": MAX_SHARD_SIZE} if len(dataset) else {"num_shards": 1}
    dataset.save_to_disk(str(path), **shards)


def int32_lists(values: list[list[int]]):
    """A list<int32> Arrow column from Python lists, through one flat numpy buffer: pyarrow's
    nested-list conversion walks every element as a Python object, this copies them once."""
    import itertools

    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(np.fromiter(map(len, values), dtype=np.int64, count=len(values)), out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def build_meta(cfg: Config, kind: str, tokenizer, fmt: ChatFormat | None, splits: dict) -> dict:
    data = cfg.data
    first = "chosen_input_ids" if kind == "preference" else "input_ids"
    return {"stage": cfg.train.stage, "kind": kind, "template": fmt.name if fmt else None,
            "chat_template": fmt.template if fmt else None, "native_tools": fmt.native_tools if fmt else None,
            "cutoff_len": data.cutoff_len, "packing": bool(data.packing and kind in ("sft", "pretrain")),
            "tokenizer": {"name": Path(str(tokenizer.name_or_path)).name, "vocab_size": len(tokenizer),
                          "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
            "rows": {split: len(columns.get(first, [])) for split, columns in splits.items()},
            "columns": {split: column_names(kind, split, data.packing) for split in splits}}

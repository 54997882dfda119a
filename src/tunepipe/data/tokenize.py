"""The tokenize stage: validated canonical rows -> `data/tokenized/{train,eval}` Arrow shards.

Reads `data/validated/` (manifest + rows), the base model's tokenizer and `data.*`;
writes HF datasets shards (`load_from_disk`-compatible), `data/tokenized/meta.json` and
`metrics/data.json`. Columns per objective are fixed in docs/architecture.md
("Tokenized shards").

Streaming, in bounded memory: the rows to tokenize are chosen as row numbers
(`mixing`), tokenized in chunks on every core (`chunks`) and written to the shards as
they come (`shards`); packing goes through disk from the samples' lengths
(`pack_spill`). Memory grows by a few bytes per row (the plan, offsets, lengths), never
by the rows. The same inputs and params give byte-identical shards, whatever the
worker count or chunk size, so DVC's hash does not change on a rerun.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from tunepipe.config import Config, DataConfig
from tunepipe.data.chat.templates import ChatFormat
from tunepipe.data.checks.validated import KINDS_FOR_STAGE, SHARD_KINDS, line_offsets, read_manifest
from tunepipe.data.sources.media import MEDIA_STORE
from tunepipe.data.tokenizing.chunks import Job, merge_stats, new_stats, run_chunks, worker_count
from tunepipe.data.tokenizing.encoding import PROMPT_COLUMNS
from tunepipe.data.tokenizing.mixing import mix_plan, sample_indices, split_positions
from tunepipe.data.tokenizing.pack_spill import PackSpill
from tunepipe.data.tokenizing.packing import BlockCutter
from tunepipe.data.tokenizing.shards import ShardWriter, to_table
from tunepipe.data.vision import MediaTokens
from tunepipe.data.vocabulary import extend_tokenizer
from tunepipe.errors import TunepipeError
from tunepipe.io_utils import atomic_dir, write_json_atomic
from tunepipe.layout import Layout
from tunepipe.models.base import follow_manifest, is_vision_model, load_tokenizer

log = logging.getLogger(__name__)

META = "meta.json"
METRICS = "data.json"


def run_tokenize(cfg: Config, layout: Layout) -> dict:
    """Tokenize the validated rows; return the stats written to metrics/data.json."""
    data, stage = cfg.data, cfg.train.stage
    manifest = read_manifest(layout.validated)
    if manifest.get("stage") != stage:
        raise TunepipeError(f"{layout.validated} holds rows validated for train.stage={manifest.get('stage')}, "
                            f"not {stage}", hint="re-run the validate stage with this config")
    kind = SHARD_KINDS.get(stage, KINDS_FOR_STAGE[stage])
    if data.packing and kind not in ("sft", "pretrain"):
        raise TunepipeError(f"data.packing=true: packing applies to stage sft and pt, not {stage}")
    tokenizer = load_tokenizer(layout.base_model, trust_remote_code=cfg.model.trust_remote_code)
    added, descriptions = extend_tokenizer(tokenizer, cfg.model)  # before the template's, as LLaMA-Factory
    # pretraining reads no chat, but a named template still decides its EOS (replace_eos), as in LLaMA-Factory
    fmt = None if kind == "pretrain" and not data.template else ChatFormat(
        tokenizer, data.template, data.tool_format, data.today(), default_system=data.default_system)
    if kind == "pretrain" and tokenizer.eos_token_id is None:
        raise TunepipeError("stage pt needs an EOS token between documents; the tokenizer has none")
    if fmt is not None and is_vision_model(follow_manifest(layout.base_model)):
        fmt.media = media_tokens(cfg, layout, tokenizer)
    plans, sources = select_rows(manifest, layout.validated, data)

    rows, stats = {}, {}
    with atomic_dir(layout.tokenized) as tmp:
        for split in ("train", "eval"):
            names = column_names(kind, split, data.packing, media=fmt is not None and fmt.media is not None)
            unpacked = [name for name in names if name != "seq_lens"]  # what each chunk returns
            job = Job(kind, unpacked, kind == "sft" and split == "eval", data, fmt, tokenizer, *sources[split])
            rows[split], stats[split] = encode_split(job, plans[split], split, tmp / split, names)
            if split == "train" and not rows[split]:
                raise TunepipeError(f"no training rows left after tokenization: {stats['train']}",
                                    hint="raise data.cutoff_len or use data.overlong: truncate")
        if fmt is not None and fmt.media is not None and (layout.validated / MEDIA_STORE).is_dir():
            # images held inside datasets travel with the shards: train / evaluate read only their inputs
            shutil.copytree(layout.validated / MEDIA_STORE, tmp / MEDIA_STORE)
        added += fmt.added_tokens if fmt else []
        if added:  # training resizes the embeddings for these; eval / export / chat get this tokenizer
            tokenizer.save_pretrained(str(tmp / layout.grown_tokenizer.relative_to(layout.tokenized)))
        meta = build_meta(cfg, kind, tokenizer, fmt, rows) | {"added_tokens": added}
        if descriptions:  # for init_special_tokens: desc_init
            meta["token_descriptions"] = descriptions
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    metrics = {"stage": stage, "template": fmt.name if fmt else None, "cutoff_len": data.cutoff_len, **stats}
    write_json_atomic(layout.metrics / METRICS, metrics)
    log.info("tokenized %d train / %d eval rows into %s", stats["train"]["rows_out"], stats["eval"]["rows_out"],
             layout.tokenized)
    return metrics


def select_rows(manifest: dict, validated: Path, data: DataConfig) -> tuple[dict, dict]:
    """Per split: the plan ((dataset, row) numbers in order) and where those rows live
    (file and line offsets per dataset number). Sampling, mixing and the eval split work
    on row numbers only."""
    plans, sources = {}, {}
    for split in ("train", "eval"):
        items = manifest[split]
        files = [str(validated / item["file"]) for item in items]
        offsets = [line_offsets(Path(f)) for f in files]
        parts = [sample_indices(len(o), item.get("num_samples"), data.max_samples, data.split_seed)
                 for o, item in zip(offsets, items)]
        plans[split] = mix_plan(parts, data) if parts else np.zeros((0, 2), dtype=np.int32)
        sources[split] = (files, offsets)
        del parts
    if not manifest["eval"] and data.val_size:
        train, held_out = split_positions(len(plans["train"]), data.val_size, data.split_seed)
        plans["train"], plans["eval"] = plans["train"][train], plans["train"][held_out]
        sources["eval"] = sources["train"]
    return plans, sources


def encode_split(job: Job, plan: np.ndarray, split: str, path: Path, names: list[str]) -> tuple[int, dict]:
    """Tokenize one split's plan into shards at `path` with columns `names`; return (rows written, stats)."""
    data = job.data
    stats = new_stats()
    writer = ShardWriter(path, names)
    packed = data.packing and split == "train"
    results = progress(run_chunks(job, plan, data.preprocessing_batch_size,
                                  worker_count(data.preprocessing_num_workers)), len(plan), f"tokenize {split}")
    if job.kind == "pretrain":
        cutter = BlockCutter(data.cutoff_len, with_seq_lens=packed)
        for result in results:
            stats.rows_in += result.stats.rows_in
            write_blocks(writer, cutter.feed(result.table), names, stats)
        write_blocks(writer, cutter.finish(), names, stats)
    elif packed:
        with tempfile.TemporaryDirectory(prefix=".pack-", dir=path.parent) as spill_dir:
            spill = PackSpill(Path(spill_dir))
            for result in results:
                merge_stats(stats, result.stats)
                spill.write(result.table)
            for table in spill.packed(data.cutoff_len):
                writer.write(table)
    else:
        for result in results:
            merge_stats(stats, result.stats)
            writer.write(result.table)
    count = writer.close()
    summary = stats.as_dict()
    if packed and job.kind == "sft":
        summary["packed_rows"] = count
    if "seq_lens" in names:
        slots = count * data.cutoff_len
        summary["packing_efficiency"] = round(summary["tokens"] / slots, 4) if slots else 0.0
    return count, summary


def progress(results, total: int, desc: str):
    """The chunk results, with one progress bar for the split (workers' own bars stay off)."""
    with tqdm(total=total, desc=desc, unit="row", disable=None, mininterval=2) as bar:
        for result in results:
            bar.update(result.stats.rows_in)
            yield result


def write_blocks(writer: ShardWriter, columns: dict, names: list[str], stats) -> None:
    if job_rows := len(columns["input_ids"]):
        stats.rows_out += job_rows
        stats.lengths.extend(len(block) for block in columns["input_ids"])
        writer.write(to_table(columns, names))


def media_tokens(cfg: Config, layout: Layout, tokenizer) -> MediaTokens:
    """A vision-language base model's image tokens and processor (its rows' images resolved in media_dir)."""
    data = cfg.data
    if data.packing or cfg.train.stage not in ("sft", "dpo"):
        raise TunepipeError(f"vision-language models train with stage sft or dpo and packing off for now "
                            f"(train.stage={cfg.train.stage}, data.packing={data.packing})",
                            hint="KTO, reward models and packing with images are not supported yet")
    return MediaTokens.for_data(follow_manifest(layout.base_model), tokenizer, data, layout.validated / MEDIA_STORE)


def column_names(kind: str, split: str, packing: bool, media: bool = False) -> list[str]:
    if kind == "prompt":
        return list(PROMPT_COLUMNS)
    if kind == "preference":
        return ["chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"] + ["media"] * media
    names = ["input_ids", "labels"]
    if packing and split == "train":
        names.append("seq_lens")
    if kind == "sft" and split == "eval":
        names += ["prompt_ids", "label_text"]
    if kind == "kto":
        names.append("kto_tag")
    if media:
        names.append("media")  # JSON: {"images": [{"path", "sha256"}]}, resolved against data.media_dir
    return names


def build_meta(cfg: Config, kind: str, tokenizer, fmt: ChatFormat | None, rows: dict[str, int]) -> dict:
    data = cfg.data
    return {"stage": cfg.train.stage, "kind": kind, "template": fmt.name if fmt else None,
            "chat_template": fmt.template if fmt else None, "native_tools": fmt.native_tools if fmt else None,
            "template_date": data.template_date if fmt else None,
            "default_system": data.default_system if fmt else None,
            "cutoff_len": data.cutoff_len, "packing": bool(data.packing and kind in ("sft", "pretrain")),
            "tokenizer": {"name": Path(str(tokenizer.name_or_path)).name, "vocab_size": len(tokenizer),
                          "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token},
            "rows": rows,
            "columns": {split: column_names(kind, split, data.packing, fmt is not None and fmt.media is not None)
                        for split in rows}}

"""Reference log-probs computed once and cached beside the tokenized shards.

With full fine-tuning, `precompute_ref_log_probs: true` replaces the frozen reference
copy (a second full set of weights in memory) by one pass over the data before
training. The file lives in `data/ref_logps/` next to `data/tokenized/` (never inside
it: that folder is the tokenize stage's DVC output), named by a key over everything
the numbers depend on: the base model's weights, the exact rows, the precision and
quantization, the objective. A different base or different data never reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import torch
from pyarrow import feather
from torch.utils.data import DataLoader

from tunepipe.io_utils import read_json
from tunepipe.models.base import MANIFEST, base_dtype, follow_manifest, hash_model_dir

log = logging.getLogger(__name__)


def base_model_fingerprint(base_dir: str | Path) -> str:
    """The content hash of the base weights: the manifest's, or hashed here."""
    manifest = Path(base_dir) / MANIFEST
    if manifest.is_file() and read_json(manifest).get("sha256"):
        return read_json(manifest)["sha256"]
    return hash_model_dir(follow_manifest(base_dir))


def rows_fingerprint(dataset, columns: tuple[str, ...]) -> str:
    """sha256 of the token columns exactly as they will be batched (Arrow IPC bytes)."""
    table = dataset.select_columns(list(columns)).with_format("arrow")[:]
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def cache_key(base_dir: str | Path, dataset, columns: tuple[str, ...], cfg) -> str:
    parts = {
        "base": base_model_fingerprint(base_dir),
        "rows": rows_fingerprint(dataset, columns),
        "stage": cfg.train.stage,
        "dtype": base_dtype(base_dir),
        "quantization": [cfg.model.quantization_bit, cfg.model.quantization_type,
                         cfg.model.double_quantization],
        "autocast": "bf16" if cfg.train.bf16_compute else "fp16" if cfg.train.fp16 else "none",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def cache_dir(tokenized_dir: str | Path) -> Path:
    return Path(tokenized_dir).parent / "ref_logps"


def attach_reference_log_probs(dataset, *, key: str, split: str, tokenized_dir: str | Path,
                               out_columns: tuple[str, str], compute) -> object:
    """Add the two reference columns to `dataset`, from the cache or by `compute(dataset)`.

    `compute` returns a float tensor of 2 x len(dataset) values: the first column's then
    the second's (chosen / rejected, or completion / KL pair).
    """
    path = cache_dir(tokenized_dir) / f"{split}-{key}.arrow"
    if path.is_file():
        log.info("reference log-probs for %s read from %s", split, path)
        table = feather.read_table(path)
    else:
        values = compute(dataset).cpu().double().numpy()
        table = pa.table({out_columns[0]: values[0], out_columns[1]: values[1]})
        _write_atomic(table, path)
        log.info("reference log-probs for %s cached in %s", split, path)
    if table.num_rows != len(dataset):
        raise RuntimeError(f"{path}: {table.num_rows} rows for a dataset of {len(dataset)}")
    for name in out_columns:
        dataset = dataset.add_column(name, table.column(name).to_pylist())
    return dataset


def compute_log_probs(dataset, collator, batch_size: int, log_probs_fn, device, autocast) -> torch.Tensor:
    """Run `log_probs_fn(batch)` (2B values per batch) over `dataset` in order; shape 2 x N."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    firsts, seconds = [], []
    for batch in loader:
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast():
            values = log_probs_fn(batch).float()
        half = values.numel() // 2
        firsts.append(values[:half].cpu())
        seconds.append(values[half:].cpu())
    return torch.stack([torch.cat(firsts), torch.cat(seconds)])


def _write_atomic(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    feather.write_feather(table, tmp)
    os.replace(tmp, path)


def precompute_reference(cfg, layout, model, splits, collator, columns: tuple[str, ...],
                         out_columns: tuple[str, str]):
    """`splits` with the reference columns attached to train (and eval), each computed once
    from the not-yet-trained policy and cached under a key of its own."""
    import contextlib

    from accelerate import PartialState

    from tunepipe.train.preference.common import step_zero_log_probs

    device = PartialState().device  # this process's training device (its GPU under DDP)
    if cfg.model.quantization_bit is None:  # bitsandbytes placed quantized weights already
        model.to(device)
    if cfg.train.bf16_compute or cfg.train.fp16:
        dtype = torch.bfloat16 if cfg.train.bf16_compute else torch.float16

        def autocast():
            return torch.autocast(device.type, dtype=dtype)
    else:
        autocast = contextlib.nullcontext
    was_training = model.training
    model.eval()

    def compute(dataset):
        return compute_log_probs(dataset, collator, cfg.train.per_device_eval_batch_size,
                                 lambda batch: step_zero_log_probs(model, batch), device, autocast)

    for split in ("train", "eval"):
        dataset = getattr(splits, split)
        if dataset is None:
            continue
        key = cache_key(layout.base_model, dataset, columns, cfg)
        setattr(splits, split, attach_reference_log_probs(
            dataset, key=key, split=split, tokenized_dir=layout.tokenized, out_columns=out_columns,
            compute=compute))
    model.train(was_training)
    return splits


def reference_for(cfg, layout, model, splits, collator, columns: tuple[str, ...], out_columns: tuple[str, str]):
    """(splits, Reference): the separate `ref_model` when set; log-probs precomputed into the
    splits with `precompute_ref_log_probs`; else the live reference (adapter disabled or a frozen copy)."""
    from tunepipe.train.preference.common import Reference, build_reference

    if cfg.train.ref_model:
        from tunepipe.train.preference.ref_model import load_reference_model

        return splits, Reference("ref_model", load_reference_model(cfg))
    if cfg.train.precompute_ref_log_probs:
        splits = precompute_reference(cfg, layout, model, splits, collator, columns, out_columns)
        return splits, Reference("precomputed")
    return splits, build_reference(model, cfg.train)

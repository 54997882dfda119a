"""Sharded safetensors: `export_size` parsing, saving within the limit, checking the result.

transformers' `save_pretrained(max_shard_size=...)` does the splitting. It bounds the
tensor bytes per shard, not the file size, and puts a tensor larger than the limit in
a shard of its own; we subtract a bound on the safetensors header from the limit and
refuse a limit below the largest tensor, so every file really is <= `export_size`.
A model that fits in one file is still written as shard 1 of 1 with an index, so an
export always has the same layout: `model.safetensors.index.json` + shards.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tunepipe.errors import TunepipeError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Upper bound on one tensor's entry in a safetensors JSON header beyond its name:
# {"dtype":"BF16","shape":[a,b,c],"data_offsets":[x,y]} with room for large numbers.
_HEADER_PER_TENSOR = 112
_HEADER_FIXED = 8 + 64 + 8  # length prefix, {"__metadata__":{"format":"pt"}}, alignment


def export_size_bytes(value: int | str) -> int:
    """`export_size` in bytes: an integer (or a bare number) is GB as in LLaMA-Factory; or `200MB`."""
    from huggingface_hub.serialization._base import parse_size_to_int

    text = str(value).strip()
    try:
        size = int(float(text) * 10**9) if text.replace(".", "", 1).isdigit() else parse_size_to_int(text)
    except ValueError:
        size = 0
    if size <= 0:
        raise TunepipeError(f"export.export_size={value!r}: expected a number of GB or a size like 200MB / 2GB")
    return size


def header_bound(names: list[str]) -> int:
    """Bytes a header can take if every named tensor landed in one shard."""
    return _HEADER_FIXED + sum(len(name.encode()) + _HEADER_PER_TENSOR for name in names)


def check_fits(model, limit: int) -> int:
    """The tensor-byte budget per shard; a TunepipeError when one tensor cannot fit."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    budget = limit - header_bound(list(params))
    name, tensor = max(params.items(), key=lambda item: item[1].numel() * item[1].element_size())
    largest = tensor.numel() * tensor.element_size()
    if largest > budget:
        raise TunepipeError(
            f"export.export_size={limit} bytes is too small: tensor {name} alone is {largest} bytes",
            hint=f"use an export_size above {largest + header_bound(list(params))} bytes")
    return budget


def save_sharded(model, out_dir: Path, limit: int) -> None:
    model.save_pretrained(str(out_dir), max_shard_size=check_fits(model, limit))
    if not (out_dir / INDEX).is_file():
        _index_single_file(out_dir)


def _index_single_file(out_dir: Path) -> None:
    from safetensors import safe_open

    shard = "model-00001-of-00001.safetensors"
    os.replace(out_dir / SINGLE, out_dir / shard)
    with safe_open(str(out_dir / shard), framework="pt") as handle:
        names = list(handle.keys())
    index = {"metadata": {"total_size": (out_dir / shard).stat().st_size},
             "weight_map": {name: shard for name in sorted(names)}}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def verify_shards(out_dir: Path, limit: int) -> dict[str, int]:
    """Every tensor is in exactly one shard, where the index says; every file is <= limit."""
    from safetensors import safe_open

    weight_map: dict[str, str] = json.loads((out_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
    seen: dict[str, str] = {}
    sizes = []
    for shard in sorted(set(weight_map.values())):
        path = out_dir / shard
        sizes.append(path.stat().st_size)
        if sizes[-1] > limit:
            raise TunepipeError(f"{path}: {sizes[-1]} bytes exceeds export_size ({limit} bytes)")
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                if name in seen:
                    raise TunepipeError(f"{out_dir}: tensor {name} is in both {seen[name]} and {shard}")
                seen[name] = shard
    if seen != weight_map:
        raise TunepipeError(f"{out_dir / INDEX}: the weight map does not match the shards' tensors")
    return {"shards": len(sizes), "total_bytes": sum(sizes), "largest_shard_bytes": max(sizes),
            "tensors": len(seen)}

"""Batches for causal-LM training: no padding to cutoff_len, attention kept inside each sample.

For the preference trainers: `SegmentCollator` takes rows with `input_ids` and `labels`
(and, for packed rows, `seq_lens`) and returns a batch whose `model_inputs(batch)` are
what the model's forward takes; `shift_labels` are the next-token targets. Rows of other
shapes (chosen/rejected pairs) can be turned into such rows first, one segment each.

Layouts (each row of the batch is a list of segments, one per sample):
- `flatten=False`: one dataset row per batch row, right-padded to the longest row.
- `flatten=True`: every sample of the batch concatenated into a single row (padding-free),
  so no step pays for pad tokens.
Samples sharing a row get position ids restarting at 0 and must not attend to each other.
How each attention path keeps them apart (and keeps the model's own sliding windows and
softcapping, which a hand-built block-diagonal mask would replace):
- SDPA / eager: no attention mask is passed at all. transformers' masking_utils then finds
  the samples from the restarting position ids (`find_packed_sequence_indices`) and builds
  each layer type's own mask (causal, or sliding-window for windowed layers of Mistral,
  Qwen2/3, Gemma 2/3, Phi-3) restricted to each sample, window distances counted inside
  the sample. Padding after the samples restarts its positions too, so it is a segment of
  its own and needs no 2-D mask either.
- flash attention 2 and tunepipe's per-sample SDPA (`varlen_attention`): varlen
  `cu_seq_lens_*` kwargs; the kernel gets each layer's `sliding_window` / `softcap` from
  the model code.

Batch keys: `input_ids`, `labels`, `shift_labels` (targets of each position, -100 across a
sample boundary and on padding), `position_ids`, `attention_mask` (2-D, 1 = real token:
the Trainer counts real tokens with it; never passed to the model), and for rows holding
several segments on a varlen kernel the flash-attention varlen kwargs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
VARLEN = "tunepipe_sdpa_varlen"  # the attn_implementation varlen_attention registers under this name
FLASH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def row_segments(row: dict) -> list[int]:
    """Lengths of the samples a tokenized row holds (`seq_lens` for packed rows)."""
    length = len(row["input_ids"])
    lens = row.get("seq_lens")
    if not lens:
        return [length]
    lens = [int(n) for n in lens]
    if sum(lens) != length:
        raise ValueError(f"seq_lens {lens} sum to {sum(lens)}, but the row holds {length} tokens")
    return lens


def shifted_labels(labels: list[int], segments: list[int]) -> list[int]:
    """Next-token targets per segment: the last token of a sample predicts nothing."""
    out, start = [], 0
    for length in segments:
        out.extend(labels[start + 1:start + length])
        out.append(IGNORE_INDEX)
        start += length
    return out


@dataclass
class SegmentCollator:
    pad_token_id: int
    attn_implementation: str = "sdpa"
    flatten: bool = False
    pad_to_multiple_of: int | None = None
    # False: never the varlen kwargs (rows of one sample each, for a model whose recurrent layers
    # refuse sample boundaries without their GPU kernels: batches/recurrent.py)
    sample_boundaries: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        rows_segments = [row_segments(row) for row in rows]
        if self.flatten and len(rows) > 1:
            rows = [{"input_ids": [t for row in rows for t in row["input_ids"]],
                     "labels": [t for row in rows for t in row["labels"]]}]
            rows_segments = [[n for segs in rows_segments for n in segs]]
        width = self._padded_width(max(len(row["input_ids"]) for row in rows))
        batch = {key: torch.full((len(rows), width), fill, dtype=torch.long)
                 for key, fill in (("input_ids", self.pad_token_id), ("labels", IGNORE_INDEX),
                                   ("shift_labels", IGNORE_INDEX), ("position_ids", 0),
                                   ("attention_mask", 0))}
        for i, (row, segments) in enumerate(zip(rows, rows_segments)):
            n = len(row["input_ids"])
            batch["input_ids"][i, :n] = torch.as_tensor(row["input_ids"])
            batch["labels"][i, :n] = torch.as_tensor(row["labels"])
            batch["shift_labels"][i, :n] = torch.as_tensor(shifted_labels(list(row["labels"]), segments))
            batch["position_ids"][i] = positions(segments, width)
            batch["attention_mask"][i, :n] = 1
        if self._varlen() and any(len(with_tail(segments, width)) > 1 for segments in rows_segments):
            batch.update(varlen_kwargs(rows_segments, width))
        return batch

    def _varlen(self) -> bool:
        kernel = self.attn_implementation
        return self.sample_boundaries and (kernel.startswith("flash_attention") or kernel == VARLEN)

    def _padded_width(self, longest: int) -> int:
        multiple = self.pad_to_multiple_of
        return longest if not multiple else -(-longest // multiple) * multiple


def with_tail(segments: list[int], width: int) -> list[int]:
    """Padding after the samples forms a segment of its own, so no query row is fully masked
    (a fully masked softmax row is NaN, and NaN times a zero gradient is still NaN)."""
    tail = width - sum(segments)
    return segments + [tail] if tail > 0 else list(segments)


def positions(segments: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in with_tail(segments, width)])


def varlen_kwargs(rows_segments: list[list[int]], width: int) -> dict[str, torch.Tensor | int]:
    """flash-attention varlen boundaries over the flattened batch (rows laid end to end)."""
    lengths = [n for segments in rows_segments for n in with_tail(segments, width)]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.as_tensor(lengths), 0)
    longest = max(lengths)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(), "max_length_q": longest, "max_length_k": longest}


def model_inputs(batch: dict) -> dict:
    """The forward kwargs of a collated batch: ids, restarting position ids and, on varlen
    kernels, the sample boundaries. Never an attention mask: a 2-D mask would switch off
    transformers' packed-sample detection, and a 4-D one would replace the model's own
    per-layer masks (sliding windows). `use_cache=False` always: with a KV cache transformers
    skips the packed-sample detection too, and samples would see each other."""
    if "position_ids" not in batch:
        # a vision-language batch (train/model/vision.py): right-padded rows with their mask, images and
        # videos; the model computes its own (3-D, image- and video-aware) rotary positions
        keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                "image_sizes", "pixel_attention_mask", "token_type_ids",  # the families' image inputs
                "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        return {**{key: batch[key] for key in keys if key in batch}, "use_cache": False}
    inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "cu_seq_lens_q" in batch:
        inputs.update({key: batch[key] for key in FLASH_KWARGS})
    return inputs

"""One measuring probe attached to whichever transformers Trainer a process builds.

Imported by both benchmark drivers (tunepipe's venv and LLaMA-Factory's), so both sides are
timed and counted by the same code, without changing how either trains:

- time: from the first `on_step_begin` to the last `on_step_end` (the optimizer steps only,
  not model loading or tokenization), plus each step's own duration;
- real tokens: per micro-batch, the sum of a 2-D `attention_mask` when the batch has one
  (padded batches), else the number of `input_ids` (padding-free / packed batches have no
  pad tokens); padded slots are counted too, to show how much work went to padding;
- loss: `state.log_history` (the benchmark sets `logging_steps: 1`, so entry 1 is the loss of
  the first batch, before any update).

Only transformers is imported here; this file must run in either virtualenv.
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import transformers
from transformers import TrainerCallback


class TrainerProbe(TrainerCallback):
    def __init__(self) -> None:
        self.real_tokens = 0
        self.slot_tokens = 0
        self.micro_batches = 0
        self.step_times: list[float] = []
        self.first_step_begin: float | None = None
        self.last_step_end: float | None = None
        self._step_begin = 0.0
        self.log_history: list[dict] = []
        self.first_batch: dict = {}
        self.gpu_peak: dict = {}

    def count(self, inputs) -> None:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.slot_tokens += int(input_ids.numel())
        padded = mask is not None and mask.dim() == 2
        self.real_tokens += int(mask.sum()) if padded else int(input_ids.numel())
        if self.micro_batches == 0:
            self.first_batch = first_batch_fingerprint(inputs, padded)
        self.micro_batches += 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_begin = time.perf_counter()
        if self.first_step_begin is None:
            self.first_step_begin = self._step_begin

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()
        self.step_times.append(self.last_step_end - self._step_begin)

    def on_train_end(self, args, state, control, **kwargs):
        self.log_history = list(state.log_history)
        self.gpu_peak = gpu_peak_memory()

    def summary(self) -> dict:
        train_s = (self.last_step_end or 0.0) - (self.first_step_begin or 0.0)
        losses = [entry["loss"] for entry in self.log_history if "loss" in entry]
        return {
            "steps": len(self.step_times),
            "micro_batches": self.micro_batches,
            "train_s": round(train_s, 3),
            "step_s": [round(s, 3) for s in self.step_times],
            "real_tokens": self.real_tokens,
            "slot_tokens": self.slot_tokens,
            "real_tokens_per_s": round(self.real_tokens / train_s, 2) if train_s > 0 else None,
            "first_loss": losses[0] if losses else None,
            "first_batch": self.first_batch,
            "losses": losses,
            **self.gpu_peak,
        }


def gpu_peak_memory() -> dict:
    """Peak CUDA memory of this process (allocated by tensors, and reserved by the caching allocator)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0),
            "gpu_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "gpu_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20)}


def first_batch_fingerprint(inputs, padded: bool) -> dict:
    """Which rows the first batch holds, comparable across padded and padding-free batches.

    The first-batch losses of two trainers are only comparable when both saw the same rows:
    this gives the sorted real lengths and a hash of the real token ids of each row.
    """
    import hashlib

    input_ids = inputs["input_ids"]
    if padded:
        rows = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, inputs["attention_mask"])]
    elif "seq_lens" in inputs or "cu_seq_lens_q" in inputs:
        flat = input_ids.reshape(-1).tolist()
        lens = _sample_lengths(inputs)
        rows, start = [], 0
        for length in lens:
            rows.append(flat[start:start + length])
            start += length
    else:
        rows = [ids.tolist() for ids in input_ids]
    digests = sorted(hashlib.sha256(json.dumps(row).encode()).hexdigest()[:12] for row in rows)
    return {"lengths": sorted(len(row) for row in rows), "rows": digests}


def _sample_lengths(inputs) -> list[int]:
    if "seq_lens" in inputs:
        return [int(x) for x in inputs["seq_lens"].reshape(-1) if int(x) > 0]
    cu = inputs["cu_seq_lens_q"].reshape(-1).tolist()
    return [b - a for a, b in itertools.pairwise(cu)]


PROBE = TrainerProbe()


def install() -> TrainerProbe:
    """Make every Trainer built after this call report to PROBE.

    The wrap is per instance, after the trainer's own __init__, so a subclass that overrides
    `training_step` is still counted (the instance attribute is what the train loop calls).
    """
    original_init = transformers.Trainer.__init__

    def init_with_probe(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(PROBE)
        step = self.training_step

        def counted_training_step(model, inputs, *rest, **kw):
            PROBE.count(inputs)
            return step(model, inputs, *rest, **kw)

        self.training_step = counted_training_step

    transformers.Trainer.__init__ = init_with_probe
    return PROBE


def write(path: str | Path) -> None:
    Path(path).write_text(json.dumps(PROBE.summary(), indent=2) + "\n", encoding="utf-8")

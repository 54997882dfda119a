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
        self.batches: list[dict] = []  # per micro-batch: sample lengths, trained tokens (bench/train_floor.py)
        self.gpu_peak: dict = {}
        self.cpu_begin = self.cpu_end = 0.0

    def count(self, inputs) -> None:
        input_ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        self.slot_tokens += int(input_ids.numel())
        padded = mask is not None and mask.dim() == 2
        self.real_tokens += int(mask.sum()) if padded else int(input_ids.numel())
        samples = batch_samples(inputs, padded)
        if self.micro_batches == 0:
            self.first_batch = first_batch_fingerprint(samples)
        labels = inputs.get("labels")
        trained = int((labels != -100).sum()) if labels is not None else None
        self.batches.append({"lengths": [len(sample) for sample in samples], "trained": trained})
        self.micro_batches += 1

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_begin = time.perf_counter()
        if self.first_step_begin is None:
            self.first_step_begin = self._step_begin
            self.cpu_begin = process_cpu_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()
        self.cpu_end = process_cpu_seconds()
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
            "train_cpu_s": round(self.cpu_end - self.cpu_begin, 3),
            "first_loss": losses[0] if losses else None,
            "first_batch": self.first_batch,
            "batches": self.batches,
            "losses": losses,
            **self.gpu_peak,
        }


def process_cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (see _common.cpu_seconds for why)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def gpu_peak_memory() -> dict:
    """Peak CUDA memory of this process (allocated by tensors, and reserved by the caching allocator)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    return {"gpu": torch.cuda.get_device_name(0),
            "gpu_peak_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20),
            "gpu_peak_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20)}


def batch_samples(inputs, padded: bool) -> list[list[int]]:
    """The real token ids of each sample in a batch. A batch row holding several samples
    (padding-free) is cut where its position ids restart at 0."""
    import torch

    samples = []
    for index, ids in enumerate(inputs["input_ids"]):
        keep = inputs["attention_mask"][index].bool() if padded else torch.ones_like(ids, dtype=torch.bool)
        ids = ids[keep].tolist()
        positions = inputs["position_ids"][index][keep].tolist() if "position_ids" in inputs else [1] * len(ids)
        starts = [0] + [i for i, p in enumerate(positions) if p == 0 and i > 0] + [len(ids)]
        samples.extend(ids[a:b] for a, b in itertools.pairwise(starts))
    return samples


def first_batch_fingerprint(samples: list[list[int]]) -> dict:
    """Which samples the first batch holds, comparable across padded and padding-free batches.

    The first-batch losses of two trainers are only comparable when both saw the same samples:
    this gives the sorted sample lengths and a hash of each sample's real token ids.
    """
    import hashlib

    digests = sorted(hashlib.sha256(json.dumps(sample).encode()).hexdigest()[:12] for sample in samples)
    return {"lengths": sorted(len(sample) for sample in samples), "samples": digests}


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

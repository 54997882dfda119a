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
import os
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
        self.step_cpu: list[float] = []  # this process's CPU seconds per step (all its threads)
        self.first_step_begin: float | None = None
        self.last_step_end: float | None = None
        self._step_begin = 0.0
        self.log_history: list[dict] = []
        self.first_batch: dict = {}
        self.batches: list[dict] = []  # per micro-batch: sample lengths, trained tokens (bench/train_floor.py)
        self.gpu_peak: dict = {}
        self.cpu_begin = self.cpu_end = 0.0
        self.process_start = time.perf_counter()  # install() time: before the model is loaded
        self.first_step_end: float | None = None

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
        if state.global_step + 1 == int(os.environ.get("BENCH_PROFILE_STEP", "0")):
            self.profiler = StepProfiler()
        self._step_begin = time.perf_counter()
        self._step_cpu_begin = process_cpu_seconds()
        if self.first_step_begin is None:
            self.first_step_begin = self._step_begin
            self.cpu_begin = process_cpu_seconds()

    def on_step_end(self, args, state, control, **kwargs):
        self.last_step_end = time.perf_counter()
        if self.first_step_end is None:
            self.first_step_end = self.last_step_end
        self.cpu_end = process_cpu_seconds()
        self.step_times.append(self.last_step_end - self._step_begin)
        self.step_cpu.append(self.cpu_end - self._step_cpu_begin)
        if getattr(self, "profiler", None) is not None:
            self.profile = self.profiler.finish(self.last_step_end - self._step_begin)
            self.profiler = None

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
            "step_cpu_s": [round(s, 3) for s in self.step_cpu],
            "real_tokens": self.real_tokens,
            "slot_tokens": self.slot_tokens,
            "real_tokens_per_s": round(self.real_tokens / train_s, 2) if train_s > 0 else None,
            "train_cpu_s": round(self.cpu_end - self.cpu_begin, 3),
            # model load, set-up and the first step (a compile warm-up lands here)
            "first_step_after_s": round((self.first_step_end or 0.0) - self.process_start, 3),
            "first_loss": losses[0] if losses else None,
            "first_batch": self.first_batch,
            "batches": self.batches,
            "losses": losses,
            "profile": getattr(self, "profile", None),
            **self.gpu_peak,
        }


# Operator groups of a profiled step, by aten op name (first match wins; self time, so no
# time is counted twice). Everything not claimed by an op's self time is Python and dispatch.
OP_GROUPS = (
    ("matmul (frozen + LoRA)", {"aten::mm", "aten::addmm", "aten::bmm"}, ()),
    ("attention (SDPA kernels)", set(), ("flash_attention", "scaled_dot_product", "efficient_attention")),
    ("loss (log-softmax, NLL)", set(), ("log_softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("copies, casts, layout", {"aten::copy_", "aten::_to_copy", "aten::clone", "aten::cat", "aten::contiguous",
                               "aten::empty", "aten::empty_strided", "aten::zero_", "aten::fill_", "aten::zeros",
                               "aten::index", "aten::split", "aten::split_with_sizes", "aten::slice",
                               "aten::select", "aten::transpose", "aten::view", "aten::reshape", "aten::permute",
                               "aten::t", "aten::as_strided", "aten::expand", "aten::unsqueeze", "aten::squeeze",
                               "aten::detach", "aten::_unsafe_view", "aten::masked_select", "aten::nonzero",
                               "aten::item", "aten::_local_scalar_dense", "aten::to", "aten::new_zeros",
                               "aten::empty_like", "aten::zeros_like", "aten::stack", "aten::index_put_"}, ()),
    ("elementwise + norms + optimizer math (mul, add, silu, rsqrt, pow, mean, ...)", set(), ("aten::",)),
)


def op_group(key: str) -> str:
    for name, exact, parts in OP_GROUPS:
        if key in exact or any(part in key for part in parts):
            return name
    return "other"


class StepProfiler:
    """torch.profiler over one optimizer step; `finish` returns seconds per operator group
    (self CPU time of the calling thread's ops: intra-op threads are not added again), the
    optimizer's share, and the rest (Python, the Trainer, dispatch)."""

    def __init__(self):
        import torch

        self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
        self.prof.__enter__()

    def finish(self, step_s: float) -> dict:
        self.prof.__exit__(None, None, None)
        groups = {name: 0.0 for name, _, _ in OP_GROUPS}
        optimizer_s, top = 0.0, []
        for event in self.prof.key_averages(group_by_input_shape=True):
            seconds = event.self_cpu_time_total / 1e6
            if event.key.startswith("Optimizer.step#"):
                optimizer_s += event.cpu_time_total / 1e6
            if not event.key.startswith("aten::") and not any(k in event.key for k in ("flash", "scaled_dot")):
                continue
            group = op_group(event.key)
            if group.startswith("matmul") and lora_sized(event.input_shapes):
                group = "matmul: LoRA A / B (a dimension <= 16)"
            top.append((seconds, event.key, event.count))
            groups[group] = groups.get(group, 0.0) + seconds
        ops_s = sum(groups.values())
        merged: dict[str, list] = {}
        for sec, key, count in top:  # the same op over all its shapes
            merged.setdefault(key, [0.0, 0])
            merged[key][0] += sec
            merged[key][1] += count
        top = [(sec, key, count) for key, (sec, count) in merged.items()]
        return {"step_s": round(step_s, 3), "groups_s": {k: round(v, 3) for k, v in groups.items()},
                "optimizer_step_total_s": round(optimizer_s, 3),
                "python_dispatch_other_s": round(step_s - ops_s, 3),
                "top_ops": [{"op": key, "self_s": round(sec, 3), "calls": count}
                            for sec, key, count in sorted(top, reverse=True)[:25]]}


def lora_sized(shapes) -> bool:
    """A matmul one of whose operands has a dimension of 16 or less: a LoRA rank (8 here)."""
    return any(0 < dim <= 16 for shape in shapes or [] for dim in (shape or [])[-2:])


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
    PROBE.process_start = time.perf_counter()
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

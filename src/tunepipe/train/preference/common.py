"""What DPO and KTO share: a Trainer driven by an objective function, the reference model,
and windowed reward metrics.

`ObjectiveTrainer` is transformers' Trainer (scheduler, accumulation, checkpoints,
resume, callbacks) with `compute_loss` delegated to an objective callable: dpo.py and
kto.py each provide one instead of each subclassing the Trainer.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Trainer

from tunepipe.errors import TunepipeError
from tunepipe.train.preference.losses import IGNORE_INDEX, ld_token_weights

# objective(model, batch) -> (loss, {metric name: (sum over rows, row count)})
Objective = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, tuple[float, int]]]]
MODEL_INPUTS = ("input_ids", "attention_mask")
# a vision-language batch's image inputs (train/model/vision.py), passed on when the collator made them
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "mm_token_type_ids")


def forward_log_probs(model: torch.nn.Module, batch: dict,
                      ld_alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed answer log-probs and answer token counts of every row in `batch`.

    Equal to `sequence_log_probs(model(...).logits, labels)`, but the vocabulary projection
    runs only at positions that predict an answer token (transformers' boolean
    `logits_to_keep`): prompts are often most of a preference row, and with a large
    vocabulary the logits are the biggest tensor of the step. With `ld_alpha` (LD-DPO, on a
    chosen-rows-then-rejected-rows batch) the tokens past the shorter answer's length count
    `ld_alpha` times (`losses.ld_token_weights`).
    """
    labels = batch["labels"]
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    selected = targets != IGNORE_INDEX
    inputs = {k: batch[k] for k in MODEL_INPUTS + IMAGE_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False, logits_to_keep=selected).logits
    token_logps = -F.cross_entropy(logits.float(), targets[selected], reduction="none")
    if ld_alpha is not None:
        token_logps = token_logps * ld_token_weights(selected, ld_alpha)[selected]
    rows = selected.nonzero()[:, 0]
    sums = torch.zeros(labels.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), selected.sum(-1)


def peft_model_of(model: torch.nn.Module):
    """The PeftModel inside an accelerate / DDP wrapper, or None for a plain model."""
    inner = getattr(model, "module", model)
    return inner if hasattr(inner, "disable_adapter") and hasattr(inner, "peft_config") else None


@dataclass
class Reference:
    """Where reference log-probs come from.

    `adapter_off`: LoRA; the policy with its adapter disabled *is* the base model, so
    no second copy of the weights is held. `frozen_copy`: full / freeze fine-tuning.
    `precomputed`: read from the batch (`ref_logps`, computed once before training).
    `ref_model`: a separate model (`train.ref_model`, `ref_model.load_reference_model`).
    """

    kind: str
    frozen: torch.nn.Module | None = None

    @torch.no_grad()
    def log_probs(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        if self.kind == "precomputed":
            return batch["ref_logps"].to(torch.float32)
        if self.kind in ("frozen_copy", "ref_model"):
            device = batch["input_ids"].device
            if next(self.frozen.parameters()).device != device:  # the Trainer moved only the policy
                self.frozen.to(device)
            return forward_log_probs(self.frozen, batch)[0]
        peft_model = peft_model_of(model)
        with peft_model.disable_adapter():
            return forward_log_probs(peft_model, batch)[0]


def build_reference(model: torch.nn.Module, train_cfg) -> Reference:
    """The live reference for `model` at step 0 (see `Reference`); checks what cannot work."""
    if train_cfg.uses_adapter:
        if peft_model_of(model) is None:
            raise TunepipeError(f"train.finetuning_type={train_cfg.finetuning_type} but the model has no PEFT adapter")
        if train_cfg.pissa_init:
            raise TunepipeError(
                "train.pissa_init=true with a reference-model objective: PiSSA rewrites the base weights, "
                "so the model with its adapter disabled is not the reference model",
                hint="set pissa_init: false, or use pref_loss orpo / simpo (no reference)")
        return Reference("adapter_off")
    frozen = copy.deepcopy(model).eval().requires_grad_(False)
    return Reference("frozen_copy", frozen)


def step_zero_log_probs(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Reference log-probs from the not-yet-trained policy (used to precompute them)."""
    with torch.no_grad():
        peft_model = peft_model_of(model)
        if peft_model is not None:
            with peft_model.disable_adapter():
                return forward_log_probs(peft_model, batch)[0]
        return forward_log_probs(model, batch)[0]


class MetricWindow:
    """Row-weighted means of metrics since the last log, per mode (train / eval)."""

    def __init__(self):
        self._sums = {"train": defaultdict(float), "eval": defaultdict(float)}
        self._counts = {"train": defaultdict(int), "eval": defaultdict(int)}

    def add(self, mode: str, metrics: dict[str, tuple[float, int]]) -> None:
        for name, (total, count) in metrics.items():
            self._sums[mode][name] += float(total)
            self._counts[mode][name] += int(count)

    def flush(self, mode: str, accelerator=None) -> dict[str, float]:
        """Means over the window (summed across processes), then reset; absent metrics are skipped."""
        names = sorted(self._sums[mode])
        if not names:
            return {}
        stats = torch.tensor([[self._sums[mode][n] for n in names], [self._counts[mode][n] for n in names]],
                             dtype=torch.float64)
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        self._sums[mode].clear()
        self._counts[mode].clear()
        return {name: float(stats[0, i] / stats[1, i]) for i, name in enumerate(names) if stats[1, i] > 0}


def reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, tuple[float, int]]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies for paired rows."""
    chosen, rejected = chosen.detach().float(), rejected.detach().float()
    rows = chosen.numel()
    return {
        "rewards/chosen": (chosen.sum().item(), rows),
        "rewards/rejected": (rejected.sum().item(), rows),
        "rewards/margins": ((chosen - rejected).sum().item(), rows),
        "rewards/accuracies": ((chosen > rejected).float().sum().item(), rows),
    }


class ObjectiveTrainer(Trainer):
    """transformers.Trainer whose loss is `objective(model, batch)`; logs the objective's metrics."""

    # The objective returns a per-batch mean, so the Trainer divides it by the number of
    # accumulation steps (the causal LM's own num_items_in_batch path does not apply).
    loss_is_scaled_for_ga = False

    def __init__(self, *args, objective: Objective,
                 derive_metrics: Callable[[dict], dict] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.derive_metrics = derive_metrics  # adds metrics computed from the window means
        self.metric_window = MetricWindow()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, metrics = self.objective(model, inputs)
        self.metric_window.add("train" if model.training else "eval", metrics)
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        window = self.metric_window.flush(mode, self.accelerator)
        logs.update(window if mode == "train" else {f"eval_{k}": v for k, v in window.items()})
        if self.derive_metrics is not None:
            logs = self.derive_metrics(logs)
        super().log(logs, start_time)


def train_with_objective(cfg, layout, model, tokenizer, splits, collator, objective: Objective,
                         derive_metrics: Callable[[dict], dict] | None = None) -> dict:
    """The shared training session with an ObjectiveTrainer (DPO and KTO alike); returns
    metrics/train.json with the objective's last metrics added."""
    from tunepipe.train.session import run_session
    from tunepipe.train.trainer_setup import optimizer_for

    built = []

    def make_trainer(args, callbacks):
        built.append(ObjectiveTrainer(
            model=model, args=args, train_dataset=splits.train, eval_dataset=splits.eval,
            data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
            optimizers=(optimizer_for(model, cfg.train), None), objective=objective,
            derive_metrics=derive_metrics))
        return built[-1]

    summary = run_session(cfg, layout, model, tokenizer, splits.eval is not None, make_trainer)
    return add_objective_metrics(layout, summary, built[-1])


OBJECTIVE_METRICS = ("rewards/", "logps/", "kl", "sft_loss", "reward", "completions/mean_length")  # reward: grpo
OBJECTIVE_METRIC_PREFIXES = OBJECTIVE_METRICS + tuple(f"eval_{name}" for name in OBJECTIVE_METRICS)


def add_objective_metrics(layout, summary: dict, trainer) -> dict:
    """metrics/train.json gains the last logged value of each objective metric (rewards/*,
    logps/*, kl, sft_loss, and their eval_ versions): the shared session writes only the
    loss figures."""
    from tunepipe.io_utils import write_json_atomic
    from tunepipe.train.outputs import TRAIN_METRICS

    last = {}
    for entry in trainer.state.log_history:
        last.update({key: value for key, value in entry.items() if key.startswith(OBJECTIVE_METRIC_PREFIXES)})
    summary = {**summary, **last}
    if last and trainer.is_world_process_zero():
        write_json_atomic(layout.metrics / TRAIN_METRICS, summary)
    return summary

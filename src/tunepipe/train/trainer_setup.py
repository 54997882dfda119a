"""transformers' Trainer configured from `train.*`: arguments, precision, progress.

For the preference trainers: `training_arguments(cfg, layout, has_eval)` gives the
TrainingArguments (checkpoints in `layout.checkpoints`, LLaMA-Factory knob names mapped,
our own progress bar, no transformers reporting: tracking is `tunepipe.tracking.tracker`);
`ProgressBar` and `optimizer_for(model, cfg.train)` go to the Trainer; which checkpoint a run
resumes from is `checkpoints.py`. `session.run_session` ties them together.
"""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from tunepipe.config import Config, TrainConfig
from tunepipe.devices import liger_kernel
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.train.optimizers import custom_optimizer, optimizer_arguments

log = logging.getLogger(__name__)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def training_arguments(cfg: Config, layout: Layout, has_eval: bool, **extra):
    """TrainingArguments with LLaMA-Factory's knob names and meaning."""
    from transformers import TrainingArguments

    train = cfg.train
    eval_strategy = train.eval_strategy if has_eval else "no"
    if train.eval_strategy != "no" and not has_eval:
        raise TunepipeError(f"train.eval_strategy={train.eval_strategy!r} needs an eval split, and it is empty",
                            hint="set data.val_size or data.eval_dataset, or eval_strategy: no")
    return TrainingArguments(
        output_dir=str(layout.checkpoints),
        per_device_train_batch_size=train.per_device_train_batch_size,
        per_device_eval_batch_size=train.per_device_eval_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        learning_rate=train.learning_rate,
        num_train_epochs=train.num_train_epochs,
        max_steps=train.max_steps,
        lr_scheduler_type=train.lr_scheduler_type,
        # transformers 5 folds the ratio into warmup_steps (a float < 1 is a ratio)
        warmup_steps=train.warmup_steps if train.warmup_steps > 0 else train.warmup_ratio,
        max_grad_norm=train.max_grad_norm,
        weight_decay=train.weight_decay,
        **optimizer_arguments(train),  # optim; GaLore / APOLLO through transformers' names
        adam_beta1=train.adam_beta1,
        adam_beta2=train.adam_beta2,
        adam_epsilon=train.adam_epsilon,
        lr_scheduler_kwargs=train.scheduler_kwargs(),
        neftune_noise_alpha=train.neftune_noise_alpha,
        load_best_model_at_end=train.load_best_model_at_end and eval_strategy != "no",
        metric_for_best_model=train.metric_for_best_model or ("loss" if wants_best(train) else None),
        greater_is_better=train.greater_is_better,
        logging_first_step=train.logging_first_step,
        dataloader_drop_last=train.dataloader_drop_last,
        eval_accumulation_steps=train.eval_accumulation_steps,
        full_determinism=train.full_determinism,
        label_smoothing_factor=train.label_smoothing_factor,
        # transformers 5 replaced group_by_length with a sampling strategy of that name
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        torch_compile=False,  # train.torch_compile compiles each decoder layer instead (fast_path.py)
        tf32=tf32_setting(train),
        deepspeed=train.deepspeed,  # the Trainer fills the JSON's "auto" values from these arguments
        bf16=train.bf16_compute,
        fp16=train.fp16,
        activation_checkpointing=train.checkpointing,  # transformers 5's name for gradient_checkpointing
        activation_checkpointing_kwargs=train.checkpointing_kwargs() if train.checkpointing else None,
        logging_strategy="steps",
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=train.save_total_limit,
        eval_strategy=eval_strategy,
        eval_steps=(train.eval_steps or train.logging_steps) if eval_strategy == "steps" else None,
        seed=train.seed,
        restore_callback_states_from_checkpoint=train.restore_callback_states_from_checkpoint,
        report_to="none",  # tunepipe.tracking.tracker logs to MLflow itself
        disable_tqdm=True,  # replaced by ProgressBar
        remove_unused_columns=False,  # the collator picks its columns (seq_lens is not a forward arg)
        prediction_loss_only=True,
        include_num_input_tokens_seen="non_padding",
        ddp_find_unused_parameters=False,
        dataloader_num_workers=0,
        # without a GPU, say so: transformers refuses bf16 unless use_cpu is set
        use_cpu=not _has_gpu(),
        # Liger's RMSNorm / RoPE / SwiGLU kernels through transformers; its fused linear
        # cross-entropy stays off: tunepipe's loss already projects only trained positions.
        use_liger_kernel=liger_kernel(train),
        liger_kernel_config={"fused_linear_cross_entropy": False, "cross_entropy": False},
        **extra,
    )


def tf32_setting(train) -> bool | None:
    """`tf32` for TrainingArguments: only CUDA GPUs of the Ampere generation or newer have TF32
    (transformers refuses the flag elsewhere), so on other devices it is logged and left unset."""
    from transformers.utils import is_torch_tf32_available

    if train.tf32 is None or is_torch_tf32_available():
        return train.tf32
    log.warning("tf32: %s has no effect here: TF32 needs an NVIDIA Ampere or newer GPU", train.tf32)
    return None


def wants_best(train) -> bool:
    """Whether evaluations are compared (early stopping, keeping the best checkpoint)."""
    return train.early_stopping_steps is not None or train.load_best_model_at_end


def early_stopping(train) -> list:
    """transformers' EarlyStoppingCallback for `early_stopping_steps` (LLaMA-Factory's key: the
    number of evaluations without improvement), else nothing."""
    if train.early_stopping_steps is None:
        return []
    from transformers import EarlyStoppingCallback

    return [EarlyStoppingCallback(early_stopping_patience=train.early_stopping_steps)]


# ---------------------------------------------------------------------------- progress


class ProgressBar(TrainerCallback):
    """One tqdm bar over optimizer steps, showing the last loss and real tokens/s.

    Replaces transformers' bar + dict printer, so the log shows one line that updates."""

    def __init__(self):
        self.bar = None
        self.tokens_at_start = 0  # tokens seen before this session (a resumed run's)
        self._tokens = 0
        self._clock = 0.0
        self._postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        if state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="train",
                            unit="step", dynamic_ncols=True)
        self.tokens_at_start = state.num_input_tokens_seen
        self._tokens, self._clock = state.num_input_tokens_seen, time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_evaluate(self, args, state, control, **kwargs):
        self._restart_clock(state)  # evaluation and checkpoint writing are not training time

    def on_save(self, args, state, control, **kwargs):
        self._restart_clock(state)

    def _restart_clock(self, state) -> None:
        self._tokens, self._clock = state.num_input_tokens_seen, time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is None or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        postfix = self._postfix
        if "loss" in logs:
            postfix["loss"] = f"{logs['loss']:.4f}"
            if now > self._clock and tokens > self._tokens:
                postfix["tok/s"] = f"{(tokens - self._tokens) / (now - self._clock):.0f}"
            self._tokens, self._clock = tokens, now
        if "eval_loss" in logs:
            postfix["eval_loss"] = f"{logs['eval_loss']:.4f}"
        self.bar.set_postfix(postfix, refresh=True)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def optimizer_for(model, train: TrainConfig):
    """A LoRA+, BAdam, Adam-mini or Muon optimizer when asked for, else None (the Trainer builds one)."""
    if train.loraplus_lr_ratio is None:
        return custom_optimizer(model, train)
    if train.finetuning_type != "lora":
        raise TunepipeError(f"train.loraplus_lr_ratio needs finetuning_type lora, not {train.finetuning_type!r}")
    from tunepipe.train.model.adapters import loraplus_optimizer

    return loraplus_optimizer(model, train)

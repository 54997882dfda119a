"""The `train` group: objective, fine-tuning method, PEFT, optimizer and Trainer knobs.

Field names are LLaMA-Factory's; each field's docstring feeds the generated key reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from tunepipe.config.checks import require
from tunepipe.errors import TunepipeError


@dataclass
class TrainConfig:
    stage: Literal["sft", "pt", "dpo", "kto", "rm"] = "sft"
    """Objective: sft, pt (continued pretraining), dpo (with pref_loss), kto, rm."""
    do_train: bool = True
    """Accepted for LLaMA-Factory compatibility; the train stage always trains."""
    finetuning_type: Literal["lora", "freeze", "full"] = "lora"
    """Which parameters train: LoRA adapters, the last layers (freeze) or all (full)."""
    output_dir: str = "saves/run"
    """Where `tunepipe train` writes everything (the DVC pipeline uses fixed paths)."""
    overwrite_output_dir: bool = False
    """Allow writing into a non-empty output_dir / export_dir."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: Optional[int] = None
    """LoRA scaling alpha; unset means 2 x lora_rank."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input."""
    lora_target: Union[str, list[str]] = "all"
    """Modules that get LoRA: `all` (every linear layer except the output head) or names."""
    additional_target: Optional[Union[str, list[str]]] = None
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA scaling (alpha / sqrt(r))."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA)."""
    pissa_init: bool = False
    """Initialise LoRA from the principal singular vectors (PiSSA)."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+: learning-rate ratio of the B matrices to the A matrices."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N layers (negative: the first N)."""
    freeze_trainable_modules: Union[str, list[str]] = "all"
    """freeze: module names inside the trainable layers, or all."""
    freeze_vision_tower: bool = True
    """Vision-language models: keep the vision encoder frozen (LoRA never wraps it while frozen)."""
    freeze_multi_modal_projector: bool = True
    """Vision-language models: keep the projector from vision features to the language model frozen."""
    freeze_language_model: bool = False
    """Vision-language models: keep the language model frozen (train only the unfrozen vision parts)."""
    per_device_train_batch_size: int = 1
    """Rows per device per micro-batch."""
    gradient_accumulation_steps: int = 8
    """Micro-batches per optimizer step."""
    learning_rate: float = 1.0e-4
    """Peak learning rate."""
    num_train_epochs: float = 3.0
    """Epochs (ignored when max_steps > 0)."""
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: use num_train_epochs)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup",
                               "cosine_with_restarts", "polynomial", "inverse_sqrt"] = "cosine"
    """Learning-rate schedule."""
    warmup_ratio: float = 0.0
    """Fraction of steps for linear warm-up."""
    warmup_steps: int = 0
    """Warm-up steps (overrides warmup_ratio when > 0)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    optim: str = "adamw_torch"
    """transformers optimizer name."""
    adam_beta1: float = 0.9
    """Adam / AdamW beta1."""
    adam_beta2: float = 0.999
    """Adam / AdamW beta2."""
    adam_epsilon: float = 1.0e-8
    """Adam / AdamW epsilon."""
    lr_scheduler_kwargs: Optional[Union[dict, str]] = None
    """Extra arguments of the learning-rate schedule (a mapping, or its JSON text), e.g. {"num_cycles": 2}."""
    neftune_noise_alpha: Optional[float] = None
    """NEFTune: uniform noise of this scale added to the input embeddings while training (not in eval)."""
    early_stopping_steps: Optional[int] = None
    """Stop when the eval metric has not improved for this many evaluations (needs an eval split)."""
    load_best_model_at_end: bool = False
    """Keep the checkpoint with the best eval metric as the trained output, not the last step's."""
    metric_for_best_model: Optional[str] = None
    """Eval metric that picks the best checkpoint (default: eval loss)."""
    greater_is_better: Optional[bool] = None
    """Whether a larger metric_for_best_model is better (default: false for a loss)."""
    logging_first_step: bool = False
    """Log the first optimizer step too."""
    dataloader_drop_last: bool = False
    """Drop the last incomplete micro-batch of each epoch."""
    eval_accumulation_steps: Optional[int] = None
    """Eval batches gathered before moving predictions off the device."""
    full_determinism: bool = False
    """Deterministic algorithms everywhere (torch.use_deterministic_algorithms); slower."""
    bf16: bool = False
    """Train with bfloat16 autocast."""
    pure_bf16: bool = False
    """Store the frozen weights in bfloat16 (trained ones stay float32) and train with bf16 autocast."""
    fp16: bool = False
    """Train with float16 autocast (needs a GPU)."""
    enable_liger_kernel: bool = False
    """Liger's Triton kernels (RMSNorm, RoPE, SwiGLU) on a CUDA GPU; without one, a warning and training goes on."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    logging_steps: int = 10
    """Log loss / lr / grad norm every N optimizer steps."""
    save_steps: int = 500
    """Write a checkpoint every N optimizer steps."""
    save_total_limit: Optional[int] = None
    """Keep at most N checkpoints."""
    eval_strategy: Literal["no", "steps", "epoch"] = "no"
    """When to compute eval loss on the val split during training."""
    eval_steps: Optional[int] = None
    """Eval every N steps when eval_strategy is steps (default: logging_steps)."""
    per_device_eval_batch_size: int = 1
    """Rows per device per eval batch."""
    seed: int = 42
    """Training seed (data order, LoRA init, dropout)."""
    plot_loss: bool = False
    """Write training_loss.png."""
    resume_from_checkpoint: Optional[Union[bool, str]] = None
    """Resume from a checkpoint dir; by default the newest intact checkpoint of this run is used."""
    restore_callback_states_from_checkpoint: bool = False
    """Restore callback states (e.g. early stopping) when resuming."""
    num_processes: int = 1
    """Processes to launch (torchrun / accelerate), all machines together; 1 trains in-process."""
    accelerate_config: Optional[str] = None
    """accelerate config file (FSDP / DeepSpeed), e.g. configs/accelerate/fsdp.yaml."""
    deepspeed: Optional[str] = None
    """DeepSpeed JSON config, as LLaMA-Factory takes it (e.g. its examples/deepspeed/ds_z3_config.json), run in train.num_processes processes."""
    num_machines: int = 1
    """Machines (nodes) of a multi-node run; num_processes counts the processes of all of them."""
    machine_rank: int = 0
    """This machine's rank in a multi-node run (0 prepares the data and writes the outputs)."""
    main_process_ip: Optional[str] = None
    """Address of machine 0, where the processes meet (needed when num_machines > 1)."""
    main_process_port: int = 29500
    """Port on machine 0 where the processes meet."""
    pref_beta: float = 0.1
    """Preference temperature beta (DPO / ORPO / SimPO / KTO)."""
    pref_ftx: float = 0.0
    """Weight of the SFT loss mixed into preference training."""
    pref_loss: Literal["sigmoid", "hinge", "ipo", "orpo", "simpo"] = "sigmoid"
    """Preference loss for stage dpo."""
    simpo_gamma: float = 0.5
    """SimPO target reward margin."""
    dpo_label_smoothing: float = 0.0
    """Robust DPO label smoothing in [0, 0.5)."""
    precompute_ref_log_probs: bool = False
    """Full fine-tune DPO: compute reference log-probs once and cache them beside the shards."""
    kto_chosen_weight: float = 1.0
    """KTO weight of desirable examples."""
    kto_rejected_weight: float = 1.0
    """KTO weight of undesirable examples."""

    def check(self) -> None:
        for key in ("lora_rank", "per_device_train_batch_size", "gradient_accumulation_steps",
                    "logging_steps", "save_steps", "per_device_eval_batch_size", "num_processes"):
            value = getattr(self, key)
            require(value >= 1, "train", key, value, "must be >= 1")
        require(self.learning_rate > 0, "train", "learning_rate", self.learning_rate, "must be > 0")
        require(self.num_train_epochs > 0 or self.max_steps > 0, "train", "num_train_epochs",
                 self.num_train_epochs, "must be > 0 unless max_steps is set")
        require(0 <= self.warmup_ratio < 1, "train", "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        require(0 <= self.lora_dropout < 1, "train", "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        require(0 <= self.dpo_label_smoothing < 0.5, "train", "dpo_label_smoothing",
                 self.dpo_label_smoothing, "must be in [0, 0.5)")
        require(self.max_grad_norm >= 0, "train", "max_grad_norm", self.max_grad_norm, "must be >= 0")
        require(not (self.bf16 and self.fp16), "train", "fp16", self.fp16, "bf16 and fp16 are exclusive")
        require(not (self.pure_bf16 and self.fp16), "train", "fp16", self.fp16, "pure_bf16 and fp16 are exclusive")
        require(self.save_total_limit is None or self.save_total_limit >= 1, "train",
                 "save_total_limit", self.save_total_limit, "must be >= 1")
        self._check_optimizer_and_best()
        require(not (self.deepspeed and self.accelerate_config), "train", "deepspeed", self.deepspeed,
                 "give a DeepSpeed JSON or an accelerate config (train.accelerate_config), not both")
        self._check_machines()

    def _check_optimizer_and_best(self) -> None:
        for key in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, key) < 1, "train", key, getattr(self, key), "must be in [0, 1)")
        require(self.adam_epsilon > 0, "train", "adam_epsilon", self.adam_epsilon, "must be > 0")
        require(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, "train",
                 "neftune_noise_alpha", self.neftune_noise_alpha, "must be > 0")
        require(self.early_stopping_steps is None or self.early_stopping_steps >= 1, "train",
                 "early_stopping_steps", self.early_stopping_steps, "must be >= 1")
        require(self.eval_accumulation_steps is None or self.eval_accumulation_steps >= 1, "train",
                 "eval_accumulation_steps", self.eval_accumulation_steps, "must be >= 1")
        wants_eval = self.early_stopping_steps is not None or self.load_best_model_at_end
        require(not wants_eval or self.eval_strategy != "no", "train", "eval_strategy", self.eval_strategy,
                 "early_stopping_steps / load_best_model_at_end compare evaluations: set eval_strategy: steps")
        require(not self.load_best_model_at_end or self.eval_strategy == "steps", "train", "eval_strategy",
                 self.eval_strategy, "load_best_model_at_end keeps an evaluated checkpoint, and checkpoints are "
                 "written every save_steps: set eval_strategy: steps")
        require(not self.load_best_model_at_end
                 or self.save_steps % (self.eval_steps or self.logging_steps) == 0, "train", "save_steps",
                 self.save_steps, "load_best_model_at_end keeps an evaluated checkpoint: save_steps must be a "
                 "multiple of eval_steps")

    def scheduler_kwargs(self) -> dict:
        """`lr_scheduler_kwargs` as a mapping (LLaMA-Factory also takes its JSON text)."""
        value = self.lr_scheduler_kwargs
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
            if not isinstance(value, dict):
                raise TunepipeError(f"train.lr_scheduler_kwargs={self.lr_scheduler_kwargs!r}: "
                                    "must be a mapping or its JSON text")
        return dict(value or {})

    def _check_machines(self) -> None:
        require(self.num_machines >= 1, "train", "num_machines", self.num_machines, "must be >= 1")
        require(0 <= self.machine_rank < self.num_machines, "train", "machine_rank", self.machine_rank,
                 f"must be in 0..{self.num_machines - 1} (num_machines={self.num_machines})")
        require(self.num_processes % self.num_machines == 0, "train", "num_processes", self.num_processes,
                 f"counts the processes of all {self.num_machines} machines: a multiple of num_machines")
        require(self.num_machines == 1 or bool(self.main_process_ip), "train", "main_process_ip",
                 self.main_process_ip, "a multi-node run needs the address of machine 0")
        require(1 <= self.main_process_port <= 65535, "train", "main_process_port",
                 self.main_process_port, "must be a TCP port")

    @property
    def bf16_compute(self) -> bool:
        """bf16 autocast: `bf16`, or `pure_bf16` (which also stores the frozen weights in bf16)."""
        return self.bf16 or self.pure_bf16

    @property
    def alpha(self) -> int:
        """lora_alpha with LLaMA-Factory's default of twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank

"""The `train` group: objective, fine-tuning method, PEFT, optimizer and Trainer knobs.

Field names are LLaMA-Factory's; each field's docstring feeds the generated key reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

from tunepipe.config.checks import mapping_value, name_list, require
from tunepipe.config.train_checks import check_checkpointing, check_fsdp, check_ray, check_sft_losses


@dataclass
class TrainConfig:
    stage: Literal["sft", "pt", "dpo", "kto", "rm", "grpo"] = "sft"
    """Objective: sft, pt (continued pretraining), dpo (with pref_loss), kto, rm, grpo (online RL)."""
    do_train: bool = True
    """Accepted for LLaMA-Factory compatibility; the train stage always trains."""
    finetuning_type: Literal["lora", "oft", "freeze", "full"] = "lora"
    """Which parameters train: LoRA adapters, OFT adapters (orthogonal fine-tuning), the last layers (freeze) or all (full)."""
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
    pissa_iter: int = 16
    """PiSSA: iterations of the fast randomized SVD (PEFT's `pissa_niter_K`); -1 runs the full SVD."""
    pissa_convert: bool = False
    """PiSSA: save the adapter converted to plain LoRA on the original base; tunepipe always does (false converts too)."""
    loraplus_lr_ratio: Optional[float] = None
    """LoRA+: learning-rate ratio of the B matrices to the A matrices."""
    loraplus_lr_embedding: float = 1.0e-6
    """LoRA+: learning rate of the LoRA matrices of embedding layers (lora_target naming embed_tokens)."""
    create_new_adapter: bool = False
    """With model.adapter_name_or_path: merge those adapters into the base and train a new adapter on top."""
    oft_rank: int = 0
    """OFT: blocks per adapted layer (0: derived from oft_block_size; give one of the two)."""
    oft_block_size: int = 32
    """OFT: size of each orthogonal block (0: derived from oft_rank)."""
    oft_target: Union[str, list[str]] = "all"
    """Modules that get OFT: `all` (every linear layer except the output head) or names."""
    module_dropout: float = 0.0
    """OFT: probability of setting a block to the identity while training (multiplicative dropout)."""
    freeze_trainable_layers: int = 2
    """freeze: train the last N layers (negative: the first N)."""
    freeze_trainable_modules: Union[str, list[str]] = "all"
    """freeze: module names inside the trainable layers, or all."""
    freeze_extra_modules: Optional[Union[str, list[str]]] = None
    """freeze: modules outside the decoder layers that train too (e.g. embed_tokens, norm, lm_head)."""
    use_llama_pro: bool = False
    """LLaMA Pro: train only the expanded blocks (every n-th layer, n = layers / freeze_trainable_layers), with freeze or LoRA / OFT."""
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
    fused_optimizer: bool = True
    """optim adamw_torch runs as torch's fused AdamW kernel (same update, less per-tensor overhead); not under DeepSpeed / accelerate_config."""
    fused_lora: bool = True
    """LoRA layers sharing an input (q/k/v, gate/up) run one A matmul, scaling + add fold into B's GEMM (same numbers); not with torch_compile, DeepSpeed, accelerate_config."""
    adam_beta1: float = 0.9
    """Adam / AdamW beta1."""
    adam_beta2: float = 0.999
    """Adam / AdamW beta2."""
    adam_epsilon: float = 1.0e-8
    """Adam / AdamW epsilon."""
    use_galore: bool = False
    """GaLore: project the gradients of the target linear weights to a low rank (full / freeze tuning)."""
    galore_target: Union[str, list[str]] = "all"
    """GaLore: linear modules whose weights get the projection (`all`: every linear layer but the output head)."""
    galore_rank: int = 16
    """GaLore: rank of the gradient projection."""
    galore_update_interval: int = 200
    """GaLore: optimizer steps between recomputing the projection."""
    galore_scale: float = 2.0
    """GaLore: scale of the projected update."""
    galore_proj_type: Literal["std", "reverse_std", "right", "left", "full"] = "std"
    """GaLore: which side the gradient is projected on."""
    galore_layerwise: bool = False
    """GaLore: step each weight as soon as its gradient is ready (needs gradient_accumulation_steps 1)."""
    use_apollo: bool = False
    """APOLLO: AdamW with learning-rate scaling estimated in a low-rank space (full / freeze tuning)."""
    apollo_target: Union[str, list[str]] = "all"
    """APOLLO: linear modules whose weights get the projection (`all`: every linear layer but the output head)."""
    apollo_rank: int = 16
    """APOLLO: rank of the auxiliary space."""
    apollo_update_interval: int = 200
    """APOLLO: optimizer steps between new projections."""
    apollo_scale: float = 32.0
    """APOLLO: scale of the update."""
    apollo_proj: Literal["svd", "random"] = "random"
    """APOLLO: projection kind."""
    apollo_proj_type: Literal["std", "right", "left"] = "std"
    """APOLLO: which side the gradient is projected on."""
    apollo_scale_type: Literal["channel", "tensor"] = "channel"
    """APOLLO: scaling per channel or per tensor."""
    apollo_layerwise: bool = False
    """APOLLO: step each weight as soon as its gradient is ready (needs gradient_accumulation_steps 1)."""
    use_badam: bool = False
    """BAdam: block coordinate descent, Adam on one block of the model at a time (full tuning)."""
    badam_mode: Literal["layer", "ratio"] = "layer"
    """BAdam: switch whole layers (layer) or update a random share of each weight (ratio)."""
    badam_start_block: Optional[int] = None
    """BAdam layer mode: the first block to train (unset: by badam_switch_mode)."""
    badam_switch_mode: Literal["ascending", "descending", "random", "fixed"] = "ascending"
    """BAdam layer mode: order in which blocks take turns."""
    badam_switch_interval: int = 50
    """BAdam: optimizer steps before moving to the next block (ratio mode: before a new mask)."""
    badam_update_ratio: float = 0.05
    """BAdam ratio mode: share of each weight updated."""
    badam_mask_mode: Literal["adjacent", "scatter"] = "adjacent"
    """BAdam ratio mode: updated entries adjacent or scattered."""
    badam_verbose: int = 0
    """BAdam: 0 quiet, 1 block switches, 2 also the trainable parameters."""
    use_adam_mini: bool = False
    """Adam-mini: Adam with one second-moment value per parameter block (less optimizer memory)."""
    use_muon: bool = False
    """Muon (torch.optim.Muon) on the hidden 2-D weights, AdamW on embeddings, head, norms and biases."""
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
    label_smoothing_factor: float = 0.0
    """sft / pt: smooth the next-token targets, (1 - eps) one-hot + eps uniform (transformers' LabelSmoother)."""
    group_by_length: bool = False
    """Draw training rows in groups of similar length (transformers' LengthGroupedSampler)."""
    torch_compile: bool = False
    """Compile each decoder layer with torch.compile (regional: one layer's code compiled once, reused by every layer)."""
    tf32: Optional[bool] = None
    """TF32 matmuls on NVIDIA Ampere or newer GPUs (unset: PyTorch's default); no effect without such a GPU."""
    use_dft_loss: bool = False
    """sft / pt: Dynamic Fine-Tuning loss, each token's cross-entropy weighted by its detached probability."""
    use_eaft_loss: bool = False
    """sft / pt: Entropy-Adaptive Fine-Tuning loss, each token's cross-entropy weighted by (top-20 entropy / 3) ** eaft_alpha, detached."""
    eaft_alpha: float = 1.0
    """EAFT: power of the entropy weight (0 gives plain cross-entropy)."""
    use_asft_loss: bool = False
    """sft / pt: Anchored SFT, the DFT loss + asft_alpha x KL(reference || model) per trained token (reference: the base, or ref_model)."""
    asft_alpha: float = 0.1
    """ASFT: weight of the KL anchor to the reference model."""
    moe_aux_loss_coef: Optional[float] = None
    """Mixture-of-experts models: add this weight x the router load-balancing loss to the sft / pt loss."""
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
    disable_gradient_checkpointing: Optional[bool] = None
    """LLaMA-Factory's inverse of gradient_checkpointing: false turns checkpointing on, true off (unset: gradient_checkpointing decides)."""
    use_reentrant_gc: bool = False
    """Checkpointing: torch's reentrant (true) or non-reentrant (false) variant; LLaMA-Factory's default is true."""
    gradient_checkpointing_kwargs: Optional[dict] = None
    """Checkpointing: keyword arguments of torch.utils.checkpoint.checkpoint (e.g. use_reentrant: false); they win over use_reentrant_gc."""
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
    fsdp: Optional[Union[str, list[str]]] = None
    """transformers' FSDP options (full_shard or shard_grad_op, auto_wrap, offload), run as accelerate FSDP2 in num_processes processes."""
    fsdp_transformer_layer_cls_to_wrap: Optional[Union[str, list[str]]] = None
    """With fsdp: the decoder layer class(es) each wrapped as one unit (default: the model's _no_split_modules)."""
    deepspeed: Optional[str] = None
    """DeepSpeed JSON config, as LLaMA-Factory takes it (e.g. its examples/deepspeed/ds_z3_config.json), run in train.num_processes processes (one: in this process, no launcher)."""
    num_machines: int = 1
    """Machines (nodes) of a multi-node run; num_processes counts the processes of all of them."""
    machine_rank: int = 0
    """This machine's rank in a multi-node run (0 prepares the data and writes the outputs)."""
    main_process_ip: Optional[str] = None
    """Address of machine 0, where the processes meet (needed when num_machines > 1)."""
    main_process_port: int = 29500
    """Port on machine 0 where the processes meet."""
    ray_num_workers: int = 1
    """Ray Train workers for the train step; > 1 runs it under Ray Train's TorchTrainer (see ray_init_kwargs)."""
    resources_per_worker: Optional[Union[dict, str]] = None
    """Ray resources of each worker (a mapping or its JSON text); unset: {"GPU": 1} on a cluster with GPUs, else {"CPU": 1}."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on the cluster's nodes (Ray Train's ScalingConfig)."""
    ray_storage_path: str = "./saves"
    """Where Ray Train writes its run (its checkpoints, as reported at each save); shared storage on several nodes."""
    ray_run_name: Optional[str] = None
    """Name of the Ray Train run: its folder under ray_storage_path (unset: Ray names it)."""
    ray_init_kwargs: Optional[Union[dict, str]] = None
    """Arguments of ray.init (a mapping or its JSON text), e.g. {"address": "auto"} to join a `ray start` cluster."""
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
    ref_model: Optional[str] = None
    """DPO / KTO reference: a separate model (local dir or Hub repo id) instead of the policy's base."""
    ref_model_adapters: Optional[Union[str, list[str]]] = None
    """Adapters merged into ref_model, in order (dirs, output_dirs or Hub repo ids)."""
    ref_model_quantization_bit: Optional[int] = None
    """Load ref_model in 4 or 8 bits (bitsandbytes)."""
    ld_alpha: Optional[float] = None
    """LD-DPO: weight of the policy's answer tokens past the shorter answer of each pair (in [0, 1])."""
    pref_bco_weight: float = 0.0
    """Weight w of a BCO term mixed into DPO / hinge / IPO: (loss + w * BCO) / (1 + w)."""
    kto_chosen_weight: float = 1.0
    """KTO weight of desirable examples."""
    kto_rejected_weight: float = 1.0
    """KTO weight of undesirable examples."""
    reward_funcs: Optional[Union[str, list[str]]] = None
    """grpo: rewards, each a built-in name, `configs/rewards/FILE.py:function`, or a `stage: rm` output dir."""
    reward_weights: Optional[list[float]] = None
    """grpo: weight of each reward in `reward_funcs` (default: 1 each)."""
    num_generations: int = 8
    """grpo: completions sampled per prompt (the group whose rewards are compared)."""
    max_completion_length: int = 256
    """grpo: most tokens generated per completion."""
    beta: float = 0.0
    """grpo: KL coefficient against the reference (the base; 0 skips the reference forward)."""
    epsilon: float = 0.2
    """grpo: clipping range of the policy ratio."""
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = "dapo"
    """grpo: how per-token losses are averaged (TRL's loss_type)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """grpo: divide advantages by the reward std of the group, the batch, or not at all."""
    rl_temperature: float = 1.0
    """grpo: sampling temperature of the completions (TRL's `temperature`; the flat `temperature` key is eval's)."""
    use_vllm: bool = False
    """grpo: generate with vLLM (CUDA only, vllm installed) instead of transformers."""

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
        self._check_peft_methods()
        require(0 <= self.dpo_label_smoothing < 0.5, "train", "dpo_label_smoothing",
                 self.dpo_label_smoothing, "must be in [0, 0.5)")
        require(self.max_grad_norm >= 0, "train", "max_grad_norm", self.max_grad_norm, "must be >= 0")
        require(not (self.bf16 and self.fp16), "train", "fp16", self.fp16, "bf16 and fp16 are exclusive")
        require(not (self.pure_bf16 and self.fp16), "train", "fp16", self.fp16, "pure_bf16 and fp16 are exclusive")
        require(self.save_total_limit is None or self.save_total_limit >= 1, "train",
                 "save_total_limit", self.save_total_limit, "must be >= 1")
        self._check_optimizer_and_best()
        self._check_grpo()
        self._check_optimizer_choice()
        require(0 <= self.label_smoothing_factor < 1, "train", "label_smoothing_factor",
                 self.label_smoothing_factor, "must be in [0, 1)")
        for key in ("label_smoothing_factor", "group_by_length"):
            require(not getattr(self, key) or self.stage in ("sft", "pt"), "train", key, getattr(self, key),
                     f"applies to the next-token stages (sft, pt), not stage {self.stage}")
        check_sft_losses(self)
        check_checkpointing(self)
        require(not (self.deepspeed and self.accelerate_config), "train", "deepspeed", self.deepspeed,
                 "give a DeepSpeed JSON or an accelerate config (train.accelerate_config), not both")
        self._check_machines()
        check_fsdp(self)

    def _check_peft_methods(self) -> None:
        require(0 <= self.module_dropout < 1, "train", "module_dropout", self.module_dropout, "must be in [0, 1)")
        require(self.oft_rank >= 0 and self.oft_block_size >= 0, "train", "oft_rank", self.oft_rank,
                 "oft_rank and oft_block_size must be >= 0")
        require(self.finetuning_type != "oft" or (self.oft_rank == 0) != (self.oft_block_size == 0), "train",
                 "oft_block_size", self.oft_block_size,
                 "OFT takes one of oft_rank / oft_block_size (rank x block size = layer width): set the other to 0")
        require(self.pissa_iter == -1 or self.pissa_iter >= 1, "train", "pissa_iter", self.pissa_iter,
                 "must be >= 1, or -1 for the full SVD")
        require(self.loraplus_lr_embedding > 0, "train", "loraplus_lr_embedding", self.loraplus_lr_embedding,
                 "must be > 0")
        require(not self.use_llama_pro or self.finetuning_type != "full", "train", "use_llama_pro",
                 self.use_llama_pro, "trains the expanded blocks only: use finetuning_type freeze, lora or oft")
        require(not self.freeze_extra_modules or self.finetuning_type == "freeze", "train", "freeze_extra_modules",
                 self.freeze_extra_modules, "is for finetuning_type freeze; with lora / oft use additional_target")
        require(not self.use_llama_pro or self.freeze_trainable_layers > 0, "train", "freeze_trainable_layers",
                 self.freeze_trainable_layers, "with use_llama_pro it counts the expanded blocks: must be > 0")

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed: gradient_checkpointing, or disable_gradient_checkpointing false."""
        if self.disable_gradient_checkpointing is not None:
            return not self.disable_gradient_checkpointing
        return self.gradient_checkpointing

    def checkpointing_kwargs(self) -> dict:
        """torch.utils.checkpoint.checkpoint's kwargs: use_reentrant_gc, then gradient_checkpointing_kwargs
        over it (LLaMA-Factory's Trainer call, which passes the latter, comes last)."""
        return {"use_reentrant": self.use_reentrant_gc, **(self.gradient_checkpointing_kwargs or {})}

    @property
    def uses_adapter(self) -> bool:
        """Whether training writes a PEFT adapter (LoRA or OFT) rather than whole weights."""
        return self.finetuning_type in ("lora", "oft")

    def _check_grpo(self) -> None:
        if self.stage != "grpo":
            return
        require(bool(self.reward_list()), "train", "reward_funcs", self.reward_funcs,
                "stage grpo needs at least one reward (a built-in, configs/rewards/FILE.py:function, or an rm dir)")
        require(self.num_generations >= 2, "train", "num_generations", self.num_generations,
                "must be >= 2: GRPO compares the completions of one prompt with each other")
        require(self.max_completion_length >= 1, "train", "max_completion_length", self.max_completion_length,
                "must be >= 1")
        require(self.rl_temperature > 0, "train", "rl_temperature", self.rl_temperature, "must be > 0")
        require(self.beta >= 0 and self.epsilon > 0, "train", "beta" if self.beta < 0 else "epsilon",
                self.beta if self.beta < 0 else self.epsilon, "beta must be >= 0 and epsilon > 0")
        weights = self.reward_weights
        require(weights is None or len(weights) == len(self.reward_list()), "train", "reward_weights", weights,
                f"needs one weight per reward ({len(self.reward_list())} in reward_funcs)")

    def reward_list(self) -> list[str]:
        """`reward_funcs` as a list (a comma-separated string is accepted, as for lora_target)."""
        return name_list(self.reward_funcs)

    def _check_optimizer_and_best(self) -> None:
        for key in ("adam_beta1", "adam_beta2"):
            require(0 <= getattr(self, key) < 1, "train", key, getattr(self, key), "must be in [0, 1)")
        require(self.adam_epsilon > 0, "train", "adam_epsilon", self.adam_epsilon, "must be > 0")
        require(self.ref_model_quantization_bit in (None, 4, 8), "train", "ref_model_quantization_bit",
                 self.ref_model_quantization_bit, "must be 4 or 8")
        require(self.ref_model_adapters is None or bool(self.ref_model), "train", "ref_model_adapters",
                 self.ref_model_adapters, "adapters of a reference model need train.ref_model")
        require(self.ld_alpha is None or 0 <= self.ld_alpha <= 1, "train", "ld_alpha", self.ld_alpha,
                 "must be in [0, 1]")
        require(self.pref_bco_weight >= 0, "train", "pref_bco_weight", self.pref_bco_weight, "must be >= 0")
        require(self.moe_aux_loss_coef is None or self.moe_aux_loss_coef >= 0, "train", "moe_aux_loss_coef",
                 self.moe_aux_loss_coef, "must be >= 0")
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

    def _check_optimizer_choice(self) -> None:
        chosen = [key for key in ("use_galore", "use_apollo", "use_badam", "use_adam_mini", "use_muon")
                  if getattr(self, key)] + (["loraplus_lr_ratio"] if self.loraplus_lr_ratio is not None else [])
        require(len(chosen) <= 1, "train", chosen[-1] if chosen else "optim", True,
                 f"{' and '.join(chosen)} each pick the optimizer: keep one")
        for key in ("use_galore", "use_apollo"):
            require(not getattr(self, key) or self.finetuning_type != "lora", "train", key, True,
                     "projects the gradients of the model's own weights: use finetuning_type full or freeze, "
                     "not lora (as in LLaMA-Factory)")
        require(not self.use_badam or self.finetuning_type == "full", "train", "use_badam", True,
                 "BAdam switches blocks of the whole model: use finetuning_type full")
        for key in ("galore_layerwise", "apollo_layerwise"):
            require(not getattr(self, key) or self.gradient_accumulation_steps == 1, "train", key, True,
                     "steps each weight during backward: set gradient_accumulation_steps: 1")
        for key in ("galore_rank", "apollo_rank", "galore_update_interval", "apollo_update_interval",
                    "badam_switch_interval"):
            require(getattr(self, key) >= 1, "train", key, getattr(self, key), "must be >= 1")
        require(0 < self.badam_update_ratio <= 1, "train", "badam_update_ratio", self.badam_update_ratio,
                 "must be in (0, 1]")

    def scheduler_kwargs(self) -> dict:
        """`lr_scheduler_kwargs` as a mapping (LLaMA-Factory also takes its JSON text)."""
        return mapping_value(self.lr_scheduler_kwargs, "lr_scheduler_kwargs")

    def fsdp_options(self) -> list[str]:
        """`fsdp` as a list (transformers also takes one space-separated string)."""
        return self.fsdp.split() if isinstance(self.fsdp, str) else list(self.fsdp or [])

    def _check_machines(self) -> None:
        check_ray(self)
        require(self.num_machines >= 1, "train", "num_machines", self.num_machines, "must be >= 1")
        require(0 <= self.machine_rank < self.num_machines, "train", "machine_rank", self.machine_rank,
                 f"must be in 0..{self.num_machines - 1} (num_machines={self.num_machines})")
        require(self.num_processes % self.num_machines == 0, "train", "num_processes", self.num_processes,
                 f"counts the processes of all {self.num_machines} machines: a multiple of num_machines")
        require(self.num_machines == 1 or bool(self.main_process_ip), "train", "main_process_ip",
                 self.main_process_ip, "a multi-node run needs the address of machine 0")
        require(1 <= self.main_process_port <= 65535, "train", "main_process_port",
                 self.main_process_port, "must be a TCP port")

    def ray_init_settings(self) -> dict:
        """`ray_init_kwargs` as a mapping (LLaMA-Factory also takes its JSON text)."""
        return mapping_value(self.ray_init_kwargs, "ray_init_kwargs")

    def ray_resources(self) -> dict:
        """`resources_per_worker` as a mapping; empty when unset (the cluster's devices decide)."""
        return mapping_value(self.resources_per_worker, "resources_per_worker")

    @property
    def bf16_compute(self) -> bool:
        """bf16 autocast: `bf16`, or `pure_bf16` (which also stores the frozen weights in bf16)."""
        return self.bf16 or self.pure_bf16

    @property
    def alpha(self) -> int:
        """lora_alpha with LLaMA-Factory's default of twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


"""Typed configuration: one small dataclass per params.yaml group.

Field names are LLaMA-Factory's wherever LLaMA-Factory has the knob, so a flat
LLaMA-Factory YAML maps onto these groups key by key (see `config_loader`).
Each field carries a one-line docstring (the string right after it); the README's
configuration reference is generated from them. Ranges and cross-field rules live
in `check()` beside the fields; types are checked generically by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Literal, Optional, Union

from tunepipe.errors import TunepipeError

DEFAULT_MODEL = "smollm2-135m-instruct"
# The date templates render unless data.template_date says otherwise: the date Llama 3.1's own
# chat template falls back to when it has no clock, so a pipeline is reproducible by default.
DEFAULT_TEMPLATE_DATE = "2024-07-26"


# Keys whose values are credentials: never tracked, dumped, logged or shown in an error.
SECRET_KEYS = frozenset({"model.hf_hub_token"})


def shown_value(where: str, value) -> str:
    """`value` as an error message may show it: a secret key's value never is."""
    return "<hidden>" if where in SECRET_KEYS else repr(value)


def _require(ok: bool, group: str, key: str, value, why: str) -> None:
    if not ok:
        raise TunepipeError(f"{group}.{key}={value!r}: {why}")


@dataclass
class ModelConfig:
    model_name_or_path: str = DEFAULT_MODEL
    """Base model: builtin alias `smollm2-135m-instruct`, a `.gguf` file, a local HF model dir, or a Hub repo id `org/name` (downloaded through huggingface_hub's cache; see the README's "Models and data from the Hub")."""
    model_revision: str = "main"
    """Hub revision of a repo-id base model: a branch, tag or commit sha (an adapter repo id takes its own, `org/name@revision`); base_model records the commit it resolved to."""
    cache_dir: Optional[str] = None
    """Where Hub downloads are cached; unset: huggingface_hub's cache (`HF_HUB_CACHE`, else `HF_HOME/hub`)."""
    hf_hub_token: Optional[str] = None
    """Hub token for private or gated repos; unset: `HF_TOKEN` or the saved `hf auth login`. Never written to any output, log or MLflow."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base model is saved and loaded in."""
    adapter_name_or_path: Optional[Union[str, list[str]]] = None
    """Adapter dir(s) or Hub repo id(s) to load on top of the base (eval, export, chat); comma-separated or a list."""
    quantization_bit: Optional[Literal[4, 8]] = None
    """Load the base in 4 or 8 bits with bitsandbytes (QLoRA)."""
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit quantization data type."""
    double_quantization: bool = True
    """Quantize the 4-bit quantization constants too."""
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = "auto"
    """Attention kernel: auto picks flash-attention varlen on GPU when installed, else SDPA run per sample; `disabled` is eager. Models that softcap attention logits (Gemma 2) use eager unless flash attention 2 runs. See [Model families](#model-families)."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code (off by default)."""
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    """`tunepipe serve` / `webchat` backend: huggingface (transformers, batched by tunepipe) or vllm (CUDA GPU with vLLM installed; not wired in yet: a clear error)."""
    vllm_maxlen: int = 4096
    """vLLM: longest prompt + answer (passed through with infer_backend: vllm)."""
    vllm_gpu_util: float = 0.7
    """vLLM: fraction of GPU memory it may take (passed through with infer_backend: vllm)."""
    vllm_enforce_eager: bool = False
    """vLLM: disable CUDA graphs (passed through with infer_backend: vllm)."""
    vllm_max_lora_rank: int = 32
    """vLLM: largest LoRA rank it serves (passed through with infer_backend: vllm)."""

    def check(self) -> None:
        _require(bool(self.model_name_or_path), "model", "model_name_or_path",
                 self.model_name_or_path, "must not be empty")
        _require(bool(self.model_revision), "model", "model_revision", self.model_revision,
                 "must name a branch, tag or commit (main by default)")

    def adapters(self) -> list[str]:
        """`adapter_name_or_path` as a list, in merge order."""
        value = self.adapter_name_or_path
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else value
        return [item.strip() for item in items if item.strip()]


@dataclass
class DataConfig:
    dataset: Union[str, list[str]] = "identity"
    """Dataset names from dataset_info.json: a list or a comma-separated string."""
    dataset_dir: str = "data"
    """Folder holding dataset_info.json and the files it names."""
    eval_dataset: Optional[Union[str, list[str]]] = None
    """Datasets used as the eval split instead of carving `val_size` out of `dataset`."""
    template: Optional[str] = None
    """Chat template: unset uses the model's own (the tokenizer's); or a LLaMA-Factory 0.9.5 name (qwen, llama3, ...)."""
    cutoff_len: int = 1024
    """Maximum tokens per sample after tokenization."""
    overlong: Literal["truncate", "drop"] = "truncate"
    """What to do with samples longer than cutoff_len."""
    max_samples: Optional[int] = None
    """Keep at most this many rows per dataset (for quick runs)."""
    val_size: float = 0.0
    """Held-out eval split: a fraction in [0, 1) or a row count >= 1."""
    split_seed: int = 42
    """Seed of the train/eval split and of interleaving."""
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = "concat"
    """How several datasets are mixed."""
    interleave_probs: Optional[Union[str, list[float]]] = None
    """Sampling probabilities for interleaving (comma-separated or a list)."""
    train_on_prompt: bool = False
    """Train on prompt tokens too (no label masking)."""
    mask_history: bool = False
    """Train only the last assistant turn of multi-turn rows."""
    packing: bool = False
    """Pack several samples into each cutoff_len row, attention kept inside each sample."""
    neat_packing: bool = False
    """LLaMA-Factory's contamination-free packing; tunepipe packing is always so (implies packing)."""
    tool_format: Optional[str] = None
    """Tool-call format: unset uses the template's own; default, qwen, llama3, mistral or glm4 with a named template."""
    on_invalid: Literal["error", "drop"] = "error"
    """Invalid rows: stop with an error, or drop them into reports/rejected.jsonl."""
    preprocessing_num_workers: Optional[int] = None
    """Tokenize worker processes; unset: every core. Never changes the shards."""
    preprocessing_batch_size: int = 1000
    """Rows per tokenize chunk (what a worker takes at a time). Never changes the shards."""
    streaming: bool = False
    """LLaMA-Factory's streaming: tunepipe always streams (bounded memory); true needs train.max_steps."""
    buffer_size: int = 16384
    """LLaMA-Factory's streaming shuffle buffer; training shuffles whole shards, so it changes nothing."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date a chat template renders (llama3's tool prompt `Today Date`, jinja `strftime_now`), YYYY-MM-DD: a declared input, never the clock, so the shards do not change from day to day."""

    def check(self) -> None:
        _require(self.preprocessing_num_workers is None or self.preprocessing_num_workers >= 1, "data",
                 "preprocessing_num_workers", self.preprocessing_num_workers, "must be >= 1 (or unset: every core)")
        _require(self.preprocessing_batch_size >= 1, "data", "preprocessing_batch_size",
                 self.preprocessing_batch_size, "must be >= 1")
        _require(self.buffer_size >= 1, "data", "buffer_size", self.buffer_size, "must be >= 1")
        _require(self.cutoff_len >= 8, "data", "cutoff_len", self.cutoff_len, "must be >= 8")
        _require(self.val_size >= 0, "data", "val_size", self.val_size, "must be >= 0")
        _require(self.val_size < 1 or float(self.val_size).is_integer(), "data", "val_size",
                 self.val_size, "a fraction must be < 1; a count must be a whole number")
        _require(self.max_samples is None or self.max_samples > 0, "data", "max_samples",
                 self.max_samples, "must be > 0")
        _require(bool(self.datasets()), "data", "dataset", self.dataset, "names no dataset")
        _require(not (self.eval_datasets() and self.val_size), "data", "val_size", self.val_size,
                 "must be 0 when eval_dataset is set (the eval split is that dataset)")
        try:
            date.fromisoformat(self.template_date)
        except ValueError:
            _require(False, "data", "template_date", self.template_date, "must be a date, YYYY-MM-DD")
        if self.neat_packing:
            self.packing = True

    def today(self) -> date:
        """`template_date` as the date templates render."""
        return date.fromisoformat(self.template_date)

    def datasets(self) -> list[str]:
        return _name_list(self.dataset)

    def eval_datasets(self) -> list[str]:
        return _name_list(self.eval_dataset)


def _name_list(value) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


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
            _require(value >= 1, "train", key, value, "must be >= 1")
        _require(self.learning_rate > 0, "train", "learning_rate", self.learning_rate, "must be > 0")
        _require(self.num_train_epochs > 0 or self.max_steps > 0, "train", "num_train_epochs",
                 self.num_train_epochs, "must be > 0 unless max_steps is set")
        _require(0 <= self.warmup_ratio < 1, "train", "warmup_ratio", self.warmup_ratio, "must be in [0, 1)")
        _require(0 <= self.lora_dropout < 1, "train", "lora_dropout", self.lora_dropout, "must be in [0, 1)")
        _require(0 <= self.dpo_label_smoothing < 0.5, "train", "dpo_label_smoothing",
                 self.dpo_label_smoothing, "must be in [0, 0.5)")
        _require(self.max_grad_norm >= 0, "train", "max_grad_norm", self.max_grad_norm, "must be >= 0")
        _require(not (self.bf16 and self.fp16), "train", "fp16", self.fp16, "bf16 and fp16 are exclusive")
        _require(not (self.pure_bf16 and self.fp16), "train", "fp16", self.fp16, "pure_bf16 and fp16 are exclusive")
        _require(self.save_total_limit is None or self.save_total_limit >= 1, "train",
                 "save_total_limit", self.save_total_limit, "must be >= 1")
        self._check_optimizer_and_best()
        _require(not (self.deepspeed and self.accelerate_config), "train", "deepspeed", self.deepspeed,
                 "give a DeepSpeed JSON or an accelerate config (train.accelerate_config), not both")
        self._check_machines()

    def _check_optimizer_and_best(self) -> None:
        for key in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, key) < 1, "train", key, getattr(self, key), "must be in [0, 1)")
        _require(self.adam_epsilon > 0, "train", "adam_epsilon", self.adam_epsilon, "must be > 0")
        _require(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, "train",
                 "neftune_noise_alpha", self.neftune_noise_alpha, "must be > 0")
        _require(self.early_stopping_steps is None or self.early_stopping_steps >= 1, "train",
                 "early_stopping_steps", self.early_stopping_steps, "must be >= 1")
        _require(self.eval_accumulation_steps is None or self.eval_accumulation_steps >= 1, "train",
                 "eval_accumulation_steps", self.eval_accumulation_steps, "must be >= 1")
        wants_eval = self.early_stopping_steps is not None or self.load_best_model_at_end
        _require(not wants_eval or self.eval_strategy != "no", "train", "eval_strategy", self.eval_strategy,
                 "early_stopping_steps / load_best_model_at_end compare evaluations: set eval_strategy: steps")
        _require(not self.load_best_model_at_end or self.eval_strategy == "steps", "train", "eval_strategy",
                 self.eval_strategy, "load_best_model_at_end keeps an evaluated checkpoint, and checkpoints are "
                 "written every save_steps: set eval_strategy: steps")
        _require(not self.load_best_model_at_end
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
        _require(self.num_machines >= 1, "train", "num_machines", self.num_machines, "must be >= 1")
        _require(0 <= self.machine_rank < self.num_machines, "train", "machine_rank", self.machine_rank,
                 f"must be in 0..{self.num_machines - 1} (num_machines={self.num_machines})")
        _require(self.num_processes % self.num_machines == 0, "train", "num_processes", self.num_processes,
                 f"counts the processes of all {self.num_machines} machines: a multiple of num_machines")
        _require(self.num_machines == 1 or bool(self.main_process_ip), "train", "main_process_ip",
                 self.main_process_ip, "a multi-node run needs the address of machine 0")
        _require(1 <= self.main_process_port <= 65535, "train", "main_process_port",
                 self.main_process_port, "must be a TCP port")

    @property
    def bf16_compute(self) -> bool:
        """bf16 autocast: `bf16`, or `pure_bf16` (which also stores the frozen weights in bf16)."""
        return self.bf16 or self.pure_bf16

    @property
    def alpha(self) -> int:
        """lora_alpha with LLaMA-Factory's default of twice the rank."""
        return self.lora_alpha if self.lora_alpha is not None else 2 * self.lora_rank


# LLaMA-Factory's `task:` values -> the lm-evaluation-harness task that runs the same benchmark.
LF_BENCHMARKS: dict[str, str] = {"mmlu_test": "mmlu", "cmmlu_test": "cmmlu", "ceval_validation": "ceval-valid"}


@dataclass
class EvalConfig:
    predict_with_generate: bool = True
    """Generate answers for the eval prompts and score them (ROUGE / BLEU)."""
    max_new_tokens: int = 64
    """Tokens generated per eval prompt."""
    do_sample: bool = False
    """Sample instead of greedy decoding."""
    temperature: float = 0.95
    """Sampling temperature (with do_sample)."""
    top_p: float = 0.7
    """Nucleus sampling mass (with do_sample)."""
    top_k: int = 50
    """Top-k sampling (with do_sample)."""
    max_predict_samples: Optional[int] = 64
    """Generate for at most this many eval prompts (unset: all)."""
    compare_base: bool = True
    """Also score the base model, so metrics show tuned vs base."""
    identity_keywords: list[str] = field(default_factory=list)
    """Words a correct identity answer contains (e.g. the new name); adds identity_accuracy."""
    tasks: list[str] = field(default_factory=list)
    """Standard benchmarks run by the benchmark stage on tuned and base: lm-evaluation-harness task or group names (`mmlu`, `arc_easy`, ...) or paths to task YAMLs in the repo (see the README's "Standard benchmarks")."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per benchmark prompt; unset: each task's own default (0 for most)."""
    limit: Optional[Union[int, float]] = None
    """Benchmark at most this many documents per task (a number below 1: that fraction); unset: all. For quick checks: published scores use every document."""
    batch_size: int = 8
    """Benchmark batch size (LLaMA-Factory's eval `batch_size`)."""
    task: Optional[str] = None
    """LLaMA-Factory's benchmark: `mmlu_test`, `cmmlu_test` or `ceval_validation`, run as the harness task mmlu, cmmlu or ceval-valid (added to `tasks`)."""
    n_shot: int = 5
    """LLaMA-Factory's few-shot count for `task` (used when num_fewshot is unset)."""
    lang: Literal["en", "zh"] = "en"
    """LLaMA-Factory's prompt language for `task`; the harness's prompts have one language per task (see docs/migrating-from-llama-factory.md)."""
    task_dir: Optional[str] = None
    """A folder of lm-evaluation-harness task YAMLs whose tasks `tasks` / `task` may name (LLaMA-Factory's folder of dataset scripts is not read: the data comes from the Hub)."""
    save_dir: Optional[str] = None
    """Also write the benchmark report to SAVE_DIR/results.json (as `llamafactory-cli eval` does)."""

    def check(self) -> None:
        _require(self.max_new_tokens >= 1, "eval", "max_new_tokens", self.max_new_tokens, "must be >= 1")
        _require(self.temperature > 0, "eval", "temperature", self.temperature, "must be > 0")
        _require(0 < self.top_p <= 1, "eval", "top_p", self.top_p, "must be in (0, 1]")
        _require(all(isinstance(t, str) and t.strip() for t in self.tasks), "eval", "tasks", self.tasks,
                 "each entry must name a task, a group or a task YAML")
        _require(self.num_fewshot is None or self.num_fewshot >= 0, "eval", "num_fewshot", self.num_fewshot,
                 "must be >= 0")
        _require(self.limit is None or self.limit > 0, "eval", "limit", self.limit, "must be > 0")
        _require(self.batch_size >= 1, "eval", "batch_size", self.batch_size, "must be >= 1")
        _require(self.n_shot >= 0, "eval", "n_shot", self.n_shot, "must be >= 0")
        _require(self.task is None or self.task in LF_BENCHMARKS, "eval", "task", self.task,
                 f"LLaMA-Factory's benchmarks are {', '.join(LF_BENCHMARKS)}; name any other "
                 "lm-evaluation-harness task in eval.tasks")


@dataclass
class ExportConfig:
    export_dir: str = "models/export"
    """Where the merged model is written."""
    export_size: Union[int, str] = 5
    """Largest shard: an integer is GB (as in LLaMA-Factory), or a string like 200MB."""
    export_device: Literal["cpu", "auto"] = "cpu"
    """Device the merge runs on."""
    export_legacy_format: bool = False
    """Accepted only as false: tunepipe writes safetensors, never pickle .bin files."""
    export_gguf: Optional[Literal["f32", "f16", "bf16", "q8_0"]] = None
    """Also write `model-<type>.gguf` for llama.cpp / Ollama beside the safetensors (the Modelfile then names it); its read-back logits are checked like the merge."""

    def check(self) -> None:
        _require(not self.export_legacy_format, "export", "export_legacy_format", True,
                 "tunepipe exports safetensors only (pickle .bin files can run code when loaded)")
        if isinstance(self.export_size, int):
            _require(self.export_size >= 1, "export", "export_size", self.export_size, "must be >= 1 (GB)")


@dataclass
class TrackingConfig:
    report_to: Literal["mlflow", "none"] = "mlflow"
    """Experiment tracker: mlflow, or none to disable tracking."""
    tracking_uri: Optional[str] = None
    """MLflow store; unset uses MLFLOW_TRACKING_URI, else sqlite:///mlflow.db."""
    experiment_name: str = "tunepipe"
    """MLflow experiment the runs go to."""
    run_name: Optional[str] = None
    """MLflow run name (default: stage-finetuning_type-time)."""

    def check(self) -> None:
        _require(bool(self.experiment_name), "tracking", "experiment_name", self.experiment_name,
                 "must not be empty")


GROUPS = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "export": ExportConfig,
    "tracking": TrackingConfig,
}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> None:
        """Per-group checks, then the rules that span groups."""
        for name in GROUPS:
            getattr(self, name).check()
        if self.data.streaming and self.train.max_steps <= 0:  # LLaMA-Factory's rule: no length to count epochs by
            raise TunepipeError("data.streaming=true needs train.max_steps > 0, as in LLaMA-Factory",
                                hint="set max_steps, or drop streaming: tunepipe streams every dataset anyway")
        if self.model.quantization_bit is not None and self.train.finetuning_type != "lora":
            raise TunepipeError(
                f"model.quantization_bit={self.model.quantization_bit} needs train.finetuning_type=lora "
                f"(got {self.train.finetuning_type!r}): quantized weights cannot be trained directly")

"""Typed configuration: one small dataclass per params.yaml group.

Field names are LLaMA-Factory's wherever LLaMA-Factory has the knob, so a flat
LLaMA-Factory YAML maps onto these groups key by key (see `loader`); the train group lives in `training`.
Each field carries a one-line docstring (the string right after it); the README's
configuration reference is generated from them. Ranges and cross-field rules live
in `check()` beside the fields; types are checked generically by the loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Literal, Optional, Union

from tunepipe.config.checks import DEFAULT_MODEL, DEFAULT_TEMPLATE_DATE, name_list, require
from tunepipe.config.training import TrainConfig
from tunepipe.errors import TunepipeError


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
    add_tokens: Optional[Union[str, list[str]]] = None
    """Plain tokens added to the tokenizer (comma-separated or a list); the embeddings grow to fit and the new rows train."""
    add_special_tokens: Optional[Union[str, list[str]]] = None
    """Special tokens added to the tokenizer (never split; comma-separated or a list); the embeddings grow to fit."""
    new_special_tokens: Optional[Union[str, list[str]]] = None
    """Older LLaMA-Factory name of add_special_tokens (its tokens are added too)."""
    new_special_tokens_config: Optional[Union[str, dict]] = None
    """Special tokens with descriptions (a YAML file or an inline mapping token -> text); overrides add_special_tokens; the descriptions feed init_special_tokens desc_init."""
    resize_vocab: bool = False
    """Resize the embeddings and LM head to the tokenizer; turned on by itself when tokens are added."""
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = "noise_init"
    """How new tokens' embedding rows start: the mean row plus Gaussian noise, or the mean of their description's tokens (optionally plus noise)."""
    quantization_bit: Optional[Literal[4, 8]] = None
    """Load the base in 4 or 8 bits with bitsandbytes (QLoRA)."""
    quantization_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit quantization data type."""
    double_quantization: bool = True
    """Quantize the 4-bit quantization constants too."""
    flash_attn: Literal["auto", "disabled", "sdpa", "fa2"] = "auto"
    """Attention kernel: auto picks flash-attention varlen on GPU when installed, else SDPA run per sample; `disabled` is eager; `fa2` where flash attention 2 cannot run warns and acts as auto (as LLaMA-Factory). Models that softcap attention logits (Gemma 2) use eager unless flash attention 2 runs. See [Model families](#model-families)."""
    trust_remote_code: bool = False
    """Allow model repos to run their own Python code (off by default)."""
    infer_backend: Literal["huggingface", "vllm"] = "huggingface"
    """`tunepipe serve` / `webchat` backend: huggingface (transformers, batched by tunepipe) or vllm (vLLM's AsyncLLMEngine on a CUDA GPU, adapters as vLLM LoRA adapters; without CUDA or vLLM: a clear error before loading)."""
    vllm_maxlen: int = 4096
    """vLLM: longest prompt + answer (vLLM's max_model_len, with infer_backend: vllm)."""
    vllm_gpu_util: float = 0.7
    """vLLM: fraction of GPU memory it may take (gpu_memory_utilization, with infer_backend: vllm)."""
    vllm_enforce_eager: bool = False
    """vLLM: disable CUDA graphs (enforce_eager, with infer_backend: vllm)."""
    vllm_max_lora_rank: int = 32
    """vLLM: largest LoRA rank it serves (max_lora_rank; a higher-rank adapter is refused before loading)."""

    def check(self) -> None:
        require(bool(self.model_name_or_path), "model", "model_name_or_path",
                 self.model_name_or_path, "must not be empty")
        require(bool(self.model_revision), "model", "model_revision", self.model_revision,
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
    default_system: Optional[str] = None
    """System prompt for rows and chats that bring none, in place of the template's own."""
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
    """Tool-call format: unset uses the template's own; default, qwen, qwen3_5, llama3, mistral or glm4 with a named template."""
    on_invalid: Literal["error", "drop"] = "error"
    """Invalid rows: stop with an error, or drop them into reports/rejected.jsonl."""
    preprocessing_num_workers: Optional[int] = None
    """Tokenize worker processes; unset: every core. Never changes the shards."""
    preprocessing_batch_size: int = 1000
    """Rows per tokenize chunk (what a worker takes at a time). Never changes the shards."""
    tokenized_path: Optional[str] = None
    """`tunepipe train`: reuse the tokenized shards saved in this folder, or save them there when it is absent."""
    streaming: bool = False
    """LLaMA-Factory's streaming: tunepipe always streams (bounded memory); true needs train.max_steps."""
    buffer_size: int = 16384
    """LLaMA-Factory's streaming shuffle buffer; training shuffles whole shards, so it changes nothing."""
    template_date: str = DEFAULT_TEMPLATE_DATE
    """The date a chat template renders (llama3's tool prompt `Today Date`, jinja `strftime_now`), YYYY-MM-DD: a declared input, never the clock, so the shards do not change from day to day."""
    media_dir: Optional[str] = None
    """Folder the `images` / `videos` paths of rows are relative to (absolute paths must lie inside it too); unset: dataset_dir."""
    image_max_pixels: int = 768 * 768
    """Images larger than this many pixels are scaled down (aspect kept) before the model's image processor: fewer image tokens."""
    image_min_pixels: int = 32 * 32
    """Images smaller than this many pixels are scaled up before the model's image processor."""
    video_max_pixels: int = 256 * 256
    """Video frames larger than this many pixels are scaled down (aspect kept) before the model's video processor: fewer video tokens."""
    video_min_pixels: int = 16 * 16
    """Video frames smaller than this many pixels are scaled up."""
    video_fps: float = 2.0
    """Frames sampled per second of video (evenly spaced, at least one, at most video_maxlen; an odd count repeats the last)."""
    video_maxlen: int = 128
    """At most this many frames sampled per video (and a stream that does not know its length gives its first this many)."""

    def check(self) -> None:
        require(self.preprocessing_num_workers is None or self.preprocessing_num_workers >= 1, "data",
                 "preprocessing_num_workers", self.preprocessing_num_workers, "must be >= 1 (or unset: every core)")
        require(self.preprocessing_batch_size >= 1, "data", "preprocessing_batch_size",
                 self.preprocessing_batch_size, "must be >= 1")
        require(self.buffer_size >= 1, "data", "buffer_size", self.buffer_size, "must be >= 1")
        require(self.cutoff_len >= 8, "data", "cutoff_len", self.cutoff_len, "must be >= 8")
        for kind in ("image", "video"):
            low, high = getattr(self, f"{kind}_min_pixels"), getattr(self, f"{kind}_max_pixels")
            require(0 < low <= high, "data", f"{kind}_min_pixels", low, f"must be > 0 and <= {kind}_max_pixels ({high})")
        require(self.video_fps > 0, "data", "video_fps", self.video_fps, "must be > 0")
        require(self.video_maxlen >= 1, "data", "video_maxlen", self.video_maxlen, "must be >= 1")
        require(self.val_size >= 0, "data", "val_size", self.val_size, "must be >= 0")
        require(self.val_size < 1 or float(self.val_size).is_integer(), "data", "val_size",
                 self.val_size, "a fraction must be < 1; a count must be a whole number")
        require(self.max_samples is None or self.max_samples > 0, "data", "max_samples",
                 self.max_samples, "must be > 0")
        require(bool(self.datasets()), "data", "dataset", self.dataset, "names no dataset")
        require(not (self.eval_datasets() and self.val_size), "data", "val_size", self.val_size,
                 "must be 0 when eval_dataset is set (the eval split is that dataset)")
        try:
            date.fromisoformat(self.template_date)
        except ValueError:
            require(False, "data", "template_date", self.template_date, "must be a date, YYYY-MM-DD")
        if self.neat_packing:
            self.packing = True

    def today(self) -> date:
        """`template_date` as the date templates render."""
        return date.fromisoformat(self.template_date)

    def datasets(self) -> list[str]:
        return name_list(self.dataset)

    def eval_datasets(self) -> list[str]:
        return name_list(self.eval_dataset)


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
    num_beams: int = 1
    """Beam search width when generating (1: no beam search); LLaMA-Factory's eval_num_beams / generation_num_beams too."""
    repetition_penalty: float = 1.0
    """Penalty on tokens already in the prompt or the answer (1.0: none)."""
    length_penalty: float = 1.0
    """Beam search: exponent on the length when scoring beams (> 1 favours longer answers)."""
    skip_special_tokens: bool = True
    """Drop special tokens (end-of-turn and the like) from decoded answers."""
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
        require(self.max_new_tokens >= 1, "eval", "max_new_tokens", self.max_new_tokens, "must be >= 1")
        require(self.temperature > 0, "eval", "temperature", self.temperature, "must be > 0")
        require(0 < self.top_p <= 1, "eval", "top_p", self.top_p, "must be in (0, 1]")
        require(self.num_beams >= 1, "eval", "num_beams", self.num_beams, "must be >= 1")
        require(self.repetition_penalty > 0, "eval", "repetition_penalty", self.repetition_penalty, "must be > 0")
        require(all(isinstance(t, str) and t.strip() for t in self.tasks), "eval", "tasks", self.tasks,
                 "each entry must name a task, a group or a task YAML")
        require(self.num_fewshot is None or self.num_fewshot >= 0, "eval", "num_fewshot", self.num_fewshot,
                 "must be >= 0")
        require(self.limit is None or self.limit > 0, "eval", "limit", self.limit, "must be > 0")
        require(self.batch_size >= 1, "eval", "batch_size", self.batch_size, "must be >= 1")
        require(self.n_shot >= 0, "eval", "n_shot", self.n_shot, "must be >= 0")
        require(self.task is None or self.task in LF_BENCHMARKS, "eval", "task", self.task,
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
        require(not self.export_legacy_format, "export", "export_legacy_format", True,
                 "tunepipe exports safetensors only (pickle .bin files can run code when loaded)")
        if isinstance(self.export_size, int):
            require(self.export_size >= 1, "export", "export_size", self.export_size, "must be >= 1 (GB)")


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
        require(bool(self.experiment_name), "tracking", "experiment_name", self.experiment_name,
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
        if self.model.quantization_bit is not None and not self.train.uses_adapter:
            raise TunepipeError(
                f"model.quantization_bit={self.model.quantization_bit} needs train.finetuning_type=lora or oft "
                f"(got {self.train.finetuning_type!r}): quantized weights cannot be trained directly")

"""Which weights evaluate, export and chat load, and loading them.

Three kinds of trained output exist: PEFT adapters (one or several, applied in order
on top of the base), a full / freeze fine-tune (an HF dir of its own), or nothing (the
base alone). `trained_source` decides which from the config the way LLaMA-Factory
does (`adapter_name_or_path` wins), then falls back to what the train stage wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from tunepipe.config import Config, ModelConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import (
    ensure_base_model,
    hub_repo,
    load_causal_lm,
    load_tokenizer,
    peft_wrapping,
    quantization_skip_modules,
    resize_embeddings,
    resolve_source,
)
from tunepipe.models.hub import DEFAULT_REVISION, fetch_model, is_repo_id

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class TrainedSource:
    """What sits on top of the base: `adapters` (paths, merge order), `full` (one HF dir) or `none`."""

    kind: str
    paths: list[Path] = field(default_factory=list)

    @property
    def record_dir(self) -> Path | None:
        """The dir whose `tunepipe_run.json` names the MLflow run to join (the last trained output)."""
        return self.paths[-1] if self.paths else None


def cli_config(args) -> tuple[Config, Layout]:
    """Config and layout of `tunepipe export|chat|score CONFIG [k=v ...]`.

    The same as `tunepipe.pipeline.cli_config`, repeated rather than imported: the pipeline
    module names validate / tokenize / train, which would become merge's DVC deps.
    """
    from tunepipe.config.loader import load_config

    cfg = load_config(args.config, args.overrides)
    return cfg, Layout.at(cfg.train.output_dir)


def base_dir_for(cfg: Config, layout: Layout) -> Path:
    """The base weights: a local HF dir is used in place, anything else (a GGUF, a Hub repo id)
    goes through models/base."""
    source = resolve_source(cfg.model.model_name_or_path, cfg.model)
    if source.kind == "hf_dir":
        return source.path
    return ensure_base_model(cfg.model, layout.base_model, source)


def trained_source(cfg: Config, layout: Layout, quiet: bool = False) -> TrainedSource:
    """`model.adapter_name_or_path` if set (followed by the adapter trained on top of them with
    `create_new_adapter`), else what the train stage wrote under `layout`.

    `quiet`: no log line (for a check ahead of the command that then loads it and says so)."""
    named = cfg.model.adapters()
    trained = layout.trained(cfg.train.finetuning_type)
    if named:
        paths = [adapter_dir(name, quiet, cfg.model) for name in named]
        if cfg.train.create_new_adapter and (trained / ADAPTER_CONFIG).is_file() and trained not in paths:
            paths.append(trained)  # trained on top of the named ones: applied after them
        return TrainedSource("adapters", paths)
    if (trained / ADAPTER_CONFIG).is_file():
        return TrainedSource("adapters", [trained])
    if (trained / "config.json").is_file():
        return TrainedSource("full", [trained])
    return TrainedSource("none")


def adapter_dir(name: str, quiet: bool = False, model_cfg: ModelConfig | None = None) -> Path:
    """One `adapter_name_or_path` entry as a PEFT adapter dir.

    LLaMA-Factory writes the adapter into `output_dir` itself, so its merge and predict
    YAMLs name the train `output_dir`; tunepipe writes it to `output_dir/models/adapter`.
    Both are accepted: an output_dir resolves to the adapter its train run wrote. A Hub
    repo id (`org/name`, or `org/name@revision`, default main) is downloaded into
    huggingface_hub's cache with `model_cfg`'s cache dir and token."""
    path = Path(name).expanduser()
    if (path / ADAPTER_CONFIG).is_file():
        return path
    if not path.exists() and is_repo_id(name.split("@", 1)[0]):
        return hub_adapter(name, model_cfg)
    trained = Layout.at(path)
    if (trained.adapter / ADAPTER_CONFIG).is_file():
        if not quiet:
            log.info("adapter_name_or_path %s is a tunepipe output_dir: using its trained adapter %s",
                     path, trained.adapter)
        return trained.adapter
    if (trained.full / "config.json").is_file():
        raise TunepipeError(f"model.adapter_name_or_path: {path} holds a full fine-tune, not an adapter",
                            hint=f"set model_name_or_path: {trained.full} and leave adapter_name_or_path unset")
    raise TunepipeError(f"model.adapter_name_or_path: {path} holds no {ADAPTER_CONFIG} "
                        f"(nor {trained.adapter.relative_to(path)}/{ADAPTER_CONFIG})",
                        hint="point it at a PEFT adapter dir, or at the output_dir of a LoRA train run")


def hub_adapter(name: str, model_cfg: ModelConfig | None) -> Path:
    """An adapter repo's snapshot. Its revision is its own (`@revision`), not model_revision: a
    base pinned to one of its commits names no commit of the adapter repo."""
    repo_id, _, revision = name.partition("@")
    repo = hub_repo(repo_id, model_cfg, revision=revision or DEFAULT_REVISION)
    path, _ = fetch_model(repo, needed=ADAPTER_CONFIG)
    return path


def require_trained(source: TrainedSource, cfg: Config, layout: Layout) -> TrainedSource:
    if source.kind == "none":
        raise TunepipeError(
            f"no trained model in {layout.trained(cfg.train.finetuning_type)}",
            hint="run the train stage first, or set model.adapter_name_or_path")
    return source


def device_for(preference: str = "auto") -> str:
    import torch

    return "cuda" if preference == "auto" and torch.cuda.is_available() else "cpu"


def quantization_config(cfg: Config):
    """bitsandbytes settings for `model.quantization_bit`, computing in the base dtype."""
    from transformers import BitsAndBytesConfig

    from tunepipe.models.base import torch_dtype

    if cfg.model.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quantization_type,
        bnb_4bit_use_double_quant=cfg.model.double_quantization,
        bnb_4bit_compute_dtype=torch_dtype(cfg.model.dtype))


def load_base(cfg: Config, base_dir: Path, device: str, quantized: bool = False, dtype: str | None = None):
    """The base model in `dtype` (default `model.dtype`); in 4/8 bits only when asked and configured."""
    kwargs = {}
    if quantized and cfg.model.quantization_bit:
        kwargs["quantization_config"] = quantization_config(cfg)
        kwargs["quantization_config"].llm_int8_skip_modules = quantization_skip_modules(base_dir)  # as training
    model = load_causal_lm(base_dir, dtype=dtype or cfg.model.dtype, trust_remote_code=cfg.model.trust_remote_code,
                           device_map=device, **kwargs)
    return model.eval()


def apply_adapters(model, paths: list[Path], merge_last: bool = False):
    """Apply adapters in order; all but the last are merged (LLaMA-Factory's stacking order).

    The last stays a PeftModel unless `merge_last`, so callers can compare it unmerged.
    """
    from peft import PeftModel

    for index, path in enumerate(paths):
        grown = grown_tokenizer_dir(path)
        if grown is not None:  # an adapter trained with new tokens carries rows past the base's vocabulary
            resize_embeddings(model, len(load_tokenizer(grown)))
        with peft_wrapping():
            model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        if index < len(paths) - 1 or merge_last:
            model = model.merge_and_unload()
    return model.eval()


def load_trained(cfg: Config, base_dir: Path, source: TrainedSource, device: str):
    """The tuned model for evaluation and chat: quantized like training when it was QLoRA."""
    if source.kind == "full":
        model = load_causal_lm(source.paths[0], dtype=cfg.model.dtype,
                               trust_remote_code=cfg.model.trust_remote_code, device_map=device)
        return model.eval()
    # Merging into 4-bit weights is lossy, so a stack of several adapters loads unquantized.
    quantized = not (source.kind == "adapters" and len(source.paths) > 1)
    if cfg.model.quantization_bit and not quantized:
        log.warning("several adapters: loading the base unquantized to merge them in order")
    model = load_base(cfg, base_dir, device, quantized=quantized)
    if source.kind == "adapters":
        model = apply_adapters(model, source.paths)
    return model


def tokenizer_for(cfg: Config, base_dir: Path, source: TrainedSource):
    """A full fine-tune carries its own tokenizer; adapters use the base's, unless one was trained
    with new tokens (then the grown tokenizer saved beside it)."""
    directory = source.paths[0] if source.kind == "full" else base_dir
    grown = [found for path in source.paths if (found := grown_tokenizer_dir(path))] if source.kind == "adapters" else []
    return load_tokenizer(grown[-1] if grown else directory, trust_remote_code=cfg.model.trust_remote_code)


def grown_tokenizer_dir(adapter: Path) -> Path | None:
    """The adapter dir when it trains whole modules (modules_to_save: how new tokens' embedding
    rows travel) and holds the tokenizer it was trained with; else None (the base's applies)."""
    import json

    config = json.loads((Path(adapter) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    has_tokenizer = (Path(adapter) / "tokenizer_config.json").is_file()
    return Path(adapter) if config.get("modules_to_save") and has_tokenizer else None

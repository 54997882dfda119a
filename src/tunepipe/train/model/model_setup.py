"""The model a trainer trains: base loaded from `models/base/`, then lora / freeze / full.

For the preference trainers: call `build_trainable_model(cfg, layout)` for the policy
(it seeds, loads the base with the configured attention kernel and quantization, and
applies `finetuning_type`), and `load_base_for_training(cfg, layout)` for a frozen
reference copy. Everything user-fixable raises a TunepipeError naming the key.
"""

from __future__ import annotations

import importlib.util
import logging

from tunepipe.config import Config, ModelConfig, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_causal_lm, quantization_skip_modules
from tunepipe.train.fast_path import compile_decoder_layers
from tunepipe.train.model.adapters import attach_lora, merge_named_adapters, name_list
from tunepipe.train.model.llama_pro import expanded_block_ids
from tunepipe.train.model.moe import configure_router_loss, is_moe
from tunepipe.train.model.vision import freeze_parts, lora_targets, model_family
from tunepipe.train.model.vocabulary import grow_vocabulary

log = logging.getLogger(__name__)


def build_trainable_model(cfg: Config, layout: Layout):
    """Seeded base load + the configured fine-tuning method; returns the model to train."""
    from transformers import set_seed

    set_seed(cfg.train.seed)  # LoRA / PiSSA init must be the same on a resumed run
    model = merge_named_adapters(load_base_for_training(cfg, layout), cfg)  # create_new_adapter
    configure_router_loss(model, cfg.train)
    train = grow_vocabulary(model, cfg, layout)  # new tokens: rows resized, initialised, and trained
    model = apply_finetuning(model, train, quantized=cfg.model.quantization_bit is not None)
    log.info("%s", trainable_summary(model))
    if train.torch_compile:
        refuse_compile_of_experts(model.config)
        compile_decoder_layers(decoder_layers(model))
    return model


def refuse_compile_of_experts(model_config) -> None:
    """Mixture-of-experts layers loop over the experts a batch routes to (a data-dependent
    list): compiled, every new routing pattern traces new graphs (Mixtral: 18, 22, 26 graphs
    after three batches, docs/benchmarks.md) until dynamo's recompile limit sends the layer
    back to eager: a compile cost with no steady graph to pay for it."""
    if is_moe(model_config):
        raise TunepipeError(f"train.torch_compile: {type(model_config).__name__} is a mixture-of-experts model, "
                            "whose experts recompile for every new routing pattern",
                            hint="set torch_compile: false for this model")


def load_base_for_training(cfg: Config, layout: Layout, quantize: bool = True):
    """The base causal LM with the chosen attention kernel (and bitsandbytes quantization)."""
    kwargs = {"attn_implementation": attention_implementation(cfg.model, base_config(cfg, layout))}
    if cfg.train.pure_bf16:
        # frozen weights stay bf16 (half the memory, no per-step cast under autocast);
        # apply_finetuning / PEFT keep the trained ones in float32
        kwargs["dtype"] = "bfloat16"
    if quantize and cfg.model.quantization_bit is not None:
        kwargs["quantization_config"] = quantization_config(cfg.model, cfg.train)
        kwargs["quantization_config"].llm_int8_skip_modules = quantization_skip_modules(layout.base_model)
        kwargs["device_map"] = {"": _default_device()}
    model = load_causal_lm(layout.base_model, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    model.config.use_cache = False  # a KV cache is useless in training and disables packed masks
    return model


def _default_device() -> str:
    """This rank's device: each launched process (DDP, FSDP) loads onto its own GPU."""
    import os

    import torch

    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"


def base_config(cfg: Config, layout: Layout):
    """The base model's transformers config (read before loading, to choose the kernel)."""
    from transformers import AutoConfig

    from tunepipe.models.base import follow_manifest

    return AutoConfig.from_pretrained(str(follow_manifest(layout.base_model)),
                                      trust_remote_code=cfg.model.trust_remote_code)


def attention_implementation(model_cfg: ModelConfig, model_config=None) -> str:
    """`flash_attn` -> a transformers attn_implementation: auto is flash attention 2 where it
    can run, else SDPA run per sample (`varlen_attention`); sdpa is SDPA with the model's own
    per-layer masks. A model that softcaps attention logits (Gemma 2) gets eager attention
    unless flash attention 2 runs: SDPA has no softcap, and dropping it changes the logits."""
    import torch

    fa2_ready = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    choice = model_cfg.flash_attn
    if choice == "disabled":
        return "eager"
    if choice == "fa2":
        if fa2_ready:
            return "flash_attention_2"
        # LLaMA-Factory warns and keeps the default kernel when flash attention 2 cannot run, so
        # its YAMLs that ask for fa2 (written for GPUs) train unchanged on a CPU: do the same.
        log.warning("model.flash_attn='fa2' needs a CUDA GPU and the flash-attn package; using "
                    "flash_attn: auto instead (SDPA run per sample)")
        choice = "auto"
    if choice == "auto" and fa2_ready:
        return "flash_attention_2"
    if softcaps_attention(model_config):
        log.info("model.flash_attn=%s: %s softcaps attention logits, which SDPA cannot do; using eager "
                 "attention (exact, more memory)", choice, type(model_config).__name__)
        return "eager"
    if choice == "auto":
        # SDPA per sample of a padding-free row (plain SDPA for everything else)
        from tunepipe.train.batches.varlen_attention import register

        return register()
    return "sdpa"


def softcaps_attention(model_config) -> bool:
    return getattr(model_config, "attn_logit_softcapping", None) is not None


def compute_dtype(train: TrainConfig):
    import torch

    return torch.bfloat16 if train.bf16_compute else torch.float16 if train.fp16 else torch.float32


def quantization_config(model_cfg: ModelConfig, train: TrainConfig):
    """bitsandbytes 4-bit (nf4 / fp4, double quantization) or 8-bit loading for QLoRA."""
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TunepipeError(f"model.quantization_bit={model_cfg.quantization_bit} needs bitsandbytes",
                            hint="pip install bitsandbytes")
    if model_cfg.quantization_bit == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=model_cfg.quantization_type,
                              bnb_4bit_use_double_quant=model_cfg.double_quantization,
                              bnb_4bit_compute_dtype=compute_dtype(train),
                              bnb_4bit_quant_storage=compute_dtype(train))


def apply_finetuning(model, train: TrainConfig, quantized: bool = False, task_type: str = "CAUSAL_LM"):
    """lora / oft -> PeftModel; freeze -> last/first layers trainable; full -> everything trainable
    (a vision-language model's frozen parts, by freeze_vision_tower etc., stay frozen and unwrapped)."""
    family = model_family(model)
    if train.uses_adapter:
        names = name_list(train.oft_target if train.finetuning_type == "oft" else train.lora_target) or ["all"]
        targets = None if family is None else lora_targets(model, family, train, names)
        if quantized:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=train.checkpointing,
                gradient_checkpointing_kwargs=train.checkpointing_kwargs())
        model = attach_lora(model, train, task_type, targets)
        if train.pure_bf16:  # PEFT keeps LoRA weights float32 but copies modules_to_save in bf16
            upcast_trainable(model)
        return model
    if train.finetuning_type == "freeze":
        freeze_all_but(model, trainable_layer_params(model, train))
    else:
        for param in model.parameters():
            param.requires_grad_(True)
    if family is not None:
        freeze_parts(model, family, train)
    upcast_trainable(model)
    return model


def decoder_layers(model):
    """The ModuleList of transformer blocks (the model's `get_decoder().layers`)."""
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    count = getattr(model.config, "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return module
    raise TunepipeError(f"train.finetuning_type=freeze: cannot find the decoder layers of "
                        f"{type(model).__name__}", hint="use finetuning_type lora or full")


def trainable_layer_params(model, train: TrainConfig) -> set[int]:
    """ids of the parameters freeze fine-tuning trains (LLaMA-Factory's layer/module rule)."""
    layers = decoder_layers(model)
    count, wanted = len(layers), train.freeze_trainable_layers
    if wanted == 0 or abs(wanted) > count:
        raise TunepipeError(f"train.freeze_trainable_layers={wanted}: the model has {count} layers",
                            hint=f"use 1..{count} (last layers) or -1..-{count} (first layers)")
    if train.use_llama_pro:
        indices = expanded_block_ids(count, wanted)
    else:
        indices = range(count - wanted, count) if wanted > 0 else range(-wanted)
    modules = name_list(train.freeze_trainable_modules) or ["all"]
    _check_module_names(layers[0], modules)
    chosen = set()
    for index in indices:
        for name, param in layers[index].named_parameters():
            if modules == ["all"] or any(name == m or name.startswith(m + ".") for m in modules):
                chosen.add(id(param))
    return chosen | extra_module_params(model, layers, name_list(train.freeze_extra_modules) or [])


def extra_module_params(model, layers, extras: list[str]) -> set[int]:
    """ids of the parameters of `freeze_extra_modules`: modules outside the decoder layers
    (embed_tokens, norm, lm_head, ...) named by their own name, as LLaMA-Factory matches them."""
    in_layers = {id(param) for param in layers.parameters()}
    outside = {name.rsplit(".", 1)[-1]: module for name, module in model.named_modules()
               if name and any(id(p) not in in_layers for p in module.parameters(recurse=False))}
    unknown = [name for name in extras if name not in outside]
    if unknown:
        raise TunepipeError(f"train.freeze_extra_modules: {', '.join(unknown)} not outside the decoder layers",
                            hint=f"modules outside the layers: {', '.join(sorted(outside))}")
    return {id(param) for name in extras for param in outside[name].parameters()}


def _check_module_names(layer, modules: list[str]) -> None:
    if modules == ["all"]:
        return
    known = {name for name, _ in layer.named_modules() if name}
    unknown = [m for m in modules if m not in known]
    if unknown:
        top = sorted({name.split(".")[0] for name in known})
        raise TunepipeError(f"train.freeze_trainable_modules: {', '.join(unknown)} not in a decoder layer",
                            hint=f"modules of each layer: all, {', '.join(top)} (or dotted names like mlp.down_proj)")


def freeze_all_but(model, trainable_ids: set[int]) -> None:
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable_ids)


def upcast_trainable(model) -> None:
    """Half-precision weights that train are kept in float32 (LLaMA-Factory does the same):
    AdamW updates are far below bf16's resolution for most weights."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()


def trainable_summary(model) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.4f}%)"

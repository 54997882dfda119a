"""PEFT adapter setup: LoRA, rsLoRA, DoRA, PiSSA, LoRA+ and OFT, on plain or quantized bases.

For the preference trainers: `model_setup.build_trainable_model` calls `attach_lora`
for `finetuning_type: lora` or `oft` (PEFT's OFTConfig, LLaMA-Factory's oft_* keys); `loraplus_optimizer` is what `trainer_setup` hands to the
Trainer when `loraplus_lr_ratio` is set; `save_adapter` writes a PEFT dir that loads with
`PeftModel.from_pretrained` on the *original* base (PiSSA adapters are converted back to
plain LoRA on save, since PiSSA rewrites the base weights it starts from).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.models.base import peft_wrapping
from tunepipe.train.fast_path import fuses_lora
from tunepipe.train.model.lora_groups import fuse_lora_inputs

log = logging.getLogger(__name__)

PISSA_INIT_ATTR = "_tunepipe_pissa_init_dir"
# Layers that route tokens between experts (Qwen2-MoE's shared-expert gate; `gate` / `router`
# in MoE code that keeps its router as a Linear, or as a bare weight in transformers 5):
# `lora_target: all` leaves them alone (LLaMA-Factory's `all` wrapped them, being every
# Linear of transformers 4); naming one in lora_target wraps it.
ROUTER_GATES = ["gate", "router", "shared_expert_gate"]
# transformers 5's fused expert weights ([experts, out, in] parameters of an `experts` module)
FUSED_EXPERTS = ("gate_up_proj", "down_proj", "gate_proj", "up_proj")


def name_list(value) -> list[str] | None:
    """A comma-separated string or a list of module names; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def pissa_init_value(train: TrainConfig) -> str:
    """PEFT's `init_lora_weights` for PiSSA: the fast randomized SVD with `pissa_iter` iterations
    (LLaMA-Factory's default 16: a full SVD of every targeted matrix costs minutes on bigger
    models for no measurable gain), or the full SVD for pissa_iter -1."""
    return "pissa" if train.pissa_iter == -1 else f"pissa_niter_{train.pissa_iter}"


def peft_targets(model, train: TrainConfig, names, target_modules: list[str] | None = None) -> str | list[str]:
    """`target_modules` for PEFT: PEFT's "all-linear" is every linear layer except the output
    head (LLaMA-Factory's `all`); with use_llama_pro, only the modules of the expanded blocks;
    `target_modules` (the layers' full names) when the caller chose them, as for a
    vision-language model's language part."""
    if target_modules is not None:
        return target_modules
    targets = name_list(names) or ["all"]
    if train.use_llama_pro:
        from tunepipe.train.model.llama_pro import expanded_block_modules

        return expanded_block_modules(model, train, targets)
    if targets == ["all"]:
        return quantized_linear_names(model) or "all-linear"
    return targets


def quantized_linear_names(model) -> list[str]:
    """LLaMA-Factory's `all` on a pre-quantized GPTQ / AWQ model: every gptqmodel quantized
    linear (PEFT's "all-linear" looks for torch.nn.Linear, which they are not, and would find
    only the output head, which it leaves out). [] for any other model."""
    import sys

    qlinear = sys.modules.get("gptqmodel.nn_modules.qlinear")  # imported by transformers when it loaded one
    if model is None or qlinear is None:
        return []
    return sorted(name for name, module in model.named_modules() if isinstance(module, qlinear.BaseQuantLinear))


def lora_config(train: TrainConfig, task_type: str = "CAUSAL_LM", model=None,
                target_modules: list[str] | None = None):
    """PEFT `LoraConfig` from the LLaMA-Factory-named knobs."""
    from peft import LoraConfig

    return LoraConfig(
        task_type=task_type,
        r=train.lora_rank,
        lora_alpha=train.alpha,
        lora_dropout=train.lora_dropout,
        target_modules=peft_targets(model, train, train.lora_target, target_modules),
        modules_to_save=name_list(train.additional_target),
        use_rslora=train.use_rslora,
        use_dora=train.use_dora,
        init_lora_weights=pissa_init_value(train) if train.pissa_init else True,
    )


def oft_config(train: TrainConfig, task_type: str = "CAUSAL_LM", model=None,
               target_modules: list[str] | None = None):
    """PEFT `OFTConfig` from LLaMA-Factory's oft_* keys (PEFT takes r or oft_block_size, the other 0)."""
    from peft import OFTConfig

    return OFTConfig(
        task_type=task_type,
        r=train.oft_rank,
        oft_block_size=train.oft_block_size,
        module_dropout=train.module_dropout,
        target_modules=peft_targets(model, train, train.oft_target, target_modules),
        modules_to_save=name_list(train.additional_target),
    )


def attach_lora(model, train: TrainConfig, task_type: str = "CAUSAL_LM", target_modules: list[str] | None = None):
    """Wrap `model` in a PeftModel with fresh LoRA (or, for finetuning_type oft, OFT) adapters;
    a bad target name or an OFT block size that does not divide a layer is a TunepipeError."""
    from peft import get_peft_model

    build = oft_config if train.finetuning_type == "oft" else lora_config
    config = build(train, task_type, model, target_modules)
    config.ensure_weight_tying = _trains_tied_embeddings(model, config)
    if train.finetuning_type == "lora" and config.target_modules == "all-linear":
        _all_linear_on_moe(config, model)  # experts yes, router gates no
    elif train.finetuning_type == "lora" and target_modules and name_list(train.lora_target) in (None, ["all"]) \
            and not train.freeze_language_model:
        # a vision-language model's `all` (train/model/vision.py names its linears): a MoE language
        # model's fused experts are parameters, not Linear layers, so they are added here
        config.target_parameters = sorted(_fused_experts(model)) or None
    pissa_snapshot = _pissa_snapshot_dir() if train.pissa_init and train.finetuning_type == "lora" else None
    try:
        with peft_wrapping():
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        target_key = "oft_target" if train.finetuning_type == "oft" else "lora_target"
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            raise TunepipeError(f"train.{target_key}={getattr(train, target_key)!r} / train.additional_target="
                                f"{train.additional_target!r}: {exc}",
                                hint="use `all`, or names of linear layers such as q_proj,v_proj") from None
        if train.finetuning_type == "oft" and "oft_block_size" in str(exc):
            raise TunepipeError(f"train.oft_rank={train.oft_rank} / oft_block_size={train.oft_block_size}: {exc}",
                                hint="pick an oft_block_size that divides every adapted layer's input width") from None
        raise
    if pissa_snapshot is not None:
        _save_pissa_start(peft_model, pissa_snapshot)
    skip_input_casts_under_autocast(peft_model)
    if fuses_lora(train):
        fuse_lora_inputs(peft_model)
    return peft_model


def _all_linear_on_moe(config, model) -> None:
    """`all` on a mixture-of-experts model: every expert, never a router.

    Before transformers 5 each expert was a set of Linear layers, so `all` (LLaMA-Factory's, and
    PEFT's `all-linear`) wrapped the experts and the router. transformers 5 fuses each layer's
    experts into 3-D parameters; PEFT keeps the old meaning for the families it maps (Mixtral,
    Qwen3-MoE: LoRA on those parameters via `target_parameters`, and on the router weight) but
    not for others (Qwen2-MoE). Resolve it here as PEFT would, add the fused experts where PEFT
    did not, and drop the router."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    convert_peft_config_for_transformers(config, model=model, conversions=None)
    targets = set(config.target_parameters or ()) | _fused_experts(model)
    config.target_parameters = {name for name in targets if name.split(".")[0] not in ROUTER_GATES} or None
    routers = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()} & set(ROUTER_GATES)
    config.exclude_modules = sorted(routers) or None  # named only where present: PEFT warns otherwise


def _fused_experts(model) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, param in model.named_parameters()
            if param.dim() == 3 and name.rsplit(".", 1)[-1] in FUSED_EXPERTS}


class _CastUnlessAutocast:
    """Truthy except under autocast: the value of PEFT's `cast_input_dtype_enabled` switch.

    PEFT casts a LoRA layer's input to the adapter's float32 before lora_A; under bf16 / fp16
    autocast lora_A then casts it straight back, so the round trip only writes memory
    (a third of the cast bytes of a pure_bf16 step: bench/bf16_ops.py). Skipping it under
    autocast gives the same numbers (bf16 -> fp32 -> bf16 is exact); outside autocast the
    cast is needed and stays."""

    def __bool__(self) -> bool:
        import torch

        return not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def skip_input_casts_under_autocast(peft_model) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    switch = _CastUnlessAutocast()
    for module in peft_model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = switch


def _trains_tied_embeddings(model, config) -> bool:
    """Training embed_tokens (or lm_head) of a model whose head is tied to its embeddings:
    keep the two tied, as they were, so the merged model has one matrix, not two diverging ones."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    return bool(tied and set(config.modules_to_save or ()) & {"embed_tokens", "lm_head"})


def _pissa_snapshot_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="tunepipe-pissa-init-"))


def _save_pissa_start(peft_model, snapshot: Path) -> None:
    """Keep the adapter as initialised: saving later converts the trained PiSSA adapter
    into a plain LoRA adapter relative to this start, so it applies to the original base."""
    config = peft_model.peft_config["default"]
    start = config.init_lora_weights
    config.init_lora_weights = True  # PEFT's documented way to save a PiSSA start point
    peft_model.save_pretrained(str(snapshot))
    config.init_lora_weights = start
    setattr(peft_model, PISSA_INIT_ATTR, str(snapshot))


def save_adapter(peft_model, out_dir: str | Path, state_dict=None) -> None:
    """PEFT-format adapter (safetensors + adapter_config.json) for the original base model;
    `state_dict`: the full weights gathered from a sharded model (PEFT picks the adapter's)."""
    snapshot = getattr(peft_model, PISSA_INIT_ATTR, None)
    if snapshot is None:
        peft_model.save_pretrained(str(out_dir), state_dict=state_dict)
    else:
        peft_model.save_pretrained(str(out_dir), path_initial_model_for_weight_conversion=snapshot,
                                   state_dict=state_dict)
    sort_module_lists(Path(out_dir) / "adapter_config.json")


def sort_module_lists(config_file: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which changes from one
    process to the next; sorted, the same training writes the same adapter_config.json bytes."""
    import json

    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def discard_pissa_snapshot(peft_model) -> None:
    snapshot = getattr(peft_model, PISSA_INIT_ATTR, None)
    if snapshot:
        shutil.rmtree(snapshot, ignore_errors=True)


def loraplus_optimizer(model, train: TrainConfig):
    """LoRA+: the B matrices learn `loraplus_lr_ratio` times faster than the A matrices; the
    LoRA matrices of embedding layers learn at `loraplus_lr_embedding`."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    if train.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise TunepipeError(f"train.loraplus_lr_ratio with train.optim={train.optim!r}: LoRA+ builds an "
                            "AdamW optimizer", hint="use optim: adamw_torch with loraplus_lr_ratio")
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=train.learning_rate,
                                     loraplus_lr_ratio=train.loraplus_lr_ratio,
                                     loraplus_lr_embedding=train.loraplus_lr_embedding,
                                     weight_decay=train.weight_decay)


def merge_named_adapters(model, cfg):
    """`create_new_adapter`: the `adapter_name_or_path` adapters merged into the base, in order,
    so the adapter trained next starts on top of them (LLaMA-Factory's meaning). Later stages
    apply them and then the new one (`tunepipe.models.trained.trained_source`)."""
    from tunepipe.models.trained import adapter_dir, apply_adapters

    names = cfg.model.adapters()
    if not names:
        return model
    if not (cfg.train.create_new_adapter and cfg.train.uses_adapter):
        raise TunepipeError(f"model.adapter_name_or_path={cfg.model.adapter_name_or_path!r} in training needs "
                            "train.create_new_adapter: true and finetuning_type lora or oft",
                            hint="the new adapter trains on top of these, merged into the base")
    if cfg.model.quantization_bit is not None:
        raise TunepipeError("train.create_new_adapter with model.quantization_bit: merging adapters into "
                            "quantized weights would bake the quantization error in",
                            hint="train on an unquantized base, or merge them first with `tunepipe export`")
    paths = [adapter_dir(name, model_cfg=cfg.model) for name in names]
    log.info("create_new_adapter: merging %s into the base before the new adapter", ", ".join(map(str, paths)))
    return apply_adapters(model, paths, merge_last=True)

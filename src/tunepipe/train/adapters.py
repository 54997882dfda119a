"""LoRA family setup with PEFT: LoRA, rsLoRA, DoRA, PiSSA, LoRA+, on plain or quantized bases.

For the preference trainers: `model_setup.build_trainable_model` calls `attach_lora`
for `finetuning_type: lora`; `loraplus_optimizer` is what `trainer_setup` hands to the
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
from tunepipe.modeling import peft_wrapping

log = logging.getLogger(__name__)

# Fast randomized SVD with 16 iterations, LLaMA-Factory's default for pissa_init: a full
# SVD of every targeted matrix costs minutes on bigger models for no measurable gain.
PISSA_INIT = "pissa_niter_16"
PISSA_INIT_ATTR = "_tunepipe_pissa_init_dir"


def name_list(value) -> list[str] | None:
    """A comma-separated string or a list of module names; None stays None."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def lora_config(train: TrainConfig, task_type: str = "CAUSAL_LM", target_modules: list[str] | None = None):
    """PEFT `LoraConfig` from the LLaMA-Factory-named knobs (`target_modules`: the layers' full
    names, when the caller chose them, as for a vision-language model's language part)."""
    from peft import LoraConfig

    targets = name_list(train.lora_target) or ["all"]
    if target_modules is not None:
        targets = target_modules
    return LoraConfig(
        task_type=task_type,
        r=train.lora_rank,
        lora_alpha=train.alpha,
        lora_dropout=train.lora_dropout,
        # PEFT's "all-linear" is every linear layer except the output head: LLaMA-Factory's `all`.
        target_modules="all-linear" if targets == ["all"] else targets,
        modules_to_save=name_list(train.additional_target),
        use_rslora=train.use_rslora,
        use_dora=train.use_dora,
        init_lora_weights=PISSA_INIT if train.pissa_init else True,
    )


def attach_lora(model, train: TrainConfig, task_type: str = "CAUSAL_LM", target_modules: list[str] | None = None):
    """Wrap `model` in a PeftModel with fresh adapters; a bad target name is a TunepipeError."""
    from peft import get_peft_model

    config = lora_config(train, task_type, target_modules)
    config.ensure_weight_tying = _trains_tied_embeddings(model, config)
    pissa_snapshot = _pissa_snapshot_dir() if train.pissa_init else None
    try:
        with peft_wrapping():
            peft_model = get_peft_model(model, config)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            raise TunepipeError(f"train.lora_target={train.lora_target!r} / train.additional_target="
                                f"{train.additional_target!r}: {exc}",
                                hint="use `all`, or names of linear layers such as q_proj,v_proj") from None
        raise
    if pissa_snapshot is not None:
        _save_pissa_start(peft_model, pissa_snapshot)
    skip_input_casts_under_autocast(peft_model)
    return peft_model


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
    config.init_lora_weights = True  # PEFT's documented way to save a PiSSA start point
    peft_model.save_pretrained(str(snapshot))
    config.init_lora_weights = PISSA_INIT
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
    """LoRA+: the B matrices learn `loraplus_lr_ratio` times faster than the A matrices."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    if train.optim not in ("adamw_torch", "adamw_torch_fused"):
        raise TunepipeError(f"train.loraplus_lr_ratio with train.optim={train.optim!r}: LoRA+ builds an "
                            "AdamW optimizer", hint="use optim: adamw_torch with loraplus_lr_ratio")
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=train.learning_rate,
                                     loraplus_lr_ratio=train.loraplus_lr_ratio,
                                     weight_decay=train.weight_decay)

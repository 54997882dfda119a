"""A separate reference model for DPO / KTO (LLaMA-Factory's `ref_model`, `ref_model_adapters`,
`ref_model_quantization_bit`).

By default the reference is the policy's own base (its adapter disabled, or a frozen copy).
`ref_model` names another model instead (a local HF dir, a tunepipe output_dir holding a full
fine-tune, or a Hub repo id, resolved like `model_name_or_path`), with its adapters merged in
order and optionally loaded in 4 / 8 bits. It is loaded once, frozen, and its log-probs are the
reference of every step. DVC sees the `ref_model` param, not the model's files: point it at a
new path (or `dvc repro -f train`) when the model behind it changes.
"""

from __future__ import annotations

import dataclasses
import logging

from tunepipe.config import Config
from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_causal_lm, resolve_source
from tunepipe.models.trained import adapter_dir, apply_adapters
from tunepipe.train.model.adapters import name_list
from tunepipe.train.model.model_setup import attention_implementation, quantization_config

log = logging.getLogger(__name__)


def load_reference_model(cfg: Config):
    """The frozen `train.ref_model` (+ `ref_model_adapters`, in `ref_model_quantization_bit` bits)."""
    from transformers import AutoConfig

    train = cfg.train
    if train.precompute_ref_log_probs:
        raise TunepipeError("train.ref_model with train.precompute_ref_log_probs: the cached log-probs "
                            "are computed from the policy's base, not from ref_model",
                            hint="unset precompute_ref_log_probs (the separate reference is loaded once)")
    source = resolve_source(train.ref_model, cfg.model)
    kwargs = {"attn_implementation": attention_implementation(
        cfg.model, AutoConfig.from_pretrained(str(source.path), trust_remote_code=cfg.model.trust_remote_code))}
    if train.ref_model_quantization_bit is not None:
        quantized = dataclasses.replace(cfg.model, quantization_bit=train.ref_model_quantization_bit)
        kwargs["quantization_config"] = quantization_config(quantized, train)
    if source.kind == "gguf":
        raise TunepipeError(f"train.ref_model={train.ref_model!r}: a .gguf reference is not supported",
                            hint="point ref_model at a Hugging Face model dir or Hub repo id")
    model = load_causal_lm(source.path, trust_remote_code=cfg.model.trust_remote_code, **kwargs)
    adapters = [adapter_dir(name, model_cfg=cfg.model) for name in name_list(train.ref_model_adapters) or []]
    if adapters:
        model = apply_adapters(model, adapters, merge_last=train.ref_model_quantization_bit is None)
    log.info("reference model: %s%s", train.ref_model, f" + {len(adapters)} adapter(s)" if adapters else "")
    return model.eval().requires_grad_(False)

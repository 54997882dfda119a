"""Mixture-of-experts training: the router's load-balancing loss (`moe_aux_loss_coef`).

transformers' MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, ...) compute the Switch
Transformer load-balancing loss from every layer's router logits when their config has
`output_router_logits`, and weigh it by `router_aux_loss_coef`. LLaMA-Factory's
`moe_aux_loss_coef` sets both on a model it trains; so does this module, and
`loss.causal_lm_loss` adds the weighted loss the forward returns (the model's own sum
happens only when it is given labels, which tunepipe's loss does not pass).
"""

from __future__ import annotations

import logging

from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError

log = logging.getLogger(__name__)

STAGES_WITH_ROUTER_LOSS = ("sft", "pt")


def is_moe(model_config) -> bool:
    """A transformers MoE config: it has a router loss weight to set."""
    return hasattr(model_config, "router_aux_loss_coef") and hasattr(model_config, "output_router_logits")


def configure_router_loss(model, train: TrainConfig) -> None:
    """With `moe_aux_loss_coef` set on an MoE model: make its forward return the router loss,
    weighted by the coefficient. A dense model is left alone (one log line), as LLaMA-Factory does."""
    coef = train.moe_aux_loss_coef
    if not coef:
        return
    config = model.config
    if not is_moe(config):
        log.warning("train.moe_aux_loss_coef=%s: %s has no router; ignored", coef, type(config).__name__)
        return
    if train.stage not in STAGES_WITH_ROUTER_LOSS:
        raise TunepipeError(f"train.moe_aux_loss_coef={coef}: the router loss is added to the sft / pt "
                            f"loss; stage {train.stage!r} does not add it",
                            hint="unset moe_aux_loss_coef for preference / reward training")
    config.router_aux_loss_coef = coef
    config.output_router_logits = True
    if hasattr(model, "router_aux_loss_coef"):  # the CausalLM copies the weight from its config at init
        model.router_aux_loss_coef = coef

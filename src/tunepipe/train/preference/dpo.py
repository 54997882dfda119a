"""`stage: dpo`: direct preference optimisation and its variants (`pref_loss`).

sigmoid (DPO), hinge and ipo compare the policy with a reference model; orpo and simpo
need none. The reference is the base with the LoRA adapter disabled (no second copy of
the weights), a frozen copy for full / freeze fine-tuning, a separate model (`ref_model`),
or log-probs precomputed once and cached (`precompute_ref_log_probs`). Chosen and rejected
answers go through one forward (a 2B-row batch). `ld_alpha` (LD-DPO) and `pref_bco_weight`
(a BCO term) are LLaMA-Factory's. Loss formulas live in losses.py.
"""

from __future__ import annotations

import torch

from tunepipe.config import Config
from tunepipe.layout import Layout
from tunepipe.train.batches.tokenized import load_tokenized
from tunepipe.train.model.model_setup import build_trainable_model
from tunepipe.train.model.vocabulary import training_tokenizer
from tunepipe.train.preference.common import (
    Objective,
    Reference,
    forward_log_probs,
    reward_metrics,
    train_with_objective,
)
from tunepipe.train.preference.data import PREFERENCE_COLUMNS, REF_COLUMNS, PreferenceCollator
from tunepipe.train.preference.losses import (
    USES_MEAN_LOGPS,
    RunningMean,
    bco_pair_loss,
    dpo_hinge_loss,
    dpo_sigmoid_loss,
    ipo_loss,
    orpo_loss,
    simpo_loss,
)
from tunepipe.train.preference.ref_cache import reference_for
from tunepipe.train.sft import media_tokens

REFERENCE_FREE = frozenset({"orpo", "simpo"})

# pref_loss -> loss(policy (chosen, rejected), reference (chosen, rejected), train config)
LOSSES = {
    "sigmoid": lambda pol, ref, t: dpo_sigmoid_loss(*pol, *ref, t.pref_beta, t.dpo_label_smoothing),
    "hinge": lambda pol, ref, t: dpo_hinge_loss(*pol, *ref, t.pref_beta),
    "ipo": lambda pol, ref, t: ipo_loss(*pol, *ref, t.pref_beta),
    "orpo": lambda pol, ref, t: orpo_loss(*pol, t.pref_beta),
    "simpo": lambda pol, ref, t: simpo_loss(*pol, t.pref_beta, t.simpo_gamma),
}


def needs_reference(train_cfg) -> bool:
    return train_cfg.pref_loss not in REFERENCE_FREE


def dpo_objective(train_cfg, reference: Reference | None) -> Objective:
    """loss(model, batch) for the configured `pref_loss`, plus the rewards metrics."""
    loss_fn = LOSSES[train_cfg.pref_loss]
    use_mean = train_cfg.pref_loss in USES_MEAN_LOGPS
    bco_weight = train_cfg.pref_bco_weight if needs_reference(train_cfg) else 0.0
    baseline = RunningMean()

    def objective(model, batch):
        # LD-DPO down-weights the policy's extra answer tokens; the reference stays plain
        logps, counts = forward_log_probs(model, batch, ld_alpha=train_cfg.ld_alpha)
        counts = counts.clamp(min=1)
        policy = logps / counts if use_mean else logps
        ref = None
        if reference is not None:
            ref_logps = reference.log_probs(model, batch)
            ref = (ref_logps / counts if use_mean else ref_logps).chunk(2)
        out = loss_fn(policy.chunk(2), ref, train_cfg)
        losses = out.losses
        if bco_weight > 0:
            # LLaMA-Factory's mixture: (DPO + w * BCO) / (1 + w), BCO around the running mean reward
            delta = baseline.update(torch.cat([out.chosen_rewards, out.rejected_rewards]).mean())
            bco = bco_pair_loss(*policy.chunk(2), *ref, train_cfg.pref_beta, delta)
            losses = (losses + bco_weight * bco) / (1 + bco_weight)
        loss = losses.mean()
        chosen_nll = -(logps.chunk(2)[0] / counts.chunk(2)[0])
        metrics = reward_metrics(out.chosen_rewards, out.rejected_rewards)
        rows = out.losses.numel()
        metrics["logps/chosen"] = (logps.chunk(2)[0].detach().sum().item(), rows)
        metrics["logps/rejected"] = (logps.chunk(2)[1].detach().sum().item(), rows)
        if train_cfg.pref_ftx > 0:
            # SFT loss on the chosen answers mixed in (LLaMA-Factory's pref_ftx), per token.
            loss = loss + train_cfg.pref_ftx * chosen_nll.mean()
            metrics["sft_loss"] = (chosen_nll.detach().sum().item(), rows)
        return loss, metrics

    return objective


def reference_columns(dataset) -> tuple[str, ...]:
    """The columns cached reference log-probs depend on: the token columns, and the images'
    references (path + sha256) of a vision-language model's rows."""
    return PREFERENCE_COLUMNS + ("media",) * ("media" in dataset.column_names)


def train(cfg: Config, layout: Layout) -> dict:
    """Train on the preference shards, write the adapter or full model; returns metrics/train.json."""
    splits = load_tokenized(layout, cfg.train.stage, PREFERENCE_COLUMNS)
    tokenizer = training_tokenizer(cfg, layout)  # the grown one when the shards added tokens
    model = build_trainable_model(cfg, layout)
    vision = "media" in splits.train.column_names  # a vision-language model's rows (train/model/vision.py)
    collator = PreferenceCollator(tokenizer.pad_token_id, media_tokens(cfg, layout, tokenizer) if vision else None)
    reference = None
    if needs_reference(cfg.train):
        splits, reference = reference_for(cfg, layout, model, splits, collator, reference_columns(splits.train),
                                          REF_COLUMNS)
    return train_with_objective(cfg, layout, model, tokenizer, splits, collator,
                                dpo_objective(cfg.train, reference))

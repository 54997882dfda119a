"""`stage: kto`: Kahneman-Tversky optimisation on unpaired desirable / undesirable rows.

Each row is scored against the reference model; the reference point z0 is the KL
between policy and reference estimated on mismatched (prompt, completion) pairs (row
i's prompt with row i-1's completion, spliced from the shards by `add_kto_kl_pairs`).
Desirable rows are weighted by `kto_chosen_weight`, undesirable by
`kto_rejected_weight`. The completions and their KL pairs go through one forward.
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
    train_with_objective,
)
from tunepipe.train.preference.data import KTO_COLUMNS, KTO_REF_COLUMNS, KtoCollator, add_kto_kl_pairs
from tunepipe.train.preference.losses import kto_kl_estimate, kto_loss
from tunepipe.train.preference.ref_cache import reference_for

# The reference columns are keyed on the rows as batched, KL pairs included.
KEYED_COLUMNS = ("input_ids", "labels", "kto_tag", "kl_input_ids", "kl_labels")


def kto_metrics(rewards: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor) -> dict:
    """rewards/chosen (desirable rows), rewards/rejected (undesirable), kl, and
    rewards/accuracies: the share of rows whose implied reward has the sign of its tag.
    Every key is always present (count 0 when absent) so processes reduce the same keys."""
    rewards = rewards.detach().float()
    desirable = desirable.bool()
    agree = torch.where(desirable, rewards > 0, rewards < 0).float()
    return {
        "rewards/chosen": (rewards[desirable].sum().item(), int(desirable.sum())),
        "rewards/rejected": (rewards[~desirable].sum().item(), int((~desirable).sum())),
        "rewards/accuracies": (agree.sum().item(), rewards.numel()),
        "kl": (kl.item(), 1),
    }


def kto_objective(train_cfg, reference: Reference) -> Objective:
    def objective(model, batch):
        logps, _ = forward_log_probs(model, batch)
        ref_logps = reference.log_probs(model, batch)
        policy, policy_kl = logps.chunk(2)
        ref, ref_kl = ref_logps.chunk(2)
        kl = kto_kl_estimate(policy_kl.detach(), ref_kl)
        out = kto_loss(policy, ref, batch["kto_tag"], kl, train_cfg.pref_beta,
                       train_cfg.kto_chosen_weight, train_cfg.kto_rejected_weight)
        return out.losses.mean(), kto_metrics(out.rewards, batch["kto_tag"], kl)

    return objective


def with_margin(logs: dict[str, float]) -> dict[str, float]:
    """rewards/margins = mean desirable reward - mean undesirable reward over the log window."""
    for prefix in ("", "eval_"):
        chosen, rejected = logs.get(f"{prefix}rewards/chosen"), logs.get(f"{prefix}rewards/rejected")
        if chosen is not None and rejected is not None:
            logs[f"{prefix}rewards/margins"] = chosen - rejected
    return logs


def train(cfg: Config, layout: Layout) -> dict:
    """Train on the KTO shards, write the adapter or full model; returns metrics/train.json."""
    splits = load_tokenized(layout, cfg.train.stage, KTO_COLUMNS)
    max_length = splits.meta.get("cutoff_len")
    splits.train = add_kto_kl_pairs(splits.train, max_length)
    if splits.eval is not None and len(splits.eval) >= 2:
        splits.eval = add_kto_kl_pairs(splits.eval, max_length)
    elif splits.eval is not None:  # one row has no other row to pair with
        splits.eval = None
    tokenizer = training_tokenizer(cfg, layout)  # the grown one when the shards added tokens
    model = build_trainable_model(cfg, layout)
    collator = KtoCollator(tokenizer.pad_token_id)
    splits, reference = reference_for(cfg, layout, model, splits, collator, KEYED_COLUMNS, KTO_REF_COLUMNS)
    return train_with_objective(cfg, layout, model, tokenizer, splits, collator,
                                kto_objective(cfg.train, reference), derive_metrics=with_margin)

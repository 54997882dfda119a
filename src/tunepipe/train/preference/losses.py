"""Preference and KTO losses as pure functions of per-sequence log-probabilities.

Written here rather than taken from TRL because TRL 1.16's DPOTrainer and KTOTrainer
re-tokenize text columns and cannot take our pre-tokenized shards; each function is
the paper's formula and is tested against a hand-computed value.

Conventions: every argument is a 1-D tensor with one entry per sequence. DPO
(`sigmoid`), `hinge` and KTO take summed log-probs; `ipo`, `orpo` and `simpo` take
log-probs averaged over the answer tokens, as their papers do (`USES_MEAN_LOGPS`).
Each loss returns per-row losses and the per-row implicit rewards that the trainers
log as `rewards/chosen` and `rewards/rejected`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
USES_MEAN_LOGPS = frozenset({"ipo", "orpo", "simpo"})


class PrefLoss(NamedTuple):
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


class KtoLoss(NamedTuple):
    losses: torch.Tensor
    rewards: torch.Tensor


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-prob of the trained tokens (labels != -100) and their count.

    `labels` are aligned with the input ids (the tokenizer's contract), so position t's
    logits predict label t + 1. Cross-entropy keeps memory to one vocab-wide row at a
    time instead of materialising a full log-softmax.
    """
    targets = labels[:, 1:]
    logits = logits[:, :-1].float()
    token_nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").view_as(targets)
    counts = (targets != IGNORE_INDEX).sum(-1)
    return -token_nll.sum(-1), counts


def ld_token_weights(selected: torch.Tensor, alpha: float) -> torch.Tensor:
    """LD-DPO (Liu et al. 2024, LLaMA-Factory's `ld_alpha`): per position of a chosen-rows-then-
    rejected-rows batch, 1 up to the shorter answer of the pair (counted from the answer's first
    token) and `alpha` after it, so a longer answer's extra tokens weigh less.
    `selected` [2B, T] marks the answer-token targets."""
    counts = selected.sum(-1)
    half = counts.shape[0] // 2
    shared = torch.minimum(counts[:half], counts[half:]).repeat(2)
    start = selected.int().argmax(-1)
    positions = torch.arange(selected.shape[-1], device=selected.device)
    front = positions[None, :] < (start + shared)[:, None]
    ones = torch.ones(selected.shape, dtype=torch.float32, device=selected.device)
    return torch.where(front, ones, ones * alpha)


def _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def _ref_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta) -> tuple:
    return ((beta * (policy_chosen - ref_chosen)).detach(),
            (beta * (policy_rejected - ref_rejected)).detach())


def dpo_sigmoid_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                     label_smoothing: float = 0.0) -> PrefLoss:
    """DPO: -log sigmoid(beta * margin); with label smoothing eps the robust (cDPO) mixture
    -(1 - eps) log sigmoid(beta * margin) - eps log sigmoid(-beta * margin)."""
    logits = beta * _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PrefLoss(losses, *_ref_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def dpo_hinge_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> PrefLoss:
    """SLiC-style hinge on the DPO margin: max(0, 1 - beta * margin)."""
    margin = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = torch.relu(1 - beta * margin)
    return PrefLoss(losses, *_ref_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def ipo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> PrefLoss:
    """IPO: (margin - 1 / (2 beta))^2, on mean per-token log-probs (beta is the regulariser tau)."""
    margin = _logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    losses = (margin - 1 / (2 * beta)) ** 2
    return PrefLoss(losses, *_ref_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta))


def bco_pair_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
                  delta: torch.Tensor | float) -> torch.Tensor:
    """BCO (Jung et al. 2024), the term LLaMA-Factory's `pref_bco_weight` mixes into DPO: a binary
    classifier on the implied rewards r = beta * logratio around the baseline delta,
    -log sigmoid(r_chosen - delta) - log sigmoid(-(r_rejected - delta))."""
    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


class RunningMean:
    """BCO's baseline delta: the running mean of each batch's mean implied reward (over all
    processes under DDP), as TRL's former RunningMoments kept it for LLaMA-Factory."""

    def __init__(self):
        self.mean, self.count = 0.0, 0

    def update(self, batch_mean: torch.Tensor) -> float:
        values = batch_mean.detach().float().reshape(1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [torch.zeros_like(values) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(gathered, values)
            values = torch.cat(gathered)
        total = self.count + values.numel()
        self.mean += (values.mean().item() - self.mean) * values.numel() / total
        self.count = total
        return self.mean


def orpo_loss(policy_chosen, policy_rejected, beta: float) -> PrefLoss:
    """ORPO: NLL of the chosen answer + beta * -log sigmoid(log odds(chosen) - log odds(rejected)).

    Inputs are mean per-token log-probs p, and odds(p) = exp(p) / (1 - exp(p)); no reference.
    """
    log_odds = (policy_chosen - policy_rejected) - (
        torch.log1p(-torch.exp(policy_chosen)) - torch.log1p(-torch.exp(policy_rejected)))
    losses = -policy_chosen - beta * F.logsigmoid(log_odds)
    return PrefLoss(losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach())


def simpo_loss(policy_chosen, policy_rejected, beta: float, gamma: float) -> PrefLoss:
    """SimPO: -log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma); no reference."""
    losses = -F.logsigmoid(beta * (policy_chosen - policy_rejected) - gamma)
    return PrefLoss(losses, (beta * policy_chosen).detach(), (beta * policy_rejected).detach())


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch mean of log pi(y'|x) - log ref(y'|x) over mismatched
    (prompt, completion) pairs, clamped at 0 and detached (the paper does not backpropagate it)."""
    return (policy_kl_logps - ref_kl_logps).mean().clamp(min=0).detach()


def kto_loss(policy_logps, ref_logps, desirable: torch.Tensor, kl: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> KtoLoss:
    """KTO: desirable rows lose w_D (1 - sigmoid(beta (r - z0))), undesirable rows
    w_U (1 - sigmoid(beta (z0 - r))), with r = log pi(y|x) - log ref(y|x)."""
    logratio = policy_logps - ref_logps
    desirable = desirable.bool()
    losses = torch.where(desirable,
                         desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio))))
    return KtoLoss(losses, (beta * logratio).detach())

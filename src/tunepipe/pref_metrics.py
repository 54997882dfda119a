"""Preference metrics on eval pairs: implicit rewards, their margins and accuracy.

The rewards are the ones the preference trainers optimise, computed by the same loss
functions (`tunepipe.train.pref_losses`) on the eval split: DPO / hinge / IPO reward a
sequence by beta x its log-prob ratio to the reference (the base), ORPO and SimPO by
beta x its mean log-prob (no reference), KTO by beta x its log-prob ratio. A preference
fine-tune worked when `rewards/margins` (chosen - rejected) is positive and
`rewards/accuracies` (pairs whose chosen reward is higher) is above one half.
"""

from __future__ import annotations

from tunepipe.config import TrainConfig
from tunepipe.lm_metrics import sequence_logps

REFERENCE_FREE = frozenset({"orpo", "simpo"})


def split_kind(dataset) -> str:
    """`pairs` (chosen/rejected), `kto` (tagged rows), `sft` (with prompts) or `pt` rows."""
    columns = set(dataset.column_names)
    if "chosen_input_ids" in columns:
        return "pairs"
    if "kto_tag" in columns:
        return "kto"
    return "sft" if "prompt_ids" in columns else "pt"


def needs_reference(train_cfg: TrainConfig) -> bool:
    if train_cfg.stage == "kto":
        return True
    return train_cfg.stage == "dpo" and train_cfg.pref_loss not in REFERENCE_FREE


def preference_logps(model, dataset, pad_id: int, batch_size: int, desc: str) -> dict[str, list]:
    """Per-sequence (sum log-prob, token count) of the answers in pair or KTO rows."""
    if split_kind(dataset) == "pairs":
        return {
            "chosen": sequence_logps(model, dataset["chosen_input_ids"], dataset["chosen_labels"],
                                     pad_id, batch_size, desc=f"{desc} chosen"),
            "rejected": sequence_logps(model, dataset["rejected_input_ids"], dataset["rejected_labels"],
                                       pad_id, batch_size, desc=f"{desc} rejected"),
        }
    return {"rows": sequence_logps(model, dataset["input_ids"], dataset["labels"], pad_id, batch_size,
                                   desc=desc),
            "tags": list(dataset["kto_tag"])}


def _values(logps, mean: bool):
    import torch

    return torch.tensor([total / max(count, 1) if mean else total for total, count in logps],
                        dtype=torch.float64)


def pair_rewards(train_cfg: TrainConfig, tuned: dict, base: dict | None):
    """(chosen rewards, rejected rewards, per-pair loss) with the trained objective's formula."""
    from tunepipe.train import pref_losses as losses

    kind = train_cfg.pref_loss
    mean = kind in losses.USES_MEAN_LOGPS
    pc, pr = _values(tuned["chosen"], mean), _values(tuned["rejected"], mean)
    beta = train_cfg.pref_beta
    if kind == "orpo":
        return losses.orpo_loss(pc, pr, beta)
    if kind == "simpo":
        return losses.simpo_loss(pc, pr, beta, train_cfg.simpo_gamma)
    rc, rr = _values(base["chosen"], mean), _values(base["rejected"], mean)
    if kind == "hinge":
        return losses.dpo_hinge_loss(pc, pr, rc, rr, beta)
    if kind == "ipo":
        return losses.ipo_loss(pc, pr, rc, rr, beta)
    return losses.dpo_sigmoid_loss(pc, pr, rc, rr, beta, train_cfg.dpo_label_smoothing)


def preference_metrics(train_cfg: TrainConfig, tuned: dict, base: dict | None) -> dict[str, float]:
    """rewards/{chosen,rejected,margins,accuracies} and the objective's eval loss."""
    if "tags" in tuned:
        return _kto_metrics(train_cfg, tuned, base)
    result = pair_rewards(train_cfg, tuned, base)
    chosen, rejected = result.chosen_rewards, result.rejected_rewards
    return {"rewards/chosen": chosen.mean().item(), "rewards/rejected": rejected.mean().item(),
            "rewards/margins": (chosen - rejected).mean().item(),
            "rewards/accuracies": (chosen > rejected).double().mean().item(),
            "pref_loss": result.losses.mean().item(), "eval_pairs": len(chosen)}


def _kto_metrics(train_cfg: TrainConfig, tuned: dict, base: dict) -> dict[str, float]:
    import torch

    rewards = train_cfg.pref_beta * (_values(tuned["rows"], False) - _values(base["rows"], False))
    tags = torch.tensor(tuned["tags"], dtype=torch.bool)
    metrics = {"eval_rows": len(rewards)}
    if tags.any():
        metrics["rewards/chosen"] = rewards[tags].mean().item()
    if (~tags).any():
        metrics["rewards/rejected"] = rewards[~tags].mean().item()
    if tags.any() and (~tags).any():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics

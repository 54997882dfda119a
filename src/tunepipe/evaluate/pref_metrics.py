"""Preference metrics on eval pairs: implicit rewards, their margins and accuracy.

The rewards are the ones the preference trainers log (`tunepipe.train.preference.losses`),
recomputed on the eval split: DPO (`sigmoid`, `hinge`) rewards a sequence by beta x
its summed log-prob ratio to the reference (the base), IPO the same on mean log-probs,
ORPO and SimPO by beta x the mean log-prob (no reference), KTO by beta x the summed
ratio. A preference fine-tune worked when `rewards/margins` (chosen - rejected) is
positive and `rewards/accuracies` (pairs whose chosen reward is higher) is above one
half. The formulas are one line each, so they are restated here rather than imported:
importing `tunepipe.train` would load the whole training stack (and make every training
module a DVC dependency of evaluate); a test checks they equal the trainers' rewards.
"""

from __future__ import annotations

from tunepipe.config import TrainConfig
from tunepipe.evaluate.lm_metrics import sequence_logps

REFERENCE_FREE = frozenset({"orpo", "simpo"})
# Losses computed on log-probs averaged over the answer tokens (train/preference/losses.py USES_MEAN_LOGPS).
MEAN_LOGPS = frozenset({"ipo", "orpo", "simpo"})


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


def preference_logps(model, dataset, pad_id: int, batch_size: int, desc: str, images=None) -> dict[str, list]:
    """Per-sequence (sum log-prob, token count) of the answers in pair or KTO rows; `images(column)`:
    the image inputs of rows whose ids are in that column (a vision-language model's pairs)."""
    if split_kind(dataset) == "pairs":
        return {side: sequence_logps(model, dataset[f"{side}_input_ids"], dataset[f"{side}_labels"], pad_id,
                                     batch_size, desc=f"{desc} {side}",
                                     extra_inputs=images(f"{side}_input_ids") if images else None)
                for side in ("chosen", "rejected")}
    return {"rows": sequence_logps(model, dataset["input_ids"], dataset["labels"], pad_id, batch_size,
                                   desc=desc),
            "tags": list(dataset["kto_tag"])}


def _values(logps, mean: bool) -> list[float]:
    return [total / max(count, 1) if mean else total for total, count in logps]


def pair_rewards(train_cfg: TrainConfig, tuned: dict, base: dict | None) -> tuple[list[float], list[float]]:
    """Per pair: (chosen reward, rejected reward) as the trained objective defines them."""
    mean = train_cfg.pref_loss in MEAN_LOGPS
    beta = train_cfg.pref_beta
    rewards = []
    for side in ("chosen", "rejected"):
        policy = _values(tuned[side], mean)
        if train_cfg.pref_loss in REFERENCE_FREE:
            rewards.append([beta * p for p in policy])
        else:
            rewards.append([beta * (p - r) for p, r in zip(policy, _values(base[side], mean), strict=True)])
    return rewards[0], rewards[1]


def preference_metrics(train_cfg: TrainConfig, tuned: dict, base: dict | None) -> dict[str, float]:
    """rewards/{chosen,rejected,margins,accuracies} over the eval pairs (or KTO rows)."""
    if "tags" in tuned:
        return _kto_metrics(train_cfg, tuned, base)
    chosen, rejected = pair_rewards(train_cfg, tuned, base)
    count = len(chosen)
    margins = [c - r for c, r in zip(chosen, rejected, strict=True)]
    return {"rewards/chosen": sum(chosen) / count, "rewards/rejected": sum(rejected) / count,
            "rewards/margins": sum(margins) / count,
            "rewards/accuracies": sum(m > 0 for m in margins) / count, "eval_pairs": count}


def _kto_metrics(train_cfg: TrainConfig, tuned: dict, base: dict) -> dict[str, float]:
    rewards = [train_cfg.pref_beta * (p - r)
               for p, r in zip(_values(tuned["rows"], False), _values(base["rows"], False), strict=True)]
    good = [r for r, tag in zip(rewards, tuned["tags"], strict=True) if tag]
    bad = [r for r, tag in zip(rewards, tuned["tags"], strict=True) if not tag]
    metrics: dict[str, float] = {"eval_rows": len(rewards)}
    if good:
        metrics["rewards/chosen"] = sum(good) / len(good)
    if bad:
        metrics["rewards/rejected"] = sum(bad) / len(bad)
    if good and bad:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics

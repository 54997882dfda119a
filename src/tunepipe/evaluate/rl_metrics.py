"""Did RL help? The rewards a `stage: grpo` run trained on, averaged over the eval prompts'
generated answers, for the tuned model and its base (the evaluate stage puts them side by side).

Each reward in `train.reward_funcs` scores the answers exactly as in training (`tunepipe.rewards`:
the same built-ins and your `configs/rewards/` functions, given the same prompt text, answer,
answer token ids and reference); a reward-model reward scores prompt + answer with that model.
"""

from __future__ import annotations

from pathlib import Path

from tunepipe.config import Config
from tunepipe.evaluate.generation import Example


def reward_means(cfg: Config, base_dir: Path, tokenizer, examples: list[Example], answers: list[str]) -> dict:
    """`reward/<name>` (mean over answers, Nones skipped) per reward, and `reward` (weighted sum of the means)."""
    from tunepipe import rewards

    prompts = [tokenizer.decode(e.prompt_ids, skip_special_tokens=False) for e in examples]
    references = [e.label for e in examples]
    completion_ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    specs = cfg.train.reward_list()
    weights = cfg.train.reward_weights or [1.0] * len(specs)
    means, total = {}, 0.0
    for spec, weight in zip(specs, weights):
        name, found = rewards.resolve(spec, Path.cwd(), cfg.train.max_completion_length)
        if isinstance(found, Path):
            values = model_rewards(found, base_dir, tokenizer, [p + a for p, a in zip(prompts, answers)])
        else:
            values = rewards.checked(name, found, spec)(
                prompts=prompts, completions=answers, completion_ids=completion_ids, reference=references,
                prompt_ids=[e.prompt_ids for e in examples], trainer_state=None,
                log_extra=lambda *a: None, log_metric=lambda *a: None)
        scored = [v for v in values if v is not None]
        means[f"reward/{name}"] = sum(scored) / len(scored) if scored else 0.0
        total += weight * means[f"reward/{name}"]
    means["reward"] = total
    return means


def model_rewards(model_dir: Path, base_dir: Path, tokenizer, texts: list[str]) -> list[float]:
    """A `stage: rm` model's score of each text (loaded, used, freed)."""
    import gc

    from tunepipe.evaluate.scoring import score_texts
    from tunepipe.models.base import load_reward_model

    model = load_reward_model(model_dir, base_dir, tokenizer.pad_token_id)
    try:
        return score_texts(model, tokenizer, texts)
    finally:
        del model
        gc.collect()

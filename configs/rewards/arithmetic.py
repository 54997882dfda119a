"""Rewards for the arithmetic GRPO recipe (README, "Online RL (GRPO, PPO)").

A reward is `f(completions, reference, **kwargs) -> list[float | None]`: one number per
completion. `reference` is each row's reference answer (alpaca `output`, or the last
assistant turn); `prompts`, `completion_ids` and `trainer_state` come in kwargs too.
The DVC train stage depends on this folder: editing a reward re-runs training.
"""

import re

ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")


def correct_answer(completions, reference, **kwargs):
    """1.0 when the completion ends with 'Answer: N' and N is the reference's final answer."""
    scores = []
    for completion, ref in zip(completions, reference):
        got, want = ANSWER.search(completion.strip()), ANSWER.search(ref.strip())
        scores.append(float(got is not None and want is not None and got.group(1) == want.group(1)))
    return scores


def answer_format(completions, **kwargs):
    """0.5 for ending with 'Answer: <integer>', whatever the number: a stepping stone to correct_answer."""
    return [0.5 if ANSWER.search(c.strip()) else 0.0 for c in completions]

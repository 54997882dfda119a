"""The rewards `train.reward_funcs` names (tunepipe.rewards): the built-ins' values, the reward
files confined to configs/rewards/, and every way a reward function can be wrong (import
error, wrong signature, exception inside, wrong length, non-number, NaN) stopped before any
model is loaded, by an error naming the function."""

from __future__ import annotations

import math

import pytest
from datasets import Dataset

from tunepipe import rewards
from tunepipe.config import Config, DataConfig, ModelConfig, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.train.rl.grpo import load_rewards

ROWS = Dataset.from_dict({"prompt": ["What is 2 + 3?", "What is 10 * 4?"], "reference": ["Answer: 5", "Answer: 40"]})


def test_builtin_rewards_score_as_documented():
    completions = ["so 2 + 3 = 5", " Answer: 40 ", "no number"]
    references = ["Answer: 5", "Answer: 40", "Answer: 7"]
    assert rewards.numeric_match(completions, references) == [1.0, 1.0, 0.0]
    assert rewards.exact_match(completions, references) == [0.0, 1.0, 0.0]
    assert rewards.numeric_match(["1,234.0 apples"], ["1234"]) == [1.0]
    _, fmt = rewards.resolve(r"format_regex=.*Answer: -?\d+", rewards.Path("."), 16)
    assert fmt(completions=completions) == [0.0, 1.0, 0.0]
    _, length = rewards.resolve("length_penalty=4", rewards.Path("."), 16)
    assert length(completion_ids=[[1] * 3, [1] * 4, [1] * 12]) == [0.0, 0.0, -0.5]


def reward_file(tmp_path, body: str, name: str = "mine.py"):
    folder = tmp_path / "configs" / "rewards"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(body)
    return f"configs/rewards/{name}"


def config(*reward_funcs) -> Config:
    return Config(model=ModelConfig(model_name_or_path="unused"), data=DataConfig(dataset="unused"),
                  train=TrainConfig(stage="grpo", reward_funcs=list(reward_funcs)))


class Tokenizer:  # what the probe needs of a tokenizer: ids for the stand-in completions
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


@pytest.mark.parametrize(("body", "message"), [
    ("import not_a_module_anywhere\n", r"importing configs/rewards/mine.py failed: ModuleNotFoundError"),
    ("def score(x):\n    return [1.0]\n", r"reward function configs/rewards/mine.py:score has the wrong signature"),
    ("def score(completions, **kw):\n    raise KeyError('answer')\n", r"reward function configs/rewards/mine.py:score raised KeyError"),
    ("def score(completions, **kw):\n    return [1.0]\n", r"reward function configs/rewards/mine.py:score returned 1 rewards for 2 completions"),
    ("def score(completions, **kw):\n    return ['good'] * len(completions)\n",
     r"reward function configs/rewards/mine.py:score returned 'good' for completion 0: not a number"),
    ("def score(completions, **kw):\n    return [float('nan')] * len(completions)\n",
     r"reward function configs/rewards/mine.py:score returned nan for completion 0"),
    ("def score(completions, **kw):\n    return 1.0\n", r"reward function configs/rewards/mine.py:score returned float, not a list"),
    ("x = 1\n", r"configs/rewards/mine.py defines no function 'score'"),
])
def test_a_broken_reward_function_is_named_before_any_model_loads(tmp_path, monkeypatch, body, message):
    monkeypatch.chdir(tmp_path)
    spec = reward_file(tmp_path, body) + ":score"
    with pytest.raises(TunepipeError, match=message):
        load_rewards(config(spec), layout=None, tokenizer=Tokenizer(), train_rows=ROWS)


def test_a_working_reward_function_is_loaded_checked_and_hashed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = reward_file(tmp_path, "def score(completions, reference, **kw):\n"
                                 "    return [float(c == r) if c else None for c, r in zip(completions, reference)]\n")
    funcs, processing = load_rewards(config(spec + ":score", "numeric_match"), None, Tokenizer(), ROWS)
    assert [f.__name__ for f in funcs] == ["score", "numeric_match"] and processing == [None, None]
    assert funcs[0](prompts=["p", "q"], completions=["a", ""], reference=["a", "b"]) == [1.0, None]
    hashes = rewards.file_hashes([spec + ":score", "numeric_match"], tmp_path)
    assert list(hashes) == [spec] and len(hashes[spec]) == 64
    assert not math.isnan(funcs[1](completions=["5"], reference=["5"])[0])


def test_reward_files_outside_configs_rewards_are_refused(tmp_path, monkeypatch):
    """DVC re-runs training when configs/rewards/ changes; a reward elsewhere would not be tracked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.py").write_text("def score(completions, **kw):\n    return [0.0] * len(completions)\n")
    with pytest.raises(TunepipeError, match=r"reward files live in configs/rewards/"):
        load_rewards(config("mine.py:score"), None, Tokenizer(), ROWS)
    with pytest.raises(TunepipeError, match=r"'nope' is not a built-in reward"):
        load_rewards(config("nope"), None, Tokenizer(), ROWS)


def test_config_checks_name_the_grpo_keys():
    with pytest.raises(TunepipeError, match=r"train.reward_funcs=None: stage grpo needs at least one reward"):
        TrainConfig(stage="grpo").check()
    with pytest.raises(TunepipeError, match=r"train.num_generations=1: must be >= 2"):
        TrainConfig(stage="grpo", reward_funcs="exact_match", num_generations=1).check()
    with pytest.raises(TunepipeError, match=r"train.reward_weights=\[1.0\]: needs one weight per reward \(2"):
        TrainConfig(stage="grpo", reward_funcs="exact_match,numeric_match", reward_weights=[1.0]).check()

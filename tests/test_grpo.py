"""stage grpo on the tiny model, at the level of TRL's GRPOTrainer as tunepipe configures it:
the loss on a fixed group equals the formula written out here for every loss_type, a group
whose rewards are equal has zero advantages (and an unequal one the group-normalised ones),
and a seeded learning signal: a reward paying for one token raises that token's frequency,
the same rewards shuffled do not."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

from tunepipe.config import TrainConfig
from tunepipe.train.rl.grpo import grpo_config
from tunepipe.train.rl.trainer import PromptIdsGRPOTrainer

QUESTIONS = ["hi", "who are you?", "2+2?", "tips?"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    return [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]


def prompt_rows(tokenizer, prompts, repeat: int = 1) -> Dataset:
    return Dataset.from_dict({"prompt": [tokenizer.decode(p) for p in prompts] * repeat,
                              "prompt_ids": prompts * repeat, "reference": ["4"] * len(prompts) * repeat})


def grpo_trainer(model, tokenizer, rows, reward, tmp_path, batch: int = 4, steps: int = 1, lr: float = 1e-3,
                 processing=None, **grpo) -> PromptIdsGRPOTrainer:
    """The trainer tunepipe builds (grpo_config from TrainingArguments + train.* keys)."""
    args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=1, learning_rate=lr, max_steps=steps,
                             lr_scheduler_type="constant", logging_steps=1000, save_strategy="no",
                             report_to="none", seed=0, use_cpu=True)
    train_cfg = TrainConfig(stage="grpo", reward_funcs="unused", **{"num_generations": 4,
                                                                     "max_completion_length": 5, **grpo})
    return PromptIdsGRPOTrainer(model=model, reward_funcs=reward if isinstance(reward, list) else [reward],
                                args=grpo_config(args, train_cfg), train_dataset=rows, processing_class=tokenizer,
                                reward_processing_classes=processing)


def constant_reward(completions, **_):
    return [0.0] * len(completions)


# -- the loss -------------------------------------------------------------------------------


def completion_log_probs(model, prompt_ids, completion_ids) -> torch.Tensor:
    """log p(completion token | everything before it), one forward, no TRL code."""
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    predicting = logits[:, prompt_ids.shape[1] - 1:-1]
    return torch.log_softmax(predicting, -1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)


def formula(loss_type, logp, old, ref, mask, advantages, beta, epsilon, max_completion_length) -> torch.Tensor:
    """GRPO's clipped surrogate plus beta x the k3 KL estimate (weighted by the ratio, the
    off-policy correction TRL applies by default), averaged per `loss_type`:
    grpo: per sequence, then over sequences; bnpo / dapo: over every token of the batch;
    dr_grpo: over sequences x max_completion_length (a constant)."""
    ratio = torch.exp(logp - old)
    clipped = ratio.clamp(1 - epsilon, 1 + epsilon)
    a = advantages[:, None]
    kl = (torch.exp(ref - logp) - (ref - logp) - 1) * ratio
    per_token = -torch.minimum(ratio * a, clipped * a) + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum()
    return (per_token * mask).sum() / (mask.shape[0] * max_completion_length)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_loss_on_a_fixed_group_equals_the_formula(tiny_model_dir, tokenizer, prompts, tmp_path, loss_type):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    beta, epsilon, max_len = 0.04, 0.2, 6
    trainer = grpo_trainer(model, tokenizer, prompt_rows(tokenizer, prompts), constant_reward, tmp_path,
                           loss_type=loss_type, beta=beta, epsilon=epsilon, max_completion_length=max_len)
    trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(0)
    prompt_ids = torch.tensor([prompts[0]] * 4)
    completion_ids = torch.randint(5, len(tokenizer), (4, max_len), generator=generator)
    mask = torch.tensor([[1] * n + [0] * (max_len - n) for n in (6, 3, 5, 2)])
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0])
    advantages = (rewards - rewards.mean()) / (rewards.std() + 1e-4)  # one group of num_generations=4
    with torch.no_grad():
        logp = completion_log_probs(model, prompt_ids, completion_ids)
    # the policy that sampled (old) and the reference differ from the current one by fixed amounts,
    # large enough that some ratios fall outside [1 - epsilon, 1 + epsilon]
    old = logp + (torch.rand(logp.shape, generator=generator) - 0.5) * 0.8
    ref = logp + (torch.rand(logp.shape, generator=generator) - 0.5) * 0.4
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": mask, "advantages": advantages, "old_per_token_logps": old,
              "ref_per_token_logps": ref, "num_items_in_batch": mask.sum()}
    loss = trainer._compute_loss(model, inputs)
    expected = formula(loss_type, logp, old, ref, mask.float(), advantages, beta, epsilon, max_len)
    clipped = ((torch.exp(logp - old) - 1).abs() > epsilon) & mask.bool()
    assert clipped.any() and (~clipped & mask.bool()).any()  # both branches of the min are exercised
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    loss.backward()  # and it is a loss the policy can learn from
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# -- advantages -----------------------------------------------------------------------------


def test_equal_rewards_in_a_group_give_zero_advantages(tiny_model_dir, tokenizer, prompts, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    returned = []
    mode = {"equal": True}

    def reward(completions, **_):
        values = [0.7] * len(completions) if mode["equal"] else [float(i % 3) for i in range(len(completions))]
        returned.append(values)
        return values

    rows = prompt_rows(tokenizer, prompts[:2])
    trainer = grpo_trainer(model, tokenizer, rows, reward, tmp_path, batch=8)
    group_rows = [rows[0]] * 4 + [rows[1]] * 4  # what TRL's sampler hands over: each prompt num_generations times
    out = trainer._generate_and_score_completions(group_rows)
    assert torch.equal(out["advantages"], torch.zeros(8))

    mode["equal"] = False
    out = trainer._generate_and_score_completions(group_rows)
    rewards = torch.tensor(returned[-1]).view(2, 4)
    expected = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
    torch.testing.assert_close(out["advantages"], expected.flatten())


# -- learning signal ------------------------------------------------------------------------

TARGET = 201  # the token the reward pays for: ~9% of the sampled tokens before training (seeded)


def peaked_model(tiny_model_dir):
    """The tiny model with its (tied) embeddings scaled x5: the random init's logits are nearly
    uniform over 600 tokens, so no completion would ever hold a given token and no group would
    see a reward difference to learn from."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(5.0)
    return model


def target_frequency(model, tokenizer, prompt: list[int]) -> float:
    torch.manual_seed(123)
    ids = torch.tensor([prompt] * 64)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, max_new_tokens=8, top_k=0,
                             top_p=1.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=None)
    return (out[:, ids.shape[1]:] == TARGET).float().mean().item()


def train_on_token_reward(tiny_model_dir, tokenizer, prompts, tmp_path, shuffled: bool) -> tuple[float, float]:
    model = peaked_model(tiny_model_dir)
    before = target_frequency(model, tokenizer, prompts[0])
    rng = random.Random(0)

    def pays_for_the_token(completion_ids, **_):
        values = [sum(t == TARGET for t in ids) / max(len(ids), 1) for ids in completion_ids]
        if shuffled:
            rng.shuffle(values)  # the same rewards, no longer attached to the completions that earned them
        return values

    trainer = grpo_trainer(model, tokenizer, prompt_rows(tokenizer, prompts, repeat=8), pays_for_the_token,
                           tmp_path / ("shuffled" if shuffled else "paid"), batch=8, steps=24, lr=3e-3,
                           num_generations=8, max_completion_length=8, loss_type="grpo")
    trainer.train()
    return before, target_frequency(model.eval(), tokenizer, prompts[0])


def test_a_reward_for_one_token_raises_its_frequency_and_shuffled_rewards_do_not(
        tiny_model_dir, tokenizer, prompts, tmp_path):
    before, after = train_on_token_reward(tiny_model_dir, tokenizer, prompts, tmp_path, shuffled=False)
    assert 0.03 < before < 0.2  # a token the base samples now and then
    assert after > before + 0.3, (before, after)
    control_before, control_after = train_on_token_reward(tiny_model_dir, tokenizer, prompts, tmp_path, shuffled=True)
    assert control_before == before
    assert control_after < before + 0.05, (before, control_after)


# -- a reward model as a reward ----------------------------------------------------------------


def test_a_stage_rm_output_dir_rewards_prompt_plus_completion_with_its_score(tiny_model_dir, tokenizer, prompts,
                                                                             tmp_path):
    from tests.fixtures.pref_rows import preference_dataset
    from tests.fixtures.pref_runs import pref_config, write_tree
    from tunepipe.config import Config, DataConfig, ModelConfig
    from tunepipe.evaluate.scoring import score_texts
    from tunepipe.models.base import load_reward_model
    from tunepipe.train.preference import rm
    from tunepipe.train.rl.grpo import load_rewards

    rm_cfg = pref_config(tiny_model_dir, tmp_path / "rm", stage="rm", max_steps=2)
    layout = write_tree(rm_cfg, preference_dataset(tokenizer))
    rm.train(rm_cfg, layout)
    cfg = Config(model=ModelConfig(model_name_or_path=str(tiny_model_dir)), data=DataConfig(dataset="unused"),
                 train=TrainConfig(stage="grpo", reward_funcs=[str(layout.adapter), "exact_match"]))
    rows = prompt_rows(tokenizer, prompts[:1])
    funcs, processing = load_rewards(cfg, layout, tokenizer, rows)
    assert processing == [tokenizer, None]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = grpo_trainer(model, tokenizer, rows, funcs, tmp_path, processing=processing)
    trainer._generate_and_score_completions([rows[0]] * 4)
    texts = [p + c for p, c in zip(trainer._logs["prompt"], trainer._logs["completion"])]
    expected = score_texts(load_reward_model(layout.adapter, layout.base_model, tokenizer.pad_token_id), tokenizer,
                           texts)
    assert trainer.reward_func_names == ["reward_model", "exact_match"]
    assert trainer._logs["rewards"]["reward_model"] == pytest.approx(expected, abs=1e-5)
    assert len(set(expected)) > 1  # the completions differ, and so do their scores

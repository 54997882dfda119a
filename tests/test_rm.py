"""stage rm on the tiny model: pairwise accuracy on the training pairs, the saved reward model
scores text exactly as training scored the rows, and `tunepipe score` prints those scores."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.fixtures.pref_rows import PAIRS, preference_dataset
from tests.fixtures.pref_runs import pref_config, write_tree
from tunepipe.evaluate.scoring import load_reward_model, score_texts
from tunepipe.train.preference import rm


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_reward_model_ranks_its_training_pairs(tiny_model_dir, tokenizer, tmp_path, method):
    finetuning_type = "full" if method == "full" else "lora"
    cfg = pref_config(tiny_model_dir, tmp_path, stage="rm", finetuning_type=finetuning_type, max_steps=10,
                      learning_rate=5e-3 if finetuning_type == "lora" else 1e-3)
    quantization = None
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
        from tunepipe.models.trained import quantization_config

        cfg.model.quantization_bit = 4
        quantization = quantization_config(cfg)
    rows = preference_dataset(tokenizer)
    layout = write_tree(cfg, rows)
    summary = rm.train(cfg, layout)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert key in summary
    assert "accuracy" not in summary  # TRL's duplicate names are replaced by ours

    trained = layout.trained(finetuning_type)
    model = load_reward_model(trained, layout.base_model, tokenizer.pad_token_id, quantization_config=quantization)
    chosen = score_texts(model, tokenizer, [conversation(p, c) for p, c, _ in PAIRS])
    rejected = score_texts(model, tokenizer, [conversation(p, r) for p, _, r in PAIRS])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(PAIRS)
    assert accuracy > 0.5, (chosen, rejected)

    # Scoring a rendered conversation = the reward of the tokenized training row.
    with torch.no_grad():
        ids = torch.tensor([rows[0]["chosen_input_ids"]])
        row_reward = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.item()
    assert chosen[0] == pytest.approx(row_reward, abs=1e-5)


def test_lora_reward_adapter_carries_the_value_head(tiny_model_dir, tokenizer, tmp_path, capsys):
    from safetensors import safe_open

    from tunepipe.cli import main

    cfg = pref_config(tiny_model_dir, tmp_path, stage="rm", finetuning_type="lora", max_steps=2)
    layout = write_tree(cfg, preference_dataset(tokenizer))
    rm.train(cfg, layout)
    with safe_open(str(layout.adapter / "adapter_model.safetensors"), "pt") as weights:
        assert any("score" in name for name in weights.keys())  # noqa: SIM118 (safe_open has no __iter__)
    assert json.loads((layout.adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"

    config_file = tmp_path / "rm.yaml"
    config_file.write_text(yaml.safe_dump({
        "model_name_or_path": str(tiny_model_dir), "stage": "rm", "finetuning_type": "lora",
        "output_dir": str(tmp_path), "dataset": "unused", "report_to": "none"}))
    text = json.dumps(conversation(*PAIRS[0][:2]))
    assert main(["score", str(config_file), "--text", text, "--text", "plain words"]) == 0
    printed = [line.split("\t")[0] for line in capsys.readouterr().out.strip().splitlines()]
    model = load_reward_model(layout.adapter, layout.base_model, tokenizer.pad_token_id)
    expected = score_texts(model, tokenizer, [conversation(*PAIRS[0][:2]), "plain words"])
    assert [float(value) for value in printed] == pytest.approx(expected, abs=1e-4)


def test_score_refuses_a_causal_lm_adapter(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    from tunepipe.errors import TunepipeError
    from tunepipe.models.base import load_causal_lm

    get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=2, target_modules="all-linear",
                                                              task_type="CAUSAL_LM")).save_pretrained(tmp_path)
    with pytest.raises(TunepipeError, match="not a reward model"):
        load_reward_model(tmp_path, tiny_model_dir, 0)

"""stage dpo end to end on the tiny model: DPO, ORPO and SimPO raise the reward margin and the
accuracy on their training pairs; full fine-tuning with cached reference log-probs; QLoRA."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.pref_rows import preference_dataset
from tests.fixtures.pref_runs import pref_config, write_tree
from tunepipe.models.base import load_causal_lm
from tunepipe.train.preference import dpo
from tunepipe.train.preference.common import Reference
from tunepipe.train.preference.data import PreferenceCollator


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def trained_model(layout, finetuning_type: str):
    if finetuning_type == "full":
        return load_causal_lm(layout.full).eval()
    from peft import PeftModel

    return PeftModel.from_pretrained(load_causal_lm(layout.base_model), str(layout.adapter)).eval()


@torch.no_grad()
def pair_figures(train_cfg, policy, base, rows, tokenizer) -> tuple[float, float]:
    """(mean reward margin, pairwise accuracy) of `policy` on every training pair, with the
    base model as reference: the objective's own reward definition."""
    batch = PreferenceCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    reference = Reference("frozen_copy", base) if dpo.needs_reference(train_cfg) else None
    _, metrics = dpo.dpo_objective(train_cfg, reference)(policy, batch)
    margin, accuracy = metrics["rewards/margins"], metrics["rewards/accuracies"]
    return margin[0] / margin[1], accuracy[0] / accuracy[1]


@pytest.mark.parametrize("pref_loss,beta", [("sigmoid", 0.1), ("orpo", 0.1), ("simpo", 2.0)])
def test_short_run_raises_margin_and_accuracy(tiny_model_dir, tokenizer, tmp_path, pref_loss, beta, request):
    # One of the runs also goes to MLflow, to check the rewards reach it at every logging step.
    tracking_uri = request.getfixturevalue("mlflow_uri") if pref_loss == "sigmoid" else None
    cfg = pref_config(tiny_model_dir, tmp_path, tracking_uri, stage="dpo", pref_loss=pref_loss,
                      pref_beta=beta, finetuning_type="lora", max_steps=8)
    rows = preference_dataset(tokenizer)
    layout = write_tree(cfg, rows)
    summary = dpo.train(cfg, layout)

    base = load_causal_lm(layout.base_model).eval()
    before = pair_figures(cfg.train, base, base, rows, tokenizer)
    after = pair_figures(cfg.train, trained_model(layout, "lora"), base, rows, tokenizer)
    assert after[0] > before[0], (before, after)
    assert after[1] > 0.5 and after[1] >= before[1], (before, after)
    if pref_loss == "sigmoid":
        assert before == (0.0, 0.0)  # policy == reference at step 0
    written = json.loads((layout.metrics / "train.json").read_text())
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert written[key] == summary[key]
    if tracking_uri:
        assert_rewards_in_mlflow(tracking_uri, layout, steps=8, logging_steps=2)


def assert_rewards_in_mlflow(uri: str, layout, steps: int, logging_steps: int) -> None:
    from mlflow import MlflowClient

    run_id = json.loads((layout.adapter / "tunepipe_run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(tracking_uri=uri)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        history = client.get_metric_history(run_id, key)
        assert [point.step for point in history] == list(range(logging_steps, steps + 1, logging_steps))
    margins = [point.value for point in client.get_metric_history(run_id, "rewards/margins")]
    assert margins[-1] > margins[0]


def test_full_finetune_with_precomputed_reference(tiny_model_dir, tokenizer, tmp_path):
    cfg = pref_config(tiny_model_dir, tmp_path, stage="dpo", finetuning_type="full", learning_rate=1e-3,
                      precompute_ref_log_probs=True, max_steps=4)
    rows = preference_dataset(tokenizer)
    layout = write_tree(cfg, rows)
    dpo.train(cfg, layout)
    cached = list((layout.root / "data" / "ref_logps").glob("train-*.arrow"))
    assert len(cached) == 1
    base = load_causal_lm(layout.base_model).eval()
    margin, accuracy = pair_figures(cfg.train, trained_model(layout, "full"), base, rows, tokenizer)
    assert margin > 0.05 and accuracy > 0.5


def test_qlora_4bit_dpo_trains(tiny_model_dir, tokenizer, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = pref_config(tiny_model_dir, tmp_path, stage="dpo", finetuning_type="lora", max_steps=4)
    cfg.model.quantization_bit = 4
    rows = preference_dataset(tokenizer)
    layout = write_tree(cfg, rows)
    summary = dpo.train(cfg, layout)
    assert summary["rewards/margins"] > 0
    assert (layout.adapter / "adapter_model.safetensors").is_file()


def test_eval_split_reports_rewards(tiny_model_dir, tokenizer, tmp_path):
    rows = preference_dataset(tokenizer)
    cfg = pref_config(tiny_model_dir, tmp_path, stage="dpo", pref_loss="ipo", finetuning_type="lora",
                      max_steps=2, eval_strategy="steps", eval_steps=2)
    layout = write_tree(cfg, rows.select(range(4)), eval_rows=rows.select(range(4, 6)))
    summary = dpo.train(cfg, layout)
    assert "eval_loss" in summary
    for key in ("eval_rewards/margins", "eval_rewards/accuracies", "rewards/margins"):
        assert key in summary, key

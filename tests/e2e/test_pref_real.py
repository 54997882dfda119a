"""LLaMA-Factory's dpo_en_demo and kto_en_demo train a few steps on the real SmolLM2 through
`tunepipe train` with a flat LLaMA-Factory YAML, the demo folder read in place."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tunepipe.cli import main

pytestmark = pytest.mark.slow

STAGES = {
    "dpo_en_demo": {"stage": "dpo", "pref_loss": "sigmoid", "pref_beta": 0.1},
    "kto_en_demo": {"stage": "kto", "pref_beta": 0.1},
}


@pytest.mark.parametrize("dataset", sorted(STAGES))
def test_lf_demo_preference_data_trains_on_smollm2(smollm2_base_dir, lf_demo_dir, tmp_path, dataset):
    out = tmp_path / "out"
    config = {
        "model_name_or_path": str(smollm2_base_dir),
        **STAGES[dataset],
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": 8,
        "lora_target": "all",
        "dataset": dataset,
        "dataset_dir": str(lf_demo_dir),
        "cutoff_len": 256,
        "max_samples": 16,
        "overwrite_output_dir": True,
        "output_dir": str(out),
        "per_device_train_batch_size": 1,  # the smallest real step: one pair (DPO) or one row + its KL pair (KTO)
        "gradient_accumulation_steps": 1,
        "learning_rate": 5.0e-5,
        "max_steps": 2,
        "logging_steps": 1,
        "report_to": "none",
    }
    config_file = tmp_path / "lf.yaml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(config_file)]) == 0

    metrics = json.loads((out / "metrics" / "train.json").read_text())
    assert metrics["steps"] == 2
    # Two KTO rows may both be desirable: then no undesirable reward (nor margin) is logged.
    required = ("rewards/accuracies", "kl") if STAGES[dataset]["stage"] == "kto" else (
        "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    for key in required:
        assert math.isfinite(metrics[key]), key
    assert "rewards/chosen" in metrics or "rewards/rejected" in metrics
    meta = json.loads((out / "data" / "tokenized" / "meta.json").read_text())
    assert meta["stage"] == STAGES[dataset]["stage"]

    from peft import PeftModel

    from tunepipe.models.base import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm(out / "models" / "base"), str(out / "models" / "adapter"))
    changed = [name for name, param in model.named_parameters() if "lora_B" in name and param.abs().sum() > 0]
    assert changed, "the trained adapter's B matrices are still zero"

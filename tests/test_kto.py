"""stage kto end to end on the tiny model: desirable rewards rise above undesirable ones."""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.pref_rows import kto_dataset
from tests.fixtures.pref_runs import pref_config, write_tree
from tunepipe.models.base import load_causal_lm
from tunepipe.train.preference import kto
from tunepipe.train.preference.common import Reference
from tunepipe.train.preference.data import KtoCollator, add_kto_kl_pairs


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@torch.no_grad()
def tag_figures(train_cfg, policy, base, rows, tokenizer) -> tuple[float, float]:
    """(mean desirable reward - mean undesirable reward, share of rows whose reward has the
    sign of its tag) over every training row, the base model as reference."""
    rows = add_kto_kl_pairs(rows)
    batch = KtoCollator(tokenizer.pad_token_id)([rows[i] for i in range(len(rows))])
    _, metrics = kto.kto_objective(train_cfg, Reference("frozen_copy", base))(policy, batch)
    mean = {name: total / count for name, (total, count) in metrics.items()}
    return mean["rewards/chosen"] - mean["rewards/rejected"], mean["rewards/accuracies"]


def test_short_kto_run_separates_desirable_from_undesirable(tiny_model_dir, tokenizer, tmp_path):
    from peft import PeftModel

    cfg = pref_config(tiny_model_dir, tmp_path, stage="kto", finetuning_type="lora", max_steps=8,
                      per_device_train_batch_size=4, kto_rejected_weight=1.2)
    rows = kto_dataset(tokenizer)
    layout = write_tree(cfg, rows)
    summary = kto.train(cfg, layout)

    base = load_causal_lm(layout.base_model).eval()
    before = tag_figures(cfg.train, base, base, rows, tokenizer)
    trained = PeftModel.from_pretrained(load_causal_lm(layout.base_model), str(layout.adapter)).eval()
    after = tag_figures(cfg.train, trained, base, rows, tokenizer)
    assert before == (0.0, 0.0)  # policy == reference: every implied reward is 0
    assert after[0] > 0.05 and after[1] > 0.5, after

    written = json.loads((layout.metrics / "train.json").read_text())
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "kl"):
        assert key in written and written[key] == summary[key]
    assert written["rewards/margins"] == pytest.approx(written["rewards/chosen"] - written["rewards/rejected"])


def test_kto_needs_two_rows_for_kl_pairs(tokenizer):
    from tunepipe.errors import TunepipeError

    with pytest.raises(TunepipeError, match="at least 2"):
        add_kto_kl_pairs(kto_dataset(tokenizer).select([0]))

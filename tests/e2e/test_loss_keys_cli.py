"""LLaMA-Factory's loss keys through `tunepipe train cfg.yaml`: the first logged loss equals the
formula computed by hand from the tokenized shards.

- SFT on a tiny Mixtral with `use_dft_loss` and `moe_aux_loss_coef`: DFT over each sample run
  alone, plus the coefficient times transformers' load-balancing loss over every token.
- DPO with `ref_model` (another model), `ld_alpha` and `pref_bco_weight`: at step 0 the LoRA
  policy is its base, the reference is the other model, the baseline is the batch's mean reward.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from tests.e2e.test_families_cli import ROWS, first_loss, train_samples, write_config
from tests.fixtures.families import build_family_dir
from tests.fixtures.tiny_model import build_tiny_model_dir

from tunepipe.cli import main
from tunepipe.models.base import load_causal_lm
from tunepipe.train.batches.collate import IGNORE_INDEX


def test_dft_and_router_loss_through_the_cli(tmp_path):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model_dir = build_family_dir(tmp_path / "model", "mixtral")
    config, out = write_config(tmp_path, model_dir, use_dft_loss=True, moe_aux_loss_coef=0.2)
    assert main(["train", str(config)]) == 0
    model = load_causal_lm(model_dir, attn_implementation="eager")
    total, count, router_logits = 0.0, 0, []
    with torch.no_grad():
        for ids, labels in train_samples(out):
            outputs = model(input_ids=torch.tensor([ids]), use_cache=False, output_router_logits=True)
            targets = torch.tensor(labels[1:])
            ce = F.cross_entropy(outputs.logits[0, :-1], targets, ignore_index=IGNORE_INDEX, reduction="none")
            total += (ce * torch.exp(-ce))[targets != IGNORE_INDEX].sum().item()
            count += int((targets != IGNORE_INDEX).sum())
            router_logits.append(outputs.router_logits)
        per_layer = tuple(torch.cat(layer) for layer in zip(*router_logits, strict=True))  # every token, one batch
        aux = load_balancing_loss_func(per_layer, model.config.num_local_experts, model.config.num_experts_per_tok)
    assert len(train_samples(out)) == len(ROWS)  # one step, one padding-free batch
    assert first_loss(out) == pytest.approx(total / count + 0.2 * aux.item(), abs=1e-5)


PAIRS = [
    {"instruction": "What is the capital of France?", "chosen": "The capital of France is Paris.",
     "rejected": "The quick brown fox jumps over the lazy dog every single day."},
    {"instruction": "Who are you?", "chosen": "I am a helpful assistant built to answer questions.",
     "rejected": "The lazy dog."},
    {"instruction": "Give three tips for staying healthy.", "chosen": "Eat well, exercise, and sleep.",
     "rejected": "Bonjour, je suis un assistant."},
]


def test_dpo_with_ref_model_ld_alpha_and_bco_through_the_cli(tmp_path, tiny_model_dir):
    from datasets import load_from_disk

    from tunepipe.train.preference.common import forward_log_probs
    from tunepipe.train.preference.data import PreferenceCollator

    other = build_tiny_model_dir(tmp_path / "other", seed=5)
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.json").write_text(json.dumps(PAIRS), encoding="utf-8")
    entry = {"file_name": "pairs.json", "ranking": True,
             "columns": {"prompt": "instruction", "chosen": "chosen", "rejected": "rejected"}}
    (data / "dataset_info.json").write_text(json.dumps({"pairs": entry}), encoding="utf-8")
    out = tmp_path / "out"
    alpha, weight, beta = 0.5, 0.4, 0.1
    config = {"model_name_or_path": str(tiny_model_dir), "stage": "dpo", "finetuning_type": "lora", "lora_rank": 4,
              "dataset": "pairs", "dataset_dir": str(data), "cutoff_len": 256, "output_dir": str(out),
              "overwrite_output_dir": True, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
              "max_steps": 1, "logging_steps": 1, "report_to": "none", "pref_beta": beta,
              "ref_model": str(other), "ld_alpha": alpha, "pref_bco_weight": weight}
    path = tmp_path / "dpo.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    assert main(["train", str(path)]) == 0

    shard = load_from_disk(str(out / "data" / "tokenized" / "train"))
    batch = PreferenceCollator(0)([shard[i] for i in range(len(shard))])
    with torch.no_grad():  # step 0: LoRA B is zero, so the policy is its base
        policy = forward_log_probs(load_causal_lm(tiny_model_dir), batch, ld_alpha=alpha)[0]
        ref = forward_log_probs(load_causal_lm(other), batch)[0]
    (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    delta = torch.cat([chosen, rejected]).mean()
    dpo = -F.logsigmoid(chosen - rejected)
    bco = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    want = ((dpo + weight * bco) / (1 + weight)).mean().item()
    assert len(shard) == len(PAIRS)
    assert first_loss(out) == pytest.approx(want, abs=1e-5)
    assert abs(want - dpo.mean().item()) > 1e-3  # the keys changed the loss

"""LLaMA-Factory's ASFT example (`extras/asft/qwen2_full_asft.yaml`, read from
../shared/llamafactory-examples/ as it ships) through `tunepipe train`, on a tiny random Qwen2 at
the YAML's own local path (`models/Qwen2.5-7B`, relative to where the run starts).

This checks the loss against its formula; the example as it ships (its `math` dataset added to
the run folder's dataset_info.json, DeepSpeed ZeRO-0, bf16) runs a step in
tests/e2e/test_hub_llamafactory_examples.py. Overrides keep this run exact: the demo's identity
set, one batch of 8 rows per step, float32 (bf16 would blur the comparison), no DeepSpeed (the
loss under test is computed the same with or without it), one tokenizer worker, a checkpoint
after step 1, and a first step that moves the weights (no warmup, learning rate 1e-2). Full fine-tuning's reference is a frozen copy of the starting weights, so
the first step's KL anchor is 0 and its loss is exactly the DFT loss of the base model; the
second step's is the DFT loss of the updated model plus alpha x its KL to the frozen start.
"""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from tests.e2e.test_families_cli import train_samples
from tests.fixtures.families import build_family_dir

from tunepipe.cli import main
from tunepipe.train import asft
from tunepipe.train.batches.collate import IGNORE_INDEX

EXAMPLES = __import__("pathlib").Path(__file__).resolve().parents[3] / "shared" / "llamafactory-examples"
YAML = EXAMPLES / "extras" / "asft" / "qwen2_full_asft.yaml"
ALPHA = 0.05  # the YAML's asft_alpha


def logged_losses(out) -> list[float]:
    with open(out / "plots" / "train_loss.csv", newline="") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle)]


def asft_loss(model, reference, samples) -> float:
    """sum over trained tokens of DFT + alpha x KL(reference || model), / trained tokens; each sample alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in samples:
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            ref = reference(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1].float()
            targets = torch.tensor(labels[1:])
            kept = targets != IGNORE_INDEX
            ce = F.cross_entropy(logits[kept], targets[kept], reduction="none")
            kl = F.kl_div(logits[kept].log_softmax(-1), ref[kept].softmax(-1), reduction="none").sum(-1)
            total += ((ce * torch.exp(-ce)).sum() + ALPHA * kl.sum()).item()
            count += int(kept.sum())
    return total / count


def test_llamafactory_asft_example_trains_with_the_kl_anchor(tmp_path, lf_demo_dir, monkeypatch):
    if not YAML.is_file():
        pytest.skip(f"LLaMA-Factory's examples not found at {EXAMPLES}")
    from tunepipe.models.base import load_causal_lm

    base = build_family_dir(tmp_path / "models" / "Qwen2.5-7B", "qwen2")
    anchored = []
    real_anchor = asft.reference_anchor

    def spy(cfg, model):
        anchor = real_anchor(cfg, model)
        anchored.append((anchor.reference.kind, anchor.alpha))
        return anchor

    monkeypatch.setattr("tunepipe.train.sft.reference_anchor", spy)
    monkeypatch.chdir(tmp_path)
    overrides = ["dataset=identity", f"dataset_dir={lf_demo_dir}", "max_samples=8", "max_steps=2",
                 "per_device_train_batch_size=8", "gradient_accumulation_steps=1", "logging_steps=1",
                 "bf16=false", "deepspeed=null", "preprocessing_num_workers=1", "cutoff_len=256",
                 "save_steps=1", "warmup_ratio=0", "learning_rate=1e-2"]
    assert main(["train", str(YAML), *overrides]) == 0
    assert anchored == [("frozen_copy", ALPHA)]
    out = tmp_path / "saves" / "qwen2-7b" / "full" / "asft"
    samples = train_samples(out)
    assert len(samples) == 8  # one batch per step: the logged loss is the whole batch's
    first, second = logged_losses(out)
    start = load_causal_lm(base, attn_implementation="eager")
    assert first == pytest.approx(asft_loss(start, start, samples), rel=1e-4)  # KL(start || start) = 0
    # step 2's loss: the weights after step 1 (its checkpoint) against the frozen start
    (after_one,) = sorted(out.rglob("checkpoint-1"))
    stepped = load_causal_lm(after_one, attn_implementation="eager")
    want = asft_loss(stepped, start, samples)
    assert second == pytest.approx(want, rel=1e-4)
    assert want > asft_loss(stepped, stepped, samples) * 1.01  # the KL anchor is in it

"""The reference model of DPO / KTO: adapter disabled (one copy of the weights), frozen copy, cache."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from tests.fixtures.pref_rows import kto_dataset, preference_dataset
from tests.fixtures.tiny_model import build_tiny_model_dir
from tunepipe.config import Config, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.train.preference import ref_cache
from tunepipe.train.preference.common import build_reference, forward_log_probs, step_zero_log_probs
from tunepipe.train.preference.data import KtoCollator, PreferenceCollator, add_kto_kl_pairs, prompt_length
from tunepipe.train.preference.dpo import dpo_objective


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def load_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def lora_model(tiny_model_dir, nonzero: bool = False):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    if nonzero:  # a "trained" adapter: lora_B is zero at init, which would make the test vacuous
        torch.manual_seed(1)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(std=0.5)
    return model


def storages(*modules) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def batch_of(tokenizer, rows: int = 3):
    dataset = preference_dataset(tokenizer).select(range(rows))
    return PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(rows)])


def test_lora_reference_is_the_base_with_no_second_copy(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir, nonzero=True)
    reference = build_reference(model, TrainConfig(stage="dpo", finetuning_type="lora"))
    assert reference.kind == "adapter_off" and reference.frozen is None
    # Parameters held by policy + reference together = one base model + the LoRA weights.
    held = {p.untyped_storage().data_ptr(): p.numel() for p in model.parameters()}
    base_numel = sum(p.numel() for p in load_model(tiny_model_dir).parameters())
    lora_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert len(held) == sum(1 for _ in model.parameters())  # no two parameters share a storage
    assert sum(held.values()) == base_numel + lora_numel

    batch = batch_of(tokenizer)
    base_logps = forward_log_probs(load_model(tiny_model_dir), batch)[0]
    policy_logps = forward_log_probs(model, batch)[0]
    assert torch.allclose(reference.log_probs(model, batch), base_logps, atol=1e-5)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)  # the adapter is really on


def test_full_finetune_reference_is_a_frozen_copy(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir)
    reference = build_reference(model, TrainConfig(stage="dpo", finetuning_type="full"))
    assert reference.kind == "frozen_copy"
    assert not any(p.requires_grad for p in reference.frozen.parameters())
    assert storages(model).isdisjoint(storages(reference.frozen))
    batch = batch_of(tokenizer)
    before = reference.log_probs(model, batch)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05)
    assert torch.equal(reference.log_probs(model, batch), before)  # training the policy leaves it alone


def test_dpo_step_zero_loss_is_ln2_and_rewards_zero(tiny_model_dir, tokenizer):
    model = lora_model(tiny_model_dir)  # fresh LoRA: B = 0, so policy == reference
    train_cfg = TrainConfig(stage="dpo", finetuning_type="lora", pref_beta=0.1)
    loss, metrics = dpo_objective(train_cfg, build_reference(model, train_cfg))(model, batch_of(tokenizer))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[name][0] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/accuracies"][0] == 0  # no pair is strictly preferred yet


def test_pissa_with_reference_objective_is_refused(tiny_model_dir):
    model = lora_model(tiny_model_dir)
    with pytest.raises(TunepipeError, match="pissa_init"):
        build_reference(model, TrainConfig(stage="dpo", finetuning_type="lora", pissa_init=True))


def test_kto_kl_pairs_splice_prompt_with_previous_completion(tokenizer):
    dataset = add_kto_kl_pairs(kto_dataset(tokenizer))
    labels, ids = dataset["labels"], dataset["input_ids"]
    for i in range(len(dataset)):
        donor = (i - 1) % len(dataset)
        p, q = prompt_length(labels[i]), prompt_length(labels[donor])
        assert dataset[i]["kl_input_ids"] == ids[i][:p] + ids[donor][q:]
        assert dataset[i]["kl_labels"] == [-100] * p + labels[donor][q:]
    batch = KtoCollator(tokenizer.pad_token_id)([dataset[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 8 and batch["kto_tag"].tolist() == [True, False, True, False]


def test_precomputed_reference_is_cached_and_keyed(tiny_model_dir, tokenizer, tmp_path):
    cfg = Config(train=TrainConfig(stage="dpo", finetuning_type="full", precompute_ref_log_probs=True))
    model = load_model(tiny_model_dir)
    dataset = preference_dataset(tokenizer)
    collator = PreferenceCollator(tokenizer.pad_token_id)
    calls = []

    def compute(rows):
        calls.append(len(rows))
        return ref_cache.compute_log_probs(rows, collator, 4, lambda b: step_zero_log_probs(model, b),
                                           "cpu", contextlib.nullcontext)

    columns = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
    key = ref_cache.cache_key(tiny_model_dir, dataset, columns, cfg)
    tokenized = tmp_path / "data" / "tokenized"
    kwargs = {"split": "train", "tokenized_dir": tokenized, "out_columns": ("ref_chosen_logps", "ref_rejected_logps")}
    first = ref_cache.attach_reference_log_probs(dataset, key=key, compute=compute, **kwargs)
    again = ref_cache.attach_reference_log_probs(dataset, key=key, compute=compute, **kwargs)
    assert calls == [len(dataset)]  # the second run read the cache
    assert first["ref_chosen_logps"] == again["ref_chosen_logps"]
    assert (tmp_path / "data" / "ref_logps" / f"train-{key}.arrow").is_file()

    batch = collator([first[i] for i in range(len(first))])
    live = forward_log_probs(model, batch)[0]
    assert torch.allclose(batch["ref_logps"], live, atol=1e-4)

    other_rows = dataset.select(range(len(dataset) - 1))
    assert ref_cache.cache_key(tiny_model_dir, other_rows, columns, cfg) != key
    other_cfg = Config(train=TrainConfig(stage="dpo", finetuning_type="full", bf16=True))
    assert ref_cache.cache_key(tiny_model_dir, dataset, columns, other_cfg) != key
    other_base = build_tiny_model_dir(tmp_path / "other-base", seed=1)
    assert ref_cache.cache_key(other_base, dataset, columns, cfg) != key


def test_answer_only_projection_equals_full_logits(tiny_model_dir, tokenizer):
    from tunepipe.train.preference.losses import sequence_log_probs

    model = lora_model(tiny_model_dir, nonzero=True)
    batch = batch_of(tokenizer, rows=4)
    full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected, expected_counts = sequence_log_probs(full, batch["labels"])
    logps, counts = forward_log_probs(model, batch)
    assert torch.equal(counts, expected_counts)
    assert torch.allclose(logps, expected, atol=1e-5)


def test_objective_normalises_per_loss_and_mixes_in_sft(tiny_model_dir, tokenizer):
    from tunepipe.train.preference.losses import ipo_loss

    policy, base = lora_model(tiny_model_dir, nonzero=True), load_model(tiny_model_dir)
    batch = batch_of(tokenizer, rows=3)
    logps, counts = forward_log_probs(policy, batch)
    ref_logps = forward_log_probs(base, batch)[0]
    mean, ref_mean = logps / counts, ref_logps / counts
    expected = ipo_loss(mean[:3], mean[3:], ref_mean[:3], ref_mean[3:], 0.1).losses.mean()
    chosen_nll = -mean[:3].mean()

    frozen = build_reference(base, TrainConfig(stage="dpo", finetuning_type="full"))
    for ftx in (0.0, 0.5):
        train_cfg = TrainConfig(stage="dpo", pref_loss="ipo", pref_beta=0.1, pref_ftx=ftx)
        loss, metrics = dpo_objective(train_cfg, frozen)(policy, batch)
        assert loss.item() == pytest.approx((expected + ftx * chosen_nll).item(), rel=1e-5)
        assert ("sft_loss" in metrics) == (ftx > 0)

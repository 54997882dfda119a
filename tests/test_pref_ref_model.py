"""`ref_model` / `ref_model_adapters` / `ref_model_quantization_bit`: DPO / KTO's reference
log-probs come from a separate model, loaded as a user would load it by hand."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures.pref_rows import preference_dataset
from tests.fixtures.tiny_model import build_tiny_model_dir
from tunepipe.config import Config, ModelConfig, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.preference.common import build_reference, forward_log_probs
from tunepipe.train.preference.data import PREFERENCE_COLUMNS, REF_COLUMNS, PreferenceCollator
from tunepipe.train.preference.ref_cache import reference_for


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    """Another model (other seed) sharing the test tokenizer, plus a non-zero LoRA adapter for it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("ref")
    model_dir = build_tiny_model_dir(root / "model", seed=7)
    adapted = get_peft_model(load_causal_lm(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    torch.manual_seed(3)
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    adapted.save_pretrained(root / "adapter")
    return model_dir, root / "adapter"


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    dataset = preference_dataset(tokenizer).select(range(3))
    return PreferenceCollator(tokenizer.pad_token_id)([dataset[i] for i in range(3)])


def reference_of(tiny_model_dir, tmp_path, **train):
    from peft import LoraConfig, get_peft_model

    cfg = Config(model=ModelConfig(model_name_or_path=str(tiny_model_dir)),
                 train=TrainConfig(stage="dpo", finetuning_type="lora", **train))
    policy = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules="all-linear"))
    splits = object()  # untouched when the reference is a model
    kept, reference = reference_for(cfg, Layout.at(tmp_path), policy, splits, None, PREFERENCE_COLUMNS, REF_COLUMNS)
    assert kept is splits
    return policy, reference, cfg


def test_ref_model_gives_the_reference_log_probs(tiny_model_dir, other_model, batch, tmp_path):
    model_dir, _ = other_model
    policy, reference, cfg = reference_of(tiny_model_dir, tmp_path, ref_model=str(model_dir))
    assert reference.kind == "ref_model"
    assert not any(p.requires_grad for p in reference.frozen.parameters())
    got = reference.log_probs(policy, batch)
    by_hand = forward_log_probs(load_causal_lm(model_dir).eval(), batch)[0]
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    default = build_reference(policy, cfg.train).log_probs(policy, batch)  # the policy's base, adapter off
    assert (got - default).abs().min() > 0.01 and (got - default).abs().max() > 0.1


def test_ref_model_adapters_are_merged_into_it(tiny_model_dir, other_model, batch, tmp_path):
    from peft import PeftModel

    model_dir, adapter = other_model
    policy, reference, _ = reference_of(tiny_model_dir, tmp_path, ref_model=str(model_dir),
                                        ref_model_adapters=str(adapter))
    got = reference.log_probs(policy, batch)
    by_hand = PeftModel.from_pretrained(load_causal_lm(model_dir), str(adapter)).eval()
    torch.testing.assert_close(got, forward_log_probs(by_hand, batch)[0], rtol=0, atol=1e-4)
    plain = forward_log_probs(load_causal_lm(model_dir).eval(), batch)[0]
    assert (got - plain).abs().max() > 0.1  # the adapter is really in


def test_ref_model_quantization_bit_loads_it_in_4_bits(tiny_model_dir, other_model, batch, tmp_path):
    import bitsandbytes as bnb
    from transformers import BitsAndBytesConfig

    model_dir, _ = other_model
    policy, reference, _ = reference_of(tiny_model_dir, tmp_path, ref_model=str(model_dir),
                                        ref_model_quantization_bit=4)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in reference.frozen.modules())
    by_hand = load_causal_lm(model_dir, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.float32)).eval()
    with torch.no_grad():  # as the reference runs (bitsandbytes takes another kernel under autograd)
        want = forward_log_probs(by_hand, batch)[0]
    torch.testing.assert_close(reference.log_probs(policy, batch), want, rtol=0, atol=1e-5)


def test_ref_model_with_precomputed_log_probs_is_refused(tiny_model_dir, other_model, tmp_path):
    with pytest.raises(TunepipeError, match="precompute_ref_log_probs"):
        reference_of(tiny_model_dir, tmp_path, ref_model=str(other_model[0]), precompute_ref_log_probs=True)

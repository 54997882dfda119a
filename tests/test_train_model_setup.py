"""Fine-tuning methods: which parameters train, with which PEFT / bitsandbytes settings."""

from __future__ import annotations

import math

import pytest
import torch

from tunepipe.config import Config, ModelConfig, TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.layout import Layout
from tunepipe.models.base import load_causal_lm, prepare_base_model
from tunepipe.train.model.adapters import loraplus_optimizer, save_adapter
from tunepipe.train.model.model_setup import build_trainable_model


@pytest.fixture(scope="module")
def layout(tiny_model_dir, tmp_path_factory) -> Layout:
    layout = Layout.at(tmp_path_factory.mktemp("setup"))
    prepare_base_model(ModelConfig(model_name_or_path=str(tiny_model_dir)), layout.base_model)
    return layout


def build(layout, model=None, **train):
    cfg = Config(model=model or ModelConfig(model_name_or_path="unused"), train=TrainConfig(**train))
    return build_trainable_model(cfg, layout)


def trainable(model) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_lora_all_targets_every_linear_layer_but_the_head(layout):
    model = build(layout, lora_rank=4)
    names = trainable(model)
    assert names and all("lora_" in n for n in names)
    wrapped = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == 2.0  # lora_alpha defaults to 2 x rank


def test_lora_knobs_reach_peft(layout):
    model = build(layout, lora_rank=4, lora_alpha=8, lora_target="q_proj,v_proj", use_rslora=True,
                  use_dora=True, additional_target="embed_tokens", lora_dropout=0.1)
    names = trainable(model)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if "lora_A" in n} == {"q_proj", "v_proj"}
    q_proj = model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8 / math.sqrt(4))  # rsLoRA
    assert any("lora_magnitude_vector" in n for n in names)  # DoRA
    assert any("embed_tokens.modules_to_save" in n for n in names)  # additional_target
    assert q_proj.lora_dropout["default"].p == 0.1


def test_unknown_lora_target_names_the_key(layout):
    with pytest.raises(TunepipeError, match="lora_target"):
        build(layout, lora_target="no_such_proj")


def test_freeze_trains_last_layers_and_chosen_modules(layout):
    names = trainable(build(layout, finetuning_type="freeze", freeze_trainable_layers=1))
    assert names and all(n.startswith("model.layers.1.") for n in names)
    names = trainable(build(layout, finetuning_type="freeze", freeze_trainable_layers=-1,
                            freeze_trainable_modules="mlp"))
    assert names and all(n.startswith("model.layers.0.mlp.") for n in names)
    with pytest.raises(TunepipeError, match="freeze_trainable_modules"):
        build(layout, finetuning_type="freeze", freeze_trainable_modules="feed_forward")
    with pytest.raises(TunepipeError, match="freeze_trainable_layers"):
        build(layout, finetuning_type="freeze", freeze_trainable_layers=3)


def test_full_trains_everything(layout):
    model = build(layout, finetuning_type="full")
    assert trainable(model) == {name for name, _ in model.named_parameters()}


@pytest.mark.parametrize("bits,kind", [(4, "Linear4bit"), (8, "Linear8bitLt")])
def test_qlora_quantizes_the_base_with_bitsandbytes(layout, bits, kind):
    model_cfg = ModelConfig(model_name_or_path="unused", quantization_bit=bits, quantization_type="fp4")
    model = build(layout, model=model_cfg)
    base_layer = model.base_model.model.model.layers[0].mlp.down_proj.base_layer
    assert type(base_layer).__name__ == kind
    if bits == 4:
        assert base_layer.weight.quant_type == "fp4"
    assert all("lora_" in n for n in trainable(model))


def test_pissa_adapter_is_saved_for_the_original_base(layout, tmp_path, tiny_model_dir):
    from peft import PeftModel

    model = build(layout, lora_rank=4, pissa_init=True)
    with torch.no_grad():  # stand-in for training: move every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.01 * torch.randn_like(param))
    ids = torch.tensor([[5, 9, 30, 41, 7, 2]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    save_adapter(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load_causal_lm(tiny_model_dir), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)


def test_loraplus_gives_b_matrices_a_larger_learning_rate(layout):
    model = build(layout, loraplus_lr_ratio=16.0, learning_rate=1e-3)
    optimizer = loraplus_optimizer(model, TrainConfig(loraplus_lr_ratio=16.0, learning_rate=1e-3))
    rates = {group["lr"] for group in optimizer.param_groups if group["params"]}
    assert rates == {1e-3, 16e-3}


def test_flash_attn_fa2_without_flash_attention_warns_and_uses_auto(caplog, monkeypatch):
    """LLaMA-Factory's GPU YAMLs say `flash_attn: fa2`; where flash attention 2 cannot run (no CUDA
    or no flash-attn) the run keeps auto's kernel with a warning instead of stopping."""
    from tunepipe.train.model import model_setup

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = model_setup.attention_implementation(ModelConfig(model_name_or_path="m", flash_attn="auto"))
    with caplog.at_level("WARNING", logger=model_setup.__name__):
        fa2 = model_setup.attention_implementation(ModelConfig(model_name_or_path="m", flash_attn="fa2"))
    assert fa2 == auto and fa2 != "flash_attention_2"
    assert "flash_attn='fa2' needs a CUDA GPU and the flash-attn package; using flash_attn: auto" in caplog.text

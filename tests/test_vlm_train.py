"""Training a tiny Qwen2-VL: a batch of image rows gives each sample exactly its loss alone (3-D M-RoPE
positions included), the collator's image grids match the tokenized image-token counts, and the
freeze_* keys / lora_target: all decide which parts train (frozen parts bit-identical after a step)."""

from __future__ import annotations

import pytest
import torch
from datasets import load_from_disk

from tests.fixtures.vlm_checks import assert_each_row_as_alone
from tests.test_tokenize import run_stages
from tests.test_vlm_tokenize import SMALL
from tunepipe.config.loader import load_config
from tunepipe.data.vision import MediaTokens
from tunepipe.models.base import load_causal_lm, load_tokenizer
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.model_setup import apply_finetuning
from tunepipe.train.model.vision import VisionCollator


@pytest.fixture(scope="module")
def shards(tmp_path_factory, tiny_qwen2vl_dir, lf_demo_dir):
    root = tmp_path_factory.mktemp("vlm-train")
    layout = run_stages(root, tiny_qwen2vl_dir, lf_demo_dir, "mllm_demo", template="qwen2_vl", **SMALL)[1]
    return load_from_disk(str(layout.tokenized / "train"))


@pytest.fixture(scope="module")
def collator(tiny_qwen2vl_dir, lf_demo_dir):
    tokenizer = load_tokenizer(tiny_qwen2vl_dir)
    media = MediaTokens.load(tiny_qwen2vl_dir, tokenizer, lf_demo_dir, SMALL["image_max_pixels"], 32 * 32)
    return VisionCollator(tokenizer.pad_token_id, media)


def test_a_batch_gives_each_sample_its_loss_alone(shards, collator, tiny_qwen2vl_dir):
    model = load_causal_lm(tiny_qwen2vl_dir).eval()
    rows = [shards[0], shards[1]]  # two images, then one: different lengths, so row 2 is padded
    assert len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])
    assert_each_row_as_alone(model, collator, rows)


def test_image_tokens_per_image_equal_the_processor_grid(shards, collator):
    for row in shards:
        batch = collator([row])
        grid_tokens = (batch["image_grid_thw"].prod(dim=1) // collator.media.image_processor.merge_size ** 2)
        assert int((batch["input_ids"] == collator.media.image_token_id).sum()) == int(grid_tokens.sum()) > 0
        assert batch["pixel_values"].shape[0] == int(batch["image_grid_thw"].prod(dim=1).sum())


def parts(model):
    named = dict(model.named_parameters())
    return {part: {k: v.detach().clone() for k, v in named.items() if key(k)}
            for part, key in (("vision", lambda k: "visual.blocks" in k or "visual.patch_embed" in k),
                              ("projector", lambda k: "visual.merger" in k),
                              ("language", lambda k: "language_model" in k and "lora_" not in k),
                              ("lora", lambda k: "lora_" in k))}


def one_step(model, batch):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    causal_lm_loss(model, batch).backward()
    optimizer.step()


@pytest.mark.parametrize("keys,trained", [
    ({"finetuning_type": "lora"}, {"lora"}),
    ({"finetuning_type": "full"}, {"language"}),
    ({"finetuning_type": "full", "freeze_vision_tower": "false", "freeze_multi_modal_projector": "false"},
     {"language", "vision", "projector"}),
    ({"finetuning_type": "full", "freeze_vision_tower": "false", "freeze_language_model": "true"}, {"vision"}),
])
def test_freeze_keys_decide_which_parts_train(shards, collator, tiny_qwen2vl_dir, keys, trained):
    train = load_config(None, [f"train.{k}={v}" for k, v in keys.items()]).train
    torch.manual_seed(0)
    model = apply_finetuning(load_causal_lm(tiny_qwen2vl_dir), train)
    if keys["finetuning_type"] == "lora":  # `all` wraps the language model's linears only
        wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
        assert wrapped and all("language_model" in name for name in wrapped)
        assert any(name.endswith("mlp.down_proj") for name in wrapped)
    before = parts(model)
    one_step(model, collator([shards[0], shards[1]]))
    after = parts(model)
    for part, params in before.items():
        changed = any(not torch.equal(params[k], after[part][k]) for k in params)
        assert changed == (part in trained), part


@pytest.mark.parametrize("method", ["qlora", "freeze"])
def test_qlora_and_freeze_train_the_language_model_and_leave_the_tower_bit_identical(shards, collator, tmp_path,
                                                                                    tiny_qwen2vl_dir, method):
    """QLoRA: the base loads as training loads it, the language model in 4 bits (bitsandbytes) and the vision
    tower + projector unquantized; LoRA wraps the 4-bit linears of the language model only. freeze: only the
    last decoder layer trains. Either way the vision tower and projector stay bit-identical."""
    from tunepipe.config.loader import load_config as load
    from tunepipe.layout import Layout
    from tunepipe.train.model.model_setup import load_base_for_training

    keys = ["train.finetuning_type=lora", "model.quantization_bit=4"] if method == "qlora" \
        else ["train.finetuning_type=freeze", "train.freeze_trainable_layers=1"]
    cfg = load(None, keys + ["model.flash_attn=disabled"])
    layout = Layout.at(tmp_path)
    layout.base_model.parent.mkdir(parents=True)
    layout.base_model.symlink_to(tiny_qwen2vl_dir)
    torch.manual_seed(0)
    model = apply_finetuning(load_base_for_training(cfg, layout), cfg.train, quantized=method == "qlora")
    if method == "qlora":
        import bitsandbytes as bnb

        wrapped = [module for name, module in model.named_modules() if hasattr(module, "lora_A")]
        assert wrapped and all(isinstance(module.base_layer, bnb.nn.Linear4bit) for module in wrapped)
        linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
        assert not any(isinstance(module, bnb.nn.Linear4bit) for name, module in linears.items() if "visual" in name)
    before = parts(model)
    one_step(model, collator([shards[0], shards[1]]))
    after = parts(model)
    if method == "qlora":  # bitsandbytes' CPU kernels repack the 4-bit weights at their first forward: frozen
        packed = {name for name, param in model.named_parameters() if isinstance(param, bnb.nn.Params4bit)}
        assert packed and not any(param.requires_grad for name, param in model.named_parameters() if name in packed)
        before["language"] = {k: v for k, v in before["language"].items() if k not in packed}
    changed = {part for part, params in before.items() if any(not torch.equal(params[k], after[part][k]) for k in params)}
    assert changed == ({"lora"} if method == "qlora" else {"language"})
    if method == "freeze":  # the last decoder layer only
        moved = {k for k, v in before["language"].items() if not torch.equal(v, after["language"][k])}
        assert moved and all(".layers.1." in k for k in moved)

"""LLaMA-Factory's PEFT options, each shown to change what it should (through PEFT).

OFT trains, writes PEFT's OFT adapter config and merges to base + adapter; pissa_iter picks PEFT's
PiSSA initialisation; loraplus_lr_embedding is the embedding group's learning rate; LLaMA Pro
trains only the expanded blocks (freeze and LoRA); freeze_extra_modules trains the named modules
outside the layers.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.fixtures.train_runs import tiny_run
from tunepipe.config import TrainConfig
from tunepipe.config.loader import load_config
from tunepipe.errors import TunepipeError
from tunepipe.models.base import load_causal_lm
from tunepipe.train import run_train
from tunepipe.train.model.adapters import attach_lora, lora_config, loraplus_optimizer, merge_named_adapters
from tunepipe.train.model.model_setup import apply_finetuning


def fresh_model(tiny_model_dir, layers: int | None = None):
    if layers is None:
        return load_causal_lm(tiny_model_dir, dtype="float32")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def trainable_names(model) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}


def test_oft_trains_writes_its_config_and_merges_to_base_plus_adapter(tmp_path, tiny_model_dir):
    from tunepipe.export.merge import run_export

    cfg, layout = tiny_run(tmp_path, tiny_model_dir, max_steps=3, finetuning_type="oft", oft_block_size=16,
                           oft_target="q_proj,v_proj", module_dropout=0.1)
    run_train(cfg, layout)
    config = json.loads((layout.adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "OFT" and config["oft_block_size"] == 16 and config["module_dropout"] == 0.1
    assert config["target_modules"] == ["q_proj", "v_proj"]

    cfg.export.export_dir = str(tmp_path / "export")
    metrics = run_export(cfg, layout)
    assert metrics["max_abs_logit_diff"] <= metrics["logit_tolerance"] <= 1e-3
    base = load_causal_lm(tiny_model_dir, dtype="float32")
    merged = load_causal_lm(tmp_path / "export", dtype="float32")
    moved = [name for name, param in merged.named_parameters()
             if not torch.equal(param, base.get_parameter(name))]
    assert moved and all("q_proj" in name or "v_proj" in name for name in moved)  # OFT rotated only its targets


def test_oft_needs_one_of_rank_and_block_size():
    with pytest.raises(TunepipeError, match="oft_block_size"):
        load_config(None, ["train.finetuning_type=oft", "train.oft_rank=4"])  # block size 32 is set too
    assert load_config(None, ["train.finetuning_type=oft", "train.oft_rank=4", "train.oft_block_size=0"])


@pytest.mark.parametrize(("pissa_iter", "expected"), [(16, "pissa_niter_16"), (4, "pissa_niter_4"), (-1, "pissa")])
def test_pissa_iter_picks_peft_initialisation(pissa_iter, expected):
    config = lora_config(TrainConfig(pissa_init=True, pissa_iter=pissa_iter))
    assert config.init_lora_weights == expected


def test_pissa_full_svd_adapter_is_saved_converted_for_the_original_base(tmp_path, tiny_model_dir):
    from tunepipe.models.trained import apply_adapters

    cfg, layout = tiny_run(tmp_path, tiny_model_dir, max_steps=2, pissa_init=True, pissa_iter=-1,
                           pissa_convert=True, lora_target="q_proj")
    run_train(cfg, layout)
    config = json.loads((layout.adapter / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # converted: a plain LoRA adapter on the original base
    assert config["r"] == 2 * cfg.train.lora_rank  # PEFT's conversion doubles the rank
    adapted = apply_adapters(load_causal_lm(tiny_model_dir, dtype="float32"), [layout.adapter])
    ids = torch.tensor([[1, 5, 9, 12, 40]])
    with torch.no_grad():
        with adapted.disable_adapter():
            base_logits = adapted(ids).logits
        assert not torch.allclose(adapted(ids).logits, base_logits)


def test_loraplus_lr_embedding_is_the_embedding_groups_learning_rate(tiny_model_dir):
    train = TrainConfig(lora_target="embed_tokens,q_proj", loraplus_lr_ratio=16.0, loraplus_lr_embedding=3e-5,
                        learning_rate=1e-3)
    model = attach_lora(fresh_model(tiny_model_dir), train)
    groups = loraplus_optimizer(model, train).param_groups
    embedding_ids = {id(param) for name, param in model.named_parameters() if "lora_embedding" in name}
    embedding = [group for group in groups if embedding_ids & {id(param) for param in group["params"]}]
    assert len(embedding) == 1 and embedding[0]["lr"] == 3e-5
    assert sorted(group["lr"] for group in groups if group["params"]) == [3e-5, 1e-3, 1.6e-2]


def test_llama_pro_freeze_trains_only_the_expanded_blocks(tiny_model_dir):
    # 4 layers expanded from 2 by 2 inserted blocks: the inserted ones are layers 1 and 3
    model = apply_finetuning(fresh_model(tiny_model_dir, layers=4),
                             TrainConfig(finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=2))
    layers = {int(name.split(".")[2]) for name in trainable_names(model)}
    assert layers == {1, 3}
    plain = apply_finetuning(fresh_model(tiny_model_dir, layers=4),
                             TrainConfig(finetuning_type="freeze", freeze_trainable_layers=2))
    assert {int(name.split(".")[2]) for name in trainable_names(plain)} == {2, 3}  # the last two, without it


def test_llama_pro_lora_adapts_only_the_expanded_blocks(tiny_model_dir):
    model = apply_finetuning(fresh_model(tiny_model_dir, layers=4),
                             TrainConfig(use_llama_pro=True, freeze_trainable_layers=2, lora_target="q_proj,down_proj"))
    names = trainable_names(model)
    assert names and all("lora_" in name for name in names)
    assert {int(name.split(".layers.")[1].split(".")[0]) for name in names} == {1, 3}
    assert {name.split(".")[-4] for name in names} == {"q_proj", "down_proj"}


def test_llama_pro_needs_layers_divisible_by_the_expansion(tiny_model_dir):
    with pytest.raises(TunepipeError, match="not a multiple"):
        apply_finetuning(fresh_model(tiny_model_dir, layers=4),
                         TrainConfig(finetuning_type="freeze", use_llama_pro=True, freeze_trainable_layers=3))


def test_freeze_extra_modules_train_beside_the_layers(tiny_model_dir):
    model = apply_finetuning(fresh_model(tiny_model_dir),
                             TrainConfig(finetuning_type="freeze", freeze_trainable_layers=1,
                                         freeze_extra_modules="embed_tokens,norm"))
    names = trainable_names(model)
    assert "model.embed_tokens.weight" in names and "model.norm.weight" in names
    assert not any(".layers.0." in name for name in names) and any(".layers.1." in name for name in names)
    with pytest.raises(TunepipeError, match="not outside the decoder layers"):
        apply_finetuning(fresh_model(tiny_model_dir),
                         TrainConfig(finetuning_type="freeze", freeze_extra_modules="q_proj"))


def first_loss(layout) -> float:
    import csv

    with open(layout.plots / "train_loss.csv", newline="") as handle:
        return float(next(csv.DictReader(handle))["loss"])


def test_create_new_adapter_trains_on_top_of_the_merged_adapters(tmp_path, tiny_model_dir):
    from tests.fixtures.adapters import make_adapter
    from tunepipe.models.trained import trained_source

    old = make_adapter(tiny_model_dir, tmp_path / "old", scale=1.0)
    plain_cfg, plain = tiny_run(tmp_path / "plain", tiny_model_dir, max_steps=1)
    run_train(plain_cfg, plain)
    cfg, layout = tiny_run(tmp_path / "new", tiny_model_dir, max_steps=2, create_new_adapter=True,
                           model={"adapter_name_or_path": str(old)})
    run_train(cfg, layout)
    # the same first batch, before any update (LoRA B starts at zero): base + old adapter, not the base
    assert first_loss(layout) != pytest.approx(first_loss(plain), abs=1e-4)
    # eval / export / chat apply the old adapter, then the new one (tests/test_export.py: ordered merges)
    assert trained_source(cfg, layout).paths == [old, layout.adapter]
    cfg.train.create_new_adapter = False
    with pytest.raises(TunepipeError, match="create_new_adapter"):
        apply_finetuning(merge_named_adapters(fresh_model(tiny_model_dir), cfg), cfg.train)

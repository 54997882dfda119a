"""`fused_lora` (train/model/lora_groups.py) computes what PEFT's own LoRA forward computes.

- every family of tests/fixtures/families.py: the loss and every LoRA gradient of a padding-free
  batch of five samples equal PEFT's per-module path to 1e-5 in float32, each group's fused A
  product runs once per forward (so the fused path really ran), and the saved adapter has the
  same tensor names and shapes;
- gradient checkpointing (non-reentrant and reentrant: the recompute) gives the same loss and
  gradients;
- the modes where PEFT's forward must be used or the cache must not leak: eval / no_grad logits,
  greedy generation with a KV cache, `disable_adapter()`, a merged adapter, two active adapters,
  DoRA and an active `lora_dropout` (fall back: the same numbers under the same seed);
- `fused_lora: false`, `torch_compile` (more graphs to compile), DeepSpeed and accelerate
  configs (ZeRO-3 gathers weights in each Linear's own hook) leave PEFT's forward alone; OFT
  layers are never touched.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from tests.fixtures.families import FAMILIES
from tests.test_model_families import config_for, family_dirs, labelled, lora_grads, randomise_lora_b, samples
from tunepipe.config import TrainConfig
from tunepipe.train.fast_path import fuses_lora
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model import lora_groups
from tunepipe.train.model.adapters import save_adapter
from tunepipe.train.model.model_setup import build_trainable_model
from tunepipe.train.sft import batch_layout

__all__ = ["family_dirs"]  # the module-scoped fixture of test_model_families

# groups of several members per decoder layer: q/k/v and gate/up; MoE experts are LoRA on
# parameters (no Linear), Qwen2-MoE's shared expert is a gated MLP; Phi-3 already fuses qkv / gate_up
SHARED_PER_LAYER = {name: 2 for name in FAMILIES} | {"qwen3_moe": 1, "mixtral": 1, "phi3": 0}
# groups of several members in the 2-layer test models: Qwen3.5's first layer is a Gated DeltaNet
# (its in_proj_* are not q/k/v), so its q/k/v group is in the attention layer only
SHARED_GROUPS = {name: 2 * count for name, count in SHARED_PER_LAYER.items()} | {"qwen3_5": 3, "qwen3_5_moe": 3}


def pair(layout, **train):
    """(PEFT's forward, fused_lora) on the same weights, B randomised so A gets gradients."""
    plain = build_trainable_model(config_for(layout, fused_lora=False, **train), layout)
    fused = build_trainable_model(config_for(layout, fused_lora=True, **train), layout)
    randomise_lora_b(plain)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def batch_for(model) -> dict:
    """The batch `tunepipe train` feeds: padding-free (right-padded rows for Qwen3.5's recurrent layers)."""
    return batch_layout(model, 0)([labelled(ids) for ids in samples()])


def groups_of(model) -> set:
    return {getattr(m, lora_groups.GROUP_ATTR) for m in model.modules() if hasattr(m, lora_groups.GROUP_ATTR)}


def assert_same_step(plain, fused, batch, seed: int = 0) -> None:
    losses = []
    for model in (plain, fused):
        model.zero_grad()
        torch.manual_seed(seed)  # the same dropout masks where dropout runs
        loss = causal_lm_loss(model, batch)
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    want = lora_grads(plain)
    got = lora_grads(fused)
    assert got.keys() == want.keys() and any(g.abs().max() > 0 for g in want.values())
    for key, grad in got.items():
        torch.testing.assert_close(grad, want[key], rtol=0, atol=1e-5, msg=key)


def saved_shapes(model, out) -> dict:
    save_adapter(model, out)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        names = f.keys()
        return {key: tuple(f.get_slice(key).get_shape()) for key in names}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_lora_equals_peft_on_every_family(family_dirs, name, tmp_path, monkeypatch):
    plain, fused = pair(family_dirs(name))
    groups = groups_of(fused)
    assert not groups_of(plain)
    assert sum(len(g.members) > 1 for g in groups) == SHARED_GROUPS[name]
    products = []
    real = lora_groups.InputGroup._fused_product
    monkeypatch.setattr(lora_groups.InputGroup, "_fused_product",
                        lambda self, x: products.append(self) or real(self, x))
    assert_same_step(plain, fused, batch_for(plain))
    assert len(products) == len(groups) and set(products) == groups  # one A product per group
    assert all(g.pending is None for g in groups)  # no input kept after the forward
    assert saved_shapes(fused, tmp_path / "fused") == saved_shapes(plain, tmp_path / "plain")


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same(family_dirs, reentrant):
    plain, fused = pair(family_dirs("llama"))
    for model in (plain, fused):
        model.train()
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:
            model.enable_input_require_grads()
    assert fused.base_model.model.model.gradient_checkpointing
    assert_same_step(plain, fused, batch_for(plain))


@pytest.fixture(scope="module")
def llama_pair(family_dirs):
    return pair(family_dirs("llama"))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_eval_generation_disabled_and_merged_adapters(llama_pair):
    plain, fused = llama_pair
    ids = torch.tensor([samples()[0][:12]])
    for model in (plain, fused):
        model.eval()
    with_adapter = logits(plain, ids)
    torch.testing.assert_close(logits(fused, ids), with_adapter, rtol=0, atol=1e-5)
    generated = [m.generate(input_ids=ids, max_new_tokens=6, do_sample=False, use_cache=True) for m in (plain, fused)]
    assert torch.equal(generated[0], generated[1])
    with plain.disable_adapter(), fused.disable_adapter():
        base = logits(plain, ids)
        torch.testing.assert_close(logits(fused, ids), base, rtol=0, atol=1e-5)
    assert (base - with_adapter).abs().max() > 1e-3  # the adapter changes the logits
    fused.merge_adapter()
    try:
        torch.testing.assert_close(logits(fused, ids), with_adapter, rtol=0, atol=1e-4)
    finally:
        fused.unmerge_adapter()
    torch.testing.assert_close(logits(fused, ids), with_adapter, rtol=0, atol=1e-5)
    for model in (plain, fused):
        model.train()


def test_two_active_adapters_fuse_both(llama_pair):
    from peft import LoraConfig

    plain, fused = llama_pair
    config = LoraConfig(r=2, lora_alpha=6, target_modules="all-linear")
    for model in (plain, fused):
        model.add_adapter("second", config)
        randomise_lora_b(model, seed=2)
        model.base_model.set_adapter(["default", "second"])
    try:
        fused.load_state_dict(plain.state_dict())
        assert_same_step(plain, fused, batch_for(plain))
        assert any(name.endswith("lora_A.second.weight") for name in lora_grads(fused))
    finally:
        for model in (plain, fused):
            model.base_model.set_adapter("default")
            model.delete_adapter("second")


@pytest.mark.parametrize("train", [{"lora_dropout": 0.1}, {"use_dora": True}])
def test_dropout_and_dora_fall_back_to_peft(family_dirs, train, monkeypatch):
    plain, fused = pair(family_dirs("llama"), **train)
    for model in (plain, fused):
        model.train()
    products = []
    real = lora_groups.InputGroup._fused_product
    monkeypatch.setattr(lora_groups.InputGroup, "_fused_product",
                        lambda self, x: products.append(self) or real(self, x))
    assert_same_step(plain, fused, batch_for(plain), seed=3)
    assert products == []  # every layer ran PEFT's own forward


@pytest.mark.parametrize("values, fuses", [
    ({}, True), ({"fused_lora": False}, False), ({"torch_compile": True}, False),
    ({"deepspeed": "ds_z3.json"}, False), ({"accelerate_config": "fsdp.yaml"}, False),
    ({"finetuning_type": "oft"}, False), ({"finetuning_type": "full"}, False),
])
def test_where_fused_lora_applies(values, fuses):
    assert fuses_lora(TrainConfig(**{"finetuning_type": "lora", **values})) is fuses


def test_oft_layers_are_left_alone(family_dirs):
    layout = family_dirs("llama")
    model = build_trainable_model(config_for(layout, finetuning_type="oft", oft_rank=0, oft_block_size=16), layout)
    assert not groups_of(model)

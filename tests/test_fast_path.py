"""The speed switches of train/fast_path.py leave a step's numbers unchanged, on every model family.

- fused AdamW (the default `adamw_torch` as transformers' `adamw_torch_fused`): the Trainer's
  optimizer, given a padding-free LoRA batch's gradients, takes the step torch's per-tensor
  loop takes, and the next loss is the same, on every family of tests/fixtures/families.py;
- `torch_compile` (regional): every decoder layer compiled, none of the model wrapped; the
  compiled layers give the eager loss and LoRA gradients on padding-free batches of three
  different layouts through the per-sample attention, with no new graph for a new layout,
  on every family of the table (graphs traced by dynamo and split by AOTAutograd into forward
  and backward; `make test` runs COMPILE_SUITE, TUNEPIPE_COMPILE_SWEEP=1 every family;
  inductor's own kernels take minutes to build on the shared CPU: bench/family_compile.py);
- `lora_dropout: 0` puts no dropout op in LoRA's path (PEFT's nn.Identity).
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Trainer

from tests.fixtures.families import FAMILIES
from tests.test_model_families import config_for, family_dirs, labelled, lora_grads, randomise_lora_b, samples
from tunepipe.config import TrainConfig
from tunepipe.errors import TunepipeError
from tunepipe.train.fast_path import compile_decoder_layers
from tunepipe.train.loss import causal_lm_loss
from tunepipe.train.model.model_setup import build_trainable_model, decoder_layers
from tunepipe.train.optimizers import optimizer_arguments
from tunepipe.train.sft import batch_layout
from tunepipe.train.trainer_setup import training_arguments

__all__ = ["family_dirs"]  # the module-scoped fixture, shared with test_model_families

NAMES = sorted(FAMILIES)
LAYOUTS = ((0, 1, 2, 3, 4), (4, 0, 2), (1, 3))
# The families `make test` compiles (~45 CPU s each on aot_eager here): llama (SmolLM2's plain
# layer, per-sample attention between two graphs) and gemma2 (softcapped eager attention inside the graph)
COMPILE_SUITE = frozenset({"llama", "gemma2"})
COMPILE_SWEEP_ENV = "TUNEPIPE_COMPILE_SWEEP"


def lora_model(layout, **train):
    model = build_trainable_model(config_for(layout, **train), layout)
    randomise_lora_b(model)  # B starts at zero: A would get no gradient
    return model


def padding_free(model, order=(0, 1, 2, 3, 4)) -> dict:
    """The batch `tunepipe train` feeds: padding-free (right-padded rows for Qwen3.5's recurrent layers)."""
    rows = [labelled(ids) for ids in samples()]
    return batch_layout(model, 0)([rows[i] for i in order])


@pytest.mark.parametrize("values, expected", [
    ({}, "adamw_torch_fused"),
    ({"fused_optimizer": False}, "adamw_torch"),
    ({"deepspeed": "ds_z2.json"}, "adamw_torch"),
    ({"accelerate_config": "fsdp.yaml"}, "adamw_torch"),
    ({"optim": "sgd"}, "sgd"),
])
def test_the_default_adamw_is_fused_where_it_applies(values, expected):
    assert optimizer_arguments(TrainConfig(**values)) == {"optim": expected}


@pytest.mark.parametrize("name", NAMES)
def test_fused_adamw_takes_the_per_tensor_loops_step(family_dirs, name):
    layout = family_dirs(name)
    cfg = config_for(layout, learning_rate=1e-2, weight_decay=0.1)
    model = lora_model(layout)
    batch = padding_free(model)
    causal_lm_loss(model, batch).backward()
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_arguments(cfg, layout, False), model)
    assert optimizer_cls is torch.optim.AdamW and kwargs["fused"] is True

    def stepped(optimizer_cls, **settings) -> dict[str, torch.Tensor]:
        params = [torch.nn.Parameter(p.detach().clone()) for _, p in trained]
        for copy, (_, p) in zip(params, trained):
            copy.grad = p.grad.clone()
        optimizer = optimizer_cls(params, **settings)
        optimizer.step()
        optimizer.step()  # the second step reads the moments the first one wrote
        return {n: copy.detach() for (n, _), copy in zip(trained, params)}

    loop = stepped(torch.optim.AdamW, **{**kwargs, "fused": False, "foreach": False})
    fused = stepped(optimizer_cls, **kwargs)
    moved = max((loop[n] - p.detach()).abs().max().item() for n, p in trained)
    assert moved > 1e-3  # the steps did change the weights, so equal updates mean something
    losses = []
    for weights in (loop, fused):
        with torch.no_grad():
            for n, p in trained:
                p.copy_(weights[n])
            losses.append(causal_lm_loss(model, batch))
    for n in loop:
        torch.testing.assert_close(fused[n], loop[n], rtol=0, atol=1e-6, msg=n)
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)


def test_torch_compile_compiles_each_decoder_layer_in_place(family_dirs):
    layout = family_dirs("llama")
    model = build_trainable_model(config_for(layout, torch_compile=True), layout)
    layers = decoder_layers(model)
    assert len(layers) == 2 and all(layer._compiled_call_impl is not None for layer in layers)
    assert not any("_orig_mod" in key for key in model.state_dict())  # saving sees the usual names
    assert training_arguments(config_for(layout, torch_compile=True), layout, False).torch_compile is False


@pytest.mark.parametrize("name", NAMES)
def test_compiled_layers_give_the_eager_loss_and_grads(family_dirs, name):
    """Every family of the table, on aot_eager (dynamo's graphs, AOTAutograd's forward/backward
    split and functionalisation: the regional-compile path; no code generation). Tracing one
    family costs tens of CPU seconds, so `make test` runs COMPILE_SUITE and the rest skips
    unless COMPILE_SWEEP_ENV is set (bench/family_compile.py runs the table with inductor).
    Mixture-of-experts families are refused: exact, but their experts recompile per routing pattern."""
    from torch._dynamo.utils import counters

    if FAMILIES[name].moe():
        with pytest.raises(TunepipeError, match="mixture-of-experts.*routing pattern"):
            build_trainable_model(config_for(family_dirs(name), torch_compile=True), family_dirs(name))
        return
    if name not in COMPILE_SUITE and not os.environ.get(COMPILE_SWEEP_ENV):
        pytest.skip(f"{name}: outside make test's compile subset {sorted(COMPILE_SUITE)}; "
                    f"{COMPILE_SWEEP_ENV}=1 runs it (docs/benchmarks.md)")
    torch._dynamo.reset()
    counters.clear()
    layout = family_dirs(name)
    eager, compiled = lora_model(layout), lora_model(layout)
    assert compile_decoder_layers(decoder_layers(compiled), backend="aot_eager") == 2
    graphs = []
    for order in LAYOUTS:  # three layouts: new lengths, new sample counts
        want_loss = causal_lm_loss(eager, padding_free(eager, order))
        got_loss = causal_lm_loss(compiled, padding_free(compiled, order))
        eager.zero_grad()
        compiled.zero_grad()
        want_loss.backward()
        got_loss.backward()
        torch.testing.assert_close(got_loss, want_loss, rtol=0, atol=1e-5)
        want = lora_grads(eager)
        assert want and all(grad.abs().max() > 0 for grad in want.values())  # every LoRA weight is compared
        for key, grad in lora_grads(compiled).items():
            torch.testing.assert_close(grad, want[key], rtol=0, atol=1e-5, msg=key)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[2] == graphs[1] == graphs[0]  # compiled, and no new graph per layout


@pytest.mark.parametrize("dropout, kind", [(0.0, torch.nn.Identity), (0.1, torch.nn.Dropout)])
def test_no_dropout_op_when_lora_dropout_is_zero(family_dirs, dropout, kind):
    model = build_trainable_model(config_for(family_dirs("llama"), lora_dropout=dropout), family_dirs("llama"))
    modules = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert len(modules) == 14 and all(type(m) is kind for m in modules)  # 7 linears x 2 layers


def test_fused_optimizer_is_a_train_param_of_the_dvc_stage():
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parents[1]
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert "train.fused_optimizer" in stages["train"]["params"]
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["fused_optimizer"] is True
